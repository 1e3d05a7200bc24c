"""The ``s3`` pool driver: keyed blobs as objects in an S3 bucket (AWS, Ceph RGW, MinIO...).

A key is the object's name in the bucket, unchanged. S3 makes a ``PUT`` atomic, and a
multipart upload too (the object appears whole when the upload completes), so ``put`` is a
``PutObject`` for values up to ``multipart_threshold`` and boto3's transfer manager (parts of
``part_size`` bytes, ``max_concurrency`` at once) above it, for ``put_stream`` as well.
Streams that return short reads (pipes, sockets) are read until each part is full, because S3
refuses parts under 5 MiB except the last.

The bucket is created if missing. Credentials not given come from boto3's usual places
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws/credentials``, an instance role).
With an explicit ``endpoint_url`` (anything but AWS) requests use path-style addressing and
checksums only where S3 requires them: older S3 implementations such as Ceph 16's RGW reject
the checksum trailers recent boto3 sends by default.

boto3 is imported when a backend is created, so ``import torpor`` never needs it (it comes with
``pip install 'torpor[s3]'``). botocore's and boto3's errors are converted into
:class:`~torpor.PoolError` in :meth:`S3Backend._errors`, the driver's one boundary.
"""

from __future__ import annotations

import contextlib
import functools
import io
import threading
from collections.abc import Iterator
from typing import Any, BinaryIO

from .._errors import PoolConfigError, PoolError
from ._backend import check_key, read_at_most, too_large
from ._leases import S3Leases

_MIB = 1 << 20
_MIN_PART = 5 * _MIB  # S3's smallest part (but the last)
# Seconds a lease request may wait to connect, and for each read: a renewal (a GET, a PUT) is
# bounded by about 4 s, within the 20 % of a supervisor's 15 s lease between its fence
# deadline and its expiry plus the 2 s to the deadline from the last regular renewal.
LEASE_TIMEOUT = 1.0
_HINTS = {
    "InvalidAccessKeyId": "check the access key",
    "SignatureDoesNotMatch": "check the secret key",
    "AccessDenied": "the credentials may not use this bucket",
    # A HEAD's refusal has no body, hence no error code.
    "403": "check the access key and secret key (and that the bucket is yours)",
    "NoSuchBucket": "the bucket was deleted; reopen the pool to create it again",
    "BucketAlreadyExists": "the name is taken by another account: choose another bucket",
    "QuotaExceeded": "the S3 user's quota is exhausted",
}


class _Boto:
    """The parts of boto3 the driver uses, imported on first use."""

    def __init__(self) -> None:
        try:
            import boto3.exceptions
            import boto3.s3.transfer
            import boto3.session
            import botocore.config
            import botocore.exceptions
        except ImportError as exc:
            raise PoolError(
                "the s3 pool driver needs boto3", hint="pip install 'torpor[s3]'"
            ) from exc
        self.Config: Any = botocore.config.Config
        self.TransferConfig: Any = boto3.s3.transfer.TransferConfig
        self.ClientError: type[Exception] = botocore.exceptions.ClientError
        self.NoCredentialsError: type[Exception] = botocore.exceptions.NoCredentialsError
        self.ConnectionError: type[Exception] = botocore.exceptions.EndpointConnectionError
        # Every error boto3 or botocore raise on purpose.
        self.errors: tuple[type[Exception], ...] = (
            botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError,
            boto3.exceptions.Boto3Error,
        )

    def client(self, **kwargs: Any) -> Any:
        """A new S3 client from the process's shared boto3 session."""
        with _SESSION_LOCK:  # boto3 sessions are not thread-safe
            return _shared_session().client("s3", **kwargs)


# One boto3 session serves every backend: a session parses S3's service model (0.1-0.5 s)
# once, and the clients made from it, which carry each backend's credentials, are then cheap.
# Credentials not given explicitly are resolved once per process, as boto3 does.
_SESSION_LOCK = threading.Lock()


@functools.cache
def _shared_session() -> Any:
    import boto3.session

    return boto3.session.Session()


