"""perc's DTLS engine recovering lost datagrams against OpenSSL, with perc's timers on a fake
clock.

OpenSSL's retransmission timer reads the wall clock (and is never polled here), so OpenSSL never
retransmits on its own in these tests: each case drops one datagram whose loss perc's side must
repair, by its own timer or by answering OpenSSL's reaction. The cases where only OpenSSL's
timer could help (its ClientHello or flight 5, or the final flight perc's server sends, which has
no timer by RFC 6347 §4.2.4) are not tested here; the engine-only lossy runs cover them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from perc.identity import Identity
from tests.dtls_interop.engine import GatedServer, client_peer, server_peer
from tests.dtls_interop.harness import describe
from tests.dtls_interop.openssl_peer import OpensslPeer

Drop = Callable[[str, int, bytes], bool]  # (direction "us"/"them", index in that direction, data)


def drive(ours: Any, theirs: OpensslPeer, drop: Drop, *, max_time: float = 30.0) -> float:
    """Deliver everything except what ``drop`` picks; when the pair goes quiet, jump the fake
    clock to perc's timer. Returns the fake time at completion."""
    now = 0.0
    sent = {"us": 0, "them": 0}
    dropped = 0
    for _ in range(500):
        if ours.handshake_complete and theirs.handshake_complete:
            assert dropped == 1, "the drop predicate matched no datagram"
            return now
        moved = False
        for source, target, tag in ((ours, theirs, "us"), (theirs, ours, "them")):
            for datagram in source.datagrams_to_send():
                moved = True
                index = sent[tag]
                sent[tag] += 1
                if drop(tag, index, datagram):
                    dropped += 1
                else:
                    target.receive_datagram(datagram, now)
        if not moved:
            timer = ours.get_timer()
            if timer is None or timer > max_time:
                break
            now = max(now, timer)
            ours.handle_timer(now)
    raise AssertionError(f"no recovery by t={now}: {describe(ours)} / {describe(theirs)}")


def only(direction: str, index: int) -> Drop:
    return lambda tag, i, _data: tag == direction and i == index


def count_sent(ours: Any, theirs: OpensslPeer) -> dict[str, int]:
    """How many datagrams each side sends in a clean run of an identical pair."""
    sent = {"us": 0, "them": 0}

    def counting(tag: str, _i: int, _data: bytes) -> bool:
        sent[tag] += 1
        return False

    now = 0.0
    for _ in range(100):
        if ours.handshake_complete and theirs.handshake_complete:
            return sent
        for source, target, tag in ((ours, theirs, "us"), (theirs, ours, "them")):
            for datagram in source.datagrams_to_send():
                counting(tag, 0, datagram)
                target.receive_datagram(datagram, now)
    raise AssertionError("clean run did not complete")


def our_client_pair(
    client_identity: Identity, server_identity: Identity, *, mtu: int, cookie: bool
) -> tuple[Any, OpensslPeer]:
    ours = client_peer(client_identity, mtu=mtu)
    theirs = OpensslPeer(is_client=False, identity=server_identity, mtu=mtu, cookie_exchange=cookie)
    ours.connect(0.0)
    return ours, theirs


def our_server_pair(
    client_identity: Identity, server_identity: Identity, *, mtu: int, gated: bool
) -> tuple[Any, OpensslPeer]:
    ours: Any = (
        GatedServer(server_identity, mtu=mtu) if gated else server_peer(server_identity, mtu=mtu)
    )
    theirs = OpensslPeer(is_client=True, identity=client_identity, mtu=mtu)
    theirs.connect(0.0)
    return ours, theirs


def check(ours: Any, theirs: OpensslPeer) -> None:
    assert ours.failed is None and theirs.failed is None
    assert ours.completed.srtp_keying_material == theirs.srtp_keying_material


@pytest.mark.parametrize("mtu", [1200, 300])
@pytest.mark.parametrize("cookie", [False, True])
def test_our_client_repairs_each_lost_datagram_of_its_own(
    client_identity: Identity, server_identity: Identity, mtu: int, cookie: bool
) -> None:
    total = count_sent(*our_client_pair(client_identity, server_identity, mtu=mtu, cookie=cookie))[
        "us"
    ]
    assert total >= 2
    for index in range(total):
        ours, theirs = our_client_pair(client_identity, server_identity, mtu=mtu, cookie=cookie)
        drive(ours, theirs, only("us", index))
        check(ours, theirs)


@pytest.mark.parametrize("mtu", [1200, 300])
def test_our_client_repairs_lost_openssl_final_flight(
    client_identity: Identity, server_identity: Identity, mtu: int
) -> None:
    # OpenSSL's flight 6 (CCS + Finished) is its last datagram: our client retransmits flight
    # 5 on its timer and OpenSSL answers a repeated Finished with its final flight again.
    total = count_sent(*our_client_pair(client_identity, server_identity, mtu=mtu, cookie=False))
    ours, theirs = our_client_pair(client_identity, server_identity, mtu=mtu, cookie=False)
    when = drive(ours, theirs, only("them", total["them"] - 1))
    check(ours, theirs)
    assert when == 1.0  # one retransmission, at the initial 1 s timeout


@pytest.mark.parametrize("mtu", [1200, 300])
@pytest.mark.parametrize("gated", [False, True])
def test_our_server_repairs_each_lost_flight_4_datagram(
    client_identity: Identity, server_identity: Identity, mtu: int, gated: bool
) -> None:
    # our datagrams: [HVR], flight 4 (one or more), flight 6 (last, no timer by design)
    sent = count_sent(*our_server_pair(client_identity, server_identity, mtu=mtu, gated=gated))
    first = 1 if gated else 0  # the HVR is never retransmitted (RFC 6347 §4.2.1)
    indices = range(first, sent["us"] - 1)
    assert len(indices) >= (3 if mtu == 300 else 1)
    for index in indices:
        ours, theirs = our_server_pair(client_identity, server_identity, mtu=mtu, gated=gated)
        drive(ours, theirs, only("us", index))
        check(ours, theirs)
