"""D27 workers without processes: the plan a worker gets, the mesh's links, the restart
policy, ``[mdd] workers`` and ``--workers`` (config and usage errors exit 2)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from perc import config
from perc.cli import main
from perc.config import ConfigError
from perc.workers import (
    MESH_GROUP,
    RESTART_MAX,
    RESTART_MIN,
    STABLE_AFTER,
    ConferencePlan,
    RestartPolicy,
    WorkerPlan,
    WorkerPlanError,
    mesh_links,
)

from .test_config import ids, mdd_toml  # noqa: F401 (the fixture)

FP = "sha-256 " + ":".join(["AB"] * 32)


def plan(index: int = 0, count: int = 3) -> WorkerPlan:
    mesh = tuple(("127.0.0.1", 40000 + i) for i in range(count))
    return WorkerPlan(index, count, 3, {"demo": ConferencePlan(5, 6, mesh)})


def test_a_plan_goes_through_json() -> None:
    p = plan(1)
    assert WorkerPlan.from_json(p.to_json()) == p


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        "{}",
        '{"index": 0, "count": 1, "parent_fd": 3, "conferences": []}',
        '{"index": "0", "count": 1, "parent_fd": 3, "conferences": {}}',
        '{"index": true, "count": 1, "parent_fd": 3, "conferences": {}}',
        '{"index": 1, "count": 1, "parent_fd": 3, "conferences": {}}',
        '{"index": 0, "count": 2, "parent_fd": 3, "conferences": {"d": '
        '{"listen_fd": 4, "mesh_fd": 5, "mesh": [["127.0.0.1", 1]]}}}',
        '{"index": 0, "count": 1, "parent_fd": 3, "conferences": {"d": '
        '{"listen_fd": 4, "mesh_fd": 5, "mesh": [1]}}}',
    ],
)
def test_a_bad_plan_is_one_error(text: str) -> None:
    with pytest.raises(WorkerPlanError) as e:
        WorkerPlan.from_json(text)
    assert str(e.value).startswith("bad worker plan: ")


def test_the_mesh_links_every_other_worker_once_and_the_lower_index_dials() -> None:
    for me in range(3):
        links = mesh_links(plan(me), "demo", FP)
        assert [link.peer for link in links] == [
            ("127.0.0.1", 40000 + j) for j in range(3) if j != me
        ]
        for link in links:
            j = link.peer[1] - 40000
            assert link.connect == (me < j)
            assert link.fingerprint == FP and link.group == MESH_GROUP
            assert link.name == f"worker{me}>worker{j}"


def test_restarts_back_off_and_reset_after_a_stable_run() -> None:
    policy = RestartPolicy()
    policy.started(0, 0.0)
    delays = []
    now = 0.0
    for _ in range(10):
        delay = policy.exited(0, now, -9)
        assert delay is not None
        delays.append(delay)
        now += delay
        policy.started(0, now)
    assert delays[0] == RESTART_MIN and delays[1] == 2 * RESTART_MIN
    assert max(delays) == RESTART_MAX == delays[-1]
    assert policy.restarts(0) == 10 and policy.restarts(1) == 0
    # A worker that ran long enough starts over from the shortest delay.
    assert policy.exited(0, now + STABLE_AFTER, 1) == RESTART_MIN
    # Another worker has its own schedule; a refused configuration is not restarted.
    assert policy.exited(1, now, -9) == RESTART_MIN
    assert policy.exited(1, now, 2) is None


def test_workers_in_the_config(ids: dict[str, Any]) -> None:  # noqa: F811
    data = tomllib.loads(mdd_toml(ids))
    assert config.build_mdd_config(data, base=ids["dir"]).mdd.workers == 1
    data["mdd"]["workers"] = 4
    cfg = config.build_mdd_config(data, base=ids["dir"])
    assert cfg.mdd.workers == 4
    assert config.with_workers(cfg, 2).mdd.workers == 2


@pytest.mark.parametrize(
    ("workers", "link", "message"),
    [
        (0, False, "mdd.workers: must be >= 1, got 0"),
        (-1, False, "mdd.workers: must be >= 1, got -1"),
        (
            2,
            True,
            "mdd.workers: 2 workers cannot serve conference 'demo': its [[conference.link]] "
            "needs a single MDD process (workers = 1)",
        ),
    ],
)
def test_bad_workers(ids: dict[str, Any], workers: int, link: bool, message: str) -> None:  # noqa: F811
    data = tomllib.loads(mdd_toml(ids))
    data["mdd"]["workers"] = workers
    if link:
        data["conference"][0]["link"] = [
            {"peer": "127.0.0.1:7000", "fingerprint": FP, "connect": True}
        ]
    with pytest.raises(ConfigError) as e:
        config.build_mdd_config(data, base=ids["dir"])
    assert str(e.value) == message


@pytest.mark.parametrize("value", ["0", "-3"])
def test_workers_option_below_one_exits_2(
    ids: dict[str, Any],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    value: str,
) -> None:
    import perc.cli

    started: list[object] = []
    monkeypatch.setattr(perc.cli, "_run_role", lambda *a: started.append(a))
    path = ids["dir"] / "mdd-workers.toml"
    path.write_text(mdd_toml(ids))
    result = CliRunner().invoke(main, ["mdd", "--config", str(path), "--workers", value])
    assert result.exit_code == 2
    assert result.stderr == f"perc: error: --workers: must be >= 1, got {value}\n"
    assert started == []


def test_a_bad_worker_plan_exits_2(
    ids: dict[str, Any],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import perc.cli

    started: list[object] = []
    monkeypatch.setattr(perc.cli, "_run_role", lambda *a: started.append(a))
    path = ids["dir"] / "mdd-workers.toml"
    path.write_text(mdd_toml(ids))
    other = WorkerPlan(0, 1, 3, {"other": ConferencePlan(4, 5, (("127.0.0.1", 1),))})
    for text, error in (
        ("{", "bad worker plan: "),
        (other.to_json(), "bad worker plan: conferences demo, other do not match"),
    ):
        result = CliRunner().invoke(main, ["mdd", "--config", str(path), "--worker-plan", text])
        assert result.exit_code == 2
        assert result.stderr.startswith(f"perc: error: {error}"), result.stderr
    assert started == []


def test_one_worker_runs_the_mdd_itself(
    ids: dict[str, Any],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """workers = 1 (the default) is the MDD as before: no supervisor."""
    import perc.cli
    from perc.roles import mdd

    started: list[Any] = []
    monkeypatch.setattr(perc.cli, "_run_role", lambda *a: started.append(a))
    path = ids["dir"] / "mdd-workers.toml"
    path.write_text(mdd_toml(ids))
    result = CliRunner().invoke(main, ["mdd", "--config", str(path), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert started[0][0] is mdd.serve


@pytest.mark.parametrize("extra", [["--metrics", "127.0.0.1:0"], []])
def test_workers_with_metrics_or_an_admin_socket_exit_2(
    ids: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
) -> None:
    """Every worker would bind the metrics port and the admin socket: refused, one line."""
    import perc.cli

    started: list[object] = []
    monkeypatch.setattr(perc.cli, "_run_role", lambda *a: started.append(a))
    path = ids["dir"] / "mdd-workers-ops.toml"
    text = mdd_toml(ids)
    if not extra:
        text = text.replace("[mdd]\n", '[mdd]\nadmin_socket = "mdd.sock"\n', 1)
    path.write_text(text)
    result = CliRunner().invoke(main, ["mdd", "--config", str(path), "--workers", "2", *extra])
    assert result.exit_code == 2, result.output
    assert "cannot be combined with mdd.metrics or mdd.admin_socket" in result.stderr
    assert started == []
