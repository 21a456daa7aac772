"""Self-tests of the fake lossy network (netsim.py) with trivial fake peers."""

from __future__ import annotations

import pytest

from tests.dtls_interop.netsim import Link, Network


class PingClient:
    """Stop-and-wait: sends PING n, retransmits on a 1 s doubling timer, needs PONG n."""

    def __init__(self, count: int, *, give_up_after: int | None = None) -> None:
        self.count = count
        self.give_up_after = give_up_after
        self.n = 0
        self.rto = 1.0
        self.retries = 0
        self.timer: float | None = None
        self.outbox: list[bytes] = []
        self.timer_calls: list[float] = []
        self.gave_up = False

    def connect(self, now: float) -> None:
        self._send(now)

    def _send(self, now: float) -> None:
        self.outbox.append(b"PING %d" % self.n)
        self.timer = now + self.rto

    @property
    def done(self) -> bool:
        return self.n == self.count

    def receive_datagram(self, data: bytes, now: float) -> None:
        if data == b"PONG %d" % self.n:
            self.n += 1
            self.rto = 1.0
            self.retries = 0
            if self.done:
                self.timer = None
            else:
                self._send(now)

    def datagrams_to_send(self) -> list[bytes]:
        out, self.outbox = self.outbox, []
        return out

    def get_timer(self) -> float | None:
        return self.timer

    def handle_timer(self, now: float) -> None:
        self.timer_calls.append(now)
        if self.give_up_after is not None and self.retries >= self.give_up_after:
            self.gave_up = True
            self.timer = None
            return
        self.retries += 1
        self.rto = min(self.rto * 2, 60.0)
        self._send(now)


class PongServer:
    def __init__(self) -> None:
        self.outbox: list[bytes] = []
        self.received: list[bytes] = []

    def receive_datagram(self, data: bytes, now: float) -> None:
        self.received.append(data)
        if data.startswith(b"PING "):
            self.outbox.append(b"PONG " + data[5:])

    def datagrams_to_send(self) -> list[bytes]:
        out, self.outbox = self.outbox, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        raise AssertionError("server has no timer")


class Blaster:
    """Sends `count` numbered datagrams once, then nothing."""

    def __init__(self, count: int) -> None:
        self.outbox = [b"%06d" % i for i in range(count)]

    def receive_datagram(self, data: bytes, now: float) -> None:
        pass

    def datagrams_to_send(self) -> list[bytes]:
        out, self.outbox = self.outbox, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass


def run_ping(seed: int, link: Link, count: int = 20, **kwargs: float):
    client, server = PingClient(count), PongServer()
    client.connect(0.0)
    net = Network.symmetric(seed, link, record_trace=True)
    result = net.run(client, server, until=lambda: client.done, **kwargs)
    return client, server, result


def test_clean_link_no_retransmission_and_exact_time() -> None:
    client, _server, result = run_ping(1, Link(latency=0.01), count=10)
    assert result.done
    assert client.timer_calls == []
    assert result.now == pytest.approx(10 * 2 * 0.01)
    assert result.c2s.dropped == result.s2c.dropped == 0
    assert result.c2s.delivered == result.c2s.sent == 10


def test_same_seed_same_run_other_seed_other_run() -> None:
    link = Link(drop=0.2, duplicate=0.2, reorder=0.2)
    runs = [run_ping(seed, link)[2] for seed in (7, 7, 8)]
    assert runs[0].trace == runs[1].trace
    assert runs[0].c2s == runs[1].c2s
    assert runs[0].trace != runs[2].trace


def test_drop_and_duplicate_rates_and_accounting() -> None:
    link = Link(drop=0.3, duplicate=0.1)
    blaster, sink = Blaster(20_000), PongServer()
    net = Network(3, link, Link())
    result = net.run(blaster, sink, until=lambda: False)
    assert result.outcome == "stalled"  # everything delivered, no timers
    stats = result.c2s
    assert stats.sent == 20_000
    assert 0.28 < stats.dropped / stats.sent < 0.32
    # duplication is decided independently of the drop
    assert 0.08 < stats.duplicated / (stats.sent - stats.dropped) < 0.12
    assert stats.delivered == stats.sent - stats.dropped + stats.duplicated
    assert len(sink.received) == stats.delivered


def test_reorder_changes_order_only_when_asked() -> None:
    for reorder, expect_sorted in ((0.0, True), (0.3, False)):
        blaster, sink = Blaster(500), PongServer()
        Network(5, Link(reorder=reorder), Link()).run(blaster, sink, until=lambda: False)
        assert len(sink.received) == 500
        assert (sink.received == sorted(sink.received)) is expect_sorted


def test_lossy_ping_pong_completes_through_retransmissions() -> None:
    link = Link(drop=0.3, duplicate=0.1, reorder=0.1)
    client, _server, result = run_ping(11, link, count=50)
    assert result.done
    assert client.n == 50
    assert result.client_timer_fires > 0
    assert result.c2s.dropped > 0 and result.s2c.dropped > 0


def test_timer_fires_at_exact_fake_times() -> None:
    client, server = PingClient(1, give_up_after=4), PongServer()
    client.connect(0.0)
    result = Network.symmetric(1, Link(drop=1.0)).run(client, server, until=lambda: client.done)
    # 1 s initial, doubling: expiries at 1, 3, 7, 15, then the give-up at 31
    assert client.timer_calls == [1.0, 3.0, 7.0, 15.0, 31.0]
    assert client.gave_up
    assert result.outcome == "stalled"
    assert server.received == []


def test_vanished_peer_cannot_hang_the_run() -> None:
    client, server = PingClient(1), PongServer()  # retransmits forever
    client.connect(0.0)
    result = Network.symmetric(1, Link(drop=1.0)).run(
        client, server, until=lambda: client.done, max_time=600.0
    )
    assert result.outcome == "timed_out"
    assert result.now <= 600.0
    assert not client.done


def test_turn_limit_bounds_a_timer_stuck_in_the_past() -> None:
    class Stuck(PongServer):
        def get_timer(self) -> float | None:
            return 0.0

        def handle_timer(self, now: float) -> None:
            pass

    result = Network(1).run(Stuck(), PongServer(), until=lambda: False, max_turns=50)
    assert result.outcome == "timed_out"
    assert result.now == 0.0


def test_tap_sees_every_delivery_in_order() -> None:
    seen: list[tuple[str, bytes, float]] = []
    client, server = PingClient(3), PongServer()
    client.connect(0.0)
    result = Network.symmetric(1, Link(latency=0.5)).run(
        client, server, until=lambda: client.done, tap=lambda d, x, t: seen.append((d, x, t))
    )
    assert result.done
    assert seen == [
        ("c2s", b"PING 0", 0.5),
        ("s2c", b"PONG 0", 1.0),
        ("c2s", b"PING 1", 1.5),
        ("s2c", b"PONG 1", 2.0),
        ("c2s", b"PING 2", 2.5),
        ("s2c", b"PONG 2", 3.0),
    ]
