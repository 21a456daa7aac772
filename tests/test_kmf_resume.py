"""A KMF that restarts takes up its associations and EKTKeys from the state (D29).

Sans-IO on a fake clock: :class:`tests.kmf_memory.MemoryKmf` plays the shell; the requests
the engine makes are written to a real :class:`perc.state.KmfState` file by the shell's own
writer code (:meth:`perc.roles.kmf.StateWriter._write`), and the "restart" is a second engine
opened on the same file. The endpoints are perc's DTLS clients and never restart.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import attrs
import pytest

from perc import identity
from perc.config import KmfConfig
from perc.dtls import DtlsConnection
from perc.events import EktKeyAcked, Left, Rekeyed
from perc.keying import EktKeyMaterial
from perc.kmf import (
    ForgetAssociation,
    PersistRequest,
    ReserveSeq,
    ReserveSpis,
    SaveAssociation,
    SaveEktKey,
)
from perc.roles.kmf import StateWriter
from perc.state import SEQ_BLOCK, KmfState
from perc.wire import dtls as w

from .kmf_memory import FakeTunnel, MemoryKmf, client, ekt_spis
from .roles.join_helpers import keying_kmf_config

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def who() -> SimpleNamespace:
    return SimpleNamespace(
        kmf=identity.generate("kmf"),
        mdd=identity.generate("mdd"),
        members=[identity.generate(f"m{i}") for i in range(4)],
    )


def config(who: SimpleNamespace) -> KmfConfig:
    return keying_kmf_config(who.kmf, [who.mdd], {"demo": who.members}, dtls_cookies=False)


class Shell:
    """Writes the engine's requests to the state and confirms them, as the trio shell does."""

    def __init__(self, mem: MemoryKmf, state: KmfState) -> None:
        self.mem = mem
        self.state = state
        self.writer = StateWriter(state, lambda c, n: None)
        self.requests: list[PersistRequest] = []

    def write(self) -> None:
        engine = self.mem.engine
        while batch := engine.persistence_requests():
            self.requests += batch
            self.writer._write([(r, time.time()) for r in batch])
            for r in batch:
                if isinstance(r, ReserveSpis):
                    engine.spis_reserved(r.conference, r.ceiling, self.mem.now)
                elif isinstance(r, SaveAssociation):
                    engine.seq_reserved(r.association_id, r.next_seq + SEQ_BLOCK, self.mem.now)
                elif isinstance(r, ReserveSeq):
                    engine.seq_reserved(r.association_id, r.from_seq + SEQ_BLOCK, self.mem.now)
            self.mem.route()
            self.mem.advance(self.mem.now)


class Endpoint:
    """A joined DTLS client and every epoch-1 record number the KMF sent it."""

    def __init__(self, conn: DtlsConnection, aid: uuid.UUID) -> None:
        self.conn = conn
        self.aid = aid
        self.records: list[tuple[int, int]] = []

    def pump(self, mem: MemoryKmf, tunnel: FakeTunnel) -> None:
        while True:
            moved = False
            for datagram in self.conn.datagrams_to_send():
                tunnel.deliver(self.aid, datagram)
                moved = True
            for datagram in tunnel.take_dtls(self.aid):
                records, _ = w.parse_datagram_untrusted(datagram)
                self.records += [(r.epoch, r.sequence_number) for r in records if r.epoch == 1]
                self.conn.receive_datagram(datagram, mem.now)
                moved = True
            if not moved:
                return


def start(who: SimpleNamespace, path: Path, *, persist_keys: bool = True) -> Shell:
    state = KmfState(path, KEY, persist_keys=persist_keys)
    starts = {c: n + 1 for c, n in state.spi_counters().items()}
    mem = MemoryKmf(
        config(who), persistent=True, resumable=persist_keys, spi_starts=starts, now=100.0
    )
    keys = {
        r.conference: EktKeyMaterial.decode(r.material, now=mem.now, wall_now=time.time())
        for r in state.ekt_keys()
    }
    mem.engine.resume(state.associations(), keys, mem.now)
    shell = Shell(mem, state)
    shell.write()
    return shell


