"""The DTLS 1.2 handshake (client and server). Every state transition of the engine is in this
module, in one table: ``_TABLE`` at the bottom. Nothing else assigns ``Handshake.state``.

Theory of operation
-------------------
The handshake consumes whole, reassembled handshake messages (and ChangeCipherSpec) and
produces whole messages grouped in flights; it never sees records, fragments being joined or
timers (STYLE practice 2). It holds no reference to the connection: every input fills an
:class:`Output` (keys to install, a flight to send, the record number to echo, the offer seen,
the parameters settled, an EKTKey received) that the connection applies, in that field order.

One table (STYLE practice 3, h11's ``_state.py``): ``_TABLE[(state, input)]`` names the handler
and the state it leads to; the input is a handshake type, ``CCS`` or ``START``. The handler
checks and builds; the state changes only here, after the handler returned. Any pair not in the
table is an ``unexpected_message`` alert. States and flights (RFC 6347 §4.2.4, Figure 1)::

  client: START -start-> EXPECT_SERVER_HELLO -(HVR: new CH)-> EXPECT_SERVER_HELLO
          -SH-> EXPECT_CERTIFICATE -Cert-> EXPECT_SERVER_KEY_EXCHANGE
          -SKE-> EXPECT_CERTIFICATE_REQUEST -CR-> EXPECT_SERVER_HELLO_DONE
                                            -SHD (no CR)-> (flight 5)
          -SHD-> flight 5 (Cert, CKE, CV, CCS, Finished) -> EXPECT_CCS -CCS-> EXPECT_FINISHED
          -Finished-> ESTABLISHED
  server: EXPECT_CLIENT_HELLO -CH-> flight 4 (SH, Cert, SKE, CR, SHD) -> EXPECT_CERTIFICATE
          -Cert-> EXPECT_CLIENT_KEY_EXCHANGE -CKE-> EXPECT_CERTIFICATE_VERIFY
          -CV-> EXPECT_CCS -CCS-> EXPECT_FINISHED -Finished-> flight 6 (CCS, Finished)
          -> ESTABLISHED
  server: EXPECT_CLIENT_HELLO -RESUME-> ESTABLISHED   (a KMF restart, D29; perc.dtls.resume)
  ESTABLISHED: client takes EKTKey (RFC 8870 §5.2.2); everything else is unexpected.

Fragments are admitted by the same state (``_FRAGMENT_ROUTES``, :meth:`Handshake.route_fragment`)
before reassembly: the message that opens the peer's flight restarts reassembly at its
message_seq (stateless numbering), a HelloVerifyRequest is taken whole and outside the
transcript, a ClientHello with another random on a live server is a new handshake (RFC 6347
§4.2.8), and types the peer's role never sends in plaintext are dropped (RFC 6347 §4.1).
ChangeCipherSpec (``_ccs_route``) is accepted where the table has it, held when it overtook the
messages it follows (RFC 5246 §7.1), else dropped.

Numbering (RFC 6347 §4.2.2): the server numbers its messages from the ClientHello's
message_seq (stateless cookie echo), so ServerHello.message_seq = ClientHello.message_seq.

Transcript (RFC 6347 §4.2.6): a bytearray of whole messages in single-fragment form, from the
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

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.utils import CryptographyDeprecationWarning

from perc.dtls import keys
from perc.dtls.config import DtlsConfiguration, PeerIdentity, own_certificate_der
from perc.dtls.errors import AlertDescription as AD
from perc.dtls.errors import AlertError, LocalProtocolError
from perc.dtls.events import ClientOffer, Negotiated
from perc.dtls.flight import FlightItem, OutgoingCcs, OutgoingMessage
from perc.dtls.offer import client_offer
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
    HandshakeFragment,
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
MAX_HELLO_VERIFY_REQUESTS = 3  # bound HVR loops (RFC 6347 §4.2.1)
CCS = -1  # pseudo input: the peer's ChangeCipherSpec
START = -2  # pseudo input: the client's connect()
RESUME = -3  # pseudo input: a server association resumed from an exported state (D29)


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


class Route(Enum):
    """What the connection does with one handshake fragment (``Handshake.route_fragment``)."""

    #: into the reassembler, delivered in message_seq order
    REASSEMBLE = auto()
    #: opens the peer's flight: reassembly restarts at its message_seq, then as REASSEMBLE
    FIRST = auto()
    #: client: a whole HelloVerifyRequest answering our ClientHello, handled at once
    HELLO_VERIFY = auto()
    #: stray or forged for this state or epoch (counted in ``fragments_dropped``)
    DROP = auto()
    #: server: a ClientHello with a new random, i.e. a new handshake (RFC 6347 §4.2.8) that
    #: this association does not answer (counted in ``dropped_unexpected``)
    NEW_HELLO = auto()
    #: after completion, a plaintext fragment: a retransmission of the peer's final flight if
    #: its message_seq is old, else stray
    LATE_PLAINTEXT = auto()


class CcsRoute(Enum):
    ACCEPT = auto()  # the table expects it now: switch the read epoch
    EARLY = auto()  # overtook the messages it follows: apply once they are in (RFC 5246 §7.1)
    DROP = auto()


@attrs.define(slots=True)
class Output:
    """What one input made the handshake do; the connection applies it in field order."""

    #: server: the offer of the ClientHello being answered (ClientHelloReceived)
    offer: ClientOffer | None = None
    #: server: our first record echoes the ClientHello's record number (RFC 6347 §4.2.1, §4.2.2)
    echo_record_seq: int | None = None
    #: the epoch-1 keys, to install before the flight (it may carry Finished)
    keys: tuple[keys.CipherSuite, keys.KeyBlock] | None = None
    flight: list[FlightItem] | None = None
    #: the server's flight 6: no timer, resent only on demand (RFC 6347 §4.2.4)
    final: bool = False
    #: the handshake completed with these parameters
    completed: Negotiated | None = None
    #: client: an EKTKey arrived (after completion)
    ekt_key: EktKey | None = None


class _Encodable(Protocol):
    msg_type: ClassVar[int]

    def encode(self) -> bytes: ...


class _Decodable(Protocol):
    @classmethod
    def decode(cls, data: bytes) -> Self: ...


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
    """The peer's end-entity certificate, checked against perc's profile (D17; RFC 5246 §7.4.2)."""
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

    def __init__(self, config: DtlsConfiguration) -> None:
        self.config = config
        self.is_client = config.is_client
        self.state = State.CLIENT_START if config.is_client else State.SERVER_EXPECT_CLIENT_HELLO
        self._transcript = bytearray()
        self._send_seq = 0  # next message_seq we send
        self._client_random = b""
        self._server_random = b""
        self._suite: keys.CipherSuite | None = None
        self._group = 0
        self._server_public = b""
        # supported_groups also names the curves we accept in the server's ECDSA certificate
        # (RFC 8422 §5.1): secp256r1 is always listed, after the configured ECDHE preference
        # (RFC 8422 §5.1.1; OpenSSL refuses a P-256 certificate to an x25519-only client).
        self._offered_groups = config.groups + (
            (SECP256R1,) if SECP256R1 not in config.groups else ()
        )
        self._ephemeral: EphemeralKey | None = None
        self._master_secret = b""
        self._srtp_profile: int | None = None
        self._ekt_cipher: int | None = None
        self._local_tls_id: bytes | None = config.tls_id if config.is_client else None
        self._peer_certificate_der = b""
        self._peer_fingerprint = ""
        self._peer_tls_id: bytes | None = None
        self._peer_key: ec.EllipticCurvePublicKey | None = None
        self._sign_scheme = ECDSA_SHA256
        self._cert_requested = False
        # client
        self._client_hello_seq = 0
        self._client_hello: ClientHello | None = None
        self._client_hello_raw = b""
        self._hvr_count = 0
        # Handshake messages the peer may send in plaintext (epoch 0), by role.
        self._epoch0_types = _EPOCH0_FROM_SERVER if config.is_client else _EPOCH0_FROM_CLIENT

    # --- entry points (each runs one row of _TABLE) -----------------------------------------

    def start(self) -> Output:
        """Client: build and send the first ClientHello (flight 1)."""
        out = Output()
        self._step(START, 0, b"", 0, out)
        return out

    def handle_message(
        self, msg_type: int, seq: int, body: bytes, epoch: int, record_seq: int, *, out: Output
    ) -> None:
        """One whole message that arrived in ``epoch``. ``out`` is filled even when this
        raises (a refused ClientHello: the alert must echo its record number)."""
        # Finished and EKTKey only under the new keys; everything else of the handshake in
        # epoch 0 (RFC 6347 §4.1; RFC 5246 §7.1).
        want_epoch = 1 if msg_type in (HandshakeType.FINISHED, HandshakeType.EKT_KEY) else 0
        if (self.state, msg_type) in _TABLE and epoch != want_epoch:
            raise AlertError(AD.unexpected_message, f"{_type_name(msg_type)} in epoch {epoch}")
        self._step(msg_type, seq, body, record_seq, out)

    def resume(self, negotiated: Negotiated, next_message_seq: int) -> None:
        """Server: take up an association established by an earlier process (D29), from the
        parameters it exported. No secrets come back: the exporter stays unavailable."""
        self._suite = keys.CIPHER_SUITES[negotiated.cipher_suite]
        self._group = negotiated.named_group
        self._srtp_profile = negotiated.srtp_profile
        self._ekt_cipher = negotiated.ekt_cipher
        self._client_random = negotiated.client_random
        self._server_random = negotiated.server_random
        self._local_tls_id = negotiated.local_tls_id
        self._peer_tls_id = negotiated.peer_tls_id
        self._peer_fingerprint = negotiated.peer_fingerprint
        self._peer_certificate_der = negotiated.peer_certificate_der
        self._step(RESUME, next_message_seq, b"", 0, Output())

    @property
    def message_seq(self) -> int:
        """The next message_seq we would send."""
        return self._send_seq

    def _server_resume(self, out: Output, seq: int, body: bytes, record_seq: int) -> None:
        self._send_seq = seq

    def handle_ccs(self) -> None:
        """The peer's ChangeCipherSpec (only called when ``ccs_route()`` is ACCEPT)."""
        self._step(CCS, 0, b"", 0, Output())

    def _step(self, input_type: int, seq: int, body: bytes, record_seq: int, out: Output) -> None:
        row = _TABLE.get((self.state, input_type))
        if row is None:
            raise AlertError(
                AD.unexpected_message, f"{_type_name(input_type)} in state {self.state.name}"
            )
        handler, next_state = row
        if handler is not None:
            handler(self, out, seq, body, record_seq)
        completes = next_state is State.ESTABLISHED and self.state is not State.ESTABLISHED
        self.state = next_state  # the only assignment of a new state
        if completes:
            out.completed = self._negotiated()
            self._finish()

    # --- what the connection asks before reassembly ------------------------------------------

    def route_fragment(self, frag: HandshakeFragment, epoch: int) -> Route:
        """How the connection treats ``frag`` (of a record in ``epoch``) in the current state."""
        msg_type = frag.msg_type
        route = _FRAGMENT_ROUTES.get((self.state, msg_type))
        if route is None:
            route = _FRAGMENT_DEFAULT.get(self.state, Route.REASSEMBLE)
        if route is Route.NEW_HELLO:
            # Is it our client's retransmission (same random) or a new handshake?
            if self.is_client or not frag.is_whole:
                route = Route.REASSEMBLE
            else:
                try:
                    random = ClientHello.decode(frag.body).random
                except DtlsDecodeError:
                    random = b""
                if random == self._client_random:
                    route = Route.REASSEMBLE
                else:
                    return Route.NEW_HELLO
        if epoch == 0 and msg_type not in self._epoch0_types:
            # Finished and EKTKey only exist under epoch-1 keys: a plaintext one is forged and
            # must not occupy a message_seq the real (protected) message will need.
            return Route.DROP
        if epoch == 0 and self.state in _PLAINTEXT_IS_LATE:
            return Route.LATE_PLAINTEXT
        if route is Route.HELLO_VERIFY:
            # RFC 6347 §4.2.1, §4.2.2: an HVR must answer the ClientHello just sent, whole.
            ok = frag.is_whole and frag.message_seq == self._client_hello_seq and epoch == 0
            return Route.HELLO_VERIFY if ok else Route.DROP
        if route is Route.FIRST:
            if self.is_client:
                # A ServerHello at or below our ClientHello's number restarts reassembly there
                # (the server numbers from the ClientHello it answers); others queue as usual.
                return (
                    Route.FIRST if frag.message_seq <= self._client_hello_seq else Route.REASSEMBLE
                )
            return Route.FIRST if epoch == 0 else Route.DROP
        return route

    @property
    def can_start(self) -> bool:
        return (self.state, START) in _TABLE

    def ccs_route(self) -> CcsRoute:
        if (self.state, CCS) in _TABLE:
            return CcsRoute.ACCEPT
        return CcsRoute.DROP if self.state in _NO_EARLY_CCS else CcsRoute.EARLY

    @property
    def expects_ccs(self) -> bool:
        return (self.state, CCS) in _TABLE

    @property
    def epoch1_means_peer_resent(self) -> bool:
        """A protected record before the peer's CCS: in this state the peer already uses
        epoch 1, so it has our last flight and its own was lost (RFC 6347 §4.2.4)."""
        return self.state in _EPOCH1_MEANS_RESENT

    def next_message_seq(self) -> int:
        """Take the next server message_seq (EKTKey after Finished, D23)."""
        seq = self._send_seq
        self._send_seq += 1
        return seq

    # --- key schedule state -------------------------------------------------------------------

    def export_keying_material(self, label: bytes, length: int) -> bytes:
        """RFC 5705 without context, once the handshake completed and until erase_secrets()."""
        if self.state is not State.ESTABLISHED or self._suite is None:
            raise LocalProtocolError("exporter before the handshake completed")
        if not self._master_secret:
            raise LocalProtocolError("keys were erased (connection closed by an alert)")
        return keys.export_keying_material(
            self._suite,
            master_secret=self._master_secret,
            client_random=self._client_random,
            server_random=self._server_random,
            label=label,
            length=length,
        )

    def erase_secrets(self) -> None:
        """A fatal alert ends the association and its secrets (RFC 5246 §7.2.2)."""
        self._master_secret = b""
        self._ephemeral = None

    # --- helpers -------------------------------------------------------------------------

    def _message(self, msg: _Encodable, epoch: int = 0, transcript: bool = True) -> OutgoingMessage:
        body = msg.encode()
        msg_type = msg.msg_type
        seq = self._send_seq
        self._send_seq += 1
        if transcript:
            self._transcript += encode_handshake(msg_type, seq, body)
        return OutgoingMessage(epoch, msg_type, seq, body)

    def _hash(self, alg: hashes.HashAlgorithm) -> bytes:
        return keys.digest(alg, bytes(self._transcript))

    def _derive_keys(self, pre_master: bytes, out: Output) -> None:
        """EMS master secret over the transcript through ClientKeyExchange (RFC 7627 §4)."""
        suite = self._suite
        if suite is None:  # pragma: no cover - the table's order guarantees a suite
            raise AlertError(AD.internal_error, "no suite")
        session_hash = self._hash(suite.prf_hash)
        self._master_secret = keys.extended_master_secret(suite, pre_master, session_hash)
        self._ephemeral = None
        if self.config.keylog is not None:
            self.config.keylog(keys.keylog_line(self._client_random, self._master_secret))
        out.keys = (
            suite,
            keys.key_block(suite, self._master_secret, self._client_random, self._server_random),
        )

    def _verify_data(self, client: bool) -> bytes:
        if self._suite is None:  # pragma: no cover
            raise AlertError(AD.internal_error, "no suite")
        return keys.finished_verify_data(
            self._suite, self._master_secret, client, bytes(self._transcript)
        )

    def _sign(self, scheme: int, data: bytes) -> bytes:
        return self.config.private_key.sign(data, ec.ECDSA(_SIG_HASH[scheme]))

    def _negotiated(self) -> Negotiated:
        if self._suite is None:  # pragma: no cover - the table's order guarantees a suite
            raise AlertError(AD.internal_error, "no suite")
        return Negotiated(
            cipher_suite=self._suite.code,
            named_group=self._group,
            srtp_profile=self._srtp_profile,
            ekt_cipher=self._ekt_cipher,
            client_random=self._client_random,
            server_random=self._server_random,
            local_tls_id=self._local_tls_id,
            peer_tls_id=self._peer_tls_id,
            peer_fingerprint=self._peer_fingerprint,
            peer_certificate_der=self._peer_certificate_der,
        )

    def _check_peer(self) -> None:
        """The caller's certificate policy (D15): None accepts, an alert code refuses."""
        self._peer_fingerprint = fingerprint_of_der(self._peer_certificate_der)
        if self.config.verify_peer is None:
            return
        verdict = self.config.verify_peer(
            PeerIdentity(
                self._peer_certificate_der,
                self._peer_fingerprint,
                self._peer_tls_id,
                self._negotiated(),
            )
        )
        if verdict is not None:
            raise AlertError(verdict, f"peer {self._peer_fingerprint} refused")

    def _finish(self) -> None:
        """ESTABLISHED: drop what only the handshake needed (a KMF keeps many associations)."""
        self._transcript = bytearray()
        self._client_hello = None
        self._client_hello_raw = b""
        self._peer_key = None
        self._server_public = b""

    def _add_received(self, msg_type: int, seq: int, body: bytes) -> None:
        self._transcript += encode_handshake(msg_type, seq, body)

    def _send_client_hello(self, out: Output) -> None:
        ch = self._client_hello
        if ch is None:  # pragma: no cover
            raise AlertError(AD.internal_error, "no ClientHello")
        self._client_hello_seq = self._send_seq
        self._transcript = bytearray()
        item = self._message(ch)
        self._client_hello_raw = bytes(self._transcript)
        out.flight = [item]

    # --- client handlers ---------------------------------------------------------------------

    def _client_start(self, out: Output, seq: int, body: bytes, record_seq: int) -> None:
        c = self.config
        self._client_random = os.urandom(32)
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
            DTLS_1_2, self._client_random, b"", b"", c.cipher_suites, b"\x00", tuple(exts)
        )
        self._send_client_hello(out)

    def _client_hello_verify_request(
        self, out: Output, seq: int, body: bytes, record_seq: int
    ) -> None:
        """Answer an HVR with a new ClientHello carrying the cookie (RFC 6347 §4.2.1).

        Routed here (``Route.HELLO_VERIFY``) only whole and with message_seq equal to the
        ClientHello just sent; the HVR is not part of the transcript.
        """
        hvr = _decode(HelloVerifyRequest, body)
        # The HVR version only signals the packet format (RFC 6347 §4.2.1): accept {254, x}.
        if hvr.server_version >> 8 != 0xFE:
            raise AlertError(AD.protocol_version, "HelloVerifyRequest is not DTLS")
        self._hvr_count += 1
        if self._hvr_count > MAX_HELLO_VERIFY_REQUESTS:
            raise AlertError(AD.handshake_failure, "too many HelloVerifyRequests")
        ch = self._client_hello
        if ch is None:  # pragma: no cover
            raise AlertError(AD.internal_error, "no ClientHello")
        self._client_hello = attrs.evolve(ch, cookie=hvr.cookie)
        self._send_client_hello(out)

    def _client_server_hello(self, out: Output, seq: int, body: bytes, record_seq: int) -> None:
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
                self._srtp_profile = use.profiles[0]
            ekt = exts.get(ExtensionType.SUPPORTED_EKT_CIPHERS)
            if ekt is not None:
                chosen = decode_ekt_selected(ekt)
                if chosen not in c.ekt_ciphers:
                    raise AlertError(AD.illegal_parameter, f"unoffered EKT cipher {chosen}")
                self._ekt_cipher = chosen
            elif c.require_ekt:
                raise AlertError(AD.handshake_failure, "server selected no EKT cipher")
            tls_id = exts.get(ExtensionType.EXTERNAL_SESSION_ID)
            if tls_id is not None:
                self._peer_tls_id = decode_opaque8(tls_id)
        except DtlsDecodeError as e:
            raise AlertError(AD.decode_error, str(e)) from None
        if c.expected_peer_tls_id is not None and (
            self._peer_tls_id is None
            or not hmac.compare_digest(self._peer_tls_id, c.expected_peer_tls_id)
        ):
            # RFC 8844 §4.3 / RFC 9185 §5.1: a mismatch terminates the association.
            raise AlertError(AD.illegal_parameter, "server tls-id does not match")
        self._suite = suite
        self._server_random = sh.random
        # The transcript starts at the ClientHello this ServerHello answers (RFC 6347 §4.2.6).
        self._transcript = bytearray(self._client_hello_raw)
        self._add_received(HandshakeType.SERVER_HELLO, seq, body)

    def _client_certificate(self, out: Output, seq: int, body: bytes, record_seq: int) -> None:
        cert = _decode(Certificate, body)
        self._peer_certificate_der, self._peer_key = load_peer_certificate(cert.certificates)
        self._add_received(HandshakeType.CERTIFICATE, seq, body)

    def _client_server_key_exchange(
        self, out: Output, seq: int, body: bytes, record_seq: int
    ) -> None:
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
            self._client_random + self._server_random + ske.params,
        )
        self._group = ske.named_curve
        self._check_peer()
        self._server_public = ske.public
        self._add_received(HandshakeType.SERVER_KEY_EXCHANGE, seq, body)

    def _client_certificate_request(
        self, out: Output, seq: int, body: bytes, record_seq: int
    ) -> None:
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

    def _client_server_hello_done(
        self, out: Output, seq: int, body: bytes, record_seq: int
    ) -> None:
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
        self._derive_keys(pre_master, out)
        if self._cert_requested:
            signature = self._sign(self._sign_scheme, bytes(self._transcript))
            items.append(self._message(CertificateVerify(self._sign_scheme, signature)))
        items.append(OutgoingCcs(0))
        items.append(self._message(Finished(self._verify_data(client=True)), epoch=1))
        out.flight = items

    def _client_finished(self, out: Output, seq: int, body: bytes, record_seq: int) -> None:
        fin = _decode(Finished, body)
        if not hmac.compare_digest(fin.verify_data, self._verify_data(client=False)):
            raise AlertError(AD.decrypt_error, "server Finished does not verify")
        self._add_received(HandshakeType.FINISHED, seq, body)

    def _client_ekt_key(self, out: Output, seq: int, body: bytes, record_seq: int) -> None:
        if not self.is_client:
            raise AlertError(AD.unexpected_message, "EKTKey sent to the server")
        msg = _decode(EktKey, body)
        if self._ekt_cipher is None:
            # RFC 8870 §5.2.2: no EKTKey unless the extension was negotiated.
            raise AlertError(AD.unexpected_message, "EKTKey without a negotiated EKT cipher")
        if len(msg.ekt_key_value) != EKT_KEY_LENGTHS.get(self._ekt_cipher, -1):
            raise AlertError(AD.illegal_parameter, "EKTKey length does not fit the EKT cipher")
        out.ekt_key = msg

    # --- server handlers ---------------------------------------------------------------------

    def _server_client_hello(self, out: Output, seq: int, body: bytes, record_seq: int) -> None:
        ch = _decode(ClientHello, body)
        c = self.config
        # Stateless numbering (RFC 6347 §4.2.1, §4.2.2): echo record and message sequence numbers.
        out.echo_record_seq = record_seq
        self._send_seq = seq
        if ch.client_version > DTLS_1_2:  # DTLS numbers decrease: FEFF (1.0) > FEFD (1.2)
            raise AlertError(AD.protocol_version, f"client version {ch.client_version:#x}")
        if 0 not in ch.compression_methods:
            raise AlertError(AD.illegal_parameter, "null compression not offered")
        try:
            offer = client_offer(ch)
        except DtlsDecodeError as e:
            raise AlertError(AD.decode_error, str(e)) from None
        out.offer = offer
        self._refuse_early(offer)
        exts = {e.extension_type: e.data for e in ch.extensions or ()}
        sh_exts: list[Extension] = []
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
                # Our ECDSA certificate is P-256 (RFC 8422 §5.1).
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
                sh_exts.append(Extension(ExtensionType.RENEGOTIATION_INFO, encode_opaque8(b"")))
            sh_exts.append(Extension(ExtensionType.EXTENDED_MASTER_SECRET, b""))
            if pf is not None:
                sh_exts.append(Extension(ExtensionType.EC_POINT_FORMATS, encode_uint8_list((0,))))
            if offer.use_srtp and c.srtp_profiles:
                offered = offer.srtp_profiles
                if c.select_srtp_profile is not None:
                    profile = c.select_srtp_profile(offered)
                else:
                    profile = next((p for p in c.srtp_profiles if p in offered), None)
                if profile is None or profile not in offered:
                    raise AlertError(AD.handshake_failure, "no common SRTP protection profile")
                self._srtp_profile = profile
                sh_exts.append(Extension(ExtensionType.USE_SRTP, UseSrtp((profile,)).encode()))
            if offer.supported_ekt_ciphers and c.ekt_ciphers:
                chosen = next((e for e in c.ekt_ciphers if e in offer.ekt_ciphers), None)
                if chosen is not None:
                    self._ekt_cipher = chosen
                    sh_exts.append(Extension(ExtensionType.SUPPORTED_EKT_CIPHERS, bytes((chosen,))))
            if offer.tls_id is not None:
                self._peer_tls_id = offer.tls_id
                if c.tls_id is not None:
                    self._local_tls_id = c.tls_id
                    sh_exts.append(
                        Extension(ExtensionType.EXTERNAL_SESSION_ID, encode_opaque8(c.tls_id))
                    )
        except DtlsDecodeError as e:
            raise AlertError(AD.decode_error, str(e)) from None
        self._suite = suite
        self._group = group
        self._sign_scheme = scheme
        self._client_random = ch.random
        self._server_random = os.urandom(32)
        self._transcript = bytearray()
        self._add_received(HandshakeType.CLIENT_HELLO, seq, body)
        items: list[FlightItem] = [
            self._message(
                ServerHello(DTLS_1_2, self._server_random, b"", suite.code, 0, tuple(sh_exts))
            ),
            self._message(Certificate((own_certificate_der(c.certificate),))),
        ]
        self._ephemeral, public = generate_ephemeral(group)
        unsigned = ServerKeyExchange(group, public, scheme, b"")
        signature = self._sign(scheme, self._client_random + self._server_random + unsigned.params)
        items.append(self._message(ServerKeyExchange(group, public, scheme, signature)))
        items.append(self._message(CertificateRequest(b"\x40", SIGNATURE_SCHEMES)))
        items.append(self._message(ServerHelloDone()))
        out.flight = items

    def _refuse_early(self, offer: ClientOffer) -> None:
        """Refuse an offer we cannot serve before sending anything: an alert now costs the
        server no signature or ECDHE key and tells the client at once (RFC 5246 §7.4.1.3)."""
        c = self.config
        if c.inspect_client_offer is not None:
            verdict = c.inspect_client_offer(offer)
            if verdict is not None:
                raise AlertError(verdict, "ClientHello offer refused")
        if c.srtp_profiles and not offer.use_srtp:
            # RFC 5764 §4.1.1 lets a server go on without SRTP, but a DTLS-SRTP server exists
            # to make SRTP keys: a handshake without them would complete only to be aborted.
            raise AlertError(AD.handshake_failure, "ClientHello without use_srtp")
        if c.require_ekt:
            if not offer.supported_ekt_ciphers:
                # RFC 8870 §5.2: EKT is negotiated by this extension only; PERC needs EKT.
                raise AlertError(AD.handshake_failure, "ClientHello without supported_ekt_ciphers")
            if not any(e in offer.ekt_ciphers for e in c.ekt_ciphers):
                raise AlertError(AD.handshake_failure, "no common EKT cipher")

    def _server_certificate(self, out: Output, seq: int, body: bytes, record_seq: int) -> None:
        cert = _decode(Certificate, body)
        self._peer_certificate_der, self._peer_key = load_peer_certificate(cert.certificates)
        self._add_received(HandshakeType.CERTIFICATE, seq, body)

    def _server_client_key_exchange(
        self, out: Output, seq: int, body: bytes, record_seq: int
    ) -> None:
        cke = _decode(ClientKeyExchange, body)
        if self._ephemeral is None:  # pragma: no cover
            raise AlertError(AD.internal_error, "no ephemeral key")
        pre_master = ecdh(self._group, self._ephemeral, cke.public)
        self._add_received(HandshakeType.CLIENT_KEY_EXCHANGE, seq, body)
        self._derive_keys(pre_master, out)

    def _server_certificate_verify(
        self, out: Output, seq: int, body: bytes, record_seq: int
    ) -> None:
        cv = _decode(CertificateVerify, body)
        if cv.signature_scheme not in SIGNATURE_SCHEMES:
            raise AlertError(AD.illegal_parameter, "CertificateVerify scheme not requested")
        if self._peer_key is None:  # pragma: no cover
            raise AlertError(AD.internal_error, "no client key")
        _verify(self._peer_key, cv.signature_scheme, cv.signature, bytes(self._transcript))
        self._check_peer()
        self._add_received(HandshakeType.CERTIFICATE_VERIFY, seq, body)

    def _server_finished(self, out: Output, seq: int, body: bytes, record_seq: int) -> None:
        fin = _decode(Finished, body)
        if not hmac.compare_digest(fin.verify_data, self._verify_data(client=True)):
            raise AlertError(AD.decrypt_error, "client Finished does not verify")
        self._add_received(HandshakeType.FINISHED, seq, body)
        items: list[FlightItem] = [
            OutgoingCcs(0),
            self._message(Finished(self._verify_data(client=False)), epoch=1),
        ]
        out.flight = items
        out.final = True


