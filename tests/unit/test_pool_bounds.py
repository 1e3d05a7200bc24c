"""A hostile pool's huge objects: every read of a pool object is bounded at the backend.

A ``dir`` pool whose packs were made 8 GiB (sparse files: no disk used) must not make root
read them: ``torpor image pull``, a lazy restore's materialisation and the keeper's page
source each fail with the one-line error naming the object, its size, the bound and the fix,
with no big allocation (each runs in a child under an address-space limit far below 8 GiB
and reports its peak RSS), and nothing local is left half made.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest

from torpor._errors import ImageCorruptedError, PoolError, TorporError
from torpor._pools import Pool
from torpor._pools._backend import PoolObjectTooLargeError, read_at_most
from torpor._pools._dir import DirBackend
from torpor._pools._pack import MAX_PACK, PackIndex, index_key, pack_key, pack_limit
from torpor._pools._reader import MAX_INDEX, MAX_META
from torpor._pools._record import MAX_RECORD, image_key, list_key, list_limit
from torpor._pools._session import CONDEMNED_KEY, MAX_CONDEMNED

from .capped import AS_HEADROOM, HOSTILE_DIR_POOL, HUGE, RSS_GROWTH, run_capped
from .test_pool_support import FAST, make_image, random_pages

MIB = 1 << 20
PAGES = 1500  # ~6 MiB of incompressible pages: two packs

_SETUP = (
    HOSTILE_DIR_POOL
    + """
    from torpor._lazy import _poolimage
    from torpor._lazy._source import pool_source

    def run(args):
        if op == "pull":
            pool.pull("app")
        elif op == "lazy":
            _poolimage.materialise(pool, "app").discard()
        elif op == "source":
            source = pool_source(pool, "app")  # the keeper's: chunks fetched on demand
            try:
                source.read("pages-1.img", 0, 4096)
            finally:
                source.close()
