"""The host key: made once under ``<torpor home>/identity/``, then loaded and checked on use.

The private key is a PEM PKCS#8 file (``host.key``, mode 0600, in a 0700 directory) so that
``cryptography`` (and the TLS stack later) loads it as is. It is created race-free: the new key
is written completely to a temporary file made ``O_EXCL``, then ``link``\\ ed to its name; when
two processes make one at once, one link wins and both then load the winner's key.

``cryptography`` is imported inside the functions: it costs ~25 ms, which commands that never
sign or verify (``torpor ps``, a local restore) should not pay.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import _paths, _safe
from .._errors import TorporError, UnsafePathError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

DIR_NAME = "identity"
KEY_NAME = "host.key"
KEY_ID_LEN = 64  # hex of a raw 32-byte Ed25519 public key
SIG_LEN = 64  # bytes of an Ed25519 signature
_MAX_KEY_FILE = 64 * 1024  # a PEM Ed25519 key is ~120 bytes; refuse to read a huge planted file


class IdentityError(TorporError):
    """The host key cannot be made or loaded (unreadable, not a valid Ed25519 key)."""


@dataclass(frozen=True)
class HostIdentity:
    """This host's key pair. ``key_id`` names it (hex of the raw public key)."""

    key_id: str
    key_path: Path
    private_key: Ed25519PrivateKey = field(repr=False, compare=False)

    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature (64 bytes) of ``data``."""
        return self.private_key.sign(data)


def host_identity() -> HostIdentity:
    """This host's identity, made on first use under ``<torpor home>/identity/``.

    Refuses (:class:`UnsafePathError`) an identity directory another user could change, and a
    key file that is a symlink, not a regular file, owned by another user, or readable or
    writable by group or others.
    """
    pem, path = load_or_make(_paths.home(), _KEY_FILE, _new_key_pem)
    return _load(pem, path)


def _new_key_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# -- private files of the identity directory ---------------------------------------------------


@dataclass(frozen=True)
class PrivateFile:
    """A file of the identity directory only its owner may read (a key): its ``name``, what
    messages call it (``what``), the most bytes it may hold (``limit``) and what removing it
    does (``remade``, for hints)."""

    name: str
    what: str
    limit: int
    remade: str


_KEY_FILE = PrivateFile(KEY_NAME, "host key", _MAX_KEY_FILE, "a new key is made on next use")


def load_or_make(home: Path, spec: PrivateFile, make: Callable[[], bytes]) -> tuple[bytes, Path]:
    """The bytes of ``spec``'s file in ``home``'s identity directory (made 0700 on first use,
    refused if another user could change it) and its path; a file not there yet is first
    made, race-free, from ``make()``: written whole to an ``O_EXCL`` temporary file, then
    ``link``\\ ed to its name, so that of two processes making one at once both use the
    winner's."""
    home_fd = _safe.open_dir(home)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(DIR_NAME, 0o700, dir_fd=home_fd)
        dir_fd = _safe.open_dir(DIR_NAME, dir_fd=home_fd)
    finally:
        os.close(home_fd)
    dir_path = home / DIR_NAME
    try:
        _safe.check_private(dir_path, what="identity directory", fd=dir_fd)
        data = _read_private(dir_fd, dir_path, spec)
        if data is None:
            _make_private(dir_fd, dir_path, spec, make())
            data = _read_private(dir_fd, dir_path, spec)
        if data is None:  # made, then removed under us: say so rather than loop
            raise IdentityError(
                f"{spec.what} {dir_path / spec.name} vanished just after it was made",
                hint="run the command again",
            )
    finally:
        os.close(dir_fd)
    return data, dir_path / spec.name


