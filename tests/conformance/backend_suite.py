"""The storage backend conformance suite: the contract of ``torpor._pools._backend``, as tests.

Every pool driver passes this suite. A driver's test module subclasses
:class:`BackendConformance` and provides:

- a ``backend`` fixture yielding a fresh, empty, open backend (closed afterwards);
- :meth:`BackendConformance.assert_private`, saying how the driver's objects are private
  (file modes, anonymous access refused...). A driver that has no notion of per-object privacy
  sets ``test_objects_are_private = None`` with a comment saying why, so the test is not
  collected for it rather than passing without checking anything.

Example::

    class TestDirBackend(BackendConformance):
        @pytest.fixture
        def backend(self, tmp_path):
            b = DirBackend(tmp_path / "pool")
            yield b
            b.close()
"""

from __future__ import annotations

import io
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

import pytest

from torpor._errors import PoolError
from torpor._pools._backend import Backend

MIB = 1 << 20
# Above every driver's single-part threshold (dir: none; ceph: 4 MiB stripes; s3: 8 MiB parts).
LARGE = 40 * MIB
# Above the ceph driver's stripe size, so overwrites switch whole striped values.
STRIPED = 6 * MIB

INVALID_KEYS = [
    "",
    "/a",
    "a/",
    "a//b",
    ".",
    "..",
    "../x",
    "a/../b",
    "a/./b",
    "a b",
    "a\\b",
    "a\x00b",
    "ü",
    "a~b",
    "a+b",
    "a@b",
    "a\nb",
]


def payload(size: int, seed: int = 0) -> bytes:
    """``size`` pseudo-random bytes: any misplaced or repeated block shows."""
    return random.Random(seed).randbytes(size)


class TrickleStream(io.RawIOBase):
    """A non-seekable stream of ``data`` that returns short reads, like a pipe or a socket."""

    def __init__(self, data: bytes, step: int = 3 * MIB + 7) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._step, len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def read_all(stream: BinaryIO, block: int = MIB) -> bytes:
    """Everything left in ``stream``, read in blocks the way a copying caller would."""
    parts = []
    while chunk := stream.read(block):
        parts.append(chunk)
    return b"".join(parts)