def join(shell: Shell, ident: identity.Identity, tunnel: FakeTunnel) -> Endpoint:
    ep = Endpoint(client(ident), uuid.uuid4())
    ep.conn.connect(shell.mem.now)
    for _ in range(4):
        ep.pump(shell.mem, tunnel)
        shell.write()
    return ep


def settle(shell: Shell, tunnel: FakeTunnel, eps: list[Endpoint]) -> list[list[int]]:
    spis: list[list[int]] = [[] for _ in eps]
    for _ in range(4):
        shell.mem.advance(shell.mem.now + 0.3)
        shell.write()
        for i, ep in enumerate(eps):
            ep.pump(shell.mem, tunnel)
            spis[i] += ekt_spis(ep.conn)
    return spis


def test_a_restarted_kmf_rekeys_members_who_joined_before_it(
    who: SimpleNamespace, tmp_path: Path
) -> None:
    path = tmp_path / "kmf-state.sqlite"
    first = start(who, path)
    tunnel = first.mem.tunnel(who.mdd.fingerprint)
    eps = [join(first, m, tunnel) for m in who.members[:2]]
    first.mem.now += 1.0
    got = settle(first, tunnel, eps)
    old_spi = first.mem.engine.state.conferences["demo"].current.spi  # type: ignore[union-attr]
    assert all(g and g[-1] == old_spi for g in got)
    assert [r for r in first.requests if isinstance(r, SaveEktKey)][-1].key is not None
    saves = [r for r in first.requests if isinstance(r, SaveAssociation)]
    assert {s.association_id for s in saves} == {ep.aid for ep in eps}
    assert all(KEY.hex() not in repr(s) and b"write_key" in s.record_state for s in saves)
    first.state.close()  # the process dies: nothing more is written

    second = start(who, path)
    engine = second.mem.engine
    assert engine.stats.resumed == 2 and set(engine.associations) == {ep.aid for ep in eps}
    conf = engine.state.conferences["demo"]
    assert conf.current is not None and conf.current.spi == old_spi
    # The MDD reconnects: one resync rekey reaches both members through the new tunnel.
    tunnel2 = second.mem.tunnel(who.mdd.fingerprint)
    got = settle(second, tunnel2, eps)
    restart = [e for e in second.mem.events if isinstance(e, Rekeyed)]
    assert [e.reason for e in restart] == ["restart"]
    assert got == [[restart[0].spi], [restart[0].spi]]
    assert len([e for e in second.mem.events if isinstance(e, EktKeyAcked)]) == 2
    # A new member joins: everyone, old and new, ends on the key made for its join.
    late = join(second, who.members[2], tunnel2)
    got = settle(second, tunnel2, [*eps, late])
    spi = [e for e in second.mem.events if isinstance(e, Rekeyed)][-1].spi
    assert [g[-1] for g in got] == [spi, spi, spi]
    # A member who joined before the restart leaves: the others get a key it never sees.
    eps[0].conn.close(second.mem.now)
    eps[0].pump(second.mem, tunnel2)
    got = settle(second, tunnel2, [*eps, late])
    (left,) = [e for e in second.mem.events if isinstance(e, Left)]
    assert left.association == eps[0].aid and left.reason == "close_notify"
    final = [e for e in second.mem.events if isinstance(e, Rekeyed)][-1]
    assert final.reason == "leave" and got[0] == [] and got[1] == got[2] == [final.spi]
    assert ForgetAssociation(eps[0].aid) in second.requests
    assert {r.association_id for r in second.state.associations()} == {eps[1].aid, late.aid}
    # No (epoch, sequence number) was ever sent twice under one key.
    for ep in eps:
        assert len(ep.records) == len(set(ep.records)), ep.records
    second.state.close()


