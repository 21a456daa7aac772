"""perc.kmf / perc.keying with a state (D28, D32): SPI reservations before use, audit requests.

Sans-IO, on a fake clock: :class:`tests.kmf_memory.MemoryKmf` plays the shell and the test
plays the state writer (it answers ``spis_reserved`` when it chooses).
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest

from perc import identity
from perc.config import KmfConfig
from perc.events import Joined, Rekeyed
from perc.keying import AESKW128, Conference, KeyingError, KeyingState, Member
from perc.kmf import SPI_BLOCK, AuditRecord, ReserveSpis
from perc.state import spi_is_newer

from .kmf_memory import MemoryKmf, ekt_spis, join, pump
from .roles.join_helpers import keying_kmf_config
from .test_keying import conference


@pytest.fixture(scope="module")
def who() -> SimpleNamespace:
    return SimpleNamespace(
        kmf=identity.generate("kmf"),
        mdd=identity.generate("mdd"),
        members=[identity.generate(f"m{i}") for i in range(3)],
        outsider=identity.generate("outsider"),
    )


def config(who: SimpleNamespace) -> KmfConfig:
    return keying_kmf_config(who.kmf, [who.mdd], {"demo": who.members}, dtls_cookies=False)



def member(n: int = 0) -> Member:
    return Member(uuid.uuid4(), f"fp{n}", None, None, 9, AESKW128, 0.0)


# --- keying -------------------------------------------------------------------------------------


def test_a_first_key_waits_for_its_spi_reservation() -> None:
    conf = Conference(conference(), spi_start=70_000, spi_ceiling=70_000)
    first = member()
    assert conf.join(first, 0.0) is None  # held: its SPI is not on disk yet
    assert first.spi is None and conf.current is None and conf.next_deadline() is None
    assert conf.poll(5.0) is None
    second = member(1)
    assert conf.join(second, 1.0) is None  # waits for the same first key
    conf.spis_reserved(70_000 + SPI_BLOCK)
    assert conf.next_deadline() == 0.0
    rekey = conf.poll(2.0)
    assert rekey is not None and rekey.reasons == ("first",) and rekey.previous is None
    assert rekey.key.spi == 70_000 % 65536 and rekey.key.created == 2.0
    assert first.spi == second.spi == rekey.key.spi


def test_a_rekey_past_the_ceiling_waits_and_resumes_when_reserved() -> None:
    conf = Conference(conference(rekey_window=0.5), spi_start=10, spi_ceiling=11)
    a, b = member(), member(1)
    key = conf.join(a, 0.0)
    assert key is not None and key.spi == 10  # counter 10 lies below the ceiling
    assert conf.join(b, 1.0) is None  # its rekey takes counter 11: at the ceiling
    assert conf.next_deadline() is None and conf.poll(10.0) is None
    with pytest.raises(KeyingError, match="not reserved"):
        conf.rekey(10.0)
    conf.spis_reserved(5)  # ceilings only grow
    assert conf.spi_ceiling == 11
    conf.spis_reserved(100)
    rekey = conf.poll(10.0)
    assert rekey is not None and rekey.key.spi == 11 and a.spi == b.spi == 11


def test_keying_state_resumes_stored_counters_and_starts_others_at_random() -> None:
    confs = (conference(), conference("other"))
    state = KeyingState(confs, spi_starts={"demo": 65_535 + 300}, durable_spis=True)
    c = state.conferences["demo"]
    # Nothing made yet, nothing reserved: the first key will wait.
    assert (c.spi_counter, c.spi_ceiling) == (65_835, 65_835) and c.spis_covered()
    assert state.conferences["other"].spi_ceiling == state.conferences["other"].spi_counter
    memory = KeyingState(confs)
    assert memory.conferences["demo"].spi_ceiling is None  # no state: nothing to wait for


# --- engine -------------------------------------------------------------------------------------


def test_engine_reserves_before_the_first_key_and_audits_without_key_material(
    who: SimpleNamespace,
) -> None:
    mem = MemoryKmf(config(who), persistent=True, spi_starts={"demo": 70_000})
    engine = mem.engine
    assert engine.persistence_requests() == [ReserveSpis("demo", 70_000 + SPI_BLOCK)]
    tunnel = mem.tunnel(who.mdd.fingerprint)
    ep, aid = join(mem, who.members[0], tunnel)
    assert ekt_spis(ep) == []  # handshake done, MediaKeys sent, the EKTKey held (D28)
    (joined,) = mem.of(Joined)
    assert isinstance(joined, Joined) and joined.first_key == "at-rekey"
    assert mem.advance(mem.now + 10.0) == 0  # nothing due while it waits
    engine.spis_reserved("demo", 70_000 + SPI_BLOCK, mem.now)
    assert mem.advance(mem.now) == 1
    pump(mem, ep, aid, tunnel)
    spi = 70_000 % 65536
    assert ekt_spis(ep) == [spi]
    rows = [r for r in engine.persistence_requests() if isinstance(r, AuditRecord)]
    assert rows == [
        AuditRecord(
            "join",
            conference="demo",
            fingerprint=who.members[0].fingerprint,
            name="m0",
            association_id=aid,
            spi=spi,
            mdd_fingerprint=who.mdd.fingerprint,
        ),
        AuditRecord("rekey", conference="demo", spi=spi),
    ]
    conf = engine.state.conferences["demo"]
    assert conf.current is not None and conf.current.key.hex() not in repr(rows)


def test_engine_asks_for_the_next_block_half_way_and_holds_keys_past_it(
    who: SimpleNamespace,
) -> None:
    mem = MemoryKmf(config(who), persistent=True, spi_starts={"demo": 0})
    engine = mem.engine
    engine.persistence_requests()
    engine.spis_reserved("demo", SPI_BLOCK, mem.now)
    tunnel = mem.tunnel(who.mdd.fingerprint)
    ep, aid = join(mem, who.members[0], tunnel)
    reservations: list[ReserveSpis] = []
    spis = [0]
    for _ in range(SPI_BLOCK - 1):  # counters 1..255: all inside the first block
        mem.now += 1.0
        key = mem.rekey("demo")
        assert key is not None
        spis.append(key.spi)  # type: ignore[attr-defined]
        reservations += [r for r in engine.persistence_requests() if isinstance(r, ReserveSpis)]
    # One request, made when half the block was used (counter 128 made, 129 next).
    assert reservations == [ReserveSpis("demo", SPI_BLOCK // 2 + 1 + SPI_BLOCK)]
    assert spis == list(range(SPI_BLOCK))
    mem.now += 1.0
    assert mem.rekey("demo") is None  # counter 256: not reserved yet, the rekey waits
    rekeys = len(mem.of(Rekeyed))
    mem.advance(mem.now + 60.0)  # (DTLS retransmissions run; the rekey does not)
    assert len(mem.of(Rekeyed)) == rekeys
    engine.spis_reserved("demo", reservations[0].ceiling, mem.now)
    mem.advance(mem.now)
    assert len(mem.of(Rekeyed)) == rekeys + 1
    rekeyed = mem.of(Rekeyed)[-1]
    assert isinstance(rekeyed, Rekeyed) and rekeyed.spi == SPI_BLOCK
    pump(mem, ep, aid, tunnel)
    assert ekt_spis(ep)[-1] == SPI_BLOCK
    assert all(spi_is_newer(SPI_BLOCK, s) for s in spis)


def test_engine_audits_denials_and_leaves(who: SimpleNamespace) -> None:
    mem = MemoryKmf(config(who), persistent=True)
    engine = mem.engine
    (reserve,) = engine.persistence_requests()
    assert isinstance(reserve, ReserveSpis)
    engine.spis_reserved("demo", reserve.ceiling, mem.now)
    tunnel = mem.tunnel(who.mdd.fingerprint)
    _, bad = join(mem, who.outsider, tunnel)
    ep, aid = join(mem, who.members[1], tunnel)
    mem.advance(mem.now)
    pump(mem, ep, aid, tunnel)
    ep.close(mem.now)
    pump(mem, ep, aid, tunnel)
    rows = [r for r in engine.persistence_requests() if isinstance(r, AuditRecord)]
    assert [r.event for r in rows] == [
        "deny", "rekey", "join", "leave",
    ]  # fmt: skip
    deny, leave = rows[0], rows[-1]
    assert isinstance(deny, AuditRecord) and isinstance(leave, AuditRecord)
    assert (deny.association_id, deny.fingerprint, deny.name, deny.conference) == (
        bad, who.outsider.fingerprint, "outsider", None,
    )  # fmt: skip
    assert (leave.association_id, leave.name, leave.conference) == (aid, "m1", "demo")
    assert leave.spi is not None and leave.mdd_fingerprint == who.mdd.fingerprint


def test_an_engine_without_state_asks_for_nothing(who: SimpleNamespace) -> None:
    mem = MemoryKmf(config(who))
    tunnel = mem.tunnel(who.mdd.fingerprint)
    ep, _ = join(mem, who.members[0], tunnel)
    assert len(ekt_spis(ep)) == 1 and mem.engine.persistence_requests() == []
