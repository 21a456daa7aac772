"""MDD workers (D27), sans-IO: the plan a supervisor hands each worker, the worker mesh's
links, which worker runs each external link and the BPF program that steers its peer's
datagrams there, and the supervisor's restart policy.

API::

    plan = WorkerPlan(index, count, parent_fd, {conference: ConferencePlan(...)})
    text = plan.to_json();  WorkerPlan.from_json(text)     # WorkerPlanError on bad text
    mesh_links(plan, conference, fingerprint) -> [LinkSpec]  # one per other worker
    link_owners(count, links, first) -> [int]                 # external link k -> a worker
    owned_links(plan, conference) -> [LinkSpec]               # the external links it runs
    links_elsewhere(plan, conference) -> [peer]               # ... and those it does not
    steering_program([(peer, owner)]) -> bytes                # classic BPF for the group
    gso_runs([datagram]) -> [(buffer, segment size)]          # mesh batches (UDP GSO)
    gso_control(size) -> (level, type, data)                  # the send's control message
    gro_segments(buffer, ancillary) -> [datagram]              # one coalesced receive (GRO)
    policy = RestartPolicy();  policy.started(index, now)
    policy.exited(index, now, returncode) -> float | None    # restart delay; None: give up

Theory of operation
-------------------
``perc mdd`` with ``[mdd] workers = N`` (N > 1) is a *supervisor*: it binds every socket
itself and starts N copies of itself as *workers*, each told by a :class:`WorkerPlan` which
inherited file descriptors are its own.

* **The conference port.** Per conference the supervisor binds N UDP sockets to the listen
  address with ``SO_REUSEPORT``; worker *i* reads and sends on socket *i*. The kernel picks
  the socket for a datagram by a hash of its addresses (a link peer's: see *Steering*), so
  one remote address always reaches the same worker. The supervisor keeps every socket open
  for its whole life, so the group of sockets never changes: a worker that dies and is
  restarted gets the same socket, and the same remote addresses, back (the kernel's hash
  would move some addresses to another worker if a socket left the group). Datagrams that
  arrive while a worker is down wait in its socket's buffer; its endpoints, whose
  associations died with it, join again by themselves (D30).
* **The mesh.** Per conference each worker also gets a private UDP socket on loopback (the
  supervisor's too, so its port never changes). Worker *i* has a D25 link to every other
  worker *j* whose peer is *j*'s private address; datagrams for that peer leave from *i*'s
  private socket, so they arrive from the address *j* knows as *i*. The lower index dials.
  The links pin the MDD's own certificate (every worker has it) and share the split-horizon
  group :data:`MESH_GROUP`: media from one worker goes to every other worker once, and a
  worker forwards what it got over the mesh only to its own endpoints and to external links.
* **External links.** Each ``[[conference.link]]`` of a conference is run by exactly one
  worker, its *owner* (:func:`link_owners`: link *k* by worker *(first + k) mod N*, where
  *first* counts the links of the conferences before, so several conferences spread their
  links over the workers). Only the owner adds the link to its engine; it sends the link's
  datagrams from its socket of the group, so they leave from the conference port the peer
  has configured, and nothing changes for the peer. The peer's datagrams must reach the owner
  whatever the hash says: the supervisor attaches :func:`steering_program` to the group.
  What the owner gets over an external link goes to its endpoints, to the mesh and to its
  other external links; what a worker gets over the mesh goes to its endpoints and to the
  external links it owns (D26's split horizon with the mesh's group): every stream crosses
  every external link once, from its owner.
* **Steering** (:func:`steering_program`). A classic BPF program attached to a reuseport
  group with ``SO_ATTACH_REUSEPORT_CBPF`` returns the index of the socket that gets a
  datagram; the socket array is in join order (the supervisor binds socket *i* *i*-th and never
  closes one, so index *i* is worker *i*'s socket). The kernel runs it on the UDP payload
  (``reuseport_select_sock`` -> ``run_bpf_filter`` in net/core/sock_reuseport.c pulls the
  UDP header first), so the program reads the IP and UDP headers at negative offsets from
  :data:`SKF_NET_OFF` (the network header). A datagram whose source address and port are a
  link peer's gets its owner's index; any other gets :data:`STEER_BY_HASH`:
  ``run_bpf_filter`` returns no socket for an index >= the number of sockets, and
  ``reuseport_select_sock`` then falls back to ``reuseport_select_sock_by_hash``, the same
  hash as without a program (endpoints land exactly as before). (Read in Linux's
  net/core/sock_reuseport.c, the same since the option came in 4.5; the tests run the
  program on the kernel at hand.) The program belongs to the group, not to a worker, so a
  worker's restart does not touch it. The program handles IPv4 (any
  header length) and IPv6 whose fixed header is followed directly by UDP; an IPv4 peer of an
  IPv6 socket (``::ffff:a.b.c.d``) is matched in the IPv4 part. An IPv6 datagram with
  extension headers is steered by the hash; if it reaches a worker that does not run the
  link, that worker drops the peer's DTLS (:func:`links_elsewhere`, counted) rather than
  take it for an endpoint's join. (A load the kernel cannot make ends a classic
  program with 0, socket 0: the headers the program reads are in the linear part of every
  UDP packet the socket lookup sees, so this does not happen.)
* **Mesh batches.** Every packet a worker's endpoints send crosses the mesh once per other
  worker, and a crossing costs a send and a receive system call besides its crypto (on
  loopback about 8 us, as much as a whole delivery). So a worker holds the SRTP and SRTCP it
  has for a mesh peer until the end of the batch of datagrams it is handling (at most
  :data:`MESH_BATCH`), and sends them with Linux's UDP segmentation offload (``UDP_SEGMENT``,
  :func:`gso_runs`): one system call carries several datagrams, each still its own UDP
  datagram with its own SRTP packet (what the link protocol needs; a GSO send segments
  exactly as separate sends would). The receiving worker asks for them coalesced
  (``UDP_GRO``) and splits them again by the segment size the kernel reports
  (:func:`gro_segments`). Nothing changes on the wire or in the engines; DTLS (the links'
  handshakes and keepalives) is never held. A kernel without GSO or GRO gets plain sends.
* **Restarts.** :class:`RestartPolicy`: a worker that exits is restarted after
  :data:`RESTART_MIN` seconds, doubling for each exit up to :data:`RESTART_MAX`; a worker
  that ran :data:`STABLE_AFTER` seconds starts again from the shortest delay. A worker that
  exits with status 2 (its configuration was refused) is not restarted: the supervisor stops.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from collections.abc import Sequence
from typing import Any

import attrs

from perc.links import LinkSpec

__all__ = [
    "MESH_GROUP",
    "MESH_HOST",
    "RESTART_MAX",
    "RESTART_MIN",
    "SKF_NET_OFF",
    "SO_ATTACH_REUSEPORT_CBPF",
    "STABLE_AFTER",
    "STEER_BY_HASH",
    "ConferencePlan",
    "ExternalLink",
    "RestartPolicy",
    "WorkerPlan",
    "WorkerPlanError",
    "gro_segments",
    "gso_control",
    "gso_runs",
    "link_owners",
    "links_elsewhere",
    "mesh_links",
    "owned_links",
    "split_segments",
    "steering_program",
]

#: IPPROTO_UDP, the level of the UDP socket options.
SOL_UDP = 17
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
#: At most this many mesh datagrams are held for one peer, and sent by one GSO send.
MESH_BATCH = 16
#: Linux: ``SOL_UDP`` options (linux/udp.h) for segmentation offload on send and coalescing on
#: receive.
UDP_SEGMENT = 103
UDP_GRO = 104
#: The most bytes one GSO send carries (a UDP datagram's payload is at most 65,507 on IPv4).
GSO_MAX_BYTES = 65_000


class WorkerPlanError(ValueError):
    """A worker plan that does not parse (the one error of :meth:`WorkerPlan.from_json`)."""


@attrs.frozen
class ExternalLink:
    """One ``[[conference.link]]`` of a conference, resolved by the supervisor, and its owner.

    The plan carries the whole link (not an index into the config file): a restarted worker
    reads the config file again, which may have changed, but must run what the supervisor
    steers to it."""

    peer: tuple[Any, ...]
    """The peer's address as ``recvfrom`` on the conference socket reports it."""
    fingerprint: str
    connect: bool
    name: str
    owner: int
    """The index of the worker that runs this link."""

    def to_json(self) -> dict[str, Any]:
        return {
            "peer": list(self.peer),
            "fingerprint": self.fingerprint,
            "connect": self.connect,
            "name": self.name,
            "owner": self.owner,
        }

    @classmethod
    def from_json(cls, data: Any) -> ExternalLink:
        host, *rest = data["peer"]
        if not rest:
            raise ValueError(f"peer {host!r} without a port")
        connect = data["connect"]
        if not isinstance(connect, bool):
            raise TypeError(f"connect {connect!r} is not a boolean")
        return cls(
            (_str(host), *(_int(v) for v in rest)),
            _str(data["fingerprint"]),
            connect,
            _str(data["name"]),
            _int(data["owner"]),
        )


