"""Joining for real: ``perc kmf``, ``perc mdd`` and ``perc endpoint`` processes on loopback.

Each test builds its own identities and configs (tests/system/conftest.py) and reads what
happened from the processes' logs and exit statuses. Keys are compared through the one-way
digests the roles log (``perc.roles.endpoint.key_digest``), never printed.
"""

from __future__ import annotations

import pytest

from tests.system.conftest import System

pytestmark = pytest.mark.slow


async def test_mdd_not_trusted_endpoints_fail_with_a_clear_message(system: System) -> None:
    kmf, kmf_port = await system.start_kmf(system.kmf_config(trusted_mdds=["other-mdd"]))
    mdd, mdd_port = await system.start_mdd(system.mdd_config("mdd", kmf_port), wait_tunnel=False)
    # The KMF refuses the MDD's certificate: no tunnel, the MDD keeps retrying.
    await kmf.wait_for(r"tunnel refused peer=")
    await mdd.wait_for(r"tunnel (connect failed|down) conference=demo")
    alice = await system.start_endpoint("alice", mdd_port, "--join-timeout", "1.5")
    assert await alice.wait_exit() == 5
    assert alice.error_line.startswith(
        f"perc: error: join timed out after 1.5 s through the MDD at 127.0.0.1:{mdd_port}: "
    )
    assert "tunnel to the KMF up" in alice.error_line
    assert "Traceback" not in alice.text
    assert not mdd.find("tunnel up")
