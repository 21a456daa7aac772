"""perc.demo and perc.demo_report without processes: arguments, files, table, verdict."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from perc import config
from perc import demo as plan
from perc.demo_report import (
    HEADER,
    EndpointOutcome,
    RoleOutcome,
    Screen,
    endpoint_summary,
    fail_lines,
    pass_line,
    sums,
    table_row,
    verdict,
)

NAMES = ("alice", "bob", "carol")


def _report(name: str, peers: dict[str, int], *, ssrc: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "sent": 100,
        "spis": [1, 2, 3],
        "streams": {"audio": {"ssrc": ssrc}},
        "peers": {
            peer: {
                "received": 50,
                "verified": verified,
                "hbh_failures": 0,
                "e2e_failures": 0,
                "payload_failures": 0,
                "key_wait": 0,
                "streams": {"9": {"verified": verified}},
            }
            for peer, verified in peers.items()
        },
        **extra,
    }


def _good_run() -> list[EndpointOutcome]:
    """alice and bob stay; carol leaves (life 1) and rejoins (life 2, SSRC 9)."""
    everyone = dict.fromkeys(NAMES, 40)

    def others(name: str) -> dict[str, int]:
        return {k: v for k, v in everyone.items() if k != name}

    return [
        EndpointOutcome("alice", 1, True, True, 0, None, _report("alice", others("alice"))),
        EndpointOutcome("bob", 1, True, True, 0, None, _report("bob", others("bob"))),
        EndpointOutcome("carol", 1, False, True, 0, None, _report("carol", others("carol"))),
        EndpointOutcome("carol", 2, True, True, 0, None, _report("carol", others("carol"), ssrc=9)),
    ]


REKEYS = {"leave": 4, "rejoin": 5}


def _verdict(endpoints: list[EndpointOutcome], **kw: Any) -> list[str]:
    args: dict[str, Any] = {"leaver": "carol", "rekeys": REKEYS, "interrupted": False}
    args.update(kw)
    return verdict(NAMES, endpoints, **args)


def test_a_good_run_passes() -> None:
    assert _verdict(_good_run(), isolation="key isolation: loaded: none") == []
    assert pass_line("carol", REKEYS).startswith("PASS: every endpoint verified every other")
    assert "(SPI 4, then 5)" in pass_line("carol", REKEYS)


def test_every_problem_of_an_endpoint_is_on_its_line() -> None:
    run = _good_run()
    bad = _report("alice", {"bob": 40, "carol": 0}, unattributed={"e2e_failures": 2})
    bad["peers"]["bob"]["payload_failures"] = 1
    run[0] = EndpointOutcome("alice", 1, True, True, 8, "too few peers", bad)
    assert _verdict(run) == [
        "alice: verified no media from carol; 2 end-to-end failures; 1 payload failures; "
        "verified nothing from the rejoined carol's stream(s) 9"
    ]  # exit 8 is said by "verified no media"


def test_processes_that_never_joined_or_failed() -> None:
    run = _good_run()
    run[1] = EndpointOutcome("bob", 1, True, False, 3, "join refused by the KMF", None)
    run[0] = EndpointOutcome("alice", 1, True, True, 1, None, None)
    assert _verdict(run) == [
        "alice: wrote no report; verified nothing from the rejoined carol's stream(s) 9; "
        "exit 1: no error line",
        "bob: never joined (exit 3: join refused by the KMF)",
    ]


def test_rekeys_rejoin_roles_and_key_isolation() -> None:
    run = _good_run()
    leaver = run[2]
    assert leaver.report is not None
    held = EndpointOutcome("carol", 1, False, True, 0, None, {**leaver.report, "spis": [1, 4]})
    run[2] = held
    failures = _verdict(
        run[:3],
        rekeys={"leave": 4},
        roles=[RoleOutcome("mdd", 1, "address in use"), RoleOutcome("kmf", 0, None)],
        isolation="key isolation: loaded: perc.srtp.ekt",
    )
    assert failures == [
        "carol left, yet holds the EKTKey made for its leave",
        "carol never rejoined",
        "no rekey was seen for the rejoin",
        "perc mdd exited with status 1: address in use",
        "MDD: key isolation: loaded: perc.srtp.ekt",
    ]
    interrupted = _verdict(run[:3], rekeys={"leave": 4}, interrupted=True)
    assert interrupted == ["carol left, yet holds the EKTKey made for its leave"]


def test_table_rows_and_summary_lines() -> None:
    report = _report("alice", {"bob": 40, "carol": 0})
    report["peers"]["bob"]["hbh_failures"] = 3
    row = table_row("alice", "joined", report, None, 2)
    assert row.split() == ["alice", "joined", "1/2", "100", "100", "40", "3", "0", "3"]
    assert len(HEADER.split()) == 9
    assert table_row("bob", "joining", None, 7, 2).split()[2:] == [
        "0/2",
        "0",
        "0",
        "0",
        "0",
        "0",
        "7",
    ]
    assert sums({"peers": {"x": {"verified": True, "received": "9"}}})["verified"] == 0
    ep = EndpointOutcome("alice", 1, True, True, 0, None, report)
    assert endpoint_summary(ep) == (
        "  alice     sent 100; verified/received from bob 40/50, carol 0/50; failures hbh 3 "
        "e2e 0; SPIs 1 > 2 > 3"
    )
    report["unattributed"] = {"e2e_failures": 1, "early": 2, "pre_join": 5, "key_wait": 1}
    line = endpoint_summary(ep)
    assert "; 1 e2e failures on streams that never verified" in line
    assert "; 3 packets arrived before their key did" in line
    assert "; 5 packets sealed before it joined" in line
    assert endpoint_summary(EndpointOutcome("bob", 2, True, False, 5, None, None)) == (
        "  bob#2     never joined"
    )
    assert fail_lines(["one", "two"]) == ["FAIL: one", "      two"]


def test_screen_without_a_terminal_prints_the_header_once() -> None:
    out = io.StringIO()
    times = iter([1.0, 2.0, 3.0])
    screen = Screen(out, tty=False, t0=0.0, clock=lambda: next(times))
    screen.table([HEADER, "row a"])
    screen.table([HEADER, "row b"])
    screen.say("done", stamp=True)
    lines = out.getvalue().splitlines()
    assert lines == [
        " " * 8 + " " + HEADER,
        "[  1.0s] row a",
        "[  2.0s] row b",
        "[  3.0s] done",
    ]


def test_screen_on_a_terminal_redraws_the_table_in_place() -> None:
    out = io.StringIO()
    screen = Screen(out, tty=True, t0=0.0, clock=lambda: 0.0)
    screen.table([HEADER, "row"])
    screen.say("event")
    assert out.getvalue() == f"{HEADER}\nrow\n\x1b[2F\x1b[Jevent\n{HEADER}\nrow\n"
    screen.freeze()
    screen.say("after")
    assert out.getvalue().endswith("row\nafter\n")


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ((3, 12.0, "both", None), None),
        ((1, 12.0, "both", None), "--participants: a conference here has 2 to 26 participants"),
        ((27, 12.0, "both", None), "--participants"),
        ((3, 3.9, "both", None), "--duration: at least 4 seconds"),
        ((3, float("inf"), "both", None), "--duration"),
        ((3, 12.0, "none", None), "--media: one of audio, video, both"),
        ((3, 12.0, "both", "chaos"), "PERC_DEMO_FAULT: only 'outsider' is known, not 'chaos'"),
    ],
)
def test_arguments(args: tuple[int, float, str, str | None], problem: str | None) -> None:
    found = plan.check_arguments(*args)
    assert found == problem if problem is None else (found or "").startswith(problem)


def test_names_in_prose() -> None:
    assert [plan.join_names(n) for n in ([], ["a"], ["a", "b"], ["a", "b", "c"])] == [
        "nobody", "a", "a and b", "a, b and c",
    ]  # fmt: skip


def test_endpoint_arguments_are_a_valid_perc_endpoint_command(tmp_path: Path) -> None:
    files = plan.make_demo_files(tmp_path, NAMES)
    args = plan.endpoint_arguments(
        files, "bob", mdd_port=5004, media="both", report=tmp_path / "bob.json", duration=6.0
    )
    assert args[0] == "endpoint"
    options = dict(zip(args[1::2], args[2::2], strict=True))
    kinds = {"join_timeout": float, "duration": float, "expect_peers": int}
    values = {k.removeprefix("--").replace("-", "_"): v for k, v in options.items()}
    cfg = config.endpoint_config(**{k: kinds.get(k, str)(v) for k, v in values.items()})
    assert cfg.name == "bob" and cfg.media == "both" and cfg.mdd.port == 5004
    assert options["--expect-peers"] == "2" and options["--duration"] == "6.000"
    assert "--duration" not in plan.endpoint_arguments(
        files, "bob", mdd_port=1, media="audio", report=tmp_path / "r.json", duration=None
    )