@attrs.frozen
class ConferencePlan:
    """One conference as a worker sees it."""

    listen_fd: int
    """The worker's SO_REUSEPORT socket on the conference's listen address."""
    mesh_fd: int
    """The worker's private loopback socket for the mesh."""
    mesh: tuple[tuple[str, int], ...]
    """Every worker's private address, by index (this worker's included)."""
    links: tuple[ExternalLink, ...] = ()
    """The conference's external links (every worker's, each with its owner)."""


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
                    cid: {
                        "listen_fd": c.listen_fd,
                        "mesh_fd": c.mesh_fd,
                        "mesh": c.mesh,
                        "links": [link.to_json() for link in c.links],
                    }
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
                links = tuple(ExternalLink.from_json(x) for x in c.get("links", []))
                confs[str(cid)] = ConferencePlan(
                    _int(c["listen_fd"]), _int(c["mesh_fd"]), mesh, links
                )
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
            for link in c.links:
                if not 0 <= link.owner < plan.count:
                    raise WorkerPlanError(
                        f"bad worker plan: conference {cid}: link {link.name} owned by "
                        f"worker {link.owner} of {plan.count}"
                    )
        return plan


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not an integer")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
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


def link_owners(count: int, links: int, first: int = 0) -> list[int]:
    """The owners of a conference's ``links`` external links among ``count`` workers: link
    *k* is run by worker *(first + k) mod count* (``first``: how many links the conferences
    before this one have, so that their links spread over the workers too)."""
    if count < 1:
        raise ValueError(f"{count} workers")
    return [(first + k) % count for k in range(links)]


