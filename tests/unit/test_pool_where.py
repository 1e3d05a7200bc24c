"""A record's ``where`` (issue 10): which pack holds each of its chunks, written at push, so a
lazy restore reads only the indexes of the packs it needs, not every index of the pool.

It is hostile input: a malformed one refuses the record at its parse boundary; one that puts a
chunk in a pack that does not hold it refuses the image naming the file and chunk (never a
hole, never another page); one naming a pack that is gone (what a collection's repack does to
a good one) or condemned falls back to every index; a record without one reads as before."""

from __future__ import annotations

import base64
import json
import struct
import uuid
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torpor._errors import ImageCorruptedError, PoolError, TorporError
from torpor._lazy import _poolimage
from torpor._lazy._source import LazyPageError, pool_source
from torpor._pools import _cas
from torpor._pools._backend import Backend
from torpor._pools._cache import drop_cached, read_cached
from torpor._pools._pack import MAX_INDEX, PackIndex, index_key
from torpor._pools._pool import Pool
from torpor._pools._record import NO_PACK, Locations, image_key
from torpor._pools._session import Condemned

from .test_pool_support import PAGE, make_image, new_mem_pool, random_pages

PAGES = 64


def _doc(pool: Pool, name: str) -> dict[str, Any]:
    return json.loads(zstandard.ZstdDecompressor().decompress(pool.backend.get(image_key(name))))


def _put_doc(pool: Pool, name: str, doc: dict[str, Any]) -> None:
    raw = json.dumps(doc).encode()
    pool.backend.put(image_key(name), zstandard.ZstdCompressor().compress(raw))


@pytest.fixture
def pool(tmp_path: Path, torpor_home: Path) -> Pool:
    """Two images, ``other`` pushed first: each has packs of its own."""
    p = new_mem_pool()
    p.push(make_image(tmp_path / "a", "other", bytes(random_pages(PAGES, seed=1))), "other")
    p.push(make_image(tmp_path / "b", "app", bytes(random_pages(PAGES, seed=2))), "app")
    return p


class _Counting:
    """A backend that counts listings and index reads."""

    def __init__(self, inner: Backend) -> None:
        self._inner = inner
        self.lists: list[str] = []
        self.index_gets: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def list(self, prefix: str = "") -> Any:
        self.lists.append(prefix)
        return self._inner.list(prefix)

    def get(self, key: str, limit: int | None = None) -> bytes:
        if key.startswith("index/"):
            self.index_gets.append(key)
        return self._inner.get(key, limit)


def _content(image: _poolimage.PoolLazyImage, name: str = "pages-1.img") -> bytes:
    return (image.path / name).read_bytes()


def test_push_says_where_every_chunk_is(pool: Pool) -> None:
    rec = pool._record("app")
    assert rec.where is not None
    find = rec.where.finder(rec.files)
    for f, digests in zip(rec.files, pool._resolve(rec), strict=True):
        for i, d in enumerate(digests):
            pack_id = find(f.name, i)
            assert pack_id is not None
            assert d in PackIndex.decode(pack_id, pool.backend.get(index_key(pack_id))).digests()


def test_a_copy_to_another_pool_says_where_its_chunks_are_there(pool: Pool) -> None:
    other = new_mem_pool("other")
    pool.copy_image("app", "app", to_pool=other)
    rec = other._record("app")
    assert rec.where is not None
    assert set(rec.where.packs) <= {k[len("index/") :] for k in other.backend.list("index/")}


def test_the_zero_page_is_in_no_pack(tmp_path: Path, torpor_home: Path) -> None:
    p = new_mem_pool()
    p.push(make_image(tmp_path / "z", "z", bytes(random_pages(8, zero_every=2))), "z")
    rec = p._record("z")
    assert rec.where is not None
    find = rec.where.finder(rec.files)
    assert find("pages-1.img", 0) is None and find("pages-1.img", 1) is not None


