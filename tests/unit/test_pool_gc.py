"""Garbage collection: what it removes, what it keeps, and its safety next to live writers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from torpor._errors import PoolError
from torpor._pools import MemoryBackend, Pool, Timing
from torpor._pools._gc import CONDEMNED_KEY, Heartbeat, session

from .test_pool_support import FAST, make_image, random_pages, stored_total


class HookedBackend(MemoryBackend):
    """A memory backend that runs ``hook(key)`` before every put."""

    def __init__(self) -> None:
        super().__init__()
        self.hook: Callable[[str], None] = lambda key: None

    def put(self, key: str, data: bytes) -> None:
        self.hook(key)
        super().put(key, data)


@pytest.fixture
def backend(torpor_home: Path) -> Iterator[HookedBackend]:
    b = HookedBackend()
    yield b
    b.close()


@pytest.fixture
def pool(backend: HookedBackend) -> Pool:
    return Pool("gc", backend, timing=FAST)


def _run(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``fn`` in a thread; the list gets its result or exception."""
    out: list[object] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=target)
    t.start()
    return t, out


def test_gc_removes_only_what_no_image_needs(pool: Pool, tmp_path: Path) -> None:
    shared = random_pages(800, seed=1)
    a = make_image(tmp_path, "a", bytes(shared + random_pages(800, seed=2)), cmdline=("a",))
    b = make_image(tmp_path, "b", bytes(random_pages(100, seed=3) + shared), cmdline=("b",))
    pool.push(a, "a")
    pool.push(b, "b")
    before = stored_total(pool.backend)
    assert pool.gc().packs_deleted == 0
    pool.delete_image("a")
    stats = pool.gc(repack=0)
    assert stats.images == 1 and stats.missing_chunks == 0
    assert stats.lists_deleted == 1  # a's chunk list; b has its own (another program)
    assert stored_total(pool.backend) < before
    assert (pool.pull("b").path / "pages-1.img").read_bytes() == (
        b.path / "pages-1.img"
    ).read_bytes()
    assert not pool.backend.exists(CONDEMNED_KEY)


def test_repack_rewrites_mostly_dead_packs(pool: Pool, tmp_path: Path) -> None:
    pages = random_pages(2000, seed=4)  # ~8 MiB: a few packs
    pool.push(make_image(tmp_path, "a", bytes(pages)), "a")
    keep = bytes(pages[: 4096 * 300])  # b shares 15 % of a's pages
    pool.push(make_image(tmp_path, "b", keep, cmdline=("b",)), "b")
    pool.delete_image("a")
    without = pool.gc(repack=0)
    assert without.packs_deleted >= 1 and without.dead_bytes_kept > 0
    stats = pool.gc(repack=0.5)
    assert stats.packs_repacked >= 1 and stats.dead_bytes_kept < without.dead_bytes_kept
    assert (pool.pull("b").path / "pages-1.img").read_bytes() == keep
    assert pool.stats().chunk_bytes < len(keep) + 200_000


def test_a_base_list_outlives_the_image_that_wrote_it(pool: Pool, tmp_path: Path) -> None:
    pages = random_pages(1000, seed=5)
    pool.push(make_image(tmp_path, "c0", bytes(pages)), "c0")
    pages[0:10] = b"x" * 10
    pool.push(make_image(tmp_path, "c1", bytes(pages)), "c1")  # a patch on c0's list
    pool.delete_image("c0")
    stats = pool.gc()
    assert stats.lists_deleted == 0
    assert (pool.pull("c1").path / "pages-1.img").read_bytes() == bytes(pages)


def test_a_writer_that_deduplicated_against_condemned_chunks_is_waited_for(
    pool: Pool, backend: HookedBackend, tmp_path: Path
) -> None:
    pages = bytes(random_pages(1000, seed=6))
    pool.push(make_image(tmp_path, "x", pages), "x")
    pool.delete_image("x")  # x's packs are garbage now...
    at_manifest = threading.Event()
    release = threading.Event()

    def hook(key: str) -> None:
        if key == "images/y":
            at_manifest.set()
            assert release.wait(10)

    backend.hook = hook
    # ...but y has the same pages: it relies on x's packs and uploads no chunk.
    pusher, pushed = _run(lambda: pool.push(make_image(tmp_path, "y", pages), "y"))
    assert at_manifest.wait(10)
    assert list(backend.list("packs/"))  # x's packs are still there
    collector, collected = _run(lambda: pool.gc(wait=10))
    time.sleep(0.3)
    assert collector.is_alive()  # waiting for y's session
    assert backend.exists(CONDEMNED_KEY)
    release.set()
    pusher.join(10)
    collector.join(10)
    assert not isinstance(pushed[0], BaseException), pushed
    stats = collected[0]
    assert not isinstance(stats, BaseException), stats
    assert stats.resurrected >= 1 and stats.packs_deleted == 0  # type: ignore[attr-defined]
    assert stats.waited > 0.2  # type: ignore[attr-defined]
    assert (pool.pull("y").path / "pages-1.img").read_bytes() == pages


