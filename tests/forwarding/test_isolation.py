"""The MDD's forwarding core never loads end-to-end key code; garbage never raises."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perc.forwarding import ForwardingConfig, ForwardingTable

from .helpers import Address, conference


def test_forwarding_core_never_loads_e2e_key_code() -> None:
    """RFC 8871 §4.1 / issue 5: the MDD process never loads the code that unwraps EKT tags
    or holds end-to-end keys. A fresh interpreter imports the core (and uses it) and lists
    what got loaded."""
    code = (
        "import sys, uuid\n"
        "import perc.forwarding as f\n"
        "t = f.ForwardingTable(f.ForwardingConfig(last_n=1))\n"
        "t.add(uuid.uuid4(), ('h', 1), 0.0)\n"
        "t.handle_datagram(('h', 1), bytes(64), 0.0)\n"
        "bad = sorted(m for m in sys.modules if m in ('perc.srtp.ekt', 'perc.srtp.double')"
        " or 'keywrap' in m)\n"
        "print(','.join(bad) or 'clean')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "clean", out.stdout + out.stderr


def _table() -> tuple[ForwardingTable[Address], list[Address]]:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(last_n=1, hold_limit=4))
    eps = conference(table, 3)
    (unkeyed,) = conference(table, 1, keys=False, first_port=6000, first_name="x")
    # Let the table learn SSRCs and a video stream so RTCP and last_n paths are live.
    for ep in eps:
        table.handle_datagram(ep.address, ep.send(0.0, pt=96, keyframe=True), 0.0)
    return table, [ep.address for ep in eps] + [unkeyed.address, ("10.0.0.9", 9)]


_TABLE, _ADDRESSES = _table()

_rtpish = st.builds(
    lambda b0, b1, rest: bytes((b0, b1)) + rest,
    st.integers(0x80, 0xBF),
    st.integers(0, 255),
    st.binary(max_size=120),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(5)),
    st.one_of(st.binary(max_size=200), _rtpish),
    st.floats(0, 100),
)
def test_garbage_datagrams_never_raise(which: int, data: bytes, now: float) -> None:
    out = _TABLE.handle_datagram(_ADDRESSES[which], data, now)
    assert out == []  # nothing forged authenticates


def test_truncations_and_bit_flips_of_valid_packets_never_raise_and_are_counted() -> None:
    table: ForwardingTable[Address] = ForwardingTable(ForwardingConfig(last_n=1))
    a, _b, _c = conference(table, 3)
    rtcp = struct.pack("!BBHI", 0x80, 200, 6, a.ssrc) + bytes(20)
    samples = [a.send(0.0), a.send(0.0, pt=96, keyframe=True), a.send_rtcp(rtcp)]
    dropped = 0
    for wire in samples:
        for cut in range(len(wire)):
            assert table.handle_datagram(a.address, wire[:cut], 0.0) == []
            dropped += 1
        for _ in range(20):
            i = int.from_bytes(os.urandom(2), "big") % len(wire)
            flipped = bytearray(wire)
            flipped[i] ^= 1 << (i % 8)
            # Most flips fail authentication; an EKT-tag flip passes the MD untouched (D11:
            # the MD never parses the tag; the receiver's EKT check catches it).
            out = table.handle_datagram(a.address, bytes(flipped), 0.0)
            dropped += not out
    c = table.associations[a.association_id].counters
    drops = sum(v for k, v in c.as_dict().items() if k.startswith("drop_"))
    assert drops == dropped
    assert c.received == drops + c.packets_in