def test_a_lazy_restore_reads_only_the_indexes_of_its_packs(pool: Pool) -> None:
    counting = _Counting(pool.backend)
    pool.backend = counting  # type: ignore[assignment]
    image = _poolimage.materialise(pool, "app")
    try:
        assert "index/" not in counting.lists  # no catalog of the pool
        wanted = {f"index/{p}" for p in pool._record("app").where.packs}  # type: ignore[union-attr]
        assert set(counting.index_gets) <= wanted
        assert _content(image) == bytes(random_pages(PAGES, seed=2))
        source = pool_source(pool, "app", prepared=image._prepared)  # the keeper's, no catalog
        try:
            assert (
                source.read("pages-1.img", 5 * PAGE, PAGE)
                == bytes(random_pages(PAGES, seed=2))[5 * PAGE : 6 * PAGE]
            )
        finally:
            source.close()
        assert "index/" not in counting.lists
    finally:
        image.discard()


def test_a_record_without_where_restores_through_the_catalog(pool: Pool) -> None:
    doc = _doc(pool, "app")
    del doc["where"]
    _put_doc(pool, "app", doc)
    assert pool._record("app").where is None
    image = _poolimage.materialise(pool, "app")
    try:
        assert _content(image) == bytes(random_pages(PAGES, seed=2))
    finally:
        image.discard()


def _runs(*pairs: tuple[int, int]) -> str:
    return base64.b64encode(b"".join(struct.pack("<II", n, c) for n, c in pairs)).decode()


def _chunks(pool: Pool) -> int:
    return sum(f.count for f in pool._record("app").files)


@pytest.mark.parametrize(
    "where",
    [
        None,
        [],
        {"packs": []},
        {"packs": [], "runs": "", "more": 1},
        {"packs": "x" * 32, "runs": ""},
        {"packs": ["../../etc"], "runs": ""},
        {"packs": ["A" * 32], "runs": ""},
        {"packs": ["a" * 32, "a" * 32], "runs": ""},
        {"packs": ["a" * 32], "runs": 7},
        {"packs": ["a" * 32], "runs": "not base64!"},
        {"packs": ["a" * 32], "runs": base64.b64encode(b"123").decode()},  # not whole runs
        {"packs": ["a" * 32], "runs": "AAAA" * 10_000_000},  # longer than any record's runs
        "COUNT",  # runs that do not cover the record's chunks
        "RANGE",  # a pack number past the list
        "ZERO",  # an empty run
    ],
)
def test_a_malformed_where_refuses_the_record(pool: Pool, where: Any) -> None:
    doc = _doc(pool, "app")
    n = _chunks(pool)
    if where == "COUNT":
        where = {"packs": ["a" * 32], "runs": _runs((0, n - 1))}
    elif where == "RANGE":
        where = {"packs": ["a" * 32], "runs": _runs((0, n - 1), (1, 1))}
    elif where == "ZERO":
        where = {"packs": ["a" * 32], "runs": _runs((0, n), (0, 0))}
    doc["where"] = where
    _put_doc(pool, "app", doc)
    with pytest.raises(ImageCorruptedError, match=r"manifest of image 'app' .* damaged \(where"):
        pool._record("app")


def _lie(pool: Pool, target: str) -> None:
    """Make ``app``'s record put every chunk in pack ``target``."""
    doc = _doc(pool, "app")
    doc["where"] = Locations((target,), struct.pack("<II", 0, _chunks(pool))).to_dict()
    _put_doc(pool, "app", doc)


def _a_pack_of(pool: Pool, name: str) -> str:
    rec = pool._record(name)
    assert rec.where is not None
    return rec.where.packs[0]


def test_a_chunk_put_in_a_pack_that_lacks_it_refuses_the_image(pool: Pool) -> None:
    _lie(pool, _a_pack_of(pool, "other"))  # a real pack, none of app's chunks
    with pytest.raises(ImageCorruptedError) as info:
        _poolimage.materialise(pool, "app")
    assert "where its record says it is" in str(info.value)
    assert "file " in str(info.value) and "chunk " in str(info.value)
    assert not list((Path(_poolimage.lazy_pool_dir())).glob("*/image"))  # nothing left


