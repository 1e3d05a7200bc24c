"""The host's TLS identity: an Ed25519 key and a self-signed certificate, made on first use.

Kept as one PEM file, ``<torpor home>/identity/tls.pem`` (the PKCS#8 key, then the
certificate; mode 0600 in the 0700 identity directory), so that it is made race-free the way
the signing key is (:mod:`torpor._identity._key`): written whole to an ``O_EXCL`` temporary
file, then ``link``\\ ed to its name; two processes making one at once agree on the winner's.

It is a key of its own, not the signing key: TLS signs handshake transcripts, the signing key
signs manifests, and a key used for one purpose only cannot be tricked into the other.
Ed25519 because Python's ``ssl`` on OpenSSL 3 negotiates it in TLS 1.3 (checked on Debian 12's
OpenSSL 3.0) and it has no parameters to get wrong.

Peers are not checked by any CA: a certificate is trusted when the SHA-256 of its DER form, its
**fingerprint** (``sha256:<64 hex>``), is in the trust store (:mod:`torpor._identity._trust`).
The certificate's names (CN and SAN = this host's name) are only labels for people.

The file is read through an fd opened ``O_NOFOLLOW`` and checked with ``fstat`` (a regular
file, ours, no group or other access), parsed and checked (one Ed25519 key, one certificate of
that key), and only the checked bytes are handed to ``ssl`` (through a ``memfd``: ``ssl`` loads
keys by path only, and a path could be swapped between our check and its open).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from .. import _paths
from ._key import IdentityError, PrivateFile, load_or_make

TLS_NAME = "tls.pem"
FINGERPRINT_PREFIX = "sha256:"
_MAX_FILE = 64 * 1024  # an Ed25519 key and certificate are ~1 KiB; refuse a huge planted file
_VALID_DAYS = 100 * 365  # trust is the pinned fingerprint, not the dates: a new cert = a new host
_CLOCK_SKEW = datetime.timedelta(days=1)  # a peer whose clock is behind still accepts the cert
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TLS_FILE = PrivateFile(
    TLS_NAME, "TLS identity", _MAX_FILE, "a new identity is made on next use; peers must trust it"
)


@dataclass(frozen=True)
class TlsIdentity:
    """This host's TLS key and certificate. ``fingerprint`` names it (``sha256:<hex>``)."""

    fingerprint: str
    path: Path
    cert_der: bytes = field(repr=False)
    pem: bytes = field(repr=False, compare=False)

    def load_into(self, ctx: ssl.SSLContext) -> None:
        """Load this key and certificate into ``ctx`` (from memory, never by a path that
        could be swapped)."""
        fd = os.memfd_create("torpor-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, self.pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)


def fingerprint(cert_der: bytes) -> str:
    """The fingerprint of a DER certificate: ``sha256:`` and the hex SHA-256 of its bytes."""
    return FINGERPRINT_PREFIX + hashlib.sha256(cert_der).hexdigest()


def parse_fingerprint(text: object) -> str | None:
    """The normal form (``sha256:`` + 64 lowercase hex) of a fingerprint as people paste it
    (upper case, ``:`` between bytes as ``openssl x509 -fingerprint`` prints, the prefix in any
    case), or None if ``text`` is not one."""
    if not isinstance(text, str) or len(text) > 200:
        return None
    body = text.strip()
    if body[: len(FINGERPRINT_PREFIX)].lower() == FINGERPRINT_PREFIX:
        body = body[len(FINGERPRINT_PREFIX) :]
    if ":" in body:
        parts = body.split(":")
        if len(parts) != 32 or any(len(p) != 2 for p in parts):
            return None
        body = "".join(parts)
    body = body.lower()
    return FINGERPRINT_PREFIX + body if _HEX64.fullmatch(body) else None


def is_fingerprint(value: object) -> bool:
    """Whether ``value`` is a fingerprint in normal form (as torpor writes them)."""
    return (
        isinstance(value, str)
        and value.startswith(FINGERPRINT_PREFIX)
        and (_HEX64.fullmatch(value[len(FINGERPRINT_PREFIX) :]) is not None)
    )


def tls_identity(home: Path | None = None) -> TlsIdentity:
    """This host's TLS identity, made on first use under ``<home>/identity/`` (``home``: the
    torpor home by default).

    Refuses (:class:`UnsafePathError`) an identity directory another user could change, and a
    ``tls.pem`` that is a symlink, not a regular file, owned by another user, or accessible by
    group or others; (:class:`IdentityError`) one that is not an Ed25519 key and its own
    certificate.
    """
    home = _paths.home() if home is None else _paths.private_dir(home, what="torpor home")
    pem, path = load_or_make(home, _TLS_FILE, new_identity_pem)
    return _load(pem, path)


def _host_name() -> str:
    """This host's name as a certificate label: a DNS name of at most 64 characters (the CN
    limit), ``torpor`` if the hostname is not one."""
    name = socket.gethostname()[:64]
    return name if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", name) else "torpor"


def new_identity_pem(name: str | None = None) -> bytes:
    """A new key and its self-signed certificate, as ``tls.pem`` holds them (also for tests
    that need another host's identity)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    host = name or _host_name()
    key = Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        # Not a CA: a trusted peer's key must not be able to vouch for other certificates
        # (torpor compares exact fingerprints anyway; this keeps OpenSSL's checks aligned).
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(key, None)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem + cert.public_bytes(serialization.Encoding.PEM)


def _load(pem: bytes, path: Path) -> TlsIdentity:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    hint = f"remove {path} (a new identity is made on next use; peers must trust it)"
    try:
        key = serialization.load_pem_private_key(pem, password=None)
        certs = x509.load_pem_x509_certificates(pem)
    except (ValueError, TypeError) as exc:
        raise IdentityError(
            f"TLS identity {path} is not a readable PEM key and certificate", hint=hint
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"TLS identity {path} is not an Ed25519 key", hint=hint)
    if len(certs) != 1:
        raise IdentityError(
            f"TLS identity {path} holds {len(certs)} certificates, not 1", hint=hint
        )
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    if certs[0].public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
        raise IdentityError(f"TLS identity {path}: the certificate is not of its key", hint=hint)
    der = certs[0].public_bytes(serialization.Encoding.DER)
    return TlsIdentity(fingerprint=fingerprint(der), path=path, cert_der=der, pem=pem)
