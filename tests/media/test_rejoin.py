"""The media engine across a rejoin (D30) and what healing and the verdict read from it.

A rejoin gives an endpoint new hop-by-hop keys (a new DTLS association) and a new EKTKey;
its SSRCs and sequence numbers go on. In the in-memory conference the fake MDD re-attaches
the endpoint under its new outer keys, as a restarted or new MDD association would.
"""

from __future__ import annotations

import pytest

from perc.media.endpoint import EndpointMedia, MediaUsageError
from perc.srtp.keys import SrtpProfile
from tests.media.conference import Conference, new_ekt, new_keying


def _verified(receiver: EndpointMedia, sender: str) -> int:
    return int(receiver.report()["peers"][sender]["verified"])


def test_media_goes_on_across_a_rejoin_under_new_keys() -> None:
    conf = Conference()
    ekt = new_ekt(1)
    alice, bob, carol = (conf.add(n, "both", ekt) for n in ("alice", "bob", "carol"))
    conf.run(1.0)
    assert sorted(alice.take_newly_verified()) == ["bob", "carol"]
    assert alice.take_newly_verified() == []
    ssrcs = alice.our_ssrcs()
    # alice's association is gone; she joins again: new outer keys, and the KMF's rekey for
    # her join reaches everyone.
    keying, new = new_keying(), new_ekt(2)
    conf.mdd.attach("alice", keying)
    alice.rejoin(keying, new, conf.now)
    bob.rekey(new, conf.now)
    carol.rekey(new, conf.now)
    before = _verified(bob, "alice")
    conf.run(3.0)
    assert alice.our_ssrcs() == ssrcs and alice.spis == [1, 2]
    assert sorted(alice.take_newly_verified()) == ["bob", "carol"]  # again, after the rejoin
    for receiver in (bob, carol):
        peer = receiver.report()["peers"]["alice"]
        assert peer["e2e_failures"] == peer["hbh_failures"] == peer["payload_failures"] == 0
        assert peer["verified"] == peer["received"] == alice.sent
        assert peer["spis"] == [1, 2] and peer["bye"] is False
    assert _verified(bob, "alice") > before
    for sender in (bob, carol):
        peer = alice.report()["peers"][sender.name]
        assert peer["e2e_failures"] == peer["hbh_failures"] == 0
        assert peer["verified"] == peer["received"]


def test_a_rejoin_keeps_reading_peers_still_on_the_previous_key() -> None:
    """bob has not had the new EKTKey yet: alice still reads him under the old one."""
    conf = Conference()
    ekt = new_ekt(1)
    alice = conf.add("alice", "audio", ekt)
    conf.add("bob", "audio", ekt)
    conf.run(1.0)
    keying = new_keying()
    conf.mdd.attach("alice", keying)
    alice.rejoin(keying, new_ekt(2), conf.now)
    seen = _verified(alice, "bob")
    conf.run(2.0)
    peer = alice.report()["peers"]["bob"]
    assert peer["verified"] - seen >= 45 and peer["e2e_failures"] == 0


def test_a_rejoin_needs_a_double_profile() -> None:
    conf = Conference()
    alice = conf.add("alice", "audio", new_ekt(1))
    single = new_keying(SrtpProfile.AEAD_AES_128_GCM)
    with pytest.raises(MediaUsageError, match="not a DOUBLE profile"):
        alice.rejoin(single, new_ekt(2), 0.0)


def test_a_newer_spi_we_lack_is_measured_and_forgotten_once_we_hold_it() -> None:
    conf = Conference()
    ekt = new_ekt(1)
    alice, bob = conf.add("alice", "audio", ekt), conf.add("bob", "audio", ekt)
    conf.run(1.0)
    assert bob.newer_spi is None and bob.stale_key_for(conf.now) == 0.0
    newer = new_ekt(2)
    alice.rekey(newer, conf.now)  # bob is left out of the rekey
    conf.run(1.5)
    assert bob.newer_spi == 2 and 0.3 < bob.stale_key_for(conf.now) <= 0.5
    conf.run(2.6)
    assert bob.stale_key_for(conf.now) > 1.0
    assert bob.stale_key_for(conf.now + 1.5) == 0.0  # nothing more arrived since: not stale
    bob.rekey(newer, conf.now)
    assert bob.newer_spi is None and bob.stale_key_for(conf.now) == 0.0


def test_an_older_spi_is_not_a_newer_key() -> None:
    """A member still on the previous key (its rekey is late) is not a reason to rejoin."""
    conf = Conference()
    old, new = new_ekt(1), new_ekt(2)
    alice = conf.add("alice", "audio", old)
    bob = conf.add("bob", "audio", new)
    conf.run(2.0)
    assert bob.newer_spi is None and alice.newer_spi == 2


def test_peers_last_verified_and_bye() -> None:
    conf = Conference()
    ekt = new_ekt(1)
    alice, bob = conf.add("alice", "audio", ekt), conf.add("bob", "audio", ekt)
    conf.add("carol", "audio", ekt)
    conf.run(1.0)
    bob.bye(conf.now)
    conf.pump(conf.now)
    conf.remove("carol")  # gone without a word
    conf.run(3.0)
    seen = alice.peers_last_verified()
    assert seen["bob"][1] is True and seen["carol"][1] is False
    assert 0.9 <= seen["bob"][0] <= 1.0 and 0.9 <= seen["carol"][0] <= 1.0
    peers = alice.report()["peers"]
    assert peers["bob"]["bye"] is True and peers["carol"]["bye"] is False
    assert 0.9 <= peers["carol"]["last_verified"] <= 1.0


def test_a_rejoin_under_the_same_ektkey_takes_new_ssrcs() -> None:
    """Without a rekey on join the KMF hands back the EKTKey we had: new SSRCs, since our new
    E2E key under the same SPI and epoch would be ignored (D8)."""
    conf = Conference()
    ekt = new_ekt(1)
    alice, bob = conf.add("alice", "both", ekt), conf.add("bob", "audio", ekt)
    conf.run(1.0)
    old = set(alice.our_ssrcs())
    keying = new_keying()
    conf.mdd.attach("alice", keying)
    alice.rejoin(keying, ekt, conf.now)
    assert not old & set(alice.our_ssrcs()) and alice.ssrc == alice.our_ssrcs()[0]
    seen = _verified(bob, "alice")
    conf.run(2.0)
    peer = bob.report()["peers"]["alice"]
    assert peer["e2e_failures"] == peer["hbh_failures"] == 0
    assert peer["verified"] > seen and len(peer["streams"]) == 4
    assert peer["ssrc"] == alice.ssrc and alice.spis == [1]
