"""Real processes: ``perc kmf`` and ``perc mdd`` through the CLI, stopped by signals."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from perc.roles.demo import make_demo_files

pytestmark = pytest.mark.slow


class Child:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.text = ""
        self.changed = trio.Event()

    async def pump(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.text += chunk.decode(errors="replace")
            self.changed.set()
            self.changed = trio.Event()
        self.changed.set()

    async def wait_for(self, needle: str) -> None:
        # Event-driven: wakes on each chunk of the child's log, no polling.
        with trio.fail_after(30):
            while needle not in self.text:
                assert self.process.returncode is None, self.text
                await self.changed.wait()


async def start(nursery: trio.Nursery, *args: str) -> Child:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "perc", *args], stderr=subprocess.PIPE
    )
    child = Child(process)
    nursery.start_soon(child.pump)
    return child


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_kmf_and_mdd_processes(tmp_path: Path, signum: signal.Signals) -> None:
    files = make_demo_files(tmp_path)
    async with trio.open_nursery() as nursery:
        kmf = await start(nursery, "kmf", "--config", str(files.kmf_config))
        await kmf.wait_for("KMF listening")
        mdd = await start(nursery, "--log-level", "debug", "mdd", "--config", str(files.mdd_config))
        await mdd.wait_for("tunnel up conference=demo")
        await kmf.wait_for("tunnel up peer=")
        mdd.process.send_signal(signum)
        with trio.fail_after(30):
            assert await mdd.process.wait() == 0, mdd.text
        # The stopping MDD closed its tunnel with a TLS close_notify.
        await kmf.wait_for("peer closed the tunnel (close_notify)")
        kmf.process.send_signal(signum)
        with trio.fail_after(30):
            assert await kmf.process.wait() == 0, kmf.text
    assert f"stopping on {signum.name}" in mdd.text
    assert f"stopping on {signum.name}" in kmf.text
    assert "Traceback" not in kmf.text + mdd.text


async def test_demo_command() -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "perc", "demo"], capture_stdout=True, capture_stderr=True
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "tunnel up between MDD and KMF" in out
    assert "reached the KMF through the tunnel" in out
    assert "Not yet" in out