def test_a_chunk_put_in_no_pack_refuses_the_image(pool: Pool) -> None:
    doc = _doc(pool, "app")
    doc["where"] = Locations((), struct.pack("<II", NO_PACK, _chunks(pool))).to_dict()
    _put_doc(pool, "app", doc)
    with pytest.raises(ImageCorruptedError, match="is in no pack, its record says"):
        _poolimage.materialise(pool, "app")


def test_the_page_source_refuses_a_lazy_chunk_put_in_the_wrong_pack(pool: Pool) -> None:
    image = _poolimage.materialise(pool, "app")  # the record sound while it was fetched
    try:
        prepared = image._prepared
        assert prepared is not None and prepared.located is not None
        # Its record's where then lies about the lazy chunks (as the served record: same).
        lying = Locations((_a_pack_of(pool, "other"),), struct.pack("<II", 0, _chunks(pool)))
        from dataclasses import replace

        from torpor._pools._located import Located

        rec = replace(prepared.record, where=lying)
        doc = _doc(pool, "app")
        doc["where"] = lying.to_dict()
        _put_doc(pool, "app", doc)
        assert pool._record("app") == rec
        bad = replace(prepared, record=rec, located=Located(rec, lambda *_: None), packs={})
        source = pool_source(pool, "app", prepared=bad)
        try:
            with pytest.raises(LazyPageError, match="where its record says it is") as info:
                source.read("pages-1.img", 9 * PAGE, PAGE)
            assert info.value.file == "pages-1.img" and info.value.chunk is not None
            assert info.value.chunk.startswith("9 ")
        finally:
            source.close()
    finally:
        image.discard()


def test_a_pack_gone_since_the_push_falls_back_to_every_index(pool: Pool) -> None:
    _lie(pool, uuid.uuid4().hex)  # as after a repack: the pack it names is no more
    image = _poolimage.materialise(pool, "app")
    try:
        assert _content(image) == bytes(random_pages(PAGES, seed=2))
        source = pool_source(pool, "app", prepared=image._prepared)
        try:
            assert source.read("pages-1.img", 0, PAGE) == bytes(random_pages(PAGES, seed=2))[:PAGE]
        finally:
            source.close()
    finally:
        image.discard()


def test_a_condemned_pack_falls_back_to_every_index(pool: Pool) -> None:
    counting = _Counting(pool.backend)
    pool.backend = counting  # type: ignore[assignment]
    Condemned(frozenset({_a_pack_of(pool, "app")}), frozenset()).store(pool.backend)
    image = _poolimage.materialise(pool, "app")
    try:
        assert "index/" in counting.lists  # the catalog of the pool
        assert _content(image) == bytes(random_pages(PAGES, seed=2))
    finally:
        image.discard()


def test_digests_are_the_decoded_list() -> None:
    raw = b"".join(bytes([i]) * 32 for i in range(10))
    lazy, full = _cas.Digests(raw), _cas.decode_list(raw)
    assert len(lazy) == 10 and list(lazy) == full and lazy == full
    assert lazy[3] == full[3] and lazy[-1] == full[-1] and lazy[2:5] == full[2:5]
    with pytest.raises(IndexError):
        lazy[10]
    with pytest.raises(ValueError, match="not a multiple"):
        _cas.Digests(raw + b"x")


