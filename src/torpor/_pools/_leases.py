"""Leases in a pool: one holder per name at a time, on each store's own primitive.

A lease says "this holder runs that process; nobody else may". :mod:`torpor._supervise._lease`
is the API; this module is the storage side, one :class:`LeaseStore` per driver, reached with
``backend.leases()``. A store offers three operations on a key (``leases/NAME``):

- ``acquire(key, holder, duration, force=)`` returns a :class:`LeaseHandle` (the lease is ours
  now) or the :class:`LeaseInfo` of whoever holds it. ``force`` breaks a held lease where the
  store can (``breakable``); a store that cannot returns the holder's info instead.
- ``holder(key)`` is the current holder's :class:`LeaseInfo`, or None when the name is free.
- ``handle.renew()`` extends the lease by its duration and returns False when it is no longer
  ours: taken by someone else, or lapsed (someone may have judged it free and started a copy on
  the strength of that, so a lapsed lease is never silently taken back). ``handle.release()``
  frees it; it never frees a lease someone else has taken meanwhile.

The primitives, and who judges expiry:

- ``dir``: ``flock(LOCK_EX|LOCK_NB)`` on the key's file, the holder's record written in it.
  It ends with the holder (the kernel drops the lock with its last fd), never by time.
- ``ceph``: an exclusive lock of the OSD's ``lock`` object class (what librados'
  ``lock_exclusive`` calls) with a duration, renewed with ``MUST_RENEW``; the OSD expires it by
  its own clock (it drops expired lockers before every lock call); ``break_lock`` for force.
- ``s3``: conditional PUTs: ``If-None-Match: *`` creates, ``If-Match: ETAG`` renews, takes
  an expired lease over or releases it. Expiry is judged by the server's clock, its ``Date``
  against the object's ``Last-Modified`` (whole seconds: a lease ends up to 1 s late, never
  early).
- ``memory`` (the test double): a table under a lock, with an injectable monotonic clock.

The ceph store lives in :mod:`._rados_lease`.

Every byte read back from a store is hostile: records are bounded, parsed defensively and a
holder string is cleaned of control characters before it reaches a message.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import fcntl
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from .. import _safe
from .._errors import PoolError

LEASES_PREFIX = "leases/"
MAX_HOLDER = 512  # bytes of a holder string kept (hostname, home path, pid fit easily)
_MAX_RECORD = 4096
_MAX_DURATION = 86400.0


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds a lease, and for how long: ``expires_in`` seconds (as the store judges it),
    or None when it lasts until its holder dies (``dir`` pools)."""

    holder: str
    expires_in: float | None


class LeaseHandle(Protocol):
    """A lease this process holds."""

    def renew(self) -> bool:
        """Extend the lease; False if it is no longer ours (taken, or lapsed)."""
        ...

    def release(self) -> None:
        """Give the lease up (a no-op if it is no longer ours)."""


class LeaseStore(Protocol):
    """A driver's leases. See the module docstring."""

    breakable: bool

    def acquire(
        self, key: str, holder: str, duration: float, *, force: bool
    ) -> LeaseHandle | LeaseInfo:
        """Take the lease on ``key``, or say who holds it."""
        ...

    def holder(self, key: str) -> LeaseInfo | None:
        """The holder of the lease on ``key``, None if it is free."""
        ...


def clean_holder(text: str) -> str:
    """``text`` as safe for a one-line message: control characters become ``?``, at most
    :data:`MAX_HOLDER` bytes, ``(unknown)`` if empty."""
    cleaned = "".join("?" if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 else c for c in text)
    cleaned = cleaned.encode()[:MAX_HOLDER].decode(errors="ignore").strip()
    return cleaned or "(unknown)"


def _record(holder: str, duration: float, token: str, count: int, released: bool) -> bytes:
    """A lease record (dir and s3): JSON, unique per write (``token``, ``count``) so an s3
    ETag never repeats."""
    fields = {"v": 1, "holder": holder, "duration": duration, "token": token, "n": count}
    return json.dumps({**fields, "released": released}, sort_keys=True).encode()


