"""The DTLS 1.2 handshake state machine (client and server), all transitions in this module.

Theory of operation
-------------------
The handshake consumes whole, reassembled handshake messages (and ChangeCipherSpec) and
produces whole messages grouped in flights; it never sees records, fragments or timers
(STYLE practice 2). It talks to its host (the connection) through four calls: ``send_flight``,
``install_keys``, ``echo_record_sequence`` and ``handshake_complete``.

One dispatch (STYLE practice 3): ``_DISPATCH[(state, msg_type)]``; any other pair is an
``unexpected_message`` alert. States and flights (SPEC-DTLS 3.6)::

  client: EXPECT_SERVER_HELLO -(HVR: new CH)-> EXPECT_SERVER_HELLO
          -SH-> EXPECT_CERTIFICATE -Cert-> EXPECT_SERVER_KEY_EXCHANGE
          -SKE-> EXPECT_CERTIFICATE_REQUEST -CR-> EXPECT_SERVER_HELLO_DONE
                                            -SHD (no CR)-> (flight 5)
          -SHD-> flight 5 (Cert, CKE, CV, CCS, Finished) -> EXPECT_CCS -CCS-> EXPECT_FINISHED
          -Finished-> ESTABLISHED
  server: EXPECT_CLIENT_HELLO -CH-> flight 4 (SH, Cert, SKE, CR, SHD) -> EXPECT_CERTIFICATE
          -Cert-> EXPECT_CLIENT_KEY_EXCHANGE -CKE-> EXPECT_CERTIFICATE_VERIFY
          -CV-> EXPECT_CCS -CCS-> EXPECT_FINISHED -Finished-> flight 6 (CCS, Finished)
          -> ESTABLISHED
  ESTABLISHED: client takes EKTKey (RFC 8870 §5.2.2); everything else is unexpected.

Numbering (SPEC-DTLS 3.2): the server numbers its messages from the ClientHello's
message_seq (stateless cookie echo), so ServerHello.message_seq = ClientHello.message_seq.

Transcript (SPEC-DTLS 3.4): a bytearray of whole messages in single-fragment form, from the
ClientHello the ServerHello answers; hashed on demand with the PRF hash (session hash,
Finished) or the signature hash (CertificateVerify).
"""

from __future__ import annotations

import functools
import hmac
import os
import warnings
from collections.abc import Callable
from enum import Enum, auto
from typing import ClassVar, Protocol, Self, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.utils import CryptographyDeprecationWarning

from perc.dtls import keys
from perc.dtls.config import DtlsConfiguration, PeerIdentity, own_certificate_der
from perc.dtls.errors import AlertDescription as AD
from perc.dtls.errors import AlertError
from perc.dtls.flight import FlightItem, OutgoingCcs, OutgoingMessage
from perc.identity import fingerprint_of_der
from perc.wire.dtls import (
    DTLS_1_2,
    Certificate,
    CertificateRequest,
    CertificateVerify,
    ClientHello,
    ClientKeyExchange,
    DtlsDecodeError,
    EktKey,
    Extension,
    ExtensionType,
    Finished,
    HandshakeType,
    HelloVerifyRequest,
    ServerHello,
    ServerHelloDone,
    ServerKeyExchange,
    UseSrtp,
    decode_ekt_selected,
    decode_empty,
    decode_opaque8,
    decode_uint8_list,
    decode_uint16_list,
    encode_handshake,
    encode_opaque8,
    encode_uint8_list,
    encode_uint16_list,
)

X25519 = 29
SECP256R1 = 23
ECDSA_SHA256 = 0x0403
ECDSA_SHA384 = 0x0503
SCSV = 0x00FF
SIGNATURE_SCHEMES = (ECDSA_SHA256, ECDSA_SHA384)
_SIG_HASH: dict[int, hashes.HashAlgorithm] = {
    ECDSA_SHA256: hashes.SHA256(),
    ECDSA_SHA384: hashes.SHA384(),
}
EKT_KEY_LENGTHS = {1: 16, 2: 32}  # aeskw_128, aeskw_256 (D6)
MAX_HELLO_VERIFY_REQUESTS = 3  # bound HVR loops (SPEC-DTLS 3.5)
CCS = -1  # pseudo message type for the dispatch table