class BackendConformance:
    """The contract, test by test. Subclasses provide the ``backend`` fixture."""

    def assert_private(self, backend: Backend, key: str) -> None:
        """Fail unless the object under ``key`` is readable by its owner only."""
        raise NotImplementedError(
            f"{type(self).__name__} must say how its objects are private (or set "
            "test_objects_are_private = None with the reason)"
        )

    # --- round trips -------------------------------------------------------------------

    def test_is_a_backend(self, backend: Backend) -> None:
        assert isinstance(backend, Backend)

    def test_put_get_round_trip(self, backend: Backend) -> None:
        backend.put("images/web/manifest", b"hello")
        assert backend.get("images/web/manifest") == b"hello"

    def test_put_overwrites(self, backend: Backend) -> None:
        backend.put("k", b"first value, the longer one")
        backend.put("k", b"second")
        assert backend.get("k") == b"second"
        assert backend.size("k") == len(b"second")

    @pytest.mark.parametrize(
        "value",
        [b"", b"\x00", bytes(range(256)) * 17, b"\xff" * 4097, b"\r\n\x1a", payload(MIB + 1)],
        ids=["empty", "nul", "all-bytes", "ff-page+1", "crlf", "1MiB+1"],
    )
    def test_binary_values(self, backend: Backend, value: bytes) -> None:
        backend.put("bin/v", value)
        assert backend.get("bin/v") == value
        assert backend.size("bin/v") == len(value)
        with backend.get_stream("bin/v") as stream:
            assert read_all(stream) == value

    def test_empty_value_exists(self, backend: Backend) -> None:
        backend.put("empty", b"")
        assert backend.exists("empty")
        assert backend.size("empty") == 0
        assert list(backend.list("empty")) == ["empty"]

    def test_put_stream_small(self, backend: Backend) -> None:
        backend.put_stream("s", io.BytesIO(b"streamed"), size=8)
        backend.put_stream("t", io.BytesIO(b"no size given"))
        assert backend.get("s") == b"streamed"
        assert backend.get("t") == b"no size given"

    def test_large_value_with_known_size(self, backend: Backend) -> None:
        value = payload(LARGE, seed=1)
        backend.put_stream("big/known", io.BytesIO(value), size=len(value))
        assert backend.size("big/known") == LARGE
        assert backend.get("big/known") == value
        with backend.get_stream("big/known") as stream:
            assert read_all(stream, block=3 * MIB + 1) == value

    def test_large_value_from_a_pipe_like_stream(self, backend: Backend) -> None:
        value = payload(LARGE + 12345, seed=2)
        backend.put_stream("big/unknown", TrickleStream(value))  # type: ignore[arg-type]
        assert backend.size("big/unknown") == len(value)
        assert backend.get("big/unknown") == value

    def test_large_value_overwritten_by_small_and_back(self, backend: Backend) -> None:
        big = payload(STRIPED, seed=3)
        backend.put("flip", big)
        backend.put("flip", b"small")
        assert backend.get("flip") == b"small"
        assert backend.size("flip") == 5
        backend.put_stream("flip", io.BytesIO(big))
        assert backend.get("flip") == big
        assert list(backend.list("flip")) == ["flip"]

    def test_get_stream_reads_in_pieces(self, backend: Backend) -> None:
        value = payload(3 * MIB + 5, seed=4)
        backend.put("pieces", value)
        with backend.get_stream("pieces") as stream:
            head = stream.read(10)
            rest = read_all(stream, block=MIB - 1)
        assert head + rest == value

    # --- bounded reads (a pool's objects are hostile: root must not read them whole) -----

    @pytest.mark.parametrize("size", [0, 1, 4096, MIB + 1, STRIPED], ids=str)
    def test_get_within_limit(self, backend: Backend, size: int) -> None:
        value = payload(size, seed=7)
        backend.put("bounded/v", value)
        assert backend.get("bounded/v", limit=size) == value
        assert backend.get("bounded/v", limit=size + 12345) == value
        assert backend.get("bounded/v", None) == value

    @pytest.mark.parametrize(
        ("size", "limit"),
        [(1, 0), (4097, 4096), (MIB + 1, MIB), (STRIPED, 100), (STRIPED, STRIPED - 1)],
        ids=["1-over-0", "page+1", "MiB+1", "striped-over-small", "striped-by-1"],
    )
    def test_get_over_limit_is_refused(self, backend: Backend, size: int, limit: int) -> None:
        backend.put("bounded/big", payload(size, seed=8))
        with pytest.raises(PoolError) as info:
            backend.get("bounded/big", limit=limit)
        message = str(info.value)
        assert "\n" not in message
        assert "'bounded/big'" in message
        assert f"over the {limit} bytes" in message
        assert f"is {size} bytes" in message or f"more than {limit} bytes" in message
        assert "`torpor pool gc POOL`" in message
        assert backend.get("bounded/big") == payload(size, seed=8)  # refused, not harmed

    def test_get_with_limit_of_a_missing_key(self, backend: Backend) -> None:
        with pytest.raises(KeyError) as info:
            backend.get("no/such/key", limit=10)
        assert info.value.args == ("no/such/key",)

    # --- missing keys, metadata --------------------------------------------------------

    def test_missing_key(self, backend: Backend) -> None:
        for call in (backend.get, backend.get_stream, backend.size):
            with pytest.raises(KeyError) as info:
                call("no/such/key")
            assert info.value.args == ("no/such/key",)
        assert not backend.exists("no/such/key")

    def test_exists_and_size(self, backend: Backend) -> None:
        assert not backend.exists("a/b")
        backend.put("a/b", b"12345")
        assert backend.exists("a/b")
        assert backend.size("a/b") == 5
        assert not backend.exists("a")  # a key's prefix is not a key

    # --- listing -----------------------------------------------------------------------

    def test_list_by_prefix(self, backend: Backend) -> None:
        keys = {"a/b", "a/bc", "a/b/c", "a/b/c/d", "ab", "b", "a.b", "a-b/x"}
        for key in keys:
            backend.put(key, key.encode())
        assert set(backend.list()) == keys
        assert set(backend.list("")) == keys
        assert set(backend.list("a/b")) == {"a/b", "a/bc", "a/b/c", "a/b/c/d"}
        assert set(backend.list("a/b/")) == {"a/b/c", "a/b/c/d"}
        assert set(backend.list("a/bc")) == {"a/bc"}
        assert set(backend.list("a")) == {"a/b", "a/bc", "a/b/c", "a/b/c/d", "ab", "a.b", "a-b/x"}
        assert set(backend.list("a/")) == {"a/b", "a/bc", "a/b/c", "a/b/c/d"}
        assert set(backend.list("zzz")) == set()
        assert set(backend.list("a/b/c/d/e")) == set()

    def test_list_prefix_that_no_key_can_match(self, backend: Backend) -> None:
        backend.put("a/b", b"x")
        for prefix in ("../", "a//", "/", "a/../a", "*", "a/*", "ü"):
            assert list(backend.list(prefix)) == []

    def test_list_yields_each_key_once(self, backend: Backend) -> None:
        backend.put("dup/x", payload(STRIPED))  # striped drivers must hide their parts
        backend.put("dup/y", b"y")
        assert sorted(backend.list("dup/")) == ["dup/x", "dup/y"]

    def test_key_and_its_children_coexist(self, backend: Backend) -> None:
        backend.put("a", b"parent")
        backend.put("a/b", b"child")
        assert backend.get("a") == b"parent"
        assert backend.get("a/b") == b"child"
        backend.delete("a")
        assert backend.get("a/b") == b"child"
        backend.put("a", b"again")
        backend.delete("a/b")
        assert backend.get("a") == b"again"
        assert list(backend.list()) == ["a"]

    def test_list_while_writing(self, backend: Backend) -> None:
        before = {f"l/{i:03d}" for i in range(50)}
        for key in before:
            backend.put(key, b"x")
        stop = threading.Event()

        def writer() -> None:
            i = 0
            while not stop.is_set():
                backend.put(f"l/new/{i}", b"y")
                backend.delete(f"l/new/{i - 5}")
                i += 1

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            for _ in range(5):
                seen = set(backend.list("l/"))
                assert before <= seen
        finally:
            stop.set()
            thread.join()

    # --- delete ------------------------------------------------------------------------

    def test_delete_is_idempotent(self, backend: Backend) -> None:
        backend.put("d/x", b"x")
        backend.delete("d/x")
        backend.delete("d/x")
        backend.delete("never/existed")
        assert not backend.exists("d/x")
        assert list(backend.list("d/")) == []
        with pytest.raises(KeyError):
            backend.get("d/x")

    def test_delete_large_value(self, backend: Backend) -> None:
        backend.put("d/big", payload(STRIPED))
        backend.delete("d/big")
        assert not backend.exists("d/big")
        assert list(backend.list()) == []

    # --- keys --------------------------------------------------------------------------

    @pytest.mark.parametrize("key", INVALID_KEYS)
    def test_invalid_keys_are_rejected(self, backend: Backend, key: str) -> None:
        with pytest.raises(PoolError):
            backend.put(key, b"x")
        with pytest.raises(PoolError):
            backend.put_stream(key, io.BytesIO(b"x"))
        for call in (backend.get, backend.get_stream, backend.exists, backend.size):
            with pytest.raises(PoolError):
                call(key)
        with pytest.raises(PoolError):
            backend.delete(key)
        assert list(backend.list()) == []

    def test_long_and_unusual_valid_keys(self, backend: Backend) -> None:
        keys = ["-", "_", "...", ".hidden", "a.", "-a/-b", "A/b/C", "x" * 200, "/".join("k" * 8)]
        for key in keys:
            backend.put(key, key.encode())
        for key in keys:
            assert backend.get(key) == key.encode()
        assert set(backend.list()) == set(keys)

    # --- concurrency -------------------------------------------------------------------

    def test_concurrent_puts_from_threads(self, backend: Backend) -> None:
        values = {f"c/{t}/{i}": payload(1000 + 37 * i, seed=t * 100 + i) for t in range(8)
                  for i in range(6)}  # fmt: skip
        shared = {t: payload(64 * 1024, seed=1000 + t) for t in range(8)}

        def work(t: int) -> None:
            for i in range(6):
                backend.put(f"c/{t}/{i}", values[f"c/{t}/{i}"])
                backend.put("c/shared", shared[t])

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(work, range(8)))
        for key, value in values.items():
            assert backend.get(key) == value
        assert backend.get("c/shared") in shared.values()
        assert set(backend.list("c/")) == {*values, "c/shared"}

    def test_readers_see_old_or_new_value_never_a_mix(self, backend: Backend) -> None:
        old, new = payload(STRIPED, seed=5), payload(STRIPED, seed=6)
        backend.put("atomic", old)
        seen: list[bytes] = []
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                seen.append(backend.get("atomic"))

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for i in range(6):
                backend.put("atomic", new if i % 2 == 0 else old)
        finally:
            stop.set()
            thread.join()
        assert seen
        assert all(value in (old, new) for value in seen)

    # --- privacy, lifecycle ------------------------------------------------------------

    def test_objects_are_private(self, backend: Backend) -> None:
        backend.put("private/secret", b"s3cr3t")
        backend.put("private/big", payload(STRIPED))
        self.assert_private(backend, "private/secret")
        self.assert_private(backend, "private/big")

    def test_closed_backend_refuses_calls(self, backend: Backend) -> None:
        backend.put("x", b"x")
        backend.close()
        backend.close()  # closing twice is harmless (the fixture closes again)
        with pytest.raises(PoolError):
            backend.get("x")
        with pytest.raises(PoolError):
            backend.put("y", b"y")
        with pytest.raises(PoolError):
            list(backend.list())