@dataclass(frozen=True)
class _Record:
    holder: str
    duration: float
    token: str
    released: bool


def _parse_record(data: bytes) -> _Record | None:
    """The record in ``data``, None if it is not one (hostile or torn: treated as free)."""
    if len(data) > _MAX_RECORD:
        return None
    try:
        fields = json.loads(data)
    except ValueError:
        return None
    if not isinstance(fields, dict):
        return None
    holder, duration = fields.get("holder"), fields.get("duration")
    token, released = fields.get("token"), fields.get("released")
    if not isinstance(holder, str) or not isinstance(token, str) or released not in (True, False):
        return None
    if isinstance(duration, bool) or not isinstance(duration, int | float):
        return None
    if not 0 < duration <= _MAX_DURATION:
        return None
    return _Record(clean_holder(holder), float(duration), token, bool(released))


# --- memory ------------------------------------------------------------------------------


class MemoryLeases:
    """Leases in a table, for tests: ``clock`` (monotonic seconds) may be replaced."""

    breakable = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._table: dict[str, tuple[str, str, float]] = {}  # key -> holder, token, deadline
        self.clock: Callable[[], float] = time.monotonic

    def acquire(
        self, key: str, holder: str, duration: float, *, force: bool
    ) -> _MemoryLease | LeaseInfo:
        """Take ``key`` if free, expired or ``force``; else who holds it."""
        with self._lock:
            now = self.clock()
            held = self._table.get(key)
            if held is not None and held[2] > now and not force:
                return LeaseInfo(held[0], held[2] - now)
            token = secrets.token_hex(8)
            self._table[key] = (holder, token, now + duration)
        return _MemoryLease(self, key, token, duration)

    def holder(self, key: str) -> LeaseInfo | None:
        """Who holds ``key`` (None if free or expired)."""
        with self._lock:
            now = self.clock()
            held = self._table.get(key)
            if held is None or held[2] <= now:
                return None
            return LeaseInfo(held[0], held[2] - now)

    def _renew(self, key: str, token: str, duration: float) -> bool:
        with self._lock:
            now = self.clock()
            held = self._table.get(key)
            if held is None or held[1] != token or held[2] <= now:
                return False
            self._table[key] = (held[0], token, now + duration)
            return True

    def _release(self, key: str, token: str) -> None:
        with self._lock:
            held = self._table.get(key)
            if held is not None and held[1] == token:
                del self._table[key]


class _MemoryLease:
    def __init__(self, store: MemoryLeases, key: str, token: str, duration: float) -> None:
        self._store, self._key, self._token, self._duration = store, key, token, duration

    def renew(self) -> bool:
        return self._store._renew(self._key, self._token, self._duration)

    def release(self) -> None:
        self._store._release(self._key, self._token)


# --- dir -----------------------------------------------------------------------------------

# ``holder`` takes a shared flock for a moment to see whether anyone holds the file: an
# acquirer that meets it retries for a little while before it believes the lease is held.
_DIR_ATTEMPTS = 10
_DIR_PAUSE = 0.01