def owned_links(plan: WorkerPlan, conference: str) -> list[LinkSpec]:
    """The external links worker ``plan.index`` runs for ``conference`` (D25 links of their
    own split-horizon group: None)."""
    return [
        LinkSpec(peer=link.peer, fingerprint=link.fingerprint, connect=link.connect,
                 name=link.name)
        for link in plan.conferences[conference].links
        if link.owner == plan.index
    ]  # fmt: skip


def links_elsewhere(plan: WorkerPlan, conference: str) -> list[tuple[Any, ...]]:
    """The peers of the external links of ``conference`` that other workers run."""
    return [link.peer for link in plan.conferences[conference].links if link.owner != plan.index]


# --- steering (classic BPF) ---------------------------------------------------------------------

#: setsockopt(SOL_SOCKET, ...) that attaches a classic BPF program to a reuseport group.
SO_ATTACH_REUSEPORT_CBPF = 51
#: A classic BPF load at this offset (plus n) reads byte n of the network (IP) header.
SKF_NET_OFF = -0x100000
#: What the steering program returns for a datagram that is no link peer's: an index past
#: every socket, so the kernel picks the socket by its hash (see the module docstring).
STEER_BY_HASH = 0xFFFFFFFF
#: Most instructions a classic BPF program may have (BPF_MAXINSNS).
BPF_MAXINSNS = 4096

# Classic BPF opcodes (linux/filter.h, linux/bpf_common.h) the program uses.
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS, _LD_H_IND = 0x20, 0x28, 0x30, 0x48
_LD_MEM, _ST = 0x60, 0x02
_AND_K, _LSH_K, _RSH_K = 0x54, 0x64, 0x74
_TAX, _TXA = 0x07, 0x87
_JA, _JEQ_K = 0x05, 0x15
_RET_K = 0x06
_IPPROTO_UDP = 17
_INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k (native byte order)


