"""Real processes: ``perc kmf`` and ``perc mdd`` through the CLI, stopped by signals."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from perc.demo import DemoFiles, make_demo_files, write_mdd_config
from perc.events import KmfTunnelDown, KmfTunnelUp, Listening, MddTunnelUp
from tests.procs import Proc

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_kmf_and_mdd_processes(tmp_path: Path, signum: signal.Signals) -> None:
    files = make_demo_files(tmp_path)
    children: list[Proc] = []
    try:
        await _run_kmf_and_mdd(files, signum, children)
    finally:
        # A failing assertion must not leave a role running after the test.
        for child in children:
            await child.kill_and_reap()


async def _run_kmf_and_mdd(files: DemoFiles, signum: signal.Signals, children: list[Proc]) -> None:
    async with trio.open_nursery() as nursery:
        kmf = await Proc.start(nursery, "kmf", "kmf", "--config", str(files.kmf_config))
        children.append(kmf)
        # The KMF listens on a kernel-chosen port: read it from its listening event.
        listening = await kmf.wait_event(Listening, timeout=30, what="tunnel")
        mdd_config = write_mdd_config(files, listening.port)
        mdd = await Proc.start(nursery, "mdd", "mdd", "--config", str(mdd_config))
        children.append(mdd)
        await mdd.wait_event(MddTunnelUp, timeout=30, conference="demo")
        up = await kmf.wait_event(KmfTunnelUp, timeout=30)
        mdd.signal(signum)
        assert await mdd.wait_exit(30) == 0, mdd.text
        # The stopping MDD closed its tunnel with a TLS close_notify.
        down = await kmf.wait_event(KmfTunnelDown, timeout=30, tunnel=up.tunnel)
        assert down.reason == "peer closed the tunnel (close_notify)", down
        assert not down.refused
        kmf.signal(signum)
        assert await kmf.wait_exit(30) == 0, kmf.text
        nursery.cancel_scope.cancel()
    assert f"stopping on {signum.name}" in mdd.text
    assert f"stopping on {signum.name}" in kmf.text
    assert "Traceback" not in kmf.text + mdd.text


# `perc demo` itself is tested in tests/system/test_demo.py.