class DirLeases:
    """Leases as flocked files in a dir pool. ``parent(key, create=)`` yields the fd of the
    key's directory (reached safely from the pool root) and the file name; ``errors(action,
    key)`` is the driver's ``OSError`` boundary; ``where`` names the pool in messages."""

    breakable = False  # a flock cannot be taken from a live holder

    def __init__(
        self,
        parent: Callable[..., ContextManager[tuple[int, str]]],
        errors: Callable[[str, str | None], ContextManager[None]],
        where: str,
    ) -> None:
        self._parent = parent
        self._errors = errors
        self._where = where

    def acquire(
        self, key: str, holder: str, duration: float, *, force: bool
    ) -> _DirLease | LeaseInfo:
        """Lock ``key``'s file, or say who holds it (``force`` cannot help: see class)."""
        seen = b""
        for _ in range(_DIR_ATTEMPTS):
            with self._errors("lease", key), self._parent(key, create=True) as (dir_fd, name):
                fd = self._open(dir_fd, name, key, create=True)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    seen = _read_fd(fd)
                    os.close(fd)
                    time.sleep(_DIR_PAUSE)
                    continue
                except BaseException:
                    os.close(fd)
                    raise
                try:
                    if not _same_file(fd, dir_fd, name):
                        # Released (unlinked) between our open and our lock: a new file now
                        # stands (or will) at the path, and that one is the lease.
                        os.close(fd)
                        continue
                    token = secrets.token_hex(8)
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, _record(holder, duration, token, 0, False), 0)
                except BaseException:
                    os.close(fd)
                    raise
                return _DirLease(self, key, fd)
        record = _parse_record(seen)
        return LeaseInfo(record.holder if record else "(unknown)", None)

    def holder(self, key: str) -> LeaseInfo | None:
        """Who holds ``key``'s file locked (None if nobody)."""
        with self._errors("read lease", key):
            try:
                with self._parent(key) as (dir_fd, name):
                    fd = self._open(dir_fd, name, key, create=False)
            except (FileNotFoundError, NotADirectoryError):
                return None
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    record = _parse_record(_read_fd(fd))
                    return LeaseInfo(record.holder if record else "(unknown)", None)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None
            finally:
                os.close(fd)

    def _open(self, dir_fd: int, name: str, key: str, *, create: bool) -> int:
        _safe.check_name(name, source=self._where)
        flags = os.O_RDWR if create else os.O_RDONLY
        flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # CLOEXEC: children never hold it
        try:
            fd = os.open(name, flags | (os.O_CREAT if create else 0), 0o600, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise PoolError(
                f"lease {key!r} in {self._where} is a symlink; refused",
                hint="remove it: torpor never makes one",
            ) from exc
        try:
            problem = _safe.private_file_problem(os.fstat(fd))
            if problem is not None:
                raise PoolError(
                    f"lease {key!r} in {self._where} {problem}; refused",
                    hint="remove it: torpor makes lease files 0600",
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _still_ours(self, key: str, fd: int) -> bool:
        with self._errors("renew lease", key):
            try:
                with self._parent(key) as (dir_fd, name):
                    return _same_file(fd, dir_fd, name)
            except (FileNotFoundError, NotADirectoryError):
                return False

    def _release(self, key: str, fd: int) -> None:
        with self._errors("release lease", key):
            try:
                # Unlinked while still locked: whoever opened this file meanwhile finds it gone
                # from the path once it gets the lock, and starts over.
                with self._parent(key) as (dir_fd, name):
                    if _same_file(fd, dir_fd, name):
                        os.unlink(name, dir_fd=dir_fd)
            except (FileNotFoundError, NotADirectoryError):
                pass
            finally:
                os.close(fd)


class _DirLease:
    def __init__(self, store: DirLeases, key: str, fd: int) -> None:
        self._store, self._key, self._fd = store, key, fd
        self._lock = threading.Lock()

    def renew(self) -> bool:
        # The flock cannot be taken from us; the file can be unlinked (by hand, or a pool
        # wiped), after which a newcomer would lock a new file at the path.
        with self._lock:
            return self._fd >= 0 and self._store._still_ours(self._key, self._fd)

    def release(self) -> None:
        with self._lock:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                self._store._release(self._key, fd)


def _same_file(fd: int, dir_fd: int, name: str) -> bool:
    mine = os.fstat(fd)
    try:
        there = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _read_fd(fd: int) -> bytes:
    return os.pread(fd, _MAX_RECORD + 1, 0)


# --- s3 ------------------------------------------------------------------------------------

# Last-Modified and Date are whole seconds: wait one more so a lease never ends early.
_S3_SLACK = 1.0


@dataclass(frozen=True)
class _S3State:
    record: _Record | None
    etag: str | None  # unquoted: Ceph 16's RGW compares If-Match with the bare ETag
    age: float | None  # server Date minus Last-Modified

    def left(self) -> float | None:
        """Seconds until the lease expires (None: free: missing, released or expired)."""
        if self.record is None or self.record.released:
            return None
        if self.age is None:  # no server clock in the reply: cannot call it expired
            return self.record.duration + _S3_SLACK
        left = self.record.duration + _S3_SLACK - self.age
        return left if left > 0 else None


class S3Leases:
    """Leases as small objects written with conditional PUTs. ``client`` is the driver's
    boto3 client, ``name(key)`` the object name, ``errors(action, key)`` the driver's
    boundary, ``client_error`` botocore's ``ClientError``."""

    breakable = True

    def __init__(
        self,
        client: Any,
        bucket: str,
        name: Callable[[str], str],
        errors: Callable[[str, str | None], ContextManager[None]],
        client_error: type[Exception],
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._name = name
        self._errors = errors
        self._client_error = client_error

    def acquire(
        self, key: str, holder: str, duration: float, *, force: bool
    ) -> _S3Lease | LeaseInfo:
        """Create ``key``'s object, or take it over if free or ``force`` (``If-Match`` on
        the ETag read, so a holder renewing meanwhile wins)."""
        token = secrets.token_hex(16)
        for _ in range(5):
            with self._errors("lease", key):
                state = self._read(key)
                left = state.left()
                if left is not None and not force:
                    assert state.record is not None
                    return LeaseInfo(state.record.holder, left)
                etag = self._put(key, _record(holder, duration, token, 0, False), state.etag)
            if etag is not None:
                return _S3Lease(self, key, holder, duration, token, etag)
        raise PoolError(f"lease {key!r} kept changing hands while being taken")

    def holder(self, key: str) -> LeaseInfo | None:
        """The holder of ``key`` unless its lease is missing, released or expired."""
        with self._errors("read lease", key):
            state = self._read(key)
        left = state.left()
        if left is None or state.record is None:
            return None
        return LeaseInfo(state.record.holder, left)

    def _read(self, key: str) -> _S3State:
        try:
            reply = self._client.get_object(Bucket=self._bucket, Key=self._name(key))
        except self._client_error as exc:
            response: Any = getattr(exc, "response", {})
            if response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return _S3State(None, None, None)
            raise
        with contextlib.closing(reply["Body"]) as body:
            data: bytes = body.read(_MAX_RECORD + 1)
        etag = str(reply["ETag"]).strip('"')
        now = _server_time(reply)
        age = None if now is None else now - reply["LastModified"].timestamp()
        return _S3State(_parse_record(data), etag, age)

    def _put(self, key: str, body: bytes, etag: str | None) -> str | None:
        """PUT ``body`` if the object is still ``etag`` (absent if None); its new ETag, or
        None if the condition failed."""
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            reply = self._client.put_object(
                Bucket=self._bucket, Key=self._name(key), Body=body, **condition
            )
        except self._client_error as exc:
            response: Any = getattr(exc, "response", {})
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (409, 412):  # 409: a concurrent conditional write (AWS)
                return None
            raise
        return str(reply["ETag"]).strip('"')

    def _renew(self, lease: _S3Lease) -> bool:
        with self._errors("renew lease", lease.key):
            state = self._read(lease.key)
            if state.etag != lease.etag or state.left() is None:
                return False  # taken, released by force, or lapsed
            lease.count += 1
            body = _record(lease.holder, lease.duration, lease.token, lease.count, False)
            etag = self._put(lease.key, body, lease.etag)
        if etag is None:
            return False
        lease.etag = etag
        return True

    def _release(self, lease: _S3Lease) -> None:
        lease.count += 1
        body = _record(lease.holder, lease.duration, lease.token, lease.count, True)
        with self._errors("release lease", lease.key):
            self._put(lease.key, body, lease.etag)  # a failed condition: not ours any more


class _S3Lease:
    def __init__(
        self, store: S3Leases, key: str, holder: str, duration: float, token: str, etag: str
    ) -> None:
        self.store, self.key, self.holder, self.duration = store, key, holder, duration
        self.token, self.etag, self.count = token, etag, 0
        self._lock = threading.Lock()

    def renew(self) -> bool:
        with self._lock:
            return self.store._renew(self)

    def release(self) -> None:
        with self._lock:
            self.store._release(self)


def _server_time(reply: Any) -> float | None:
    """The server's clock at the reply (its ``Date`` header), as epoch seconds."""
    date = reply.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not isinstance(date, str):
        return None
    try:
        return email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None