def _type_name(msg_type: int) -> str:
    if msg_type == CCS:
        return "ChangeCipherSpec"
    if msg_type == START:
        return "connect()"
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


# --- the table: every state transition of the engine ----------------------------------------

_Handler = Callable[[Handshake, Output, int, bytes, int], None]
S = State
H = HandshakeType

#: (state, input) -> (handler or None, next state). Rule 1: an input not listed for the
#: current state is an unexpected_message alert. Rule 2: the state changes only after the
#: handler returned; a handler that raises leaves it where it was (and the alert ends the
#: association). Reaching ESTABLISHED completes the handshake (Output.completed).
_TABLE: dict[tuple[State, int], tuple[_Handler | None, State]] = {
    # client
    (S.CLIENT_START, START): (Handshake._client_start, S.CLIENT_EXPECT_SERVER_HELLO),
    (S.CLIENT_EXPECT_SERVER_HELLO, H.HELLO_VERIFY_REQUEST): (
        Handshake._client_hello_verify_request,
        S.CLIENT_EXPECT_SERVER_HELLO,
    ),
    (S.CLIENT_EXPECT_SERVER_HELLO, H.SERVER_HELLO): (
        Handshake._client_server_hello,
        S.CLIENT_EXPECT_CERTIFICATE,
    ),
    (S.CLIENT_EXPECT_CERTIFICATE, H.CERTIFICATE): (
        Handshake._client_certificate,
        S.CLIENT_EXPECT_SERVER_KEY_EXCHANGE,
    ),
    (S.CLIENT_EXPECT_SERVER_KEY_EXCHANGE, H.SERVER_KEY_EXCHANGE): (
        Handshake._client_server_key_exchange,
        S.CLIENT_EXPECT_CERTIFICATE_REQUEST,
    ),
    (S.CLIENT_EXPECT_CERTIFICATE_REQUEST, H.CERTIFICATE_REQUEST): (
        Handshake._client_certificate_request,
        S.CLIENT_EXPECT_SERVER_HELLO_DONE,
    ),
    (S.CLIENT_EXPECT_CERTIFICATE_REQUEST, H.SERVER_HELLO_DONE): (
        Handshake._client_server_hello_done,
        S.CLIENT_EXPECT_CCS,
    ),
    (S.CLIENT_EXPECT_SERVER_HELLO_DONE, H.SERVER_HELLO_DONE): (
        Handshake._client_server_hello_done,
        S.CLIENT_EXPECT_CCS,
    ),
    (S.CLIENT_EXPECT_CCS, CCS): (None, S.CLIENT_EXPECT_FINISHED),
    (S.CLIENT_EXPECT_FINISHED, H.FINISHED): (Handshake._client_finished, S.ESTABLISHED),
    # server
    (S.SERVER_EXPECT_CLIENT_HELLO, RESUME): (Handshake._server_resume, S.ESTABLISHED),
    (S.SERVER_EXPECT_CLIENT_HELLO, H.CLIENT_HELLO): (
        Handshake._server_client_hello,
        S.SERVER_EXPECT_CERTIFICATE,
    ),
    (S.SERVER_EXPECT_CERTIFICATE, H.CERTIFICATE): (
        Handshake._server_certificate,
        S.SERVER_EXPECT_CLIENT_KEY_EXCHANGE,
    ),
    (S.SERVER_EXPECT_CLIENT_KEY_EXCHANGE, H.CLIENT_KEY_EXCHANGE): (
        Handshake._server_client_key_exchange,
        S.SERVER_EXPECT_CERTIFICATE_VERIFY,
    ),
    (S.SERVER_EXPECT_CERTIFICATE_VERIFY, H.CERTIFICATE_VERIFY): (
        Handshake._server_certificate_verify,
        S.SERVER_EXPECT_CCS,
    ),
    (S.SERVER_EXPECT_CCS, CCS): (None, S.SERVER_EXPECT_FINISHED),
    (S.SERVER_EXPECT_FINISHED, H.FINISHED): (Handshake._server_finished, S.ESTABLISHED),
    # after completion: the client takes EKTKey (RFC 8870 §5.2.2; the handler refuses it at
    # a server, where the message has no meaning)
    (S.ESTABLISHED, H.EKT_KEY): (Handshake._client_ekt_key, S.ESTABLISHED),
}