class State(Enum):
    CLIENT_START = auto()
    CLIENT_EXPECT_SERVER_HELLO = auto()
    CLIENT_EXPECT_CERTIFICATE = auto()
    CLIENT_EXPECT_SERVER_KEY_EXCHANGE = auto()
    CLIENT_EXPECT_CERTIFICATE_REQUEST = auto()
    CLIENT_EXPECT_SERVER_HELLO_DONE = auto()
    CLIENT_EXPECT_CCS = auto()
    CLIENT_EXPECT_FINISHED = auto()
    SERVER_EXPECT_CLIENT_HELLO = auto()
    SERVER_EXPECT_CERTIFICATE = auto()
    SERVER_EXPECT_CLIENT_KEY_EXCHANGE = auto()
    SERVER_EXPECT_CERTIFICATE_VERIFY = auto()
    SERVER_EXPECT_CCS = auto()
    SERVER_EXPECT_FINISHED = auto()
    ESTABLISHED = auto()


class _Encodable(Protocol):
    msg_type: ClassVar[int]

    def encode(self) -> bytes: ...


class _Decodable(Protocol):
    @classmethod
    def decode(cls, data: bytes) -> Self: ...


class HandshakeHost(Protocol):
    def send_flight(self, items: list[FlightItem], final: bool) -> None: ...

    def install_keys(self, suite: keys.CipherSuite, block: keys.KeyBlock) -> None: ...

    def echo_record_sequence(self, seq: int) -> None: ...

    def handshake_complete(self) -> None: ...

    def ekt_key_received(self, message: EktKey) -> None: ...


# --- ECDHE and signatures ----------------------------------------------------------------------

EphemeralKey = x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey


def generate_ephemeral(group: int) -> tuple[EphemeralKey, bytes]:
    """A fresh ephemeral key (RFC 9325 §7.4) and its public encoding (RFC 8422 §5.4)."""
    if group == X25519:
        xk = x25519.X25519PrivateKey.generate()
        return xk, xk.public_key().public_bytes_raw()
    pk = ec.generate_private_key(ec.SECP256R1())
    return pk, pk.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def ecdh(group: int, private: EphemeralKey, peer_public: bytes) -> bytes:
    """The pre-master secret (RFC 8422 §5.10); a bad or small-order point is illegal_parameter."""
    _check_point(group, peer_public)
    try:
        if isinstance(private, x25519.X25519PrivateKey):
            return private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
        # from_encoded_point checks that the point is on the curve (RFC 8422 §5.11).
        pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), peer_public)
        return private.exchange(ec.ECDH(), pub)
    except ValueError as e:
        raise AlertError(AD.illegal_parameter, f"bad ECDH public value: {e}") from None


def _check_point(group: int, point: bytes) -> None:
    """x25519: 32 bytes; P-256: uncompressed only (RFC 8422 §5.1.2)."""
    if (group == X25519 and len(point) != 32) or (
        group == SECP256R1 and (len(point) != 65 or point[0] != 4)
    ):
        raise AlertError(AD.illegal_parameter, "ECDH point of the wrong form")


def load_peer_certificate(
    certificates: tuple[bytes, ...],
) -> tuple[bytes, ec.EllipticCurvePublicKey]:
    """The peer's end-entity certificate, checked against perc's profile (SPEC-DTLS 4.3)."""
    if not certificates:
        # D17: the client must authenticate; an empty server chain is no better.
        raise AlertError(AD.handshake_failure, "peer sent no certificate")
    der = certificates[0]
    return der, _validated_key(der)


