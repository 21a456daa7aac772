"""contrib/wireshark/perc.lua in tshark: a captured real conference, and crafted bad input.

The conference test captures loopback with dumpcap (as root) while a KMF, an MDD and two
endpoints run with SSLKEYLOGFILE, then checks what tshark with perc.lua finds: every tunnel
message type with its fields, the EKTKey messages (type 26) inside the decrypted DTLS (on
UDP and inside the tunnel), and Full and Short EKT fields on the SRTP packets, compared with
the processes' events. The malformed-input test writes a pcap of plain TCP segments (decoded
as the tunnel with "Decode As") holding truncated and garbage messages.
"""

from __future__ import annotations

import struct
import subprocess
import uuid
from pathlib import Path

import pytest
import trio

from perc.events import AssociationKeyed, Rekeyed
from tests.system.conftest import System, system  # noqa: F401  (the fixture)

from .capture import capture_conference, require

ROOT = Path(__file__).resolve().parents[2]
LUA = ROOT / "contrib" / "wireshark" / "perc.lua"


def tshark(pcap: Path, *args: str) -> str:
    """Run tshark with perc.lua; it must exit 0 and report no Lua error."""
    proc = subprocess.run(
        [require("tshark"), "-n", "-X", f"lua_script:{LUA}", "-r", str(pcap), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Lua Error" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc.stdout


def rows(text: str) -> list[list[str]]:
    return [line.split("\t") for line in text.splitlines() if line]


def values(cells: str) -> list[str]:
    """One -T fields cell: the field's occurrences, comma separated."""
    return [v for v in cells.split(",") if v]


@pytest.mark.slow
async def test_conference_capture(system: System) -> None:  # noqa: F811
    async with trio.open_nursery() as nursery:
        cap = await capture_conference(system, nursery)
        nursery.cancel_scope.cancel()
    common = (
        "-o", f"tls.keylog_file:{cap.keylog}",
        "-o", f"perc_tunnel.port:{cap.kmf_port}",
    )  # fmt: skip

    # --- the tunnel: all five message types, with their fields -----------------------------
    out = tshark(
        cap.pcap, *common,
        "-Y", f"tcp.port == {cap.kmf_port} && perc_tunnel",
        "-T", "fields", "-E", "occurrence=a",
        "-e", "perc_tunnel.msg_type",
        "-e", "perc_tunnel.version",
        "-e", "perc_tunnel.profile",
        "-e", "perc_tunnel.highest_version",
        "-e", "perc_tunnel.association_id",
        "-e", "perc_tunnel.protection_profile",
        "-e", "perc_tunnel.client_write_key",
        "-e", "perc_tunnel.server_write_salt",
        "-e", "perc_tunnel.dtls_length",
        "-e", "_ws.expert",
    )  # fmt: skip
    types: set[int] = set()
    versions: set[str] = set()
    profiles: set[str] = set()
    highest: set[str] = set()
    ids: set[uuid.UUID] = set()
    selected: set[str] = set()
    key_sizes: set[int] = set()
    salt_sizes: set[int] = set()
    dtls_lengths = 0
    for msg_type, ver, prof, high, aid, sel, ckey, ssalt, dlen, expert in rows(out):
        types.update(int(t) for t in values(msg_type))
        versions.update(values(ver))
        profiles.update(values(prof))
        highest.update(values(high))
        ids.update(uuid.UUID(a) for a in values(aid))
        selected.update(values(sel))
        key_sizes.update(len(bytes.fromhex(k.replace(":", ""))) for k in values(ckey))
        salt_sizes.update(len(bytes.fromhex(k.replace(":", ""))) for k in values(ssalt))
        dtls_lengths += len(values(dlen))
        # only the probing tunnel's version 1 earns a (protocol) warning
        assert expert == "" or values(ver) == ["1"], f"expert info on a real tunnel: {expert}"
    assert types == {1, 2, 3, 4, 5}, types
    assert versions == {"0", "1"}  # the MDD's 0, the probing tunnel's 1
    assert profiles == {"0x0009", "0x000a"}
    assert highest == {"0"}
    assert selected <= {"0x0009", "0x000a"} and selected
    assert key_sizes <= {16, 32} and key_sizes
    assert salt_sizes == {12}
    assert dtls_lengths > 10
    keyed = {e.association for e in cap.mdd.find_events(AssociationKeyed)}
    assert len(keyed) == 2
    assert keyed <= ids, (keyed, ids)

    # --- without the port preference, the heuristic on TLS application data finds them -----
    out = tshark(
        cap.pcap, "-o", f"tls.keylog_file:{cap.keylog}", "-o", "perc_tunnel.port:0",
        "-Y", f"tcp.port == {cap.kmf_port} && perc_tunnel",
        "-T", "fields", "-E", "occurrence=a", "-e", "perc_tunnel.msg_type",
    )  # fmt: skip
    assert {int(t) for r in rows(out) for t in values(r[0])} == {1, 2, 3, 4, 5}, out

    # --- TunneledDtls reaches the DTLS dissector, one conversation per association ----------
    out = tshark(
        cap.pcap, *common,
        "-Y", f"tcp.port == {cap.kmf_port} && dtls.handshake.type == 20",
        "-T", "fields", "-e", "frame.number",
    )  # fmt: skip
    # Finished decrypted in both directions for both associations: each association's DTLS
    # session found its own keys
    assert len(rows(out)) >= 4, out

    # --- EKTKey (type 26), on UDP and inside the tunnel -------------------------------------
    out = tshark(
        cap.pcap, *common,
        "-Y", f"perc_ektkey && (tcp.port == {cap.kmf_port} || udp.port == {cap.mdd_port})",
        "-T", "fields", "-E", "occurrence=a",
        "-e", "tcp.port", "-e", "perc_ektkey.spi", "-e", "perc_ektkey.key_length",
        "-e", "perc_ektkey.salt_length", "-e", "perc_ektkey.ttl",
    )  # fmt: skip
    spis_tunnel: set[int] = set()
    spis_udp: set[int] = set()
    for tcp_port, spi, key_len, salt_len, ttl in rows(out):
        for s in values(spi):
            (spis_tunnel if tcp_port else spis_udp).add(int(s))
        assert set(values(key_len)) <= {"16", "32"}, key_len
        assert set(values(salt_len)) == {"12"}
        assert all(int(t) > 0 for t in values(ttl))
    rekeyed = {e.spi for e in cap.kmf.find_events(Rekeyed)}
    assert rekeyed, cap.kmf.text
    assert spis_tunnel == rekeyed, (spis_tunnel, rekeyed)
    assert spis_udp == rekeyed, (spis_udp, rekeyed)

    # --- EKT fields on SRTP -----------------------------------------------------------------
    out = tshark(
        cap.pcap, *common,
        "-Y", f"udp.port == {cap.mdd_port} && perc_ekt",
        "-T", "fields",
        "-e", "perc_ekt.type", "-e", "perc_ekt.spi", "-e", "perc_ekt.epoch",
        "-e", "perc_ekt.length", "-e", "perc_ekt.ciphertext", "-e", "rtp.ssrc",
    )  # fmt: skip
    full = short = 0
    for ekt_type, spi, epoch, length, ciphertext, ssrc in rows(out):
        assert ssrc, "the SRTP part is dissected as RTP"
        if ekt_type == "2":
            full += 1
            assert int(spi) in rekeyed
            assert int(epoch) >= 0
            assert int(length) == len(bytes.fromhex(ciphertext.replace(":", ""))) + 7
            assert int(length) in (47, 63)  # RFC 5649-wrapped 16 or 32-byte keys (SPEC 3.2)
        else:
            assert ekt_type == "0", ekt_type
            short += 1
    assert full > 0 and short > 0, (full, short)


# --- malformed input ---------------------------------------------------------------------------

PORT = 5555
AID = uuid.UUID("3f2c9a1e-7b4d-4c8e-9a10-55aa66bb77cc").bytes


def pcap_file(path: Path, segments: list[tuple[bool, bytes]]) -> None:
    """A classic pcap (LINKTYPE_RAW, IPv4) of one TCP stream: (from_client, payload) each."""
    out = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
    seq = {True: 1000, False: 5000}
    for i, (from_client, payload) in enumerate(segments):
        sport, dport = (40000, PORT) if from_client else (PORT, 40000)
        tcp = struct.pack(
            "!HHIIBBHHH", sport, dport, seq[from_client], seq[not from_client],
            5 << 4, 0x18, 65535, 0, 0,
        )  # fmt: skip
        seq[from_client] += len(payload)
        total = 20 + len(tcp) + len(payload)
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, total, i, 0x4000, 64, 6, 0,
            bytes([127, 0, 0, 1]), bytes([127, 0, 0, 2]) if from_client else bytes([127, 0, 0, 1]),
        )  # fmt: skip
        packet = ip + tcp + payload
        out += struct.pack("<IIII", 1_700_000_000 + i, 0, len(packet), len(packet))
        out += packet
    path.write_bytes(out)


def media_keys(body_tail: bytes) -> bytes:
    body = AID + b"\x00\x09" + body_tail
    return b"\x03" + len(body).to_bytes(2, "big") + body


GOOD_MEDIA_KEYS = media_keys(
    b"\x00" + b"\x10" + bytes(16) + b"\x10" + bytes(16) + b"\x0c" + bytes(12) + b"\x0c" + bytes(12)
)

BAD = [
    (True, bytes.fromhex("070001ff")),  # unknown type
    (False, bytes.fromhex("0200020000")),  # UnsupportedVersion body of 2 bytes
    (True, bytes.fromhex("050003aabbcc")),  # EndpointDisconnect body of 3 bytes
    (False, media_keys(b"\x05\x00")),  # MKI vector runs past the message
    (False, media_keys(b"\x00\x00" + bytes(8))),  # empty master key
    (True, b"\x04\x00\x15" + AID + b"\x00\xff\x16"),  # DTLS length disagrees
    (True, bytes.fromhex("01000400000309")),  # odd profile list
    (True, bytes.fromhex("0100010000")),  # SupportedProfiles body too short... then 1 byte
    (True, bytes(range(256)) * 2),  # garbage (reads as a reserved type 0)
    (True, b"\x04\x00\x42" + AID + b"\x00\x30" + bytes(range(0x30))),  # junk DTLS inside
    (False, b"\x05\x00"),  # truncated header
    (False, b"\x03\x00\xff" + bytes(20)),  # length larger than what follows
]


def test_malformed_messages_are_marked_not_fatal(tmp_path: Path) -> None:
    pcap = tmp_path / "bad.pcap"
    good = b"\x05\x00\x10" + AID
    pcap_file(pcap, [(True, good), *BAD, (False, good)])
    decode = ("-d", f"tcp.port=={PORT},perc_tunnel", "-o", "perc_tunnel.desegment:FALSE")
    out = tshark(
        pcap, *decode, "-T", "fields",
        "-e", "frame.number", "-e", "perc_tunnel.msg_type", "-e", "_ws.expert.group",
        "-e", "_ws.expert.severity",
    )  # fmt: skip
    by_frame = {int(r[0]): r for r in rows(out)}
    assert len(by_frame) == len(BAD) + 2
    malformed = 0x07000000  # PI_MALFORMED
    for number in range(1, len(BAD) + 3):
        _frame, msg_type, groups, _severity = by_frame[number]
        is_bad = 1 < number < len(BAD) + 2
        marked = str(malformed) in values(groups) or hex(malformed) in values(groups)
        if number == 11:  # junk DTLS in a well-formed TunneledDtls: DTLS's business
            assert values(msg_type) == ["4"], by_frame[number]
            continue
        assert marked == is_bad, (number, by_frame[number], BAD[number - 2] if is_bad else "")
    # the well-formed EndpointDisconnect on both sides of the garbage still decodes
    assert by_frame[1][1] == "5" and by_frame[len(BAD) + 2][1] == "5"


def test_split_message_is_reassembled_and_truncated_stream_survives(tmp_path: Path) -> None:
    pcap = tmp_path / "split.pcap"
    segments = [
        (False, GOOD_MEDIA_KEYS[:2]),  # not even a whole header
        (False, GOOD_MEDIA_KEYS[2:30]),
        (False, GOOD_MEDIA_KEYS[30:] + b"\x05\x00\x10" + AID[:4]),
        (False, AID[4:]),
        (True, b"\x03\x00\xff" + bytes(20)),  # the capture ends inside this message
    ]
    pcap_file(pcap, segments)
    out = tshark(
        pcap, "-d", f"tcp.port=={PORT},perc_tunnel", "-Y", "perc_tunnel",
        "-T", "fields", "-E", "occurrence=a",
        "-e", "perc_tunnel.msg_type", "-e", "perc_tunnel.association_id",
        "-e", "perc_tunnel.client_write_key_length", "-e", "_ws.expert.group",
    )  # fmt: skip
    found = rows(out)
    assert [r[0] for r in found] == ["3", "5"], found
    aid = str(uuid.UUID(bytes=AID))
    assert found[0][1] == aid and found[0][2] == "16" and found[0][3] == ""
    assert found[1][1] == aid and found[1][3] == ""