"""
)


def _child(op: str, root: str, headroom: str) -> dict[str, Any]:
    return run_capped(_SETUP, int(headroom), op, root)


@pytest.fixture
def pool(tmp_path: Path, torpor_home: Path) -> Pool:
    """A dir pool holding image ``app`` (its pages in two packs)."""
    p = Pool("hostile", DirBackend(tmp_path / "pool"), timing=FAST)
    pages = bytes(random_pages(PAGES, seed=3))
    p.push(make_image(tmp_path / "local", "app", pages), "app")
    return p


def _packs(pool: Pool) -> list[Path]:
    root = pool.backend.root  # type: ignore[attr-defined]
    packs = sorted(Path(root, "packs+").glob("*+/*"))
    assert len(packs) >= 2
    return packs


def _doctor(packs: list[Path]) -> None:
    for path in packs:
        os.truncate(path, HUGE)  # a hole: no disk, 8 GiB to whoever reads it whole


def _assert_refused(out: dict[str, Any], packs: list[Path]) -> None:
    assert out["type"] == "PoolObjectTooLargeError", out  # a PoolError
    message = out["error"]
    assert "\n" not in message
    named = [p for p in packs if f"'packs/{p.parent.name[:-1]}/{p.name}'" in message]
    assert len(named) == 1, message
    assert f"is {HUGE} bytes, over the " in message
    assert "`torpor image delete NAME@POOL`" in message and "`torpor pool gc POOL`" in message
    assert out["grew"] < RSS_GROWTH, out


def _local_images(torpor_home: Path) -> list[str]:
    """What is in the local image stores and lazy image directories (an empty store's own
    directory, made on first use, aside)."""
    found = [p for p in torpor_home.rglob("*") if not p.is_dir() or any(p.iterdir())]
    names = [str(p.relative_to(torpor_home)) for p in found]
    return sorted(n for n in names if "images" in n.split(os.sep) or "lazy" in n)


def test_pull_of_a_huge_pack_is_refused_unread(pool: Pool, torpor_home: Path) -> None:
    packs = _packs(pool)
    before = _local_images(torpor_home)
    _doctor(packs)
    out = _child("pull", str(pool.backend.root), str(AS_HEADROOM))  # type: ignore[attr-defined]
    _assert_refused(out, packs)
    assert _local_images(torpor_home) == before  # no image, no staging directory left


def test_lazy_restore_of_a_huge_pack_is_refused_unread(pool: Pool, torpor_home: Path) -> None:
    packs = _packs(pool)
    before = _local_images(torpor_home)
    _doctor(packs)
    out = _child("lazy", str(pool.backend.root), str(AS_HEADROOM))  # type: ignore[attr-defined]
    _assert_refused(out, packs)
    assert _local_images(torpor_home) == before


def test_the_page_source_refuses_a_huge_pack_unread(pool: Pool, torpor_home: Path) -> None:
    packs = _packs(pool)
    before = _local_images(torpor_home)
    _doctor(packs)
    out = _child("source", str(pool.backend.root), str(AS_HEADROOM))  # type: ignore[attr-defined]
    assert out["type"] == "LazyPageError", out  # what the keeper answers the daemon with
    message = out["error"]
    assert "\n" not in message
    assert f"is {HUGE} bytes, over the " in message
    assert "`torpor pool gc POOL`" in message
    assert out["grew"] < RSS_GROWTH, out
    assert _local_images(torpor_home) == before


# --- each object a pool holds is read under its own bound ---------------------------------


def test_every_pack_read_is_bounded_by_its_index(pool: Pool) -> None:
    rec = pool._record("app")
    assert rec.where is not None
    for pack_id in rec.where.packs:
        index = PackIndex.decode(pack_id, pool.backend.get(index_key(pack_id)))
        assert pack_limit(index) == index.size == pool.backend.size(pack_key(pack_id))
    assert pack_limit(None) == MAX_PACK


def test_a_list_object_is_bounded_by_its_file(pool: Pool) -> None:
    rec = pool._record("app")
    listed = [f for f in rec.files if f.list_id is not None]
    assert listed, "the pages file has a list object"
    for f in listed:
        assert f.list_id is not None
        assert pool.backend.size(list_key(f.list_id)) <= list_limit(f) < f.count * 32 + 4096


# In this process, an object one byte over its bound: were the bound not kept, reading it
# whole costs at most that (never 8 GiB in the test runner).
@pytest.mark.parametrize(
    ("key", "limit"),
    [
        ("torpor-pool.json", MAX_META),
        (image_key("app"), MAX_RECORD),
        (CONDEMNED_KEY, MAX_CONDEMNED),
    ],
    ids=["meta", "record", "condemned"],
)
def test_small_objects_one_byte_over_their_bound_are_refused(
    pool: Pool, key: str, limit: int
) -> None:
    if key == CONDEMNED_KEY:
        pool.backend.put(key, b"{}")
    root = pool.backend.root  # type: ignore[attr-defined]
    *dirs, name = key.split("/")
    path = Path(root, *(d + "+" for d in dirs), name)
    os.truncate(path, limit)
    try:  # at the bound: read (and then perhaps refused as malformed, not as too large)
        Pool("again", DirBackend(root), timing=FAST).pull("app")
    except TorporError as exc:
        assert "over the" not in str(exc)
    os.truncate(path, limit + 1)
    with pytest.raises(PoolError) as info:
        Pool("again", DirBackend(root), timing=FAST).pull("app")
    assert f"is {limit + 1} bytes, over the {limit} bytes" in str(info.value)


def test_a_list_object_one_byte_over_its_bound_is_refused(pool: Pool) -> None:
    rec = pool._record("app")
    f = next(f for f in rec.files if f.list_id is not None)
    assert f.list_id is not None
    root = pool.backend.root  # type: ignore[attr-defined]
    os.truncate(Path(root, "lists+", f.list_id), list_limit(f) + 1)
    fresh = Pool("again", DirBackend(root), timing=FAST, cache=False)
    with pytest.raises(PoolError) as info:
        fresh.pull("app")
    assert f"is {list_limit(f) + 1} bytes, over the {list_limit(f)} bytes" in str(info.value)


def test_a_pack_index_one_byte_over_its_bound_is_refused(pool: Pool) -> None:
    rec = pool._record("app")
    assert rec.where is not None
    pack_id = rec.where.packs[0]
    root = pool.backend.root  # type: ignore[attr-defined]
    os.truncate(Path(root, "index+", pack_id), MAX_INDEX + 1)
    fresh = Pool("again", DirBackend(root), timing=FAST, cache=False)
    with pytest.raises(PoolObjectTooLargeError) as info:
        fresh._load_indexes(strict=True)
    assert f"'index/{pack_id}'" in str(info.value)
    assert f"is {MAX_INDEX + 1} bytes, over the {MAX_INDEX} bytes" in str(info.value)
    # Not strict, it is skipped as a damaged one is: its chunks are in no pack.
    with pytest.raises(ImageCorruptedError, match=r"is in no pack of the pool"):
        fresh.pull("app")


class _Counted(io.BytesIO):
    """A stream recording how many bytes each read asked for."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.asked: list[int] = []

    def read(self, size: int | None = -1, /) -> bytes:
        self.asked.append(-1 if size is None else size)
        return super().read(size)


def test_a_stream_longer_than_it_said_is_refused_at_limit_plus_one() -> None:
    stream = _Counted(bytes(10 * MIB))
    with pytest.raises(PoolError) as info:
        read_at_most(stream, "packs/ab/x", "s3 pool b", MIB, expect=100)
    assert "is more than 1048576 bytes, over the 1048576 bytes" in str(info.value)
    assert all(n >= 0 for n in stream.asked) and sum(stream.asked) <= MIB + 1
    assert stream.asked[0] == 101  # the length it said, in one read


def test_a_stream_within_its_limit_is_read_whole() -> None:
    data = bytes(range(256)) * 4096 * 3  # 3 MiB, several blocks without ``expect``
    assert read_at_most(io.BytesIO(data), "k", "here", len(data)) == data
    assert read_at_most(io.BytesIO(data), "k", "here", len(data), expect=len(data)) == data
    assert read_at_most(io.BytesIO(b""), "k", "here", 0) == b""
