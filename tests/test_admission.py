"""perc.admission: the KMF's budget for connections still in their TLS handshake."""

from __future__ import annotations

from perc.admission import DropLog, HandshakeTable


def test_under_budget_nothing_is_evicted() -> None:
    table = HandshakeTable(max_total=3, max_per_ip=2)
    for n, ip in enumerate(["a", "a", "b"]):
        entry, victim = table.admit(ip, float(n))
        assert victim is None and entry.ip == ip
    assert table.count == 3 and table.addresses() == 2


def test_an_address_at_its_share_loses_its_least_progressed_connection() -> None:
    table = HandshakeTable(max_total=100, max_per_ip=2)
    first, _ = table.admit("a", 0.0)
    second, _ = table.admit("a", 1.0)
    first.progress = lambda: (2, 5.0)  # its ClientHello was answered: it is worth keeping
    _, victim = table.admit("a", 2.0)
    assert victim is second and "2 connections from a" in second.evicted
    assert table.count == 2
    table.forget(second)  # the shell forgets it again when its task ends: harmless
    assert table.count == 2


def test_a_full_budget_evicts_from_the_busiest_address_never_refuses() -> None:
    table = HandshakeTable(max_total=3, max_per_ip=10)
    for n in range(2):
        table.admit("attacker", float(n))
    table.admit("mdd", 2.0)
    entry, victim = table.admit("mdd", 3.0)
    assert victim is not None and victim.ip == "attacker"
    assert entry.ip == "mdd" and table.count == 3


def test_the_table_empties_with_its_connections() -> None:
    table = HandshakeTable(max_total=5, max_per_ip=5)
    entries = [table.admit(f"10.0.0.{n}", 0.0)[0] for n in range(4)]
    for e in entries:
        table.forget(e)
    assert table.count == 0 and table.addresses() == 0


def test_drop_log_allows_a_burst_per_second() -> None:
    log = DropLog(per_second=3)
    assert [log.allow(0.0) for _ in range(5)] == [True, True, True, False, False]
    assert log.allow(0.5) is False
    assert log.allow(1.0) is True
