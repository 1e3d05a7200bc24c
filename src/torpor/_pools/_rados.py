"""The ``ceph`` pool driver: keyed blobs as RADOS objects, through librados.

Layout. A key is a RADOS object of the same name (in the backend's namespace of its pool).
A value of at most ``stripe_size`` bytes (4 MiB by default) is that object's data, byte for
byte, written with one ``write_full``: atomic in RADOS. A larger value is cut into parts of
``stripe_size`` bytes, stored as objects named ``KEY@GEN.INDEX`` (``@`` is outside the key
alphabet, so parts are never listed as keys) where ``GEN`` is random for every put; the key's
own object, the *head*, then holds a small manifest (:data:`_MAGIC` followed by JSON: total
size, part size, part count, generation). RADOS objects are limited in size
(``osd_max_object_size``, 128 MiB) and so are single writes (``osd_max_write_size``, 90 MiB);
striping lifts both limits and lets parts move in parallel.

Atomicity. The head is written last, in one operation, after every part of the new value is
stored; parts of the previous value are deleted only after that. A reader reads the head in
one operation and sees either the old manifest (whose parts it then reads) or the new one. If
it finds a part gone (the value was overwritten again and the old parts deleted), ``get``
starts over from the head; a stream that is already half read cannot, and fails with
:class:`~torpor.PoolError` instead of returning a mix. A value that happens to start with
:data:`_MAGIC` is stored striped (one part) so that a head is never ambiguous.

Every head also carries the value's size in the ``torpor.size`` xattr, set in the same
operation as its data, so ``size`` is one small call.

Not handled: parts left behind by a put that failed half-way, or by two puts of the same large
key racing each other, stay in the pool (invisible: they are not keys) until the pool is
deleted.

librados (``import rados``, Debian's python3-rados) is imported when a backend is created, so
``import torpor`` never needs it. Every ``rados.Error`` is converted into
:class:`~torpor.PoolError` in :meth:`RadosBackend._errors`, the driver's one boundary.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import secrets
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

from .._errors import PoolConfigError, PoolError
from ._backend import check_key, too_large
from ._rados_lease import RadosLeases

_MAGIC = b"\x00torpor-striped-v1\x00"
_SIZE_XATTR = "torpor.size"
_PART_SEP = "@"
# A generation is ``secrets.token_hex(8)``; hex of another length is allowed, nothing else.
_GEN_RE = re.compile(r"[0-9a-f]{1,64}")
_HEAD_PROBE = 4096  # a manifest is ~150 bytes: one small read tells a head's kind
_MIN_STRIPE = 64 * 1024
# Below osd_max_write_size (90 MiB by default): a part is written in one operation.
_MAX_STRIPE = 64 << 20
_APPLICATION = "torpor"
# How many times ``get`` restarts from the head when concurrent overwrites keep deleting
# the parts it is reading.
_READ_ATTEMPTS = 5
# Seconds each lease operation may take (its connection's op timeouts): well under the fifth
# of a supervisor's 15 s lease left between its fence deadline (80 %) and its expiry.
LEASE_OP_TIMEOUT = 2


def _import_rados() -> ModuleType:
    try:
        import rados  # librados has no type stubs: the module is typed Any
    except ImportError as exc:
        raise PoolError(
            "the ceph pool driver needs the `rados` Python module (librados)",
            hint="apt-get install python3-rados, then link rados*.so into the venv "
            "(scripts/setup.sh does both)",
        ) from exc
    module: ModuleType = rados
    return module


@dataclass(frozen=True)
class _Manifest:
    """Where a striped value's parts are."""

    size: int
    part_size: int
    parts: int
    gen: str

    def encode(self) -> bytes:
        fields = {"size": self.size, "part_size": self.part_size, "parts": self.parts}
        return _MAGIC + json.dumps({**fields, "gen": self.gen}).encode()

    @classmethod
    def decode(cls, head: bytes, key: str) -> _Manifest | None:
        """The manifest in ``head``, or None if ``head`` is a plain value."""
        if not head.startswith(_MAGIC):
            return None
        # The head is hostile: ``[[[[...`` (RecursionError), ``Infinity`` (OverflowError
        # from int()), a float, a bool or a string number are all a corrupted manifest.
        try:
            fields = json.loads(head[len(_MAGIC) :])
            size, part_size, parts, gen = (
                fields["size"], fields["part_size"], fields["parts"], fields["gen"]
            )  # fmt: skip
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise PoolError(f"key {key!r} has a corrupted stripe manifest") from exc
        if not all(type(n) is int for n in (size, part_size, parts)) or not (
            isinstance(gen, str) and _GEN_RE.fullmatch(gen)
        ):
            raise PoolError(f"key {key!r} has a corrupted stripe manifest")
        manifest = m = cls(size, part_size, parts, gen)
        # Parts are read by these numbers: they must be the ones a put writes.
        if not (m.size >= 0 and 0 < m.part_size <= _MAX_STRIPE) or m.parts != -(
            -m.size // m.part_size
        ):
            raise PoolError(f"key {key!r} has a corrupted stripe manifest")
        return manifest

    def part_name(self, key: str, index: int) -> str:
        return f"{key}{_PART_SEP}{self.gen}.{index}"

    def part_length(self, index: int) -> int:
        return min(self.part_size, self.size - index * self.part_size)


