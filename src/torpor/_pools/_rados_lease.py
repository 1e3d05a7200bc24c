"""The ``ceph`` driver's leases: exclusive RADOS object locks with a duration.

The OSD's ``lock`` object class (what librados' ``lock_exclusive`` calls) holds them: the lock
``torpor-lease`` on the key's object, held by one (client instance, cookie); the OSD drops
expired lockers before every lock call, renewal uses ``MUST_RENEW`` (so a lapsed lock is never
silently taken back), force uses ``break_lock``. The requests are encoded here and sent with
``Ioctx.execute``: Ceph 16's python-rados ``lock_exclusive`` leaves the duration's
microseconds uninitialised (a 2 s lock was seen to last 4.1 s) and has no ``list_lockers`` or
``break_lock``. The lock information the OSD returns is decoded with bounds checks. See
:mod:`._leases` for the contract.
"""

from __future__ import annotations

import contextlib
import secrets
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from typing import Any

from .._errors import PoolError
from ._leases import LeaseInfo, clean_holder

_LOCK_CLASS = "lock"
_LOCK_NAME = "torpor-lease"
_LOCK_EXCLUSIVE = 1
_MUST_RENEW = 0x2  # cls_lock's LOCK_FLAG_MUST_RENEW: renew only a lock still held
_MAX_LOCKERS = 64


class RadosLeases:
    """Leases as exclusive RADOS object locks (cls ``lock``) on the key's object. ``ioctx`` is
    the driver's I/O context (its namespace set), ``rados`` the module, ``errors(action,
    key)`` the driver's ``rados.Error`` boundary."""

    breakable = True

    def __init__(
        self, ioctx: Any, rados: Any, errors: Callable[[str, str | None], ContextManager[None]]
    ) -> None:
        self._ioctx = ioctx
        self._rados = rados
        self._errors = errors

    def acquire(
        self, key: str, holder: str, duration: float, *, force: bool
    ) -> _RadosLease | LeaseInfo:
        """Lock ``key``'s object for ``duration`` s (breaking other lockers if ``force``)."""
        cookie = secrets.token_hex(16)
        for _ in range(3):
            with self._errors("lease", key):
                if force:
                    for locker, old in self._lockers(key):
                        with contextlib.suppress(self._rados.ObjectNotFound):
                            self._call(key, "break_lock", _str(_LOCK_NAME) + locker + _str(old))
                try:
                    self._lock(key, cookie, holder, duration, 0)
                    return _RadosLease(self, key, cookie, holder, duration)
                except self._rados.ObjectBusy:
                    info = self.holder(key)
                if info is not None and not force:
                    return info
        raise PoolError(f"lease {key!r} kept changing hands while being taken")

    def holder(self, key: str) -> LeaseInfo | None:
        """The live locker of ``key``'s object (the OSD drops expired ones first)."""
        with self._errors("read lease", key):
            try:
                lockers = _decode_lockers(self._call(key, "get_info", _str(_LOCK_NAME)))
            except self._rados.ObjectNotFound:
                return None
        if not lockers:
            return None
        _, _, desc, expiration = lockers[0]
        # The OSD judges expiry by its own clock; this estimate for messages uses ours.
        left = None if expiration == 0 else max(0.0, expiration - time.time())
        return LeaseInfo(clean_holder(desc), left)

    def _lockers(self, key: str) -> list[tuple[bytes, str]]:
        try:
            lockers = _decode_lockers(self._call(key, "get_info", _str(_LOCK_NAME)))
        except self._rados.ObjectNotFound:
            return []
        return [(entity, cookie) for entity, cookie, _, _ in lockers]

    def _lock(self, key: str, cookie: str, desc: str, duration: float, flags: int) -> None:
        sec = int(duration)
        nsec = min(999_999_999, round((duration - sec) * 1e9))
        body = _str(_LOCK_NAME) + bytes([_LOCK_EXCLUSIVE]) + _str(cookie) + _str("")
        body += _str(desc) + struct.pack("<IIB", sec, nsec, flags)
        self._call(key, "lock", body)

    def _call(self, key: str, method: str, body: bytes) -> bytes:
        ret, out = self._ioctx.execute(key, _LOCK_CLASS, method, _struct(body), 65536)
        data: bytes = bytes(out[:ret]) if ret > 0 else b""
        return data

    def _renew(self, key: str, cookie: str, desc: str, duration: float) -> bool:
        with self._errors("renew lease", key):
            try:
                self._lock(key, cookie, desc, duration, _MUST_RENEW)
            except (self._rados.ObjectNotFound, self._rados.ObjectBusy):
                return False  # lapsed (the OSD dropped us), or broken and taken
            return True

    def _release(self, key: str, cookie: str) -> None:
        with self._errors("release lease", key), contextlib.suppress(self._rados.ObjectNotFound):
            self._call(key, "unlock", _str(_LOCK_NAME) + _str(cookie))


class _RadosLease:
    def __init__(
        self, store: RadosLeases, key: str, cookie: str, desc: str, duration: float
    ) -> None:
        self._store, self._key, self._cookie = store, key, cookie
        self._desc, self._duration = desc, duration

    def renew(self) -> bool:
        return self._store._renew(self._key, self._cookie, self._desc, self._duration)

    def release(self) -> None:
        self._store._release(self._key, self._cookie)


def _str(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<I", len(data)) + data


def _struct(body: bytes) -> bytes:
    """Ceph's ``ENCODE_START(1, 1)`` framing: version, compat version, length."""
    return struct.pack("<BBI", 1, 1, len(body)) + body


class _Decoder:
    """A bounds-checked reader of Ceph's little-endian encoding (the reply is hostile)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u32(self) -> int:
        value: int = struct.unpack("<I", self.take(4))[0]
        return value

    def string(self) -> str:
        return self.take(self.u32()).decode(errors="replace")

    @contextlib.contextmanager
    def frame(self) -> Iterator[None]:
        """A versioned struct: its fields, then skip what a newer encoder added."""
        self.take(2)
        length = self.u32()
        end = self.pos + length
        if end > len(self.data):
            raise ValueError("truncated")
        yield
        if self.pos > end:
            raise ValueError("overrun")
        self.pos = end


def _decode_lockers(data: bytes) -> list[tuple[bytes, str, str, float]]:
    """The lockers in a ``cls_lock_get_info_reply``: (encoded entity name, cookie,
    description, expiration as epoch seconds or 0 for never)."""
    d = _Decoder(data)
    out: list[tuple[bytes, str, str, float]] = []
    try:
        with d.frame():
            count = d.u32()
            if count > _MAX_LOCKERS:
                raise ValueError("too many lockers")
            for _ in range(count):
                with d.frame():  # locker_id_t
                    entity = d.take(9)  # entity_name_t: u8 type, s64 num
                    cookie = d.string()
                with d.frame():  # locker_info_t
                    sec, nsec = d.u32(), d.u32()
                    if d.u8() != 1:  # entity_addr_t, the msgr2 encoding (marker 1)
                        raise ValueError("legacy address encoding")
                    with d.frame():
                        pass
                    desc = d.string()
                out.append((entity, cookie, desc, sec + nsec / 1e9))
    except ValueError as exc:
        raise PoolError(f"the OSD's lock information cannot be read ({exc})") from exc
    return out
