"""Rows for bench/srtp.py: the Media Distributor hop and the double sender (RFC 8723).

Loaded by ``bench/srtp.py`` (run ``.venv/bin/python bench/srtp.py --only double`` or
``--only hop``); run on its own (``bash dev.sh bench srtp_rows_double``), it is bench/srtp.py
with only these rows and takes srtp.py's options (``--packets N``, ``--repeats R``, ``--check``,
``--quick``). Targets: the MD hop (outer decrypt + outer encrypt for one
receiver) within 1.5x of pylibsrtp unprotect + protect; the double sender (inner + outer
encryption + EKT field) within 2.5x of one pylibsrtp protect. The "MD hop+SEQ rewrite" rows
(every packet renumbered, OHB grows by two bytes) are for information, with a 2.5x target of
our own: libsrtp has nothing comparable. The hop input comes from a real
DoubleSender sending audio at 20 ms intervals, so about one packet in five carries a Full EKT
tag (first three packets, then every 100 ms, RFC 8870 §4.6) and the rest a Short tag.
"""

from __future__ import annotations

import os
import sys

import srtp
from srtp import Row, Runner, libsrtp_session, rtp_packets

from perc.srtp.context import SrtpSession
from perc.srtp.double import DoubleSender
from perc.srtp.ekt import EktCipher, EktParameterSet
from perc.srtp.hop import HeaderChanges, MediaDistributorHop


def rows(n: int) -> list[Row]:
    out: list[Row] = []
    for bits in (128, 256):
        klen = bits // 8
        cipher = EktCipher.AESKW_128 if bits == 128 else EktCipher.AESKW_256
        params = EktParameterSet(1, cipher, os.urandom(klen), os.urandom(12))
        a_key, a_salt = os.urandom(klen), os.urandom(12)
        b_key, b_salt = os.urandom(klen), os.urandom(12)
        for size in (160, 1200):
            plain = rtp_packets(n, size)
            ref = libsrtp_session(a_key, a_salt, outbound=True)
            ref_protected = [ref.protect(p) for p in plain]
            sender = DoubleSender(a_key, a_salt, params)
            double = [sender.protect(p, i * 0.02) for i, p in enumerate(plain)]

            def ours_hop(
                wire: list[bytes] = double,
                a_key: bytes = a_key,
                a_salt: bytes = a_salt,
                b_key: bytes = b_key,
                b_salt: bytes = b_salt,
            ) -> Runner:
                hop = MediaDistributorHop(SrtpSession(a_key, a_salt))
                to_b = SrtpSession(b_key, b_salt)
                decrypt, encrypt_for = hop.decrypt, hop.encrypt_for
                return lambda: [encrypt_for(to_b, decrypt(p)) for p in wire]

            def ours_hop_rewrite(
                wire: list[bytes] = double,
                a_key: bytes = a_key,
                a_salt: bytes = a_salt,
                b_key: bytes = b_key,
                b_salt: bytes = b_salt,
            ) -> Runner:
                # The MD renumbers SEQ (e.g. after a source switch): OHB grows by 2 bytes.
                hop = MediaDistributorHop(SrtpSession(a_key, a_salt))
                to_b = SrtpSession(b_key, b_salt)
                decrypt, encrypt_for = hop.decrypt, hop.encrypt_for
                changes = [HeaderChanges(sequence_number=(7 + i) & 0xFFFF) for i in range(n)]
                return lambda: [
                    encrypt_for(to_b, decrypt(p), c) for p, c in zip(wire, changes, strict=True)
                ]

            def lib_hop(
                wire: list[bytes] = ref_protected,
                a_key: bytes = a_key,
                a_salt: bytes = a_salt,
                b_key: bytes = b_key,
                b_salt: bytes = b_salt,
            ) -> Runner:
                unprotect = libsrtp_session(a_key, a_salt, outbound=False).unprotect
                protect = libsrtp_session(b_key, b_salt, outbound=True).protect
                return lambda: [protect(unprotect(p)) for p in wire]

            def ours_send(
                plain: list[bytes] = plain,
                a_key: bytes = a_key,
                a_salt: bytes = a_salt,
                params: EktParameterSet = params,
            ) -> Runner:
                protect = DoubleSender(a_key, a_salt, params).protect
                times = [i * 0.02 for i in range(len(plain))]
                return lambda: [protect(p, t) for p, t in zip(plain, times, strict=True)]

            def lib_send(
                plain: list[bytes] = plain, a_key: bytes = a_key, a_salt: bytes = a_salt
            ) -> Runner:
                protect = libsrtp_session(a_key, a_salt, outbound=True).protect
                return lambda: [protect(p) for p in plain]

            out.append(
                Row(f"MD hop AES-{bits}-GCM", size, ours_hop, lib_hop, 1.5, "libsrtp unprot+prot")
            )
            out.append(
                # Not an issue target (libsrtp cannot rewrite at all): shown for information.
                Row(
                    f"MD hop+SEQ rewrite AES-{bits}-GCM",
                    size,
                    ours_hop_rewrite,
                    lib_hop,
                    2.5,
                    "libsrtp unprot+prot",
                )
            )
            out.append(
                Row(
                    f"double sender AES-{bits}-GCM",
                    size,
                    ours_send,
                    lib_send,
                    2.5,
                    "libsrtp protect",
                )
            )
    return out


#: Row names that come from this module (srtp.py's ``--only`` takes a comma-separated list).
ONLY = "MD hop,double sender"

if __name__ == "__main__":
    sys.exit(srtp.main(["--only", ONLY, *sys.argv[1:]]))
