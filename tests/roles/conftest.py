"""Fixtures for the role tests: identities, configs built without files, a mock clock.

The tests run real loopback TLS and UDP inside one trio process under a ``MockClock`` that
jumps only after 30 ms of real idleness: loopback data sent in-process is already in the
receiver's socket buffer, so the jump never outruns I/O, while timeouts, backoffs and the
idle timeout pass in virtual time.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from trio.testing import MockClock

from perc import identity


@pytest.fixture(scope="session")
def ids() -> SimpleNamespace:
    return SimpleNamespace(
        kmf=identity.generate("kmf"),
        mdd=identity.generate("mdd"),
        mdd2=identity.generate("mdd2"),
        stranger=identity.generate("stranger"),
    )


@pytest.fixture
def clock() -> MockClock:
    return MockClock(autojump_threshold=0.03)
