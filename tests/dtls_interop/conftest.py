"""Shared fixtures for the DTLS interop, lossy-network and robustness tests."""

from __future__ import annotations

import pytest

from perc import identity
from perc.identity import Identity


@pytest.fixture(scope="session")
def client_identity() -> Identity:
    return identity.generate("endpoint")


@pytest.fixture(scope="session")
def server_identity() -> Identity:
    return identity.generate("kmf")