class RadosBackend:
    """Keyed blobs in a RADOS pool (created if missing), through librados.

    ``conf_path``/``cluster_name``/``user`` say how to reach the cluster (the keyring is found
    through the conf file); ``user`` is a cephx entity such as ``client.torpor`` (a bare id
    gets ``client.``). ``pool_name`` is created with ``pg_num`` placement groups if it does not
    exist and tagged with the ``torpor`` application. ``namespace`` (a RADOS namespace) lets
    several torpor pools share one RADOS pool. ``workers`` parts of a striped value are
    written or read at once.

    Thread-safe: librados' I/O context is, and the backend keeps no other mutable state.
    """

    def __init__(
        self,
        conf_path: str | Path,
        cluster_name: str = "ceph",
        user: str = "client.admin",
        pool_name: str = "torpor",
        pg_num: int = 32,
        *,
        namespace: str = "",
        stripe_size: int = 4 << 20,
        workers: int = 4,
        connect_timeout: float = 10.0,
    ) -> None:
        if not 1 <= pg_num <= 65536:  # Ceph's mon_max_pool_pg_num
            raise PoolConfigError(f"pg_num must be 1..65536, not {pg_num}", key="pg_num")
        if not _MIN_STRIPE <= stripe_size <= _MAX_STRIPE:
            raise PoolConfigError(
                f"stripe_size must be {_MIN_STRIPE}..{_MAX_STRIPE} bytes, not {stripe_size}",
                key="stripe_size",
            )
        if workers < 1:
            raise PoolConfigError(f"workers must be at least 1, not {workers}", key="workers")
        self._rados = _import_rados()
        self._pool = pool_name
        self._stripe = stripe_size
        self._workers = workers
        self._closed = False
        entity = user if "." in user else f"client.{user}"
        with self._errors(f"connect to ceph cluster {cluster_name!r} as {entity}", None):
            # python-rados ignores connect()'s timeout: an unreachable cluster hung it for
            # minutes. The client's own mount timeout bounds it (TimedOut after that).
            mount_timeout = str(int(max(1, connect_timeout)))
            cluster = self._rados.Rados(
                conffile=str(conf_path),
                clustername=cluster_name,
                name=entity,
                conf={"client_mount_timeout": mount_timeout},
            )
            try:
                cluster.connect(timeout=int(max(1, connect_timeout)))
                self._ensure_pool(cluster, pg_num)
                ioctx = cluster.open_ioctx(pool_name)
            except BaseException:
                cluster.shutdown()
                raise
        self._cluster: Any = cluster
        self._ioctx: Any = ioctx
        self._ioctx.set_namespace(namespace)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="torpor-rados")
        # The leases' own connection, opened on first use (see leases()).
        self._lease_conf = (str(conf_path), cluster_name, entity, mount_timeout, namespace)
        self._lease_cluster: Any = None
        self._lease_ioctx: Any = None

    # --- the contract --------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (overwrite)."""
        self._check(key)
        with self._errors("write", key):
            if len(data) <= self._stripe and not data.startswith(_MAGIC):
                self._replace_head(key, bytes(data), len(data), None)
            else:
                view = memoryview(data)
                blocks = (
                    bytes(view[i : i + self._stripe]) for i in range(0, len(data), self._stripe)
                )
                self._put_striped(key, blocks)

    def put_stream(self, key: str, stream: BinaryIO, size: int | None = None) -> None:
        """Store the rest of ``stream`` under ``key`` atomically; ``size`` is not needed:
        the stream is read a stripe at a time and striped once it outgrows one."""
        self._check(key)
        with self._errors("write", key):
            first = _read_exact(stream, self._stripe)
            second = _read_exact(stream, self._stripe) if len(first) == self._stripe else b""
            if not second and not first.startswith(_MAGIC):
                self._replace_head(key, first, len(first), None)
                return

            def blocks() -> Iterator[bytes]:
                yield first
                block = second
                while block:
                    yield block
                    block = _read_exact(stream, self._stripe) if len(block) == self._stripe else b""

            self._put_striped(key, blocks())

    def get(self, key: str, limit: int | None = None) -> bytes:
        """The value under ``key``; :class:`KeyError` if missing. Over ``limit`` bytes,
        :class:`~torpor.PoolError`: a plain head is read ``limit + 1`` bytes at most, a striped
        value's size is its manifest's, checked before any part is read."""
        self._check(key)
        with self._errors("read", key):
            for _ in range(_READ_ATTEMPTS):
                head = self._read_whole(key, limit)
                manifest = _Manifest.decode(head, key)
                if manifest is None:
                    if limit is not None and len(head) > limit:
                        raise too_large(key, self._where, len(head), limit, pool=self._pool)
                    return head
                if limit is not None and manifest.size > limit:
                    raise too_large(key, self._where, manifest.size, limit, pool=self._pool)
                try:
                    parts = list(
                        self._executor.map(
                            self._read_part,
                            [key] * manifest.parts,
                            [manifest] * manifest.parts,
                            range(manifest.parts),
                        )
                    )
                except self._rados.ObjectNotFound:
                    continue  # overwritten while we read: read the new head
                return b"".join(parts)
            raise PoolError(
                f"key {key!r} in ceph pool {self._pool} kept changing while being read",
                pool=self._pool,
            )

    def get_stream(self, key: str) -> BinaryIO:
        """A stream of the value under ``key``; :class:`KeyError` if missing. A striped value
        is fetched a part at a time, the next part while the current one is consumed."""
        self._check(key)
        with self._errors("read", key):
            head = self._read_whole(key)
        manifest = _Manifest.decode(head, key)
        if manifest is None:
            return io.BytesIO(head)
        return io.BufferedReader(_PartReader(self, key, manifest), buffer_size=1 << 20)

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists (one ``stat``)."""
        self._check(key)
        with self._errors("stat", key):
            try:
                self._ioctx.stat(key)
            except self._rados.ObjectNotFound:
                return False
            return True

    def size(self, key: str) -> int:
        """The size in bytes of the value under ``key``; :class:`KeyError` if missing."""
        self._check(key)
        with self._errors("stat", key):
            try:
                return int(self._ioctx.get_xattr(key, _SIZE_XATTR))
            except self._rados.ObjectNotFound:
                raise KeyError(key) from None
            except self._rados.NoData:
                pass  # an object torpor did not write: its data is its value
            try:
                size: int = self._ioctx.stat(key)[0]
            except self._rados.ObjectNotFound:
                raise KeyError(key) from None
            return size

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with ``prefix``. RADOS lists a pool's objects in hash order with
        no prefix filter, so this walks the whole namespace."""
        self._check_open()
        return self._list(prefix)

    def delete(self, key: str) -> None:
        """Remove ``key`` (its head, then its parts); no error if it is missing."""
        self._check(key)
        with self._errors("delete", key):
            old = self._manifest_of(key)
            try:
                self._ioctx.remove_object(key)
            except self._rados.ObjectNotFound:
                return
            if old is not None:
                self._remove_parts(key, old)

    def close(self) -> None:
        """Disconnect from the cluster; later calls raise :class:`~torpor.PoolError`."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        with self._errors("disconnect", None):
            if self._lease_cluster is not None:
                self._lease_ioctx.close()
                self._lease_cluster.shutdown()
            self._ioctx.close()
            self._cluster.shutdown()

    def leases(self) -> RadosLeases:
        """The pool's leases: RADOS object locks with a duration (see :mod:`._leases`).

        They go through a connection of their own whose every OSD and monitor operation
        times out after :data:`LEASE_OP_TIMEOUT` seconds (``rados_osd_op_timeout``,
        ``rados_mon_op_timeout``; librados waits for ever otherwise): a renewal against
        unreachable OSDs fails (a PoolError) in time for the holder to stop its copy
        before the lease lapses, instead of hanging its supervisor past the expiry."""
        self._check_open()
        if self._lease_cluster is None:
            conf_path, cluster_name, entity, mount_timeout, namespace = self._lease_conf
            op_timeout = str(LEASE_OP_TIMEOUT)
            with self._errors(f"connect to ceph cluster {cluster_name!r} as {entity}", None):
                cluster = self._rados.Rados(
                    conffile=conf_path,
                    clustername=cluster_name,
                    name=entity,
                    conf={
                        "client_mount_timeout": mount_timeout,
                        "rados_osd_op_timeout": op_timeout,
                        "rados_mon_op_timeout": op_timeout,
                    },
                )
                try:
                    cluster.connect(timeout=int(mount_timeout))
                    ioctx = cluster.open_ioctx(self._pool)
                except BaseException:
                    cluster.shutdown()
                    raise
                ioctx.set_namespace(namespace)
            self._lease_cluster, self._lease_ioctx = cluster, ioctx
        return RadosLeases(self._lease_ioctx, self._rados, self._errors)

    # --- helpers -------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"ceph pool {self._pool}"

    def _check_open(self) -> None:
        if self._closed:
            raise PoolError(f"ceph pool {self._pool} is closed", pool=self._pool)

    def _check(self, key: str) -> None:
        self._check_open()
        check_key(key)

    def _ensure_pool(self, cluster: Any, pg_num: int) -> None:
        if cluster.pool_exists(self._pool):
            return
        # librados' create_pool takes no pg_num: ask the mon directly (idempotent).
        for command in (
            {"prefix": "osd pool create", "pool": self._pool, "pg_num": pg_num},
            {"prefix": "osd pool application enable", "pool": self._pool, "app": _APPLICATION},
        ):
            ret, _, status = cluster.mon_command(json.dumps(command), b"", timeout=30)
            if ret != 0:
                raise PoolError(
                    f"cannot create ceph pool {self._pool}: {command['prefix']}: {status}",
                    pool=self._pool,
                    hint="the user needs mon 'allow rw' to create pools; or create it first",
                )
        cluster.wait_for_latest_osdmap()

    def _write_head(self, key: str, data: bytes, size: int) -> None:
        op = self._ioctx.create_write_op()
        try:
            op.write_full(data)
            op.set_xattr(_SIZE_XATTR, str(size).encode())
            self._ioctx.operate_write_op(op, key, mtime=int(time.time()))
        finally:
            self._ioctx.release_write_op(op)

    def _put_striped(self, key: str, blocks: Iterator[bytes]) -> None:
        gen = secrets.token_hex(8)
        pending: deque[Future[None]] = deque()
        written, size = 0, 0
        try:
            for index, block in enumerate(blocks):
                if len(pending) >= self._workers:
                    pending.popleft().result()
                name = f"{key}{_PART_SEP}{gen}.{index}"
                pending.append(self._executor.submit(self._ioctx.write_full, name, block))
                written, size = index + 1, size + len(block)
            while pending:
                pending.popleft().result()
        except BaseException:
            for future in pending:
                with contextlib.suppress(Exception):
                    future.result()
            self._remove_parts(key, _Manifest(size, self._stripe, written, gen))
            raise
        manifest = _Manifest(size, self._stripe, written, gen)
        self._replace_head(key, manifest.encode(), size, gen)

    def _replace_head(self, key: str, data: bytes, size: int, gen: str | None) -> None:
        """Write the head, then remove the parts of the value it replaces (if striped).

        The old head is probed first (one small read): after the write, nothing would say
        where its parts were.
        """
        old = self._manifest_of(key)
        self._write_head(key, data, size)
        if old is not None and old.gen != gen:
            self._remove_parts(key, old)

    def _remove_parts(self, key: str, manifest: _Manifest) -> None:
        def remove(index: int) -> None:
            with contextlib.suppress(self._rados.ObjectNotFound):
                self._ioctx.remove_object(manifest.part_name(key, index))

        list(self._executor.map(remove, range(manifest.parts)))

    def _manifest_of(self, key: str) -> _Manifest | None:
        try:
            head = self._ioctx.read(key, _HEAD_PROBE)
        except self._rados.ObjectNotFound:
            return None
        return _Manifest.decode(head, key)

    def _read_whole(self, key: str, limit: int | None = None) -> bytes:
        """The head object's data, in one read when it is no larger than a stripe; a head
        over ``limit`` bytes (a striped value's manifest is always read) is
        :func:`~._backend.too_large`, found out by reading ``limit + 1`` bytes at most."""
        cap = None if limit is None else max(limit, _HEAD_PROBE)
        first = self._stripe if cap is None else min(self._stripe, cap)
        try:
            data: bytes = self._ioctx.read(key, first + 1)
        except self._rados.ObjectNotFound:
            raise KeyError(key) from None
        if len(data) <= first:
            return data
        # Written by someone else, or by a backend with a larger stripe_size: read the rest.
        chunks = [data]
        offset = len(data)
        while cap is None or offset <= cap:
            step = self._stripe if cap is None else min(self._stripe, cap + 1 - offset)
            chunk = self._ioctx.read(key, step, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        if cap is not None and offset > cap:
            raise too_large(key, self._where, self._head_size(key), cap, pool=self._pool)
        return b"".join(chunks)

    def _head_size(self, key: str) -> int | None:
        """The head object's size, for a message (None if it is gone meanwhile)."""
        try:
            size: int = self._ioctx.stat(key)[0]
        except self._rados.ObjectNotFound:
            return None
        return size

    def _read_part(self, key: str, manifest: _Manifest, index: int) -> bytes:
        want = manifest.part_length(index)
        data: bytes = self._ioctx.read(manifest.part_name(key, index), want)
        if len(data) != want:
            raise PoolError(
                f"key {key!r} in ceph pool {self._pool} is corrupted: part {index} has "
                f"{len(data)} bytes, not {want}",
                pool=self._pool,
            )
        return data

    def _list(self, prefix: str) -> Iterator[str]:
        with self._errors("list", None):
            for obj in self._ioctx.list_objects():
                name: str = obj.key
                if name.startswith(prefix) and _PART_SEP not in name and _is_key(name):
                    yield name

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None) -> Iterator[None]:
        """The driver's one boundary: ``rados.Error`` becomes :class:`~torpor.PoolError`."""
        try:
            yield
        except self._rados.Error as exc:
            what = f"key {key!r} in ceph pool {self._pool}" if key else f"ceph pool {self._pool}"
            raise PoolError(
                f"cannot {action} {what}: {exc}", pool=self._pool, hint=self._hint(exc)
            ) from exc

    def _hint(self, exc: Exception) -> str | None:
        r = self._rados
        if isinstance(exc, r.PermissionError | r.PermissionDeniedError):
            return "check the cephx user's caps and keyring (ceph auth get <user>)"
        if isinstance(exc, r.TimedOut | r.InterruptedOrTimeoutError):
            return "is the cluster up? check `mon host` in the conf file and `ceph -s`"
        if isinstance(exc, r.NoSpace):
            return "the cluster is full"
        if isinstance(exc, r.ObjectNotFound):
            return "check the conf file path and the pool name"
        return None