def test_a_writer_starting_during_gc_does_not_rely_on_condemned_chunks(
    pool: Pool, backend: HookedBackend, tmp_path: Path
) -> None:
    pages = bytes(random_pages(1000, seed=7))
    pool.push(make_image(tmp_path, "x", pages), "x")
    pool.delete_image("x")
    old_packs = {k for k in backend.list("packs/")}
    # A long transfer that started before the collection keeps it waiting...
    with session(backend, "pull", FAST):
        collector, collected = _run(lambda: pool.gc(wait=10))
        deadline = time.monotonic() + 5
        while not backend.exists(CONDEMNED_KEY) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.exists(CONDEMNED_KEY)
        # ...while a new push of the same pages uploads them again instead of relying on
        # packs about to go.
        y = pool.push(make_image(tmp_path, "y", pages), "y")
        assert y.stored_bytes > len(pages)
    collector.join(10)
    stats = collected[0]
    assert not isinstance(stats, BaseException), stats
    assert not (old_packs & set(backend.list("packs/")))  # x's packs went
    assert (pool.pull("y").path / "pages-1.img").read_bytes() == pages


def test_copy_during_gc_repacks_condemned_chunks(
    pool: Pool, backend: HookedBackend, tmp_path: Path
) -> None:
    pages = bytes(random_pages(300, seed=8))
    pool.push(make_image(tmp_path, "x", pages), "x")
    # x looks dead to the collector's mark (it is hidden), then reappears: as if it landed
    # after the mark. A copy of it during the sweep must not rely on condemned packs.
    hidden = backend.get("images/x")
    backend.delete("images/x")
    with session(backend, "pull", FAST):
        collector, collected = _run(lambda: pool.gc(wait=10))
        while not backend.exists(CONDEMNED_KEY):
            time.sleep(0.01)
        backend.put("images/x", hidden)
        copy = pool.copy_image("x", "x2")
        assert copy.stored_bytes > len(pages)  # re-packed, not O(1)
    collector.join(10)
    assert not isinstance(collected[0], BaseException), collected
    for name in ("x", "x2"):
        assert (pool.pull(name).path / "pages-1.img").read_bytes() == pages


def test_gc_gives_up_cleanly_when_writers_never_finish(
    pool: Pool, backend: HookedBackend, tmp_path: Path
) -> None:
    pool.push(make_image(tmp_path, "x", bytes(random_pages(100))), "x")
    pool.delete_image("x")
    before = set(backend.list(""))
    with session(backend, "push", FAST), pytest.raises(PoolError, match="gave up"):
        pool.gc(wait=0.3)
    assert not backend.exists(CONDEMNED_KEY)
    assert {k for k in before if k.startswith("packs/")} <= set(backend.list("packs/"))


def test_stale_sessions_are_broken(backend: HookedBackend, tmp_path: Path) -> None:
    timing = Timing(heartbeat=60, stale=0.3, poll=0.01)
    pool = Pool("stale", backend, timing=timing)
    pool.push(make_image(tmp_path, "x", bytes(random_pages(100))), "x")
    pool.delete_image("x")
    dead = Heartbeat(backend, "sessions/dead", "push", timing)
    dead.start()
    dead._stop.set()  # the process "froze": no more heartbeats
    time.sleep(0.4)
    assert not dead.alive()
    stats = pool.gc(wait=5)
    assert stats.packs_deleted >= 1
    assert not backend.exists("sessions/dead")


def test_one_collector_at_a_time(pool: Pool, backend: HookedBackend) -> None:
    with (
        Heartbeat(backend, "gc/lock-00000000000000000001-x", "gc", FAST),
        pytest.raises(PoolError, match="another gc"),
    ):
        pool.gc()
    # a lock left by a crashed collector expires
    backend.put("gc/lock-00000000000000000002-y", b'{"beat": 0, "host": "h", "pid": 1}')
    pool.gc()
    assert not list(backend.list("gc/"))


def test_prune_keeps_the_newest_per_program(pool: Pool, tmp_path: Path) -> None:
    for prog in ("a", "b"):
        for i in range(4):
            img = make_image(
                tmp_path, f"{prog}{i}", bytes(random_pages(8, seed=i)), cmdline=(prog,)
            )
            pool.push(img, f"{prog}-{i}")
    deleted = pool.prune(2, prefix="a-")
    assert [d.name for d in deleted] == ["a-0", "a-1"]
    assert sorted(i.name for i in pool.list_images()) == ["a-2", "a-3", "b-0", "b-1", "b-2", "b-3"]
    pool.prune(1)
    assert sorted(i.name for i in pool.list_images()) == ["a-3", "b-3"]
    with pytest.raises(Exception, match="--keep"):
        pool.prune(-1)


def test_copy_in_a_pool_is_one_manifest(pool: Pool, backend: HookedBackend, tmp_path: Path) -> None:
    pool.push(make_image(tmp_path, "x", bytes(random_pages(2000))), "x")
    puts: list[str] = []
    backend.hook = puts.append
    copy = pool.copy_image("x", "x-copy")
    assert [k for k in puts if not k.startswith("sessions/")] == ["images/x-copy"]
    # What the copy added is its manifest (no chunk, no list).
    assert copy.stored_bytes == backend.size("images/x-copy")
    pool.delete_image("x")
    pool.gc()
    assert pool.pull("x-copy").manifest.name == "x-copy"


def test_copy_between_pools_moves_only_missing_chunks(pool: Pool, tmp_path: Path) -> None:
    shared = random_pages(500, seed=9)
    other = Pool("other", MemoryBackend(), timing=FAST)
    other.push(make_image(tmp_path, "s", bytes(shared), cmdline=("s",)), "s")
    own = random_pages(50, seed=10)
    pool.push(make_image(tmp_path, "x", bytes(shared + own)), "x")
    copied = pool.copy_image("x", "x", to_pool=other)
    assert len(own) < copied.stored_bytes < len(own) + 500 * 33 + 30_000
    assert (other.pull("x").path / "pages-1.img").read_bytes() == bytes(shared + own)