#: Fragment admission by (state, type), before reassembly; a pair not listed takes the state's
#: default in _FRAGMENT_DEFAULT, else REASSEMBLE (so the table above judges it in order).
_FRAGMENT_ROUTES: dict[tuple[State, int], Route] = {
    (S.CLIENT_EXPECT_SERVER_HELLO, H.HELLO_VERIFY_REQUEST): Route.HELLO_VERIFY,
    (S.CLIENT_EXPECT_SERVER_HELLO, H.SERVER_HELLO): Route.FIRST,
    (S.SERVER_EXPECT_CLIENT_HELLO, H.CLIENT_HELLO): Route.FIRST,
    # A HelloVerifyRequest only answers a ClientHello: stray anywhere else.
    **{
        (state, H.HELLO_VERIFY_REQUEST): Route.DROP
        for state in State
        if state is not S.CLIENT_EXPECT_SERVER_HELLO
    },
    # A server that answered a ClientHello: the same one again is a retransmission, one with
    # another random a new handshake (RFC 6347 §4.2.8).
    **{
        (state, H.CLIENT_HELLO): Route.NEW_HELLO
        for state in State
        if (state.name.startswith("SERVER_") and state is not S.SERVER_EXPECT_CLIENT_HELLO)
        or state is S.ESTABLISHED
    },
}
_FRAGMENT_DEFAULT: dict[State, Route] = {
    # Before the ClientHello a server keeps no state for anything else (D14).
    S.SERVER_EXPECT_CLIENT_HELLO: Route.DROP,
}
#: States in which a plaintext fragment can only be the peer's retransmitted final flight.
_PLAINTEXT_IS_LATE = frozenset((S.ESTABLISHED,))
#: States in which a ChangeCipherSpec not expected now is dropped rather than held for later.
_NO_EARLY_CCS = frozenset((S.CLIENT_START, S.SERVER_EXPECT_CLIENT_HELLO, S.ESTABLISHED))
#: States in which an epoch-1 record before the peer's CCS means the peer resent its flight.
_EPOCH1_MEANS_RESENT = frozenset((S.CLIENT_EXPECT_CCS,))
#: Handshake messages the peer may send in plaintext (epoch 0), by the peer's role.
_EPOCH0_FROM_SERVER = frozenset(
    (
        H.HELLO_VERIFY_REQUEST,
        H.SERVER_HELLO,
        H.CERTIFICATE,
        H.SERVER_KEY_EXCHANGE,
        H.CERTIFICATE_REQUEST,
        H.SERVER_HELLO_DONE,
        H.HELLO_REQUEST,
    )
)
_EPOCH0_FROM_CLIENT = frozenset(
    (H.CLIENT_HELLO, H.CERTIFICATE, H.CLIENT_KEY_EXCHANGE, H.CERTIFICATE_VERIFY)
)