class S3Backend:
    """Keyed blobs in ``bucket`` (created if missing) behind an S3 endpoint.

    ``endpoint_url`` None means AWS. ``region``, ``access_key`` and ``secret_key`` default to
    boto3's configuration. ``prefix`` (``""`` or a key followed by ``/``, such as
    ``"pools/web/"``) is prepended to every object name, so several pools can share a bucket.
    Thread-safe: boto3 clients are.
    """

    def __init__(
        self,
        endpoint_url: str | None,
        bucket: str,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        multipart_threshold: int = 8 * _MIB,
        part_size: int = 8 * _MIB,
        max_concurrency: int = 4,
        timeout: float = 60.0,
        prefix: str = "",
    ) -> None:
        if prefix and not (prefix.endswith("/") and _is_key(prefix[:-1])):
            raise PoolConfigError(
                f"prefix must be empty or a valid key followed by '/', not {prefix!r}",
                key="prefix",
            )
        if part_size < _MIN_PART:
            raise PoolConfigError(
                f"part_size must be at least 5 MiB (S3's minimum), not {part_size}",
                key="part_size",
            )
        if multipart_threshold < part_size:
            raise PoolConfigError(
                "multipart_threshold must be at least part_size", key="multipart_threshold"
            )
        if max_concurrency < 1:
            raise PoolConfigError("max_concurrency must be at least 1", key="max_concurrency")
        self._boto = _Boto()
        self._bucket = bucket
        self._prefix = prefix
        self._endpoint = endpoint_url or "AWS"
        self._threshold = multipart_threshold
        self._part_size = part_size
        self._closed = False
        options: dict[str, Any] = {
            "signature_version": "s3v4",
            "retries": {"max_attempts": 3, "mode": "standard"},
            "max_pool_connections": max(10, 2 * max_concurrency),
            "connect_timeout": timeout,
            "read_timeout": timeout,
        }
        if endpoint_url:
            options["s3"] = {"addressing_style": "path"}
            if "request_checksum_calculation" in self._boto.Config.OPTION_DEFAULTS:
                options["request_checksum_calculation"] = "when_required"
                options["response_checksum_validation"] = "when_required"
        with self._errors("connect to", None):
            self._client: Any = self._boto.client(
                endpoint_url=endpoint_url,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                region_name=region,
                config=self._boto.Config(**options),
            )
            # The leases' own client: one attempt a request, each bounded (see leases()).
            lease_options = {
                **options,
                "retries": {"total_max_attempts": 1, "mode": "standard"},
                "connect_timeout": LEASE_TIMEOUT,
                "read_timeout": LEASE_TIMEOUT,
                "max_pool_connections": 2,
            }
            self._lease_client: Any = self._boto.client(
                endpoint_url=endpoint_url,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                region_name=region,
                config=self._boto.Config(**lease_options),
            )
            self._transfer: Any = self._boto.TransferConfig(
                multipart_threshold=multipart_threshold,
                multipart_chunksize=part_size,
                max_concurrency=max_concurrency,
                use_threads=True,
            )
            self._ensure_bucket(self._client.meta.region_name)

    # --- the contract --------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (one PUT, or a multipart upload)."""
        self._check(key)
        if len(data) > self._threshold:
            self.put_stream(key, io.BytesIO(data), len(data))
            return
        with self._errors("write", key):
            self._client.put_object(Bucket=self._bucket, Key=self._name(key), Body=bytes(data))

    def put_stream(self, key: str, stream: BinaryIO, size: int | None = None) -> None:
        """Store the rest of ``stream`` under ``key`` atomically; ``size`` is not needed."""
        self._check(key)
        with self._errors("write", key):
            self._client.upload_fileobj(
                _FullReads(stream), self._bucket, self._name(key), Config=self._transfer
            )

    def get(self, key: str, limit: int | None = None) -> bytes:
        """The value under ``key`` (one GET); :class:`KeyError` if missing. Over ``limit``
        bytes, :class:`~torpor.PoolError`: the response's Content-Length is checked before
        the body is read, and ``limit + 1`` bytes of it are read at most."""
        reply = self._open(key)
        body = reply["Body"]
        where = f"s3 pool {self._bucket}"
        with self._errors("read", key), contextlib.closing(body):
            if limit is None:
                data: bytes = body.read()
                return data
            size = reply.get("ContentLength")
            if isinstance(size, int) and size > limit:
                raise too_large(key, where, size, limit, pool=self._bucket)
            expect = size if isinstance(size, int) else None
            return read_at_most(body, key, where, limit, expect=expect, pool=self._bucket)

    def get_stream(self, key: str) -> BinaryIO:
        """A stream of the object's body (one GET); :class:`KeyError` if missing."""
        body = self._open(key)["Body"]
        return io.BufferedReader(_BodyReader(self, key, body), buffer_size=_MIB)

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists (one HEAD)."""
        try:
            self.size(key)
        except KeyError:
            return False
        return True

    def size(self, key: str) -> int:
        """The size in bytes of the value under ``key`` (one HEAD); :class:`KeyError` if
        missing."""
        self._check(key)
        with self._errors("stat", key):
            try:
                head = self._client.head_object(Bucket=self._bucket, Key=self._name(key))
            except self._boto.ClientError as exc:
                if _missing(exc):
                    raise KeyError(key) from None
                raise
            return int(head["ContentLength"])

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with ``prefix`` (S3 filters by prefix on the server)."""
        self._check_open()
        return self._list(prefix)

    def delete(self, key: str) -> None:
        """Remove ``key``; no error if it is missing (S3's DELETE is idempotent)."""
        self._check(key)
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self._bucket, Key=self._name(key))

    def close(self) -> None:
        """Close the client's connections; later calls raise :class:`~torpor.PoolError`."""
        if self._closed:
            return
        self._closed = True
        with self._errors("disconnect from", None):
            self._lease_client.close()
            self._client.close()

    def leases(self) -> S3Leases:
        """The pool's leases: objects written with conditional PUTs (see :mod:`._leases`).

        They go through a client of their own: one attempt a request (no retries), its
        connect and each read bounded by :data:`LEASE_TIMEOUT` seconds, so that a renewal
        (a GET and a PUT) against an unreachable endpoint fails in time for the holder to
        stop its copy before the lease lapses (the data client waits 60 s, 3 times)."""
        self._check_open()
        return S3Leases(
            self._lease_client, self._bucket, self._name, self._errors, self._boto.ClientError
        )

    # --- helpers -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PoolError(f"s3 pool {self._bucket} is closed", pool=self._bucket)

    def _check(self, key: str) -> None:
        self._check_open()
        check_key(key)

    def _name(self, key: str) -> str:
        return self._prefix + key

    def _open(self, key: str) -> Any:
        """The response to a GET of ``key`` (its ``Body`` not read yet)."""
        self._check(key)
        with self._errors("read", key):
            try:
                return self._client.get_object(Bucket=self._bucket, Key=self._name(key))
            except self._boto.ClientError as exc:
                if _missing(exc):
                    raise KeyError(key) from None
                raise

    def _ensure_bucket(self, region: str | None) -> None:
        try:
            self._client.head_bucket(Bucket=self._bucket)
            return
        except self._boto.ClientError as exc:
            if not _missing(exc):
                raise
        kwargs: dict[str, Any] = {"Bucket": self._bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kwargs)
        except self._boto.ClientError as exc:
            if _code(exc) != "BucketAlreadyOwnedByYou":  # created meanwhile by another pool
                raise

    def _list(self, prefix: str) -> Iterator[str]:
        with self._errors("list", None):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket, Prefix=self._prefix + prefix
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    name: str = obj["Key"][len(self._prefix) :]
                    if _is_key(name):
                        yield name

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None) -> Iterator[None]:
        """The driver's one boundary: boto3's and botocore's errors become
        :class:`~torpor.PoolError`."""
        try:
            yield
        except self._boto.errors as exc:
            where = f"s3 bucket {self._bucket} at {self._endpoint}"
            what = f"key {key!r} in {where}" if key else where
            raise PoolError(
                f"cannot {action} {what}: {exc}", pool=self._bucket, hint=self._hint(exc)
            ) from exc

    def _hint(self, exc: Exception) -> str | None:
        if isinstance(exc, self._boto.NoCredentialsError):
            return "give access_key and secret_key, or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        if isinstance(exc, self._boto.ConnectionError):
            return "is the S3 endpoint up? check endpoint_url"
        if isinstance(exc, self._boto.ClientError):
            return _HINTS.get(_code(exc))
        return None


class _FullReads(io.RawIOBase):
    """``stream``, but every ``read(n)`` returns ``n`` bytes unless the stream ends.

    boto3's transfer manager cuts parts at whatever one ``read`` returns; a pipe's short reads
    would make parts smaller than S3's 5 MiB minimum.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self._stream.read()
        chunks: list[bytes] = []
        missing = size
        while missing:
            chunk = self._stream.read(missing)
            if not chunk:
                break
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _BodyReader(io.RawIOBase):
    """An object's body; network errors while reading it become :class:`~torpor.PoolError`."""

    def __init__(self, backend: S3Backend, key: str, body: Any) -> None:
        self._backend = backend
        self._key = key
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with self._backend._errors("read", self._key):
            data: bytes = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


def _code(exc: Any) -> str:
    code: str = exc.response.get("Error", {}).get("Code", "")
    return code


def _missing(exc: Any) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    # A HEAD has no body, hence no error code: its 404 is all there is.
    return status == 404 and _code(exc) in ("404", "NoSuchKey", "NotFound")


def _is_key(name: str) -> bool:
    try:
        check_key(name)
    except PoolError:
        return False
    return True