def _insn(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> tuple[int, int, int, int]:
    return (code, jt, jf, k & 0xFFFFFFFF)


def _match(words: Sequence[int], port: int, owner: int) -> list[tuple[int, int, int, int]]:
    """``ret owner`` if M[0..] == ``words`` and X == ``port``; else fall through to what
    follows (each mismatch jumps past the rest of this block)."""
    block: list[tuple[int, int, int, int]] = []
    size = 2 * len(words) + 3
    for i, word in enumerate(words):
        block.append(_insn(_LD_MEM, i))
        block.append(_insn(_JEQ_K, word, 0, size - len(block) - 1))
    block.append(_insn(_TXA))
    block.append(_insn(_JEQ_K, port, 0, 1))
    block.append(_insn(_RET_K, owner))
    return block


def steering_program(peers: Sequence[tuple[tuple[Any, ...], int]]) -> bytes:
    """The classic BPF program (``struct sock_filter`` array, native byte order) that steers
    each ``(peer address as recvfrom reports it, owner index)`` to its owner's socket and
    everything else to the kernel's hash (:data:`STEER_BY_HASH`); see the module docstring.
    ValueError for an address that is not a numeric IP address or a program too long."""
    v4: list[tuple[int, int, int]] = []
    v6: list[tuple[int, int, int]] = []
    for peer, owner in peers:
        ip = ipaddress.ip_address(str(peer[0]).partition("%")[0])
        port = int(peer[1])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        (v4 if ip.version == 4 else v6).append((int(ip), port, owner))
    # IPv4: X = the header length, M[0] = the source address, X = the source port.
    part4 = [
        _insn(_LD_B_ABS, SKF_NET_OFF), _insn(_AND_K, 0x0F), _insn(_LSH_K, 2), _insn(_TAX),
        _insn(_LD_W_ABS, SKF_NET_OFF + 12), _insn(_ST, 0),
        _insn(_LD_H_IND, SKF_NET_OFF), _insn(_TAX),
    ]  # fmt: skip
    for addr, port, owner in v4:
        part4 += _match([addr], port, owner)
    part4.append(_insn(_RET_K, STEER_BY_HASH))
    # IPv6: UDP right after the fixed header; M[0..3] = the source address, X = the port.
    part6 = [
        _insn(_LD_B_ABS, SKF_NET_OFF + 6),
        _insn(_JEQ_K, _IPPROTO_UDP, 1, 0),
        _insn(_RET_K, STEER_BY_HASH),
    ]
    for i in range(4):
        part6 += [_insn(_LD_W_ABS, SKF_NET_OFF + 8 + 4 * i), _insn(_ST, i)]
    part6 += [_insn(_LD_H_ABS, SKF_NET_OFF + 40), _insn(_TAX)]
    for addr, port, owner in v6:
        words = [(addr >> s) & 0xFFFFFFFF for s in (96, 64, 32, 0)]
        part6 += _match(words, port, owner)
    part6.append(_insn(_RET_K, STEER_BY_HASH))
    # The IP version, then a long jump (ja) to its part.
    head = [
        _insn(_LD_B_ABS, SKF_NET_OFF),
        _insn(_RSH_K, 4),
        _insn(_JEQ_K, 4, 0, 1),
        _insn(_JA, 3),  # -> part4, after the next three
        _insn(_JEQ_K, 6, 0, 1),
        _insn(_JA, 1 + len(part4)),  # -> part6
        _insn(_RET_K, STEER_BY_HASH),
    ]
    program = head + part4 + part6
    if len(program) > BPF_MAXINSNS:
        raise ValueError(f"{len(peers)} links need {len(program)} BPF instructions, "
                         f"more than {BPF_MAXINSNS}")  # fmt: skip
    return b"".join(_INSN.pack(*insn) for insn in program)


def gso_runs(datagrams: Sequence[bytes], max_segments: int = MESH_BATCH) -> list[tuple[bytes, int]]:
    """``datagrams``, in order, as the sends of UDP segmentation offload: per send the
    concatenated datagrams and the segment size. The kernel cuts a GSO send into segments of
    that size and a last one that may be shorter, so a send holds datagrams of one size, at
    most one shorter datagram at its end, at most ``max_segments`` of them and at most
    :data:`GSO_MAX_BYTES`. A send of one datagram is a plain datagram."""
    runs: list[tuple[bytes, int]] = []
    held: list[bytes] = []
    size = total = 0
    for d in datagrams:
        n = len(d)
        if held and (n > size or len(held) >= max_segments or total + n > GSO_MAX_BYTES):
            runs.append((b"".join(held), size))
            held, total = [], 0
        if not held:
            size = n
        held.append(d)
        total += n
        if n < size:  # a shorter one can only end a send
            runs.append((b"".join(held), size))
            held, total = [], 0
    if held:
        runs.append((b"".join(held), size))
    return runs


def gso_control(size: int) -> tuple[int, int, bytes]:
    """The control message of a GSO send whose segments are ``size`` bytes (a u16)."""
    return (SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))


def gro_segments(data: bytes, ancillary: Sequence[tuple[int, int, bytes]]) -> list[bytes]:
    """The datagrams of one receive on a socket with ``UDP_GRO``: the kernel may hand several
    datagrams of one sender coalesced, with their size in a ``UDP_GRO`` control message (an
    int; the last datagram may be shorter). Without that message ``data`` is one datagram."""
    size = 0
    for level, kind, value in ancillary:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            size = struct.unpack_from("=i", value)[0]  # the kernel's int, native order
    return split_segments(data, size)


def split_segments(buffer: bytes, size: int) -> list[bytes]:
    """``buffer`` cut into datagrams of ``size`` bytes, the last one possibly shorter (what
    the kernel makes of a GSO send); ``size`` 0 or at least ``len(buffer)``: one datagram."""
    if size <= 0 or size >= len(buffer):
        return [buffer]
    return [buffer[i : i + size] for i in range(0, len(buffer), size)]


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
