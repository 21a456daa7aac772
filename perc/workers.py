"""MDD workers (D27), sans-IO: the plan a supervisor hands each worker, the worker mesh's
links, and the supervisor's restart policy.

API::

    plan = WorkerPlan(index, count, parent_fd, {conference: ConferencePlan(...)})
    text = plan.to_json();  WorkerPlan.from_json(text)     # WorkerPlanError on bad text
    mesh_links(plan, conference, fingerprint) -> [LinkSpec]  # one per other worker
    policy = RestartPolicy();  policy.started(index, now)
    policy.exited(index, now, returncode) -> float | None    # restart delay; None: give up

Theory of operation
-------------------
``perc mdd`` with ``[mdd] workers = N`` (N > 1) is a *supervisor*: it binds every socket
itself and starts N copies of itself as *workers*, each told by a :class:`WorkerPlan` which
inherited file descriptors are its own.

* **The conference port.** Per conference the supervisor binds N UDP sockets to the listen
  address with ``SO_REUSEPORT``; worker *i* reads and sends on socket *i*. The kernel picks
  the socket for a datagram by a hash of its addresses, so one remote address always reaches
  the same worker. The supervisor keeps every socket open for its whole life, so the
  group of sockets never changes: a worker that dies and is restarted gets the same socket,
  and the same remote addresses, back (the kernel's hash would move some addresses to
  another worker if a socket left the group). Datagrams that arrive while a worker is down
  wait in its socket's buffer; its endpoints, whose associations died with it, join again by
  themselves (D30).
* **The mesh.** Per conference each worker also gets a private UDP socket on loopback (the
  supervisor's too, so its port never changes). Worker *i* has a D25 link to every other
  worker *j* whose peer is *j*'s private address; datagrams for that peer leave from *i*'s
  private socket, so they arrive from the address *j* knows as *i*. The lower index dials.
  The links pin the MDD's own certificate (every worker has it) and share the split-horizon
  group :data:`MESH_GROUP`: media from one worker goes to every other worker once, and a
  worker forwards what it got over the mesh only to its own endpoints and to external links.
* **Restarts.** :class:`RestartPolicy`: a worker that exits is restarted after
  :data:`RESTART_MIN` seconds, doubling for each exit up to :data:`RESTART_MAX`; a worker
  that ran :data:`STABLE_AFTER` seconds starts again from the shortest delay. A worker that
  exits with status 2 (its configuration was refused) is not restarted: the supervisor stops.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from perc.links import LinkSpec

__all__ = [
    "MESH_GROUP",
    "MESH_HOST",
    "RESTART_MAX",
    "RESTART_MIN",
    "STABLE_AFTER",
    "ConferencePlan",
    "RestartPolicy",
    "WorkerPlan",
    "WorkerPlanError",
    "mesh_links",
]

#: Split-horizon group of the worker mesh links (D26/D27).
MESH_GROUP = "workers"
#: Where the mesh sockets are bound.
MESH_HOST = "127.0.0.1"
RESTART_MIN = 0.1
"""Seconds before the first restart of a worker that exited, doubling ..."""
RESTART_MAX = 10.0
"""... up to this."""
STABLE_AFTER = 30.0
"""A worker that ran this long is restarted after RESTART_MIN again."""
#: The exit status of a refused configuration (never worth a restart).
CONFIG_EXIT = 2


class WorkerPlanError(ValueError):
    """A worker plan that does not parse (the one error of :meth:`WorkerPlan.from_json`)."""


@attrs.frozen
class ConferencePlan:
    """One conference as a worker sees it."""

    listen_fd: int
    """The worker's SO_REUSEPORT socket on the conference's listen address."""
    mesh_fd: int
    """The worker's private loopback socket for the mesh."""
    mesh: tuple[tuple[str, int], ...]
    """Every worker's private address, by index (this worker's included)."""


@attrs.frozen
class WorkerPlan:
    """What the supervisor tells worker ``index`` of ``count``."""

    index: int
    count: int
    parent_fd: int
    """Read end of a pipe the supervisor holds open: end of file means it is gone."""
    conferences: dict[str, ConferencePlan]

    def to_json(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "count": self.count,
                "parent_fd": self.parent_fd,
                "conferences": {
                    cid: {"listen_fd": c.listen_fd, "mesh_fd": c.mesh_fd, "mesh": c.mesh}
                    for cid, c in self.conferences.items()
                },
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> WorkerPlan:
        try:
            data = json.loads(text)
            confs: dict[str, ConferencePlan] = {}
            for cid, c in data["conferences"].items():
                mesh = tuple((str(h), _int(p)) for h, p in c["mesh"])
                confs[str(cid)] = ConferencePlan(_int(c["listen_fd"]), _int(c["mesh_fd"]), mesh)
            plan = cls(_int(data["index"]), _int(data["count"]), _int(data["parent_fd"]), confs)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise WorkerPlanError(f"bad worker plan: {e}") from None
        if not 0 <= plan.index < plan.count:
            raise WorkerPlanError(f"bad worker plan: index {plan.index} of {plan.count}")
        for cid, c in plan.conferences.items():
            if len(c.mesh) != plan.count:
                raise WorkerPlanError(
                    f"bad worker plan: conference {cid}: {len(c.mesh)} mesh ports"
                )
        return plan


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not an integer")
    return value


def mesh_links(plan: WorkerPlan, conference: str, fingerprint: str) -> list[LinkSpec]:
    """The D25 links of worker ``plan.index`` to the other workers of ``conference``: peers
    are their private addresses, ``fingerprint`` is the MDD's own certificate, the lower
    index dials, and all share :data:`MESH_GROUP`."""
    mesh = plan.conferences[conference].mesh
    me = plan.index
    return [
        LinkSpec(
            peer=peer,
            fingerprint=fingerprint,
            connect=me < j,
            name=f"worker{me}>worker{j}",
            group=MESH_GROUP,
        )
        for j, peer in enumerate(mesh)
        if j != me
    ]


@attrs.define
class _Slot:
    started: float = 0.0
    delay: float = RESTART_MIN
    restarts: int = 0


class RestartPolicy:
    """When to restart a worker that exited (see the module docstring)."""

    def __init__(self, minimum: float = RESTART_MIN, maximum: float = RESTART_MAX) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self._slots: dict[int, _Slot] = {}

    def started(self, index: int, now: float) -> None:
        slot = self._slots.setdefault(index, _Slot(delay=self.minimum))
        slot.started = now

    def restarts(self, index: int) -> int:
        """How often worker ``index`` was restarted."""
        slot = self._slots.get(index)
        return 0 if slot is None else slot.restarts

    def exited(self, index: int, now: float, returncode: int | None) -> float | None:
        """Worker ``index`` exited with ``returncode`` (negative: killed by that signal): the
        delay before its restart, or None when it must not be restarted."""
        if returncode == CONFIG_EXIT:
            return None
        slot = self._slots.setdefault(index, _Slot(started=now, delay=self.minimum))
        if now - slot.started >= STABLE_AFTER:
            slot.delay = self.minimum
        delay = slot.delay
        slot.delay = min(slot.delay * 2, self.maximum)
        slot.restarts += 1
        return delay
