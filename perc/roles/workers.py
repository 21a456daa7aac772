"""MDD workers (D27), the I/O: the supervising ``perc mdd`` and the worker's relays.

Theory of operation
-------------------
The plan, the mesh and the restart policy are :mod:`perc.workers` (sans-IO); this module
binds, spawns, waits and signals.

* :func:`supervise` (``perc mdd`` with ``workers = N > 1``) binds, per conference, N UDP
  sockets on the listen address with ``SO_REUSEPORT`` (the first decides the port when the
  config says 0) and N private loopback sockets for the mesh, and a pipe. It starts N
  ``python -m perc mdd ... --worker-plan PLAN`` processes, each inheriting its own sockets
  and the pipe's read end, and keeps every descriptor open until it exits, so a restarted
  worker gets the same sockets back. A worker that exits is logged
  (:class:`~perc.events.WorkerExited`) and restarted after the policy's delay
  (:class:`~perc.events.WorkerStarted`). On SIGINT/SIGTERM the supervisor sends SIGTERM to
  every worker and waits for them (SIGKILL after :data:`STOP_WAIT`). If the supervisor
  itself dies, the pipe's write end closes and every worker stops on its own.
* :func:`serve_worker` runs an ordinary :class:`perc.roles.mdd.MddServer` whose relays are
  :class:`WorkerRelay`: the conference socket is the inherited one, the mesh links are added
  beside the configured ones, and datagrams for a mesh peer leave from the mesh socket (the
  peer knows this worker by that address; the shared port would reach a worker chosen by
  the kernel's hash). Of the conference's external links it adds only those the plan says it
  owns (sent from the conference socket, as a single MDD would). Its log records name it
  (``perc.roles.mdd[w1]``): every worker writes to the supervisor's stderr.
* Steering (:func:`attach_steering`): when a conference has external links, the supervisor
  resolves each peer as ``recvfrom`` will report it, names its owner in every plan and
  attaches :func:`perc.workers.steering_program` to the conference's reuseport group (once,
  on its first socket: the program belongs to the group, and the group outlives every
  worker). A kernel that refuses it stops the supervisor with a configuration error (exit 2).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence

import trio

from perc import events
from perc.config import ConfigError, MddConference, MddConfig
from perc.mdd import Address
from perc.roles.mdd import RECEIVE_BUFFER, ConferenceRelay, MddServer
from perc.wire.demux import is_srtp
from perc.workers import (
    MESH_BATCH,
    MESH_HOST,
    SO_ATTACH_REUSEPORT_CBPF,
    SOL_UDP,
    UDP_GRO,
    ConferencePlan,
    ExternalLink,
    RestartPolicy,
    WorkerPlan,
    gso_control,
    gso_runs,
    link_owners,
    links_elsewhere,
    mesh_links,
    owned_links,
    split_segments,
    steering_program,
)

__all__ = ["STOP_WAIT", "WorkerRelay", "attach_steering", "serve_worker", "supervise"]

log = logging.getLogger(__name__)

#: Seconds the supervisor waits for its workers after SIGTERM before it kills them.
STOP_WAIT = 5.0
#: What a GSO send fails with where the kernel or the route cannot segment.
_NO_GSO = frozenset((errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP))


# --- the worker -------------------------------------------------------------------------------


class WorkerRelay(ConferenceRelay):
    """A conference relay of one worker: inherited sockets, the mesh links beside the rest."""

    def __init__(self, conference: MddConference, config: MddConfig, plan: WorkerPlan) -> None:
        super().__init__(conference, config)
        self.plan = plan
        self.conference_plan: ConferencePlan = plan.conferences[conference.id]
        self._mesh_sock: socket.socket | None = None
        self._mesh_peers: set[Address] = set()
        self._held_peers = self._mesh_peers  # the hot loops check these inline and call _hold
        self._fingerprint = config.identity.fingerprint
        #: SRTP/SRTCP held for each mesh peer until the end of the batch (perc.workers:
        #: mesh batches); sent with UDP_SEGMENT while the kernel takes it
        self._held: dict[Address, list[bytes]] = {}
        self._gso = True
        self._gro = False

    def _open_socket(self) -> socket.socket:
        cp = self.conference_plan
        sock = socket.socket(fileno=cp.listen_fd)
        mesh = socket.socket(fileno=cp.mesh_fd)
        sock.setblocking(False)
        mesh.setblocking(False)
        try:
            mesh.setsockopt(SOL_UDP, UDP_GRO, 1)
            self._gro = True
        except OSError:
            self._gro = False  # a kernel before 5.0: one datagram per receive
        self._mesh_sock = mesh
        return sock

    def _sender(self, sock: socket.socket) -> Callable[[bytes, Address], int]:
        peers, shared, hold = self._mesh_peers, sock.sendto, self._hold

        def sendto(data: bytes, addr: Address) -> int:
            if addr not in peers:
                return shared(data, addr)
            hold(data, addr)
            return len(data)

        return sendto

    def _hold(self, data: bytes, addr: Address) -> None:
        """Mesh SRTP/SRTCP waits for the end of the batch (:meth:`_flush`), at most
        ``MESH_BATCH`` per peer; DTLS (or everything, without GSO) goes at once."""
        mesh = self._mesh_sock
        assert mesh is not None
        if not self._gso or not is_srtp(data):
            mesh.sendto(data, addr)  # DTLS is never held
            return
        queue = self._held.get(addr)
        if queue is None:
            self._held[addr] = [data]
        else:
            queue.append(data)
            if len(queue) >= MESH_BATCH:
                self._flush_peer(addr)

    def _more_sockets(self) -> list[socket.socket]:
        return [self._mesh_sock] if self._mesh_sock is not None else []

    def _coalesced(self, sock: socket.socket) -> bool:
        return self._gro and sock is self._mesh_sock

    def _flush(self) -> None:
        if self._held:
            for addr in list(self._held):
                self._flush_peer(addr)

    def _flush_peer(self, addr: Address) -> None:
        """Send what is held for mesh peer ``addr``: one system call per GSO run."""
        queue = self._held.pop(addr, None)
        mesh = self._mesh_sock
        if not queue or mesh is None:
            return
        for buffer, size in gso_runs(queue):
            try:
                if len(buffer) == size:
                    mesh.sendto(buffer, addr)
                else:
                    mesh.sendmsg([buffer], [gso_control(size)], 0, addr)
            except OSError as e:
                if len(buffer) > size and e.errno in _NO_GSO:
                    # This kernel (or this socket) cannot segment: plain sends from now on.
                    log.warning("conference=%s: no UDP segmentation offload here (%s): the "
                                "mesh sends one datagram per call", self.id, e)  # fmt: skip
                    self._gso = False
                    self._send_each(buffer, size, addr)
                else:
                    self.io.dropped_udp_send += -(-len(buffer) // size)

    def _send_each(self, buffer: bytes, size: int, addr: Address) -> None:
        mesh = self._mesh_sock
        assert mesh is not None
        for datagram in split_segments(buffer, size):
            try:
                mesh.sendto(datagram, addr)
            except OSError:
                self.io.dropped_udp_send += 1

    def _add_links(self, family: int) -> None:
        """The mesh links, and the external links this worker owns (resolved by the
        supervisor; the config's [[conference.link]] tables are not read again)."""
        now = trio.current_time()
        for spec in mesh_links(self.plan, self.id, self._fingerprint):
            self._mesh_peers.add(spec.peer)
            self.engine.add_link(spec, now)
        for spec in owned_links(self.plan, self.id):
            log.info("link %s conference=%s: this worker runs it", spec.name, self.id)
            self.engine.add_link(spec, now)
        for peer in links_elsewhere(self.plan, self.id):
            self.engine.link_elsewhere(peer)
        self._send_queued()


class _WorkerTag(logging.Filter):
    """Name the worker in each record's logger (``perc.roles.mdd[w1]``): N workers share the
    supervisor's stderr."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.suffix = f"[w{index}]"

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.endswith(self.suffix):
            record.name += self.suffix
        return True


def tag_logs(index: int) -> None:
    """Every log handler of this process names worker ``index``."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerTag(index))


async def _watch_parent(fd: int, scope: trio.CancelScope) -> None:
    """Stop the worker when the supervisor is gone (its end of the pipe closed)."""
    await trio.lowlevel.wait_readable(fd)
    log.warning("supervisor gone: worker stopping")
    scope.cancel()


async def serve_worker(
    config: MddConfig,
    plan: WorkerPlan,
    *,
    freeze_heap: bool = False,
    task_status: trio.TaskStatus[MddServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run worker ``plan.index`` until cancelled or until the supervisor is gone
    (``freeze_heap``: see :func:`perc.roles.mdd.freeze_heap`)."""

    def relay(conference: MddConference, cfg: MddConfig) -> ConferenceRelay:
        return WorkerRelay(conference, cfg, plan)

    tag_logs(plan.index)
    log.info("MDD worker %d of %d pid=%d", plan.index, plan.count, os.getpid())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_parent, plan.parent_fd, nursery.cancel_scope)
        server = await nursery.start(MddServer(config, relay, freeze_heap=freeze_heap).serve)
        task_status.started(server)


# --- the supervisor ---------------------------------------------------------------------------


def _bind_group(conference: MddConference, count: int) -> list[socket.socket]:
    """``count`` SO_REUSEPORT sockets on the conference's listen address (one port)."""
    listen = conference.listen
    infos = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = infos[0]
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.bind(sockaddr)
            sockaddr = sock.getsockname()  # port 0: the others take the port the first got
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _resolve_links(
    conference: MddConference, family: int, count: int, first: int
) -> tuple[ExternalLink, ...]:
    """The conference's external links, each peer resolved as ``recvfrom`` on a socket of
    ``family`` reports it (as a single MDD resolves them), with its owner among ``count``."""
    owners = link_owners(count, len(conference.link), first)
    links = []
    for link, owner in zip(conference.link, owners, strict=True):
        infos = socket.getaddrinfo(
            link.peer.host, link.peer.port, family=family, type=socket.SOCK_DGRAM
        )
        peer = tuple(infos[0][4])
        links.append(ExternalLink(peer, link.fingerprint, link.connect, str(link.peer), owner))
    return tuple(links)


class _SockFprog(ctypes.Structure):
    """struct sock_fprog: the instruction count and a pointer to the instructions."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach_steering(sock: socket.socket, program: bytes) -> None:
    """Attach classic BPF ``program`` (:func:`perc.workers.steering_program`) to the reuseport
    group of bound ``sock`` (SO_ATTACH_REUSEPORT_CBPF; the kernel copies it). OSError if the
    kernel refuses."""
    code = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


def _bind_mesh(count: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.bind((MESH_HOST, 0))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class Supervisor:
    """The sockets, the pipe and the worker processes of one supervising ``perc mdd``."""

    def __init__(self, config: MddConfig, worker_command: Sequence[str]) -> None:
        self.config = config
        self.count = config.mdd.workers
        self.command = list(worker_command)
        self.policy = RestartPolicy()
        self.processes: dict[int, trio.Process] = {}
        self.stopping = False
        self.failed: str | None = None
        self._sockets: list[socket.socket] = []
        self._plans: list[WorkerPlan] = []
        self._pipe: tuple[int, int] | None = None

    def bind(self) -> None:
        read_end, write_end = os.pipe()
        self._pipe = (read_end, write_end)
        per_conf: dict[
            str, tuple[list[socket.socket], list[socket.socket], tuple[ExternalLink, ...]]
        ] = {}
        first = 0  # links of the conferences before: theirs spread over the workers too
        for conf in self.config.conferences:
            group = _bind_group(conf, self.count)
            self._sockets += group
            mesh = _bind_mesh(self.count)
            self._sockets += mesh
            links = _resolve_links(conf, group[0].family, self.count, first)
            first += len(links)
            if links:
                self._steer(conf.id, group[0], links)
            per_conf[conf.id] = (group, mesh, links)
            host, port = group[0].getsockname()[:2]
            events.emit(log, events.ConferenceListening("conference", str(host), port, conf.id))
        for i in range(self.count):
            confs = {}
            for cid, (group, mesh, links) in per_conf.items():
                addrs = tuple((MESH_HOST, int(m.getsockname()[1])) for m in mesh)
                confs[cid] = ConferencePlan(group[i].fileno(), mesh[i].fileno(), addrs, links)
            self._plans.append(WorkerPlan(i, self.count, read_end, confs))

    def _steer(self, conference: str, sock: socket.socket, links: tuple[ExternalLink, ...]) -> None:
        """Datagrams from each link peer go to its owner's socket (the rest: the hash)."""
        try:
            program = steering_program([(link.peer, link.owner) for link in links])
            attach_steering(sock, program)
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(
                f"conference {conference}: cannot steer its [[conference.link]] peers to one "
                f"of {self.count} workers (SO_ATTACH_REUSEPORT_CBPF: {reason}); run it with "
                "workers = 1"
            ) from None
        for link in links:
            log.info("link %s conference=%s: worker %d runs it", link.name, conference,
                     link.owner)  # fmt: skip

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    async def start(self, index: int) -> None:
        plan = self._plans[index]
        fds = [plan.parent_fd]
        for cp in plan.conferences.values():
            fds += [cp.listen_fd, cp.mesh_fd]
        proc = await trio.lowlevel.open_process(
            [*self.command, "--worker-plan", plan.to_json()],
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
        )
        self.processes[index] = proc
        now = trio.current_time()
        self.policy.started(index, now)
        events.emit(
            log,
            events.WorkerStarted(index, self.count, proc.pid, self.policy.restarts(index)),
        )

    async def stop(self) -> None:
        """SIGTERM to every worker; SIGKILL to those still running after STOP_WAIT."""
        self.stopping = True
        running = [p for p in self.processes.values() if p.returncode is None]
        for proc in running:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:  # pragma: no cover - exited meanwhile
                pass
        with trio.move_on_after(STOP_WAIT):
            for proc in running:
                await proc.wait()
        for proc in running:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


class WorkerFailed(Exception):
    """A worker exited in a way a restart cannot mend (its configuration was refused)."""


async def supervise(
    config: MddConfig,
    worker_command: Sequence[str],
    *,
    task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``config.mdd.workers`` workers (``worker_command`` + ``--worker-plan PLAN``) until
    cancelled; raise :class:`WorkerFailed` if one cannot be restarted."""
    sup = Supervisor(config, worker_command)
    log.info(
        "MDD supervisor starting workers=%d fingerprint=%s conferences=%s",
        sup.count,
        config.identity.fingerprint,
        ",".join(c.id for c in config.conferences),
    )
    try:
        sup.bind()
    except BaseException:
        sup.close()
        raise
    try:
        async with trio.open_nursery() as nursery:
            for i in range(sup.count):
                await sup.start(i)
            for i in range(sup.count):
                nursery.start_soon(_watch_one, sup, i, nursery.cancel_scope)
            task_status.started(sup)
    finally:
        with trio.CancelScope(shield=True):
            await sup.stop()
        sup.close()
    if sup.failed is not None:
        raise WorkerFailed(sup.failed)


async def _watch_one(sup: Supervisor, index: int, scope: trio.CancelScope) -> None:
    while True:
        proc = sup.processes[index]
        status = await proc.wait()
        if sup.stopping:
            return
        delay = sup.policy.exited(index, trio.current_time(), status)
        events.emit(
            log,
            events.WorkerExited(index, proc.pid, status, delay),
            logging.WARNING if delay is not None else logging.ERROR,
        )
        if delay is None:
            sup.failed = f"worker {index} exited with status {status}; stopping"
            scope.cancel()
            return
        await trio.sleep(delay)
        await sup.start(index)


def worker_command(mdd_args: Sequence[str], log_level: str, log_format: str) -> list[str]:
    """The command line of a worker: this Python, ``-m perc``, the log options, ``mdd_args``."""
    return [
        sys.executable, "-m", "perc", "--log-level", log_level, "--log-format", log_format,
        *mdd_args,
    ]  # fmt: skip
