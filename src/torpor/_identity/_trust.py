"""The trust store: the peers (other hosts' TLS identities) this host accepts, and pairing tokens.

Kept under ``<torpor home>/trust/`` (0700): ``peers.json`` and ``tokens.json``, each written
whole (:func:`torpor._safe.replace_file`), read with a size bound through ``O_NOFOLLOW`` and
checked entry by entry; one bad entry refuses the whole file (one line naming file, entry and
problem): a store someone tampered with must not half-work. Changes are made under an
``flock`` of the directory, so two ``torpor trust add`` at once do not lose one.

A peer is a name and a certificate fingerprint (``sha256:<hex>``), with the certificate itself
when we have it. Both are needed differently (see :mod:`torpor._migrate._channel`): a connection
*to* a peer pins its fingerprint (enough), a connection *from* a peer is checked by OpenSSL
against the trusted certificates (so the peer proves it holds the key) and then by fingerprint.
A peer added by fingerprint alone is completed with its certificate on our first connection to
it (:meth:`TrustStore.learn_cert`: the certificate whose hash is the pinned fingerprint).

Pairing tokens (as LXD's): the host that will accept a peer makes one (``torpor trust token``):
a random 256-bit secret, an expiry, its own fingerprint and an address hint. Only the SHA-256
of the secret is stored. The peer adds the token (it then trusts the issuer's fingerprint) and,
over the network, presents the secret and its certificate; the issuer checks it with
:meth:`TrustStore.redeem_token` (constant-time compare, expiry, single use) and trusts that
certificate.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _paths, _safe
from .._errors import NotFoundError, TorporError
from ._tls import fingerprint, is_fingerprint, parse_fingerprint

DIR_NAME = "trust"
PEERS = "peers.json"
TOKENS = "tokens.json"
TOKEN_PREFIX = "torpor-token:"
VIAS = ("fingerprint", "cert", "token")
MAX_PEERS = 1000
MAX_TOKENS = 1000
MAX_CERT = 16 * 1024  # a DER certificate torpor makes is ~300 bytes
MAX_TOKEN_TEXT = 2048
MAX_TTL = 7 * 24 * 3600
_MAX_FILE = 8 * 1024 * 1024  # MAX_PEERS certificates, base64, and room for the JSON
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_ADDRESS = re.compile(r"[A-Za-z0-9.:\[\]-]{1,100}")
_HASH = re.compile(r"[0-9a-f]{64}")
SECRET_BYTES = 32


class TrustError(TorporError):
    """The trust store cannot be used (a file that is not one torpor wrote), or a peer, name,
    fingerprint, certificate or token given to it is not valid."""


class TokenRefusedError(TrustError):
    """A pairing token that is unknown, expired or used already."""


@dataclass(frozen=True)
class Peer:
    """A trusted host: its ``name`` here, its certificate ``fingerprint``, the certificate
    (DER) once known, when it was added (Unix time) and how (``fingerprint|cert|token``)."""

    name: str
    fingerprint: str
    cert_der: bytes | None
    added: int
    via: str

    def to_json(self) -> dict[str, Any]:
        """The peer as ``trust list --json`` shows it (no certificate bytes)."""
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "has_cert": self.cert_der is not None,
            "added": self.added,
            "via": self.via,
        }


@dataclass(frozen=True)
class Token:
    """A pairing token, as parsed from its text: the issuer's ``fingerprint``, its
    ``address`` hint, the ``secret`` (bytes), the expiry (Unix time) and the issuer's name."""

    fingerprint: str
    address: str | None
    secret: bytes
    expires: int
    issuer: str


