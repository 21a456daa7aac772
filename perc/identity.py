"""Endpoint, KMF and MDD identities: a self-signed ECDSA P-256 certificate and its key.

Peers are identified by certificate fingerprint (decision D20): ``sha-256`` followed by the
SHA-256 of the DER certificate as uppercase hex pairs joined by ``:``, as in SDP
``a=fingerprint`` (RFC 8122).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import re
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")
_FP_RE = re.compile(r"^sha-256 ((?:[0-9A-F]{2}:){31}[0-9A-F]{2})$", re.IGNORECASE)


class IdentityError(Exception):
    """A certificate, key or fingerprint could not be read or does not fit perc's profile."""


def fingerprint_of_der(der: bytes) -> str:
    """The D20 text form of the SHA-256 fingerprint of a DER certificate."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return "sha-256 " + ":".join(digest[i : i + 2] for i in range(0, 64, 2))


def fingerprint_of(cert: x509.Certificate) -> str:
    return fingerprint_of_der(cert.public_bytes(serialization.Encoding.DER))


def parse_fingerprint(text: str) -> str:
    """Validate a D20 fingerprint and return it in canonical (uppercase) form."""
    m = _FP_RE.match(text.strip())
    if m is None:
        raise IdentityError(
            f"malformed fingerprint {text!r}: expected 'sha-256 ' and 32 hex pairs joined by ':'"
        )
    return "sha-256 " + m.group(1).upper()


def fingerprint_matches(actual: str, expected: str) -> bool:
    """Constant-time comparison of two canonical fingerprints."""
    return hmac.compare_digest(actual.encode(), expected.encode())


@attrs.frozen
class Identity:
    """A certificate and its private key, loaded and checked."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @property
    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.certificate)


def generate(name: str, *, days: int = 3650) -> Identity:
    """A fresh self-signed P-256 identity with subject ``CN=name``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return Identity(certificate=cert, private_key=key)


def check_name(name: str) -> str:
    """An identity name must be a plain file stem: it becomes ``NAME.key`` and ``NAME.crt``."""
    if not _NAME_RE.match(name):
        raise IdentityError(
            f"bad identity name {name!r}: use letters, digits, '.', '-' and '_' (no '/')"
        )
    return name


def write(
    identity: Identity, directory: Path, name: str, *, overwrite: bool = True
) -> tuple[Path, Path]:
    """Write ``name.key`` (mode 0600) and ``name.crt`` (PEM) into ``directory``.

    With ``overwrite=False`` an existing file of either name is an :class:`IdentityError`
    (nothing is written).
    """
    check_name(name)
    key_path = directory / f"{name}.key"
    crt_path = directory / f"{name}.crt"
    if not overwrite:
        for p in (key_path, crt_path):
            if p.exists():
                raise IdentityError(f"{p} exists; not overwriting it")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IdentityError(f"cannot create folder {directory}: {e.strerror}") from None
    key_pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        crt_path.write_bytes(identity.certificate.public_bytes(serialization.Encoding.PEM))
    except OSError as e:
        raise IdentityError(f"cannot write {e.filename}: {e.strerror}") from None
    return key_path, crt_path


def load_certificate(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IdentityError(f"cannot read certificate {path}: {e.strerror}") from None
    except ValueError:  # e.g. a NUL in the path
        raise IdentityError(f"cannot read certificate {str(path)!r}: bad file name") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        # cryptography's parse errors are long and internal; the file name says enough.
        raise IdentityError(f"{path} is not a PEM or DER X.509 certificate") from None


def load(cert_path: Path, key_path: Path) -> Identity:
    """Load a certificate and key; they must be a matching ECDSA P-256 pair."""
    cert = load_certificate(cert_path)
    try:
        key_data = key_path.read_bytes()
    except OSError as e:
        raise IdentityError(f"cannot read key {key_path}: {e.strerror}") from None
    except ValueError:  # e.g. a NUL in the path
        raise IdentityError(f"cannot read key {str(key_path)!r}: bad file name") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise IdentityError(f"{key_path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise IdentityError(f"{key_path} is not an ECDSA P-256 key")
    if key.public_key() != cert.public_key():
        raise IdentityError(f"{key_path} does not belong to {cert_path}")
    return Identity(certificate=cert, private_key=key)
