"""Real processes: ``perc kmf`` and ``perc mdd`` through the CLI, stopped by signals."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from perc.roles.demo import DemoFiles, make_demo_files, write_mdd_config

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
    children: list[Child] = []
    try:
        await _run_kmf_and_mdd(files, signum, children)
    finally:
        # A failing assertion must not leave a role running after the test.
        for child in children:
            if child.process.returncode is None:
                child.process.kill()
                await child.process.wait()


async def _run_kmf_and_mdd(files: DemoFiles, signum: signal.Signals, children: list[Child]) -> None:
    async with trio.open_nursery() as nursery:
        kmf = await start(nursery, "kmf", "--config", str(files.kmf_config))
        children.append(kmf)
        await kmf.wait_for("KMF listening on")
        # The KMF listens on a kernel-chosen port: read it from its log line.
        match = re.search(r"KMF listening on [^\s]*:(\d+)", kmf.text)
        assert match is not None, kmf.text
        mdd_config = write_mdd_config(files, int(match.group(1)))
        mdd = await start(nursery, "--log-level", "debug", "mdd", "--config", str(mdd_config))
        children.append(mdd)
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


# `perc demo` itself is tested in tests/system/test_demo.py.