def check_peer_name(name: object) -> str:
    """Return ``name`` if it can name a peer (letters, digits, ``.``, ``_``, ``-``, at most 63,
    starting with a letter or digit, and not a fingerprint), else raise :class:`TrustError`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or parse_fingerprint(name):
        raise TrustError(
            f"peer name {name!r} is not valid",
            hint="use letters, digits, '.', '_' and '-' (at most 63, not a fingerprint)",
        )
    return name


def cert_der_from(data: bytes, *, source: str) -> bytes:
    """The DER form of the one certificate in ``data`` (PEM or DER), or :class:`TrustError`."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    if len(data) > MAX_CERT * 2:
        raise TrustError(f"{source} is larger than {MAX_CERT * 2} bytes; not a certificate")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            certs = x509.load_pem_x509_certificates(data)
            if len(certs) != 1:
                raise TrustError(f"{source} holds {len(certs)} certificates, not 1")
            cert = certs[0]
        else:
            cert = x509.load_der_x509_certificate(data)
        der = cert.public_bytes(Encoding.DER)
    except ValueError as exc:
        raise TrustError(
            f"{source} is not a PEM or DER certificate",
            hint="give the peer's certificate (torpor identity show --cert on the peer)",
        ) from exc
    if len(der) > MAX_CERT:
        raise TrustError(f"{source}: certificate is larger than {MAX_CERT} bytes; refused")
    return der


# -- tokens -------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_token(text: object) -> Token:
    """The token ``text`` (as ``torpor trust token`` prints it), or :class:`TrustError`: it
    comes from outside (pasted, sent)."""
    bad = TrustError(
        "not a pairing token (expected torpor-token:…)",
        hint="copy the whole line `torpor trust token` printed on the peer",
    )
    if not isinstance(text, str) or len(text) > MAX_TOKEN_TEXT:
        raise bad
    text = text.strip()
    if not text.startswith(TOKEN_PREFIX):
        raise bad
    try:
        doc = json.loads(_unb64(text[len(TOKEN_PREFIX) :]))
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError) as exc:
        raise bad from exc
    if not isinstance(doc, dict) or set(doc) != {"v", "fp", "addr", "secret", "exp", "name"}:
        raise bad
    fp, addr, secret, exp, name = (doc[k] for k in ("fp", "addr", "secret", "exp", "name"))
    if type(doc["v"]) is not int or doc["v"] != 1 or not is_fingerprint(fp):
        raise bad
    if addr is not None and not (isinstance(addr, str) and _ADDRESS.fullmatch(addr)):
        raise bad
    if type(exp) is not int or not 0 < exp < 2**40 or not isinstance(name, str):
        raise bad
    if not _NAME.fullmatch(name) or parse_fingerprint(name):
        raise bad
    try:
        raw = _unb64(secret) if isinstance(secret, str) else b""
    except (ValueError, binascii.Error) as exc:
        raise bad from exc
    if len(raw) != SECRET_BYTES or _b64(raw) != secret:
        raise bad
    return Token(fingerprint=fp, address=addr, secret=raw, expires=exp, issuer=name)


def format_token(token: Token) -> str:
    """The text of ``token`` (what :func:`parse_token` reads back)."""
    doc = {
        "v": 1,
        "fp": token.fingerprint,
        "addr": token.address,
        "secret": _b64(token.secret),
        "exp": token.expires,
        "name": token.issuer,
    }
    return TOKEN_PREFIX + _b64(json.dumps(doc, separators=(",", ":")).encode())


def _secret_hash(secret: bytes) -> str:
    return hashlib.sha256(b"torpor-pairing-token\0" + secret).hexdigest()


# -- the store ----------------------------------------------------------------------------------