def test_records_past_the_ceiling_wait_for_its_write(who: SimpleNamespace, tmp_path: Path) -> None:
    shell = start(who, tmp_path / "s.sqlite")
    tunnel = shell.mem.tunnel(who.mdd.fingerprint)
    ep = join(shell, who.members[0], tunnel)
    engine = shell.mem.engine
    assoc = engine.associations[ep.aid]
    ceiling = assoc.seq_ceiling
    assert ceiling is not None and ceiling == assoc.seq_asked
    # Rekeys without the writer: the engine asks for the next block half way, and what lies
    # past the confirmed ceiling waits.
    asked: list[ReserveSeq] = []
    while assoc.connection.next_record_sequence <= ceiling:
        shell.mem.now += 1.0
        shell.mem.rekey("demo")
        ep.pump(shell.mem, tunnel)
        for r in engine.persistence_requests():
            if isinstance(r, ReserveSeq):
                asked.append(r)
            elif isinstance(r, ReserveSpis):
                engine.spis_reserved(r.conference, r.ceiling, shell.mem.now)
    assert [r.from_seq for r in asked] == [ceiling]
    assert assoc.held and engine.stats.held_for_ceiling >= 1
    assert max(seq for _, seq in ep.records) < ceiling
    engine.seq_reserved(ep.aid, ceiling + SEQ_BLOCK, shell.mem.now)
    shell.mem.route()
    ep.pump(shell.mem, tunnel)
    assert not assoc.held and max(seq for _, seq in ep.records) >= ceiling
    shell.state.close()


def test_without_persist_keys_no_key_is_stored_and_old_associations_end_on_rejoin(
    who: SimpleNamespace, tmp_path: Path
) -> None:
    path = tmp_path / "s.sqlite"
    shell = start(who, path, persist_keys=False)
    tunnel = shell.mem.tunnel(who.mdd.fingerprint)
    ep = join(shell, who.members[0], tunnel)
    kinds = {type(r) for r in shell.requests}
    assert SaveAssociation in kinds and not kinds & {ReserveSeq, SaveEktKey}
    assert all(not r.record_state for r in shell.requests if isinstance(r, SaveAssociation))
    (row,) = shell.state.associations()
    assert row.association_id == ep.aid and row.record_state is None
    assert shell.state.ekt_keys() == []
    shell.state.close()
    again = start(who, path, persist_keys=False)
    engine = again.mem.engine
    assert engine.associations == {} and engine.stats.resumed == 0
    assert again.state.associations() == []  # the row is gone, its id remembered
    tunnel2 = again.mem.tunnel(who.mdd.fingerprint)
    other = join(again, who.members[1], tunnel2)
    assert tunnel2.disconnects == []
    # The same endpoint joins again (D30): the MDD is told to drop its old association.
    again_ep = join(again, who.members[0], tunnel2)
    assert tunnel2.disconnects == [ep.aid]
    assert again_ep.aid != other.aid
    again.state.close()


def test_rows_that_cannot_be_resumed_are_deleted(who: SimpleNamespace, tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    shell = start(who, path)
    tunnel = shell.mem.tunnel(who.mdd.fingerprint)
    ep = join(shell, who.members[0], tunnel)
    shell.state.remove_ekt_key("demo")  # as if the key's write had been lost
    shell.state.close()
    again = start(who, path)
    assert again.mem.engine.stats.resume_dropped == 1
    assert ForgetAssociation(ep.aid) in again.requests
    assert again.state.associations() == []
    again.state.close()


def test_stored_keys_keep_their_age_and_refuse_garbage() -> None:
    key = EktKeyMaterial(b"k" * 16, b"s" * 12, 7, 600, 1, created=5.0)
    back = EktKeyMaterial.decode(key.encode(1000.0), now=50.0, wall_now=1100.0)
    assert attrs.evolve(back, created=0.0) == attrs.evolve(key, created=0.0)
    assert back.created == pytest.approx(-50.0)
    from perc.keying import KeyingError

    for bad in (b"", b"[]", b'["zz"]', key.encode(1.0)[:-3]):
        with pytest.raises(KeyingError):
            EktKeyMaterial.decode(bad, now=0.0, wall_now=0.0)