def _read_private(dir_fd: int, dir_path: Path, spec: PrivateFile) -> bytes | None:
    """The file's bytes, None if there is none yet; refuses an unsafe file."""
    path = dir_path / spec.name
    remove = f"remove {path} ({spec.remade})"
    try:
        fd = os.open(
            spec.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(
                f"{spec.what} {path} is a symlink; refused", path=path, hint=remove
            ) from exc
        raise IdentityError(f"cannot open {spec.what} {path}: {exc.strerror}") from exc
    try:
        _check_private_stat(os.fstat(fd), path, spec.what, remove)
        data = os.read(fd, spec.limit + 1)
    finally:
        os.close(fd)
    if len(data) > spec.limit:
        raise IdentityError(
            f"{spec.what} {path} is larger than {spec.limit} bytes; refused", hint=remove
        )
    return data


def _check_private_stat(st: os.stat_result, path: Path, what: str, remove: str) -> None:
    kind = _safe.kind_problem(st.st_mode)
    if kind is not None:
        raise UnsafePathError(
            f"{what} {path} is {kind}, not a regular file; refused", path=path, hint=remove
        )
    owner = _safe.owner_problem(st)
    if owner is not None:
        raise UnsafePathError(
            f"{what} {path} {owner}; refused", path=path, hint=f"chown {os.geteuid()} {path}"
        )
    if st.st_mode & 0o077:
        raise UnsafePathError(
            f"{what} {path} is accessible by group or others"
            f" (mode {stat.S_IMODE(st.st_mode):04o}); refused",
            path=path,
            hint=f"chmod 600 {path}",
        )


def _make_private(dir_fd: int, dir_path: Path, spec: PrivateFile, data: bytes) -> None:
    """Write ``data`` under a temporary name, then link it to ``spec.name`` unless another
    process got there first (then its file is the one)."""
    tmp = f".{spec.name}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        fd = _safe.create_file(dir_fd, tmp, source=str(dir_path))
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, spec.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            pass  # another process made it at the same time: use its file
        finally:
            os.unlink(tmp, dir_fd=dir_fd)
        os.fsync(dir_fd)
    except OSError as exc:
        raise IdentityError(
            f"cannot make {spec.what} {dir_path / spec.name}: {exc.strerror}",
            hint=f"check that {dir_path} is writable by uid {os.geteuid()}",
        ) from exc


def _load(pem: bytes, path: Path) -> HostIdentity:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(
            f"host key {path} is not a readable PEM private key",
            hint=f"restore it from a backup, or remove {path} to make a new identity",
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(
            f"host key {path} is not an Ed25519 key",
            hint=f"remove {path} to make a new identity",
        )
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return HostIdentity(key_id=raw.hex(), key_path=path, private_key=key)


def is_key_id(value: object) -> bool:
    """Whether ``value`` has the form of a key id (64 lowercase hex digits)."""
    return (
        isinstance(value, str)
        and len(value) == KEY_ID_LEN
        and all(c in "0123456789abcdef" for c in value)
    )


def verify_signature(key_id: str, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``key_id``'s Ed25519 signature of ``data``. False (never an
    exception) for a malformed key id or signature: both come from outside."""
    if not is_key_id(key_id) or not isinstance(data, bytes | bytearray | memoryview):
        return False
    if not isinstance(signature, bytes) or len(signature) != SIG_LEN:
        return False
    if _weak_key(bytes.fromhex(key_id)):
        return False
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_id)).verify(signature, bytes(data))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# -- weak public keys ---------------------------------------------------------------------------
# Ed25519 verification (RFC 8032, as OpenSSL does it) accepts public keys of small order: with
# such a key (e.g. all zeros) a forged signature verifies for many messages. No honest key is
# one, so they are refused, as are non-canonical encodings (y >= p), which no key generator
# makes. Checked in pure Python: the curve arithmetic is a few lines, and `cryptography` does
# not expose the point.

_P = 2**255 - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _decode_point(raw: bytes) -> tuple[int, int] | None:
    """The affine point a 32-byte encoding names, or None if it names none (or not canonically)."""
    n = int.from_bytes(raw, "little")
    sign, y = n >> 255, n & ((1 << 255) - 1)
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = (u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P)) % _P
    if (v * x * x - u) % _P != 0:
        x = (x * _SQRT_M1) % _P
        if (v * x * x - u) % _P != 0:
            return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = _P - x
    return x, y


def _double(pt: tuple[int, int]) -> tuple[int, int]:
    x, y = pt
    xx, yy = x * x % _P, y * y % _P
    dxy = _D * xx * yy % _P
    return (2 * x * y * pow(1 + dxy, _P - 2, _P) % _P, (yy + xx) * pow(1 - dxy, _P - 2, _P) % _P)


def _weak_key(raw: bytes) -> bool:
    """Whether ``raw`` is not a canonical point, or a point of small order ([8]P is the
    identity)."""
    pt = _decode_point(raw)
    if pt is None:
        return True
    for _ in range(3):
        pt = _double(pt)
    return pt == (0, 1)