@functools.lru_cache(maxsize=1024)
def _validated_key(der: bytes) -> ec.EllipticCurvePublicKey:
    """Parse and check one DER certificate. Cached by its exact bytes: the same peers come
    back (every endpoint sees the KMF's certificate; the KMF sees each endpoint's on every
    reconnection), and the result depends on nothing else. Failures are not cached."""
    try:
        with warnings.catch_warnings():
            # cryptography warns (and will later refuse) on RFC 5280 violations such as a
            # non-positive serial: refuse them now, deterministically, instead of printing.
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            cert = x509.load_der_x509_certificate(der)
    except (
        ValueError,
        TypeError,
        x509.InvalidVersion,
        UnsupportedAlgorithm,
        CryptographyDeprecationWarning,
    ):
        raise AlertError(AD.bad_certificate, "certificate does not parse") from None
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise AlertError(AD.unsupported_certificate, "unsupported public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise AlertError(AD.unsupported_certificate, "certificate key is not ECDSA P-256")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise AlertError(AD.bad_certificate, "certificate is not validly self-signed") from None
    return key


def _verify(key: ec.EllipticCurvePublicKey, scheme: int, signature: bytes, data: bytes) -> None:
    try:
        key.verify(signature, data, ec.ECDSA(_SIG_HASH[scheme]))
    except InvalidSignature:
        # RFC 5246 §7.2.2: a signature that does not verify is decrypt_error.
        raise AlertError(AD.decrypt_error, "signature does not verify") from None


class Handshake:
    """One handshake, client or server. Raises :class:`AlertError` on peer misbehaviour."""

    def __init__(self, config: DtlsConfiguration, host: HandshakeHost) -> None:
        self.config = config
        self.host = host
        self.is_client = config.is_client
        self.state = State.CLIENT_START if config.is_client else State.SERVER_EXPECT_CLIENT_HELLO
        self._transcript = bytearray()
        self._send_seq = 0  # next message_seq we send
        self.client_random = b""
        self.server_random = b""
        self.suite: keys.CipherSuite | None = None
        self._group = 0
        self._server_public = b""
        # supported_groups also names the curves we accept in the server's ECDSA certificate
        # (RFC 8422 §5.1): secp256r1 is always listed, after the configured ECDHE preference
        # (SPEC-DTLS 5.2; OpenSSL refuses a P-256 certificate to an x25519-only client).
        self._offered_groups = config.groups + (
            (SECP256R1,) if SECP256R1 not in config.groups else ()
        )
        self._ephemeral: EphemeralKey | None = None
        self.master_secret = b""
        self.srtp_profile: int | None = None
        self.ekt_cipher: int | None = None
        self.peer_certificate_der = b""
        self.peer_fingerprint = ""
        self.peer_tls_id: bytes | None = None
        self._peer_key: ec.EllipticCurvePublicKey | None = None
        self._sign_scheme = ECDSA_SHA256
        self._cert_requested = False
        # client
        self.client_hello_seq = 0
        self._client_hello: ClientHello | None = None
        self._client_hello_raw = b""
        self._hvr_count = 0

    # --- helpers -------------------------------------------------------------------------

    def _message(self, msg: _Encodable, epoch: int = 0, transcript: bool = True) -> OutgoingMessage:
        body = msg.encode()
        msg_type = msg.msg_type
        seq = self._send_seq
        self._send_seq += 1
        if transcript:
            self._transcript += encode_handshake(msg_type, seq, body)
        return OutgoingMessage(epoch, msg_type, seq, body)

    def next_message_seq(self) -> int:
        """Take the next server message_seq (EKTKey after Finished, D23)."""
        seq = self._send_seq
        self._send_seq += 1
        return seq

    def _hash(self, alg: hashes.HashAlgorithm) -> bytes:
        return keys.digest(alg, bytes(self._transcript))

    def _derive_keys(self, pre_master: bytes) -> None:
        """EMS master secret over the transcript through ClientKeyExchange (RFC 7627 §4)."""
        suite = self.suite
        if suite is None:  # pragma: no cover - dispatch guarantees a suite
            raise AlertError(AD.internal_error, "no suite")
        session_hash = self._hash(suite.prf_hash)
        self.master_secret = keys.extended_master_secret(suite, pre_master, session_hash)
        self._ephemeral = None
        if self.config.keylog is not None:
            self.config.keylog(keys.keylog_line(self.client_random, self.master_secret))
        self.host.install_keys(
            suite,
            keys.key_block(suite, self.master_secret, self.client_random, self.server_random),
        )

    def _verify_data(self, client: bool) -> bytes:
        if self.suite is None:  # pragma: no cover
            raise AlertError(AD.internal_error, "no suite")
        return keys.finished_verify_data(
            self.suite, self.master_secret, client, bytes(self._transcript)
        )

    def _sign(self, scheme: int, data: bytes) -> bytes:
        return self.config.private_key.sign(data, ec.ECDSA(_SIG_HASH[scheme]))

    def _check_peer(self) -> None:
        """The caller's certificate policy (D15): None accepts, an alert code refuses."""
        self.peer_fingerprint = fingerprint_of_der(self.peer_certificate_der)
        if self.config.verify_peer is None:
            return
        verdict = self.config.verify_peer(
            PeerIdentity(self.peer_certificate_der, self.peer_fingerprint, self.peer_tls_id)
        )
        if verdict is not None:
            raise AlertError(verdict, f"peer {self.peer_fingerprint} refused")

    def _finish(self) -> None:
        """ESTABLISHED: drop what only the handshake needed (a KMF keeps many associations)."""
        self.state = State.ESTABLISHED
        self._transcript = bytearray()
        self._client_hello = None
        self._client_hello_raw = b""
        self._peer_key = None
        self._server_public = b""
        self.host.handshake_complete()

    def _add_received(self, msg_type: int, seq: int, body: bytes) -> None:
        self._transcript += encode_handshake(msg_type, seq, body)

    # --- entry points ----------------------------------------------------------------------

    def start(self) -> None:
        """Client: build and send the first ClientHello (flight 1)."""
        if self.state is not State.CLIENT_START:
            return
        c = self.config
        self.client_random = os.urandom(32)
        exts = [
            Extension(ExtensionType.SUPPORTED_GROUPS, encode_uint16_list(self._offered_groups)),
            Extension(ExtensionType.EC_POINT_FORMATS, encode_uint8_list((0,))),
            Extension(ExtensionType.SIGNATURE_ALGORITHMS, encode_uint16_list(SIGNATURE_SCHEMES)),
            Extension(ExtensionType.EXTENDED_MASTER_SECRET, b""),
            Extension(ExtensionType.RENEGOTIATION_INFO, encode_opaque8(b"")),
        ]
        if c.srtp_profiles:
            exts.append(Extension(ExtensionType.USE_SRTP, UseSrtp(c.srtp_profiles).encode()))
        if c.ekt_ciphers:
            exts.append(
                Extension(ExtensionType.SUPPORTED_EKT_CIPHERS, encode_uint8_list(c.ekt_ciphers))
            )
        if c.tls_id is not None:
            exts.append(Extension(ExtensionType.EXTERNAL_SESSION_ID, encode_opaque8(c.tls_id)))
        self._client_hello = ClientHello(
            DTLS_1_2, self.client_random, b"", b"", c.cipher_suites, b"\x00", tuple(exts)
        )
        self._send_client_hello()

    def _send_client_hello(self) -> None:
        ch = self._client_hello
        if ch is None:  # pragma: no cover
            raise AlertError(AD.internal_error, "no ClientHello")
        self.client_hello_seq = self._send_seq
        self._transcript = bytearray()
        item = self._message(ch)
        self._client_hello_raw = bytes(self._transcript)
        self.state = State.CLIENT_EXPECT_SERVER_HELLO
        self.host.send_flight([item], final=False)

    def handle_hello_verify_request(self, body: bytes) -> None:
        """Client: answer an HVR with a new ClientHello carrying the cookie (RFC 6347 §4.2.1).

        Called by the connection only in EXPECT_SERVER_HELLO with message_seq equal to the
        ClientHello just sent; the HVR is not part of the transcript.
        """
        try:
            hvr = HelloVerifyRequest.decode(body)
        except DtlsDecodeError as e:
            raise AlertError(AD.decode_error, str(e)) from None
        # The HVR version only signals the packet format (SPEC-DTLS 3.5): accept {254, x}.
        if hvr.server_version >> 8 != 0xFE:
            raise AlertError(AD.protocol_version, "HelloVerifyRequest is not DTLS")
        self._hvr_count += 1
        if self._hvr_count > MAX_HELLO_VERIFY_REQUESTS:
            raise AlertError(AD.handshake_failure, "too many HelloVerifyRequests")
        ch = self._client_hello
        if ch is None:  # pragma: no cover
            raise AlertError(AD.internal_error, "no ClientHello")
        self._client_hello = ClientHello(
            ch.client_version,
            ch.random,
            ch.session_id,
            hvr.cookie,
            ch.cipher_suites,
            ch.compression_methods,
            ch.extensions,
        )
        self._send_client_hello()

    def handle_message(
        self, msg_type: int, seq: int, body: bytes, epoch: int, record_seq: int
    ) -> None:
        handler = _DISPATCH.get((self.state, msg_type))
        if handler is None:
            raise AlertError(
                AD.unexpected_message, f"{_type_name(msg_type)} in state {self.state.name}"
            )
        # Finished and EKTKey only under the new keys; everything else of the handshake in
        # epoch 0 (SPEC-DTLS 1.4, 3.8).
        want_epoch = 1 if msg_type in (HandshakeType.FINISHED, HandshakeType.EKT_KEY) else 0
        if epoch != want_epoch:
            raise AlertError(AD.unexpected_message, f"{_type_name(msg_type)} in epoch {epoch}")
        handler(self, seq, body, record_seq)

    @property
    def expects_ccs(self) -> bool:
        return self.state in (State.CLIENT_EXPECT_CCS, State.SERVER_EXPECT_CCS)

    def handle_ccs(self) -> None:
        """The peer's ChangeCipherSpec (only called when ``expects_ccs``)."""
        self.state = (
            State.CLIENT_EXPECT_FINISHED if self.is_client else State.SERVER_EXPECT_FINISHED
        )

    # --- client handlers ---------------------------------------------------------------------

    def _client_server_hello(self, seq: int, body: bytes, record_seq: int) -> None:
        sh = _decode(ServerHello, body)
        c = self.config
        if sh.server_version != DTLS_1_2:
            raise AlertError(AD.protocol_version, f"ServerHello version {sh.server_version:#x}")
        suite = keys.CIPHER_SUITES.get(sh.cipher_suite)
        if suite is None or sh.cipher_suite not in c.cipher_suites:
            raise AlertError(AD.illegal_parameter, f"unoffered suite {sh.cipher_suite:#06x}")
        if sh.compression_method != 0:
            raise AlertError(AD.illegal_parameter, "compression")
        ch = self._client_hello
        offered = {e.extension_type for e in (ch.extensions or ())} if ch else set()
        exts: dict[int, bytes] = {}
        for e in sh.extensions or ():
            if e.extension_type not in offered:
                # RFC 5246 §7.4.1.4: only extensions the client offered.
                raise AlertError(
                    AD.unsupported_extension, f"unoffered extension {e.extension_type}"
                )
            exts[e.extension_type] = e.data
        try:
            if ExtensionType.EXTENDED_MASTER_SECRET not in exts:
                raise AlertError(AD.handshake_failure, "server did not negotiate EMS (D17)")
            decode_empty(exts[ExtensionType.EXTENDED_MASTER_SECRET])
            reneg = exts.get(ExtensionType.RENEGOTIATION_INFO)
            if reneg is None or decode_opaque8(reneg) != b"":
                raise AlertError(AD.handshake_failure, "renegotiation_info missing (RFC 5746)")
            pf = exts.get(ExtensionType.EC_POINT_FORMATS)
            if pf is not None and 0 not in decode_uint8_list(pf):
                raise AlertError(AD.illegal_parameter, "uncompressed points not supported")
            srtp = exts.get(ExtensionType.USE_SRTP)
            if c.srtp_profiles:
                if srtp is None:
                    raise AlertError(AD.handshake_failure, "server chose no SRTP profile")
                use = UseSrtp.decode(srtp)
                if len(use.profiles) != 1 or use.profiles[0] not in c.srtp_profiles or use.mki:
                    # RFC 5764 §4.1.1/§4.1.3: exactly one offered profile, our (empty) MKI.
                    raise AlertError(AD.illegal_parameter, "bad use_srtp in ServerHello")
                self.srtp_profile = use.profiles[0]
            ekt = exts.get(ExtensionType.SUPPORTED_EKT_CIPHERS)
            if ekt is not None:
                chosen = decode_ekt_selected(ekt)
                if chosen not in c.ekt_ciphers:
                    raise AlertError(AD.illegal_parameter, f"unoffered EKT cipher {chosen}")
                self.ekt_cipher = chosen
            tls_id = exts.get(ExtensionType.EXTERNAL_SESSION_ID)
            if tls_id is not None:
                self.peer_tls_id = decode_opaque8(tls_id)
        except DtlsDecodeError as e:
            raise AlertError(AD.decode_error, str(e)) from None
        if c.expected_peer_tls_id is not None and (
            self.peer_tls_id is None
            or not hmac.compare_digest(self.peer_tls_id, c.expected_peer_tls_id)
        ):
            # RFC 8844 §4.3 / RFC 9185 §5.1: a mismatch terminates the association.
            raise AlertError(AD.illegal_parameter, "server tls-id does not match")
        self.suite = suite
        self.server_random = sh.random
        # The transcript starts at the ClientHello this ServerHello answers (RFC 6347 §4.2.6).
        self._transcript = bytearray(self._client_hello_raw)
        self._add_received(HandshakeType.SERVER_HELLO, seq, body)
        self.state = State.CLIENT_EXPECT_CERTIFICATE

    def _client_certificate(self, seq: int, body: bytes, record_seq: int) -> None:
        cert = _decode(Certificate, body)
        self.peer_certificate_der, self._peer_key = load_peer_certificate(cert.certificates)
        self._add_received(HandshakeType.CERTIFICATE, seq, body)
        self.state = State.CLIENT_EXPECT_SERVER_KEY_EXCHANGE

    def _client_server_key_exchange(self, seq: int, body: bytes, record_seq: int) -> None:
        ske = _decode(ServerKeyExchange, body)
        if ske.named_curve not in self._offered_groups:
            raise AlertError(AD.illegal_parameter, f"unoffered group {ske.named_curve}")
        _check_point(ske.named_curve, ske.public)
        if ske.signature_scheme not in SIGNATURE_SCHEMES:
            raise AlertError(AD.illegal_parameter, f"unoffered scheme {ske.signature_scheme:#06x}")
        if self._peer_key is None:  # pragma: no cover - dispatch order guarantees a key
            raise AlertError(AD.internal_error, "no server key")
        _verify(
            self._peer_key,
            ske.signature_scheme,
            ske.signature,
            self.client_random + self.server_random + ske.params,
        )
        self._check_peer()
        self._group = ske.named_curve
        self._server_public = ske.public
        self._add_received(HandshakeType.SERVER_KEY_EXCHANGE, seq, body)
        self.state = State.CLIENT_EXPECT_CERTIFICATE_REQUEST

    def _client_certificate_request(self, seq: int, body: bytes, record_seq: int) -> None:
        cr = _decode(CertificateRequest, body)
        for scheme in SIGNATURE_SCHEMES:
            if scheme in cr.signature_algorithms:
                self._sign_scheme = scheme
                break
        else:
            raise AlertError(AD.handshake_failure, "no usable CertificateVerify scheme")
        if 64 not in cr.certificate_types:  # ecdsa_sign (RFC 8422 §5.5)
            raise AlertError(AD.handshake_failure, "server does not accept ECDSA certificates")
        self._cert_requested = True
        self._add_received(HandshakeType.CERTIFICATE_REQUEST, seq, body)
        self.state = State.CLIENT_EXPECT_SERVER_HELLO_DONE

    def _client_server_hello_done(self, seq: int, body: bytes, record_seq: int) -> None:
        _decode(ServerHelloDone, body)
        self._add_received(HandshakeType.SERVER_HELLO_DONE, seq, body)
        items: list[FlightItem] = []
        if self._cert_requested:
            items.append(
                self._message(Certificate((own_certificate_der(self.config.certificate),)))
            )
        private, public = generate_ephemeral(self._group)
        pre_master = ecdh(self._group, private, self._server_public)
        items.append(self._message(ClientKeyExchange(public)))
        self._derive_keys(pre_master)
        if self._cert_requested:
            signature = self._sign(self._sign_scheme, bytes(self._transcript))
            items.append(self._message(CertificateVerify(self._sign_scheme, signature)))
        items.append(OutgoingCcs(0))
        items.append(self._message(Finished(self._verify_data(client=True)), epoch=1))
        self.state = State.CLIENT_EXPECT_CCS
        self.host.send_flight(items, final=False)

    def _client_finished(self, seq: int, body: bytes, record_seq: int) -> None:
        fin = _decode(Finished, body)
        if not hmac.compare_digest(fin.verify_data, self._verify_data(client=False)):
            raise AlertError(AD.decrypt_error, "server Finished does not verify")
        self._add_received(HandshakeType.FINISHED, seq, body)
        self._finish()

    def _client_ekt_key(self, seq: int, body: bytes, record_seq: int) -> None:
        if not self.is_client:
            raise AlertError(AD.unexpected_message, "EKTKey sent to the server")
        msg = _decode(EktKey, body)
        if self.ekt_cipher is None:
            # RFC 8870 §5.2.2: no EKTKey unless the extension was negotiated.
            raise AlertError(AD.unexpected_message, "EKTKey without a negotiated EKT cipher")
        if len(msg.ekt_key_value) != EKT_KEY_LENGTHS.get(self.ekt_cipher, -1):
            raise AlertError(AD.illegal_parameter, "EKTKey length does not fit the EKT cipher")
        self.host.ekt_key_received(msg)

    # --- server handlers ---------------------------------------------------------------------

    def _server_client_hello(self, seq: int, body: bytes, record_seq: int) -> None:
        ch = _decode(ClientHello, body)
        c = self.config
        # Stateless numbering (SPEC-DTLS 1.5, 3.2): echo record and message sequence numbers.
        self.host.echo_record_sequence(record_seq)
        self._send_seq = seq
        if ch.client_version > DTLS_1_2:  # DTLS numbers decrease: FEFF (1.0) > FEFD (1.2)
            raise AlertError(AD.protocol_version, f"client version {ch.client_version:#x}")
        if 0 not in ch.compression_methods:
            raise AlertError(AD.illegal_parameter, "null compression not offered")
        exts = {e.extension_type: e.data for e in ch.extensions or ()}
        out: list[Extension] = []
        try:
            suite_code = next((s for s in c.cipher_suites if s in ch.cipher_suites), None)
            suite = keys.CIPHER_SUITES.get(suite_code) if suite_code is not None else None
            if suite is None:
                raise AlertError(AD.handshake_failure, "no common cipher suite")
            groups_raw = exts.get(ExtensionType.SUPPORTED_GROUPS)
            client_groups = decode_uint16_list(groups_raw) if groups_raw is not None else ()
            group = next((g for g in c.groups if g in client_groups), None)
            if group is None:
                raise AlertError(AD.handshake_failure, "no common ECDHE group")
            if SECP256R1 not in client_groups:
                # Our ECDSA certificate is P-256 (RFC 8422 §5.1, SPEC-DTLS 5.2).
                raise AlertError(AD.handshake_failure, "client cannot accept a P-256 certificate")
            sig_raw = exts.get(ExtensionType.SIGNATURE_ALGORITHMS)
            client_sigs = decode_uint16_list(sig_raw) if sig_raw is not None else ()
            scheme = next((s for s in SIGNATURE_SCHEMES if s in client_sigs), None)
            if scheme is None:
                raise AlertError(AD.handshake_failure, "no common signature algorithm")
            if ExtensionType.EXTENDED_MASTER_SECRET not in exts:
                raise AlertError(AD.handshake_failure, "client did not offer EMS (D17)")
            decode_empty(exts[ExtensionType.EXTENDED_MASTER_SECRET])
            reneg = exts.get(ExtensionType.RENEGOTIATION_INFO)
            if reneg is not None and decode_opaque8(reneg) != b"":
                raise AlertError(AD.handshake_failure, "non-empty renegotiation_info (RFC 5746)")
            pf = exts.get(ExtensionType.EC_POINT_FORMATS)
            if pf is not None and 0 not in decode_uint8_list(pf):
                raise AlertError(AD.illegal_parameter, "client lacks uncompressed points")
            # ServerHello extensions, only ones the client sent (RFC 5246 §7.4.1.4); the SCSV
            # counts as an empty renegotiation_info (RFC 5746 §3.6).
            if reneg is not None or SCSV in ch.cipher_suites:
                out.append(Extension(ExtensionType.RENEGOTIATION_INFO, encode_opaque8(b"")))
            out.append(Extension(ExtensionType.EXTENDED_MASTER_SECRET, b""))
            if pf is not None:
                out.append(Extension(ExtensionType.EC_POINT_FORMATS, encode_uint8_list((0,))))
            srtp_raw = exts.get(ExtensionType.USE_SRTP)
            if srtp_raw is not None and c.srtp_profiles:
                offered = UseSrtp.decode(srtp_raw).profiles
                if c.select_srtp_profile is not None:
                    profile = c.select_srtp_profile(offered)
                else:
                    profile = next((p for p in c.srtp_profiles if p in offered), None)
                if profile is None or profile not in offered:
                    raise AlertError(AD.handshake_failure, "no common SRTP protection profile")
                self.srtp_profile = profile
                out.append(Extension(ExtensionType.USE_SRTP, UseSrtp((profile,)).encode()))
            ekt_raw = exts.get(ExtensionType.SUPPORTED_EKT_CIPHERS)
            if ekt_raw is not None and c.ekt_ciphers:
                client_ekt = decode_uint8_list(ekt_raw)
                chosen = next((e for e in c.ekt_ciphers if e in client_ekt), None)
                if chosen is not None:
                    self.ekt_cipher = chosen
                    out.append(Extension(ExtensionType.SUPPORTED_EKT_CIPHERS, bytes((chosen,))))
            tls_raw = exts.get(ExtensionType.EXTERNAL_SESSION_ID)
            if tls_raw is not None:
                self.peer_tls_id = decode_opaque8(tls_raw)
                if c.tls_id is not None:
                    out.append(
                        Extension(ExtensionType.EXTERNAL_SESSION_ID, encode_opaque8(c.tls_id))
                    )
        except DtlsDecodeError as e:
            raise AlertError(AD.decode_error, str(e)) from None
        self.suite = suite
        self._group = group
        self._sign_scheme = scheme
        self.client_random = ch.random
        self.server_random = os.urandom(32)
        self._transcript = bytearray()
        self._add_received(HandshakeType.CLIENT_HELLO, seq, body)
        items: list[FlightItem] = [
            self._message(
                ServerHello(DTLS_1_2, self.server_random, b"", suite.code, 0, tuple(out))
            ),
            self._message(Certificate((own_certificate_der(c.certificate),))),
        ]
        self._ephemeral, public = generate_ephemeral(group)
        unsigned = ServerKeyExchange(group, public, scheme, b"")
        signature = self._sign(scheme, self.client_random + self.server_random + unsigned.params)
        items.append(self._message(ServerKeyExchange(group, public, scheme, signature)))
        items.append(self._message(CertificateRequest(b"\x40", SIGNATURE_SCHEMES)))
        items.append(self._message(ServerHelloDone()))
        self.state = State.SERVER_EXPECT_CERTIFICATE
        self.host.send_flight(items, final=False)

    def _server_certificate(self, seq: int, body: bytes, record_seq: int) -> None:
        cert = _decode(Certificate, body)
        self.peer_certificate_der, self._peer_key = load_peer_certificate(cert.certificates)
        self._add_received(HandshakeType.CERTIFICATE, seq, body)
        self.state = State.SERVER_EXPECT_CLIENT_KEY_EXCHANGE

    def _server_client_key_exchange(self, seq: int, body: bytes, record_seq: int) -> None:
        cke = _decode(ClientKeyExchange, body)
        if self._ephemeral is None:  # pragma: no cover
            raise AlertError(AD.internal_error, "no ephemeral key")
        pre_master = ecdh(self._group, self._ephemeral, cke.public)
        self._add_received(HandshakeType.CLIENT_KEY_EXCHANGE, seq, body)
        self._derive_keys(pre_master)
        self.state = State.SERVER_EXPECT_CERTIFICATE_VERIFY

    def _server_certificate_verify(self, seq: int, body: bytes, record_seq: int) -> None:
        cv = _decode(CertificateVerify, body)
        if cv.signature_scheme not in SIGNATURE_SCHEMES:
            raise AlertError(AD.illegal_parameter, "CertificateVerify scheme not requested")
        if self._peer_key is None:  # pragma: no cover
            raise AlertError(AD.internal_error, "no client key")
        _verify(self._peer_key, cv.signature_scheme, cv.signature, bytes(self._transcript))
        self._check_peer()
        self._add_received(HandshakeType.CERTIFICATE_VERIFY, seq, body)
        self.state = State.SERVER_EXPECT_CCS

    def _server_finished(self, seq: int, body: bytes, record_seq: int) -> None:
        fin = _decode(Finished, body)
        if not hmac.compare_digest(fin.verify_data, self._verify_data(client=True)):
            raise AlertError(AD.decrypt_error, "client Finished does not verify")
        self._add_received(HandshakeType.FINISHED, seq, body)
        items: list[FlightItem] = [
            OutgoingCcs(0),
            self._message(Finished(self._verify_data(client=False)), epoch=1),
        ]
        self.host.send_flight(items, final=True)
        self._finish()


def _type_name(msg_type: int) -> str:
    if msg_type == CCS:
        return "ChangeCipherSpec"
    try:
        return HandshakeType(msg_type).name
    except ValueError:
        return f"handshake type {msg_type}"


_T = TypeVar("_T", bound=_Decodable)


def _decode(cls: type[_T], body: bytes) -> _T:
    try:
        return cls.decode(body)
    except DtlsDecodeError as e:
        raise AlertError(AD.decode_error, f"{cls.__name__}: {e}") from None


S = State
H = HandshakeType
_DISPATCH: dict[tuple[State, int], Callable[[Handshake, int, bytes, int], None]] = {
    (S.CLIENT_EXPECT_SERVER_HELLO, H.SERVER_HELLO): Handshake._client_server_hello,
    (S.CLIENT_EXPECT_CERTIFICATE, H.CERTIFICATE): Handshake._client_certificate,
    (S.CLIENT_EXPECT_SERVER_KEY_EXCHANGE, H.SERVER_KEY_EXCHANGE): (
        Handshake._client_server_key_exchange
    ),
    (S.CLIENT_EXPECT_CERTIFICATE_REQUEST, H.CERTIFICATE_REQUEST): (
        Handshake._client_certificate_request
    ),
    (S.CLIENT_EXPECT_CERTIFICATE_REQUEST, H.SERVER_HELLO_DONE): (
        Handshake._client_server_hello_done
    ),
    (S.CLIENT_EXPECT_SERVER_HELLO_DONE, H.SERVER_HELLO_DONE): Handshake._client_server_hello_done,
    (S.CLIENT_EXPECT_FINISHED, H.FINISHED): Handshake._client_finished,
    (S.SERVER_EXPECT_CLIENT_HELLO, H.CLIENT_HELLO): Handshake._server_client_hello,
    (S.SERVER_EXPECT_CERTIFICATE, H.CERTIFICATE): Handshake._server_certificate,
    (S.SERVER_EXPECT_CLIENT_KEY_EXCHANGE, H.CLIENT_KEY_EXCHANGE): (
        Handshake._server_client_key_exchange
    ),
    (S.SERVER_EXPECT_CERTIFICATE_VERIFY, H.CERTIFICATE_VERIFY): (
        Handshake._server_certificate_verify
    ),
    (S.SERVER_EXPECT_FINISHED, H.FINISHED): Handshake._server_finished,
    (S.ESTABLISHED, H.EKT_KEY): Handshake._client_ekt_key,
}
