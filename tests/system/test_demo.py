"""``perc demo``: a whole conference in real processes, judged by the demo itself.

The demo prints what happened (joins, the leave, the rekeys, the rejoin), a per-endpoint
summary taken from each endpoint's ``--report`` and a verdict; these tests run it as a user
would and check that output and the exit status, including a run that must fail (an
endpoint whose certificate is not on the KMF's roster).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from perc import config, identity
from perc import demo as plan
from perc.roles import demo

pytestmark = pytest.mark.slow

NAMES = ("alice", "bob", "carol")


async def _run_demo(*options: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "perc", "demo", *options],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    out = result.stdout.decode()
    return result.returncode, out + "\n--- stderr ---\n" + result.stderr.decode()


def _summary(out: str, label: str) -> tuple[dict[str, tuple[int, int]], int, int]:
    """From the demo's summary line of ``label``: {peer: (verified, received)}, hbh, e2e."""
    m = re.search(
        rf"^  {re.escape(label)}\s+sent \d+; verified/received from (.*?); "
        r"failures hbh (\d+) e2e (\d+);",
        out,
        re.MULTILINE,
    )
    assert m is not None, f"no summary line for {label}:\n{out}"
    peers = {name: (int(v), int(r)) for name, v, r in re.findall(r"(\w+) (\d+)/(\d+)", m.group(1))}
    return peers, int(m.group(2)), int(m.group(3))


def _folder(out: str) -> Path:
    m = re.search(r"throwaway identities and configs in (\S+):", out)
    assert m is not None, out
    return Path(m.group(1))


async def test_demo_conference_with_leave_rekey_and_rejoin() -> None:
    code, out = await _run_demo("--duration", "6")
    assert code == 0, out
    assert "PASS: every endpoint verified every other end to end" in out, out
    for name in NAMES:
        assert f"{name} joined in " in out, out
    # Everyone on the KMF's key after the joins, then a new key for the leave and the rejoin.
    joined = re.search(r"alice, bob and carol hold SPI (\d+)", out)
    leave = re.search(r"rekey after the leave: new EKTKey SPI (\d+), sent to alice and bob", out)
    rejoin = re.search(r"KMF rekey for the rejoin: new EKTKey SPI (\d+)", out)
    assert joined and leave and rejoin, out
    assert len({joined.group(1), leave.group(1), rejoin.group(1)}) == 3, out
    assert "carol leaves (SIGTERM: RTCP BYE, then DTLS close_notify)" in out
    assert "carol's process exited with status 0" in out
    assert "carol joined again (a new process, same identity)" in out
    # The live table (plain lines without a terminal) shows everyone verifying both others.
    for name in ("alice", "bob", "carol", "carol#2"):
        assert re.search(rf"\] {re.escape(name)}\s+(joined|rejoined)\s+2/2 ", out), out
    # Every endpoint process (carol's two lives included) verified every other participant,
    # with no hop-by-hop or end-to-end failure.
    for label in ("alice", "bob", "carol", "carol#2"):
        peers, hbh, e2e = _summary(out, label)
        me = label.split("#")[0]
        assert set(peers) == set(NAMES) - {me}, (label, out)
        assert all(v > 0 for v, _ in peers.values()), (label, out)
        assert (hbh, e2e) == (0, 0), (label, out)
    assert "MDD       no end-to-end code was ever loaded in the MDD process" in out
    assert "FAIL" not in out
    assert not _folder(out).exists()  # cleaned up


async def test_demo_fails_when_an_endpoint_is_not_on_the_roster() -> None:
    code, out = await _run_demo("--duration", "4", env={"PERC_DEMO_FAULT": "outsider"})
    assert code == 1, out
    assert "alice's certificate is NOT on the KMF's roster" in out
    assert "roster of conference 'demo': bob, carol;" in out
    assert (
        "FAIL: alice: never joined (exit 3: join refused by the KMF: fatal alert access_denied"
        in out
    ), out
    for name in ("bob", "carol", "carol#2"):
        assert f"{name}: verified no media from alice" in out, out
    assert "PASS" not in out
    assert not _folder(out).exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"participants": 1}, "--participants"),
        ({"participants": len(plan.NAMES) + 1}, "--participants"),
        ({"duration": 1.0}, "--duration"),
        ({"duration": float("nan")}, "--duration"),
        ({"media": "none"}, "--media"),
        ({"fault": "tamper"}, "PERC_DEMO_FAULT"),
    ],
)
def test_demo_refuses_bad_arguments(
    kwargs: dict[str, object], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main(**kwargs) == 2  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert err.startswith(f"perc: error: {message}"), err


def test_demo_files_make_a_loadable_conference(tmp_path: Path) -> None:
    files = plan.make_demo_files(tmp_path, NAMES, outsiders=("alice",))
    kmf = config.load_kmf_config(files.kmf_config)
    assert kmf.kmf.listen.port == 0  # the kernel picks; the demo reads its listening event
    assert [str(fp) for fp in kmf.kmf.trusted_mdds] == [files.mdd_fingerprint]
    (conf,) = kmf.conferences
    roster = {
        identity.load(tmp_path / f"{n}.crt", tmp_path / f"{n}.key").fingerprint
        for n in ("bob", "carol")
    }
    assert {str(fp) for fp in conf.participants} == roster  # alice left off (the fault)
    assert (conf.rekey_on_join, conf.rekey_on_leave) == (True, True)
    assert conf.rekey_window == plan.REKEY_WINDOW
    assert files.on_roster == ("bob", "carol")
    mdd = config.load_mdd_config(plan.write_mdd_config(files, 4321))
    (mconf,) = mdd.conferences
    assert (mconf.kmf.port, str(mconf.kmf_fingerprint)) == (4321, files.kmf_fingerprint)
    assert mconf.listen.port == 0


async def test_a_child_that_ignores_sigterm_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "STOP_GRACE", 0.3)
    script = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    child = demo._Child("stubborn", process, tmp_path / "stubborn.log", 0.0)
    try:
        async with trio.open_nursery() as nursery:
            ready = trio.Event()

            def changed() -> None:
                if child.find("ready") is not None:
                    ready.set()

            nursery.start_soon(child.pump, changed)
            with trio.fail_after(20):
                await ready.wait()
            assert await demo._stop(child) == -signal.SIGKILL
            assert not child.running
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()
    assert (tmp_path / "stubborn.log").read_text() == "ready\n"