class TrustStore:
    """The trust store of the torpor home ``home`` (the current one by default)."""

    def __init__(self, home: Path | None = None) -> None:
        self._home = home

    @property
    def dir_path(self) -> Path:
        """The store's directory (``<home>/trust``)."""
        home = _paths.home() if self._home is None else self._home
        return home / DIR_NAME

    @contextlib.contextmanager
    def _dir(self, *, lock: bool) -> Iterator[int]:
        home = (
            _paths.home()
            if self._home is None
            else _paths.private_dir(self._home, what="torpor home")
        )
        path = _paths.private_dir(home / DIR_NAME, what="trust store")
        fd = _safe.open_dir(path)
        try:
            _safe.check_private(path, what="trust store", fd=fd)
            if lock:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    def _read(self, dir_fd: int, name: str, key: str) -> list[Any]:
        path = self.dir_path / name
        try:
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except FileNotFoundError:
            return []
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise TrustError(
                    f"trust store file {path} is a symlink; refused", hint=_fix(path)
                ) from exc
            raise TrustError(f"cannot open trust store file {path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            problem = _safe.private_file_problem(st)
            if problem is None and st.st_mode & 0o077:
                problem = f"is accessible by group or others (mode {st.st_mode & 0o777:04o})"
            if problem is not None:
                raise TrustError(f"trust store file {path} {problem}; refused", hint=_fix(path))
            if st.st_size > _MAX_FILE:
                raise TrustError(
                    f"trust store file {path} is larger than {_MAX_FILE} bytes; refused",
                    hint=_fix(path),
                )
            data = os.read(fd, st.st_size + 1)
        finally:
            os.close(fd)
        if len(data) > _MAX_FILE:
            raise TrustError(
                f"trust store file {path} is larger than {_MAX_FILE} bytes; refused",
                hint=_fix(path),
            )
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise TrustError(
                f"trust store file {path} is not JSON; refused", hint=_fix(path)
            ) from exc
        if not isinstance(doc, dict) or doc.get("version") != 1 or set(doc) != {"version", key}:
            raise TrustError(
                f"trust store file {path} is not a version-1 {key} list; refused", hint=_fix(path)
            )
        items = doc[key]
        if not isinstance(items, list):
            raise TrustError(
                f"trust store file {path}: {key} is not a list; refused", hint=_fix(path)
            )
        return items

    def _write(self, dir_fd: int, name: str, key: str, items: list[Any]) -> None:
        data = json.dumps({"version": 1, key: items}, indent=1).encode() + b"\n"
        _safe.replace_file(dir_fd, name, data, source=str(self.dir_path))

    # -- peers ----------------------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        """Every trusted peer, in the order they were added."""
        with self._dir(lock=False) as fd:
            return self._peers(fd)

    def _peers(self, dir_fd: int) -> list[Peer]:
        path = self.dir_path / PEERS
        raw = self._read(dir_fd, PEERS, "peers")
        if len(raw) > MAX_PEERS:
            raise TrustError(f"trust store file {path} lists over {MAX_PEERS} peers; refused")
        out: list[Peer] = []
        for i, item in enumerate(raw):
            problem = _peer_problem(item)
            if problem is None:
                peer = _peer_from(item)
                if any(p.name == peer.name or p.fingerprint == peer.fingerprint for p in out):
                    problem = "names a peer or fingerprint listed before it"
                else:
                    out.append(peer)
            if problem is not None:
                raise TrustError(
                    f"trust store file {path}: peer {i} {problem}; refused", hint=_fix(path)
                )
        return out

    def find(self, fp: str) -> Peer | None:
        """The peer whose certificate has the fingerprint ``fp``, if it is trusted."""
        return next((p for p in self.peers() if p.fingerprint == fp), None)

    def trusted_certs(self) -> list[bytes]:
        """The DER certificates of the peers whose certificate is known."""
        return [p.cert_der for p in self.peers() if p.cert_der is not None]

    def add(
        self,
        name: str,
        *,
        fingerprint_text: str | None = None,
        cert_der: bytes | None = None,
        via: str = "fingerprint",
    ) -> Peer:
        """Trust a peer by fingerprint or certificate, under ``name``. A name or a
        fingerprint trusted already is refused (:class:`TrustError`)."""
        check_peer_name(name)
        if cert_der is not None:
            cert_der = cert_der_from(cert_der, source="certificate")
            fp = fingerprint(cert_der)
        else:
            parsed = parse_fingerprint(fingerprint_text)
            if parsed is None:
                raise TrustError(
                    f"{fingerprint_text!r} is not a certificate fingerprint",
                    hint="give it as sha256:<64 hex digits> (torpor identity show on the peer)",
                )
            fp = parsed
        peer = Peer(name=name, fingerprint=fp, cert_der=cert_der, added=int(time.time()), via=via)
        with self._dir(lock=True) as fd:
            peers = self._peers(fd)
            for p in peers:
                if p.name == name:
                    raise TrustError(
                        f"a peer named {name!r} is trusted already ({p.fingerprint})",
                        hint=f"torpor trust remove {name} first, or choose another name",
                    )
                if p.fingerprint == fp:
                    raise TrustError(
                        f"{fp} is trusted already, as {p.name!r}",
                        hint=f"torpor trust remove {p.name} first to rename it",
                    )
            if len(peers) >= MAX_PEERS:
                raise TrustError(f"the trust store holds {MAX_PEERS} peers already")
            self._write(fd, PEERS, "peers", [_peer_json(p) for p in [*peers, peer]])
        return peer

    def remove(self, which: str) -> Peer:
        """Stop trusting the peer named ``which`` (or with that fingerprint)."""
        fp = parse_fingerprint(which)
        with self._dir(lock=True) as fd:
            peers = self._peers(fd)
            gone = next((p for p in peers if p.name == which or p.fingerprint == fp), None)
            if gone is None:
                raise NotFoundError(
                    f"no trusted peer named {which!r}", hint="torpor trust list shows them"
                )
            self._write(fd, PEERS, "peers", [_peer_json(p) for p in peers if p is not gone])
        return gone

    def learn_cert(self, cert_der: bytes) -> bool:
        """Record ``cert_der`` for the peer trusted by its fingerprint alone (True), after a
        connection to it showed it; False if no such peer lacks a certificate."""
        fp = fingerprint(cert_der)
        with self._dir(lock=True) as fd:
            peers = self._peers(fd)
            if not any(p.fingerprint == fp and p.cert_der is None for p in peers):
                return False
            new = [
                Peer(p.name, p.fingerprint, cert_der, p.added, p.via) if p.fingerprint == fp else p
                for p in peers
            ]
            self._write(fd, PEERS, "peers", [_peer_json(p) for p in new])
        return True

    # -- tokens ---------------------------------------------------------------------------------

    def _tokens(self, dir_fd: int) -> list[dict[str, Any]]:
        path = self.dir_path / TOKENS
        raw = self._read(dir_fd, TOKENS, "tokens")
        if len(raw) > MAX_TOKENS:
            raise TrustError(f"trust store file {path} lists over {MAX_TOKENS} tokens; refused")
        for i, item in enumerate(raw):
            ok = (
                isinstance(item, dict)
                and set(item) == {"hash", "name", "expires"}
                and isinstance(item["hash"], str)
                and _HASH.fullmatch(item["hash"]) is not None
                and isinstance(item["name"], str)
                and _NAME.fullmatch(item["name"]) is not None
                and type(item["expires"]) is int
            )
            if not ok:
                raise TrustError(
                    f"trust store file {path}: token {i} is not valid; refused", hint=_fix(path)
                )
        return raw

    def make_token(
        self, name: str, *, issuer_fingerprint: str, issuer: str, address: str | None, ttl: int
    ) -> str:
        """A new single-use pairing token valid for ``ttl`` seconds; the peer that redeems it
        is trusted under ``name``. Only a hash of its secret is kept."""
        check_peer_name(name)
        if not 0 < ttl <= MAX_TTL:
            raise TrustError(f"token lifetime {ttl} s is not between 1 s and {MAX_TTL} s")
        if address is not None and not _ADDRESS.fullmatch(address):
            raise TrustError(f"address {address!r} is not a host[:port]")
        secret = secrets.token_bytes(SECRET_BYTES)
        now = int(time.time())
        token = Token(issuer_fingerprint, address, secret, now + ttl, issuer)
        text = format_token(token)
        with self._dir(lock=True) as fd:
            live = [t for t in self._tokens(fd) if t["expires"] > now]
            if len(live) >= MAX_TOKENS:
                raise TrustError(f"{MAX_TOKENS} pairing tokens are pending already")
            entry = {"hash": _secret_hash(secret), "name": name, "expires": token.expires}
            self._write(fd, TOKENS, "tokens", [*live, entry])
        return text

    def redeem_token(self, secret: bytes, cert_der: bytes, *, now: float | None = None) -> Peer:
        """Check a pairing secret a peer presented with its certificate and, if it is a
        pending token's (compared in constant time), unexpired, trust that certificate under
        the token's name; the token is used up either way once matched. Any other secret is
        refused with :class:`TokenRefusedError`, saying nothing about why."""
        der = cert_der_from(cert_der, source="peer certificate")
        presented = _secret_hash(secret) if isinstance(secret, bytes) else ""
        t = time.time() if now is None else now
        with self._dir(lock=True) as fd:
            tokens = self._tokens(fd)
            match = None
            for entry in tokens:  # every entry compared: the time says nothing about which
                if hmac.compare_digest(entry["hash"].encode(), presented.encode()):
                    match = entry
            keep = [e for e in tokens if e is not match and e["expires"] > t]
            if keep != tokens:
                self._write(fd, TOKENS, "tokens", keep)
        if match is None or match["expires"] <= t:
            raise TokenRefusedError(
                "pairing token refused (unknown, used already or expired)",
                hint="make a new one with torpor trust token on this host",
            )
        return self.add(match["name"], cert_der=der, via="token")

    def pending_tokens(self) -> int:
        """How many unexpired tokens wait to be redeemed."""
        now = time.time()
        with self._dir(lock=False) as fd:
            return sum(1 for t in self._tokens(fd) if t["expires"] > now)


def _fix(path: Path) -> str:
    return f"inspect {path}; remove it to start an empty one (peers must then be added again)"


def _peer_problem(item: object) -> str | None:
    """None if ``item`` is a peer entry as torpor writes it, else what is wrong."""
    if not isinstance(item, dict):
        return "is not an object"
    if set(item) != {"name", "fingerprint", "cert", "added", "via"}:
        return "does not have exactly name, fingerprint, cert, added, via"
    if not isinstance(item["name"], str) or not _NAME.fullmatch(item["name"]):
        return "has an invalid name"
    if parse_fingerprint(item["name"]):
        return "has an invalid name"
    if not is_fingerprint(item["fingerprint"]):
        return "has an invalid fingerprint"
    if type(item["added"]) is not int or item["added"] < 0 or item["via"] not in VIAS:
        return "has an invalid added time or via"
    cert = item["cert"]
    if cert is None:
        return None
    if not isinstance(cert, str) or len(cert) > MAX_CERT * 2:
        return "has an invalid certificate"
    try:
        der = base64.b64decode(cert, validate=True)
        if cert_der_from(der, source="certificate") != der:
            return "has an invalid certificate"
    except (ValueError, binascii.Error, TrustError):
        return "has an invalid certificate"
    if fingerprint(der) != item["fingerprint"]:
        return "has a certificate whose fingerprint is not the one listed"
    return None


def _peer_from(item: dict[str, Any]) -> Peer:
    cert = None if item["cert"] is None else base64.b64decode(item["cert"])
    return Peer(item["name"], item["fingerprint"], cert, item["added"], item["via"])


def _peer_json(p: Peer) -> dict[str, Any]:
    cert = None if p.cert_der is None else base64.b64encode(p.cert_der).decode()
    return {
        "name": p.name,
        "fingerprint": p.fingerprint,
        "cert": cert,
        "added": p.added,
        "via": p.via,
    }
