"""A ClientHello's offer, read once by the engine (so that callers never parse handshake bytes).

A server must decide things about a datagram before any per-association state exists (is it a
ClientHello at all? is it a restarted client, RFC 6347 §4.2.8?) and, once it answers, on what
the client offered (D18 profile choice, RFC 8870 EKT ciphers, RFC 8844 tls-id). Both go
through here: :func:`first_client_hello_untrusted` finds the ClientHello at the start of a
datagram (the cookie gate uses it too), :func:`client_offer` turns it into a
:class:`~perc.dtls.events.ClientOffer`.
"""

from __future__ import annotations

import attrs

from perc.dtls.events import ClientOffer
from perc.wire.dtls import (
    ClientHello,
    ContentType,
    DtlsDecodeError,
    DtlsRecord,
    ExtensionType,
    HandshakeFragment,
    HandshakeType,
    UseSrtp,
    decode_opaque8,
    decode_uint8_list,
    parse_datagram_untrusted,
    parse_handshake_fragments_untrusted,
)

# Record header (13) + handshake header (12): the message type is the 14th byte.
_MIN_HELLO_DATAGRAM = 25
_MSG_TYPE_OFFSET = 13


@attrs.frozen(slots=True)
class FirstClientHello:
    record: DtlsRecord
    fragment: HandshakeFragment
    hello: ClientHello


def first_client_hello_untrusted(datagram: bytes) -> FirstClientHello | None:
    """The ClientHello when ``datagram``'s first record is an epoch-0 DTLS handshake record
    whose first fragment is one whole ClientHello; else None. Never raises."""
    if (
        len(datagram) <= _MIN_HELLO_DATAGRAM
        or datagram[0] != ContentType.HANDSHAKE
        or datagram[_MSG_TYPE_OFFSET] != HandshakeType.CLIENT_HELLO
    ):
        return None  # cheap reject: most datagrams of a live association are not hellos
    records, _ = parse_datagram_untrusted(datagram)
    if not records:
        return None
    rec = records[0]
    if rec.content_type != ContentType.HANDSHAKE or rec.epoch != 0 or rec.version >> 8 != 0xFE:
        return None
    try:
        frag = parse_handshake_fragments_untrusted(rec.fragment)[0]
        if frag.msg_type != HandshakeType.CLIENT_HELLO or not frag.is_whole:
            return None
        return FirstClientHello(rec, frag, ClientHello.decode(frag.body))
    except DtlsDecodeError:
        return None


def client_offer(hello: ClientHello) -> ClientOffer:
    """The offer of a decoded ClientHello; raises DtlsDecodeError on a malformed extension
    that the offer reports (use_srtp, supported_ekt_ciphers, external_session_id)."""
    exts = {e.extension_type: e.data for e in hello.extensions or ()}
    srtp_raw = exts.get(ExtensionType.USE_SRTP)
    use_srtp = UseSrtp.decode(srtp_raw) if srtp_raw is not None else UseSrtp(())
    ekt_raw = exts.get(ExtensionType.SUPPORTED_EKT_CIPHERS)
    tls_raw = exts.get(ExtensionType.EXTERNAL_SESSION_ID)
    return ClientOffer(
        client_random=hello.random,
        cipher_suites=hello.cipher_suites,
        use_srtp=srtp_raw is not None,
        srtp_profiles=use_srtp.profiles,
        srtp_mki=use_srtp.mki,
        supported_ekt_ciphers=ekt_raw is not None,
        ekt_ciphers=decode_uint8_list(ekt_raw) if ekt_raw is not None else (),
        tls_id=decode_opaque8(tls_raw) if tls_raw is not None else None,
        cookie=hello.cookie,
    )


def client_offer_untrusted(datagram: bytes) -> ClientOffer | None:
    """The offer of the whole ClientHello that starts ``datagram``, else None (also for a
    malformed offer). Never raises: for a server's routing before any connection exists."""
    first = first_client_hello_untrusted(datagram)
    if first is None:
        return None
    try:
        return client_offer(first.hello)
    except DtlsDecodeError:
        return None