def test_a_lazy_restore_writes_the_list_cache_only_once_discarded(
    tmp_path: Path, torpor_home: Path
) -> None:
    p = new_mem_pool()
    pages = bytes(random_pages(80, seed=3))  # over INLINE_MAX chunks: a list object
    p.push(make_image(tmp_path / "l", "app", pages), "app")
    [list_id] = p._record("app").list_ids
    drop_cached("lists", list_id)
    image = _poolimage.materialise(p, "app")
    try:
        assert read_cached("lists", list_id) is None  # not on the path to the resume
        assert _content(image) == pages
    finally:
        image.discard()
    assert read_cached("lists", list_id) == p.backend.get(f"lists/{list_id}")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_well_formed_lie_gives_the_right_pages_or_a_refusal(
    pool: Pool, data: st.DataObject
) -> None:
    """Runs of any length over the packs of both images, a pack that does not exist, and no
    pack: the local part is exactly the image, or the restore is refused; never other bytes."""
    # Every pack of the pool (both images'), and one that does not exist.
    packs = [*sorted(k[len("index/") :] for k in pool.backend.list("index/")), "0" * 32]
    left = _chunks(pool)
    runs: list[tuple[int, int]] = []
    while left:
        count = data.draw(st.integers(1, left))
        n = data.draw(st.sampled_from([*range(len(packs)), NO_PACK]))
        runs.append((n, count))
        left -= count
    doc = _doc(pool, "app")
    doc["where"] = {"packs": packs, "runs": _runs(*runs)}
    _put_doc(pool, "app", doc)
    try:
        image = _poolimage.materialise(pool, "app")
    except TorporError:
        return
    try:
        assert _content(image) == bytes(random_pages(PAGES, seed=2))
        source = pool_source(pool, "app", prepared=image._prepared)
        try:
            page = data.draw(st.integers(0, PAGES - 1))
            try:
                got = source.read("pages-1.img", page * PAGE, PAGE)
            except LazyPageError:
                return
            assert got == bytes(random_pages(PAGES, seed=2))[page * PAGE : (page + 1) * PAGE]
        finally:
            source.close()
    finally:
        image.discard()


class _Failing:
    """A backend whose index reads fail once :attr:`broken` is set (a transport error)."""

    def __init__(self, inner: Backend, error: Exception) -> None:
        self._inner = inner
        self._error = error
        self.broken = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get(self, key: str, limit: int | None = None) -> bytes:
        if self.broken and key.startswith("index/"):
            raise self._error
        return self._inner.get(key, limit)


@pytest.mark.parametrize(
    "error",
    [
        None,  # the index object is one byte over its bound
        PoolError("ceph pool p: reading 'index/x' timed out", pool="p"),
        OSError(5, "Input/output error"),
    ],
    ids=["oversized", "transport", "oserror"],
)
def test_an_index_the_page_source_cannot_read_is_the_chunk_s_bad_page(
    pool: Pool, error: Exception | None
) -> None:
    from dataclasses import replace

    from torpor._pools._located import Located

    rec = pool._record("app")
    assert rec.where is not None
    pack_id = rec.where.finder(rec.files)("pages-1.img", 9)
    assert pack_id is not None
    failing = _Failing(pool.backend, error or PoolError("unused"))
    fresh = Pool("mem", failing, cache=False)  # type: ignore[arg-type]
    image = _poolimage.materialise(fresh, "app")
    prepared = image._prepared
    assert prepared is not None and prepared.located is not None
    # No index read yet and no pack at hand: the chunk's index is read through ``where``.
    unread = replace(prepared, located=Located(prepared.record, lambda *_: None), packs={})
    source = pool_source(fresh, "app", prepared=unread)
    try:
        if error is None:
            pool.backend.put(index_key(pack_id), bytes(MAX_INDEX + 1))
        else:
            failing.broken = True
        with pytest.raises(LazyPageError) as info:
            source.read("pages-1.img", 9 * PAGE, PAGE)
        assert info.value.file == "pages-1.img" and info.value.chunk is not None
        assert info.value.chunk.startswith("9 ")
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith("image 'app' in pool 'mem': file pages-1.img, chunk 9 ")
        if error is None:
            assert f"is {MAX_INDEX + 1} bytes, over the {MAX_INDEX} bytes" in message
        else:
            assert f"cannot be fetched: {error}" in message
    finally:
        source.close()
        image.discard()