class _PartReader(io.RawIOBase):
    """A striped value, read part by part, one part ahead."""

    def __init__(self, backend: RadosBackend, key: str, manifest: _Manifest) -> None:
        self._backend = backend
        self._key = key
        self._manifest = manifest
        self._index = 0
        self._current = memoryview(b"")
        self._next: Future[bytes] | None = None
        self._next = self._fetch(0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._current:
            if self._next is None:
                return 0
            with self._backend._errors("read", self._key):
                try:
                    self._current = memoryview(self._next.result())
                except self._backend._rados.ObjectNotFound as exc:
                    raise PoolError(
                        f"key {self._key!r} was overwritten or deleted while being read",
                        pool=self._backend._pool,
                    ) from exc
            self._index += 1
            self._next = self._fetch(self._index)
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        return n

    def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
            self._next = None
        super().close()

    def _fetch(self, index: int) -> Future[bytes] | None:
        if index >= self._manifest.parts:
            return None
        self._backend._check_open()
        return self._backend._executor.submit(
            self._backend._read_part, self._key, self._manifest, index
        )


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes of ``stream``: fewer only at its end (pipes return short reads)."""
    chunks: list[bytes] = []
    missing = n
    while missing:
        chunk = stream.read(missing)
        if not chunk:
            break
        chunks.append(chunk)
        missing -= len(chunk)
    return bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)


def _is_key(name: str) -> bool:
    try:
        check_key(name)
    except PoolError:
        return False
    return True
