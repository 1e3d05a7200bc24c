"""Page sources: a local image (verified whole unless its stamp vouches for it, and never
served once changed) and a pool image (only the packs covering a read are fetched, every
chunk checked against its SHA-256, errors naming image, file and chunk)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from torpor._images._layout import VERIFIED_NAME
from torpor._lazy._source import LazyPageError, Prepared, local_source, pool_source
from torpor._pools import _cas
from torpor._pools._pack import PackIndex, pack_key
from torpor._pools._pool import Pool
from torpor._pools._reader import Catalog
from torpor._pools._session import Condemned

from .test_pool_support import PAGE, make_image, new_mem_pool, random_pages


def _image(tmp_path: Path, pages: bytes):  # type: ignore[no-untyped-def]
    return make_image(tmp_path / "images", "app", pages)


def test_local_reads_exact_bytes_of_a_trusted_image(tmp_path: Path, torpor_home: Path) -> None:
    pages = bytes(random_pages(8))
    image = _image(tmp_path, pages)
    assert image.trusted()
    source = local_source(image)
    try:
        assert source.read("pages-1.img", 3 * PAGE, 2 * PAGE) == pages[3 * PAGE : 5 * PAGE]
        with pytest.raises(LazyPageError, match=r"has no bytes 28672\.\.36864"):
            source.read("pages-1.img", 7 * PAGE, 2 * PAGE)
        with pytest.raises(LazyPageError, match="is not a pages file"):
            source.read("core-1.img", 0, 10)
    finally:
        source.close()


def test_local_untrusted_image_is_hashed_first_and_refused_if_bad(
    tmp_path: Path, torpor_home: Path
) -> None:
    pages = bytearray(random_pages(8))
    image = _image(tmp_path, bytes(pages))
    os.unlink(image.path / VERIFIED_NAME)  # no stamp: nothing vouches for the files
    local_source(image).close()  # hashed whole, good
    pages[5 * PAGE + 7] ^= 1
    (image.path / "pages-1.img").write_bytes(bytes(pages))  # same size, other bytes
    with pytest.raises(LazyPageError) as info:
        local_source(image)
    assert info.value.file == "pages-1.img" and info.value.chunk is None
    assert "does not match its SHA-256" in str(info.value)


def test_local_file_changed_after_the_check_is_not_served(
    tmp_path: Path, torpor_home: Path
) -> None:
    pages = bytes(random_pages(8))
    image = _image(tmp_path, pages)
    source = local_source(image)
    try:
        assert source.read("pages-1.img", 0, PAGE) == pages[:PAGE]
        time.sleep(0.01)
        with open(image.path / "pages-1.img", "r+b") as fh:
            fh.seek(PAGE)
            fh.write(b"X")
        with pytest.raises(LazyPageError, match="changed after it was verified"):
            source.read("pages-1.img", PAGE, PAGE)
    finally:
        source.close()


def _pool_with(tmp_path: Path, pages: bytes) -> Pool:
    pool = new_mem_pool()
    pool.push(_image(tmp_path, pages), "app")
    return pool


def test_pool_reads_fetch_only_the_packs_they_cover(tmp_path: Path, torpor_home: Path) -> None:
    pages = bytes(random_pages(3000, zero_every=10))  # ~12 MiB: several 4 MiB packs
    pool = _pool_with(tmp_path, pages)
    packs = [k for k in pool.backend.list("packs/")]
    assert len(packs) >= 3
    source = pool_source(pool, "app")
    try:
        assert (
            source.read("pages-1.img", 11 * PAGE + 100, 3 * PAGE)
            == pages[11 * PAGE + 100 : 14 * PAGE + 100]
        )
        assert source.fetches == 1
        assert source.read("pages-1.img", 12 * PAGE, PAGE) == pages[12 * PAGE : 13 * PAGE]
        assert source.fetches == 1  # cached
        assert source.read("pages-1.img", 20 * PAGE, PAGE) == bytes(PAGE)  # a zero page
        assert source.read("pages-1.img", 2990 * PAGE, 10 * PAGE) == pages[2990 * PAGE :]
        assert source.fetches == 2
        with pytest.raises(LazyPageError, match="has no bytes"):
            source.read("pages-1.img", 2999 * PAGE, 2 * PAGE)
    finally:
        source.close()
    assert not list(pool.backend.list("sessions/"))  # the session ended with the source


def test_pool_prefetch_fills_the_cache_in_the_background(tmp_path: Path, torpor_home: Path) -> None:
    pages = bytes(random_pages(2000))
    pool = _pool_with(tmp_path, pages)
    source = pool_source(pool, "app")
    try:
        source.prefetch([("pages-1.img", 1500 * PAGE, 4 * PAGE), ("pages-1.img", 0, PAGE)])
        deadline = time.monotonic() + 5
        while source.fetches < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert source.fetches == 2
        time.sleep(0.05)
        assert source.read("pages-1.img", 1501 * PAGE, PAGE) == pages[1501 * PAGE : 1502 * PAGE]
        assert source.read("pages-1.img", 0, PAGE) == pages[:PAGE]
        assert source.fetches == 2
    finally:
        source.close()


def _flip(pool: Pool, digest: bytes) -> None:
    for key in list(pool.backend.list("index/")):
        index = PackIndex.decode(key.split("/", 1)[1], pool.backend.get(key))
        for c in index.chunks:
            if c.digest == digest:
                f = index.frames[c.frame]
                assert f.codec == 0  # random pages are stored raw
                data = bytearray(pool.backend.get(pack_key(index.pack_id)))
                data[f.offset + c.offset + 9] ^= 0x80
                pool.backend.put(pack_key(index.pack_id), bytes(data))
                return
    raise AssertionError("chunk not found")


def test_pool_bad_chunk_is_named_and_never_returned(tmp_path: Path, torpor_home: Path) -> None:
    pages = bytes(random_pages(64))
    pool = _pool_with(tmp_path, pages)
    rec = pool._record("app")
    digests = dict(zip((f.name for f in rec.files), pool._resolve(rec), strict=True))
    bad = digests["pages-1.img"][17]
    _flip(pool, bad)
    source = pool_source(pool, "app")
    try:
        assert source.read("pages-1.img", 16 * PAGE, PAGE) == pages[16 * PAGE : 17 * PAGE]
        with pytest.raises(LazyPageError) as info:
            source.read("pages-1.img", 16 * PAGE, 2 * PAGE)
        err = info.value
        assert (err.image, err.file, err.chunk) == (
            "app",
            "pages-1.img",
            f"17 (sha256 {bad.hex()})",
        )
        assert str(err).startswith(
            f"image 'app' in pool 'mem': file pages-1.img, chunk 17 (sha256 {bad.hex()}) in pack "
        )
        assert "does not match its SHA-256" in str(err)
    finally:
        source.close()


def test_pool_missing_pack_is_named(tmp_path: Path, torpor_home: Path) -> None:
    pages = bytes(random_pages(16))
    pool = _pool_with(tmp_path, pages)
    for key in list(pool.backend.list("packs/")):
        pool.backend.delete(key)
    source = pool_source(pool, "app")
    try:
        with pytest.raises(LazyPageError, match=r"chunk 3 \(sha256 [0-9a-f]{64}\) is in pack"):
            source.read("pages-1.img", 3 * PAGE, PAGE)
    finally:
        source.close()


def test_zero_pages_need_no_fetch(tmp_path: Path, torpor_home: Path) -> None:
    pool = _pool_with(tmp_path, bytes(8 * PAGE))
    source = pool_source(pool, "app")
    try:
        assert source.read("pages-1.img", 0, 8 * PAGE) == bytes(8 * PAGE)
        assert source.fetches == 0
    finally:
        source.close()
    assert _cas.ZERO_PAGE  # the all-zero page is never stored


def _prepared(pool: Pool, name: str = "app") -> Prepared:
    rec = pool._record(name)
    return Prepared(rec, pool._resolve(rec), pool._catalog())


def _catalogs_read(pool: Pool) -> list[int]:
    """Start counting the pool catalogs read (every pack index decoded)."""
    seen: list[int] = []
    read = pool._catalog

    def counted() -> Catalog:
        catalog = read()
        seen.append(len(catalog.indexes))
        return catalog

    pool._catalog = counted  # type: ignore[method-assign]
    return seen


def test_pool_source_uses_what_was_prepared_for_the_same_record(
    tmp_path: Path, torpor_home: Path
) -> None:
    pages = bytes(random_pages(1500))
    pool = _pool_with(tmp_path, pages)
    prepared = _prepared(pool)
    reads = _catalogs_read(pool)
    source = pool_source(pool, "app", prepared=prepared)
    try:
        assert source.read("pages-1.img", 1200 * PAGE, PAGE) == pages[1200 * PAGE : 1201 * PAGE]
    finally:
        source.close()
    assert reads == []  # no catalog read again
    # The image replaced in the pool since: what was prepared is not used.
    other = bytes(random_pages(1500))
    pool.delete_image("app")
    pool.push(make_image(tmp_path / "other", "app", other), "app")
    source = pool_source(pool, "app", prepared=prepared)
    try:
        assert source.record != prepared.record
        assert source.read("pages-1.img", 7 * PAGE, PAGE) == other[7 * PAGE : 8 * PAGE]
    finally:
        source.close()
    assert reads  # read afresh


def _move_pack(pool: Pool, digest: bytes) -> str:
    """Store the pack holding ``digest`` under a new id and delete the old one (what a
    collection's repack and sweep do between two sessions); the old id."""
    for key in list(pool.backend.list("index/")):
        old = key.split("/", 1)[1]
        index = PackIndex.decode(old, pool.backend.get(key))
        if any(c.digest == digest for c in index.chunks):
            new = uuid.uuid4().hex
            pool.backend.put(pack_key(new), pool.backend.get(pack_key(old)))
            pool.backend.put(f"index/{new}", pool.backend.get(key))
            pool.backend.delete(key)
            pool.backend.delete(pack_key(old))
            return old
    raise AssertionError("chunk not found")


def test_pool_source_prepared_before_a_sweep_looks_again(tmp_path: Path, torpor_home: Path) -> None:
    pages = bytes(random_pages(64))
    pool = _pool_with(tmp_path, pages)
    prepared = _prepared(pool)
    digest = prepared.lists[[f.name for f in prepared.record.files].index("pages-1.img")][5]
    _move_pack(pool, digest)
    source = pool_source(pool, "app", prepared=prepared)
    try:
        assert source.read("pages-1.img", 5 * PAGE, PAGE) == pages[5 * PAGE : 6 * PAGE]
    finally:
        source.close()


def test_pool_source_prepared_with_a_condemned_pack_reads_a_fresh_catalog(
    tmp_path: Path, torpor_home: Path
) -> None:
    pool = _pool_with(tmp_path, bytes(random_pages(64)))
    prepared = _prepared(pool)
    Condemned(frozenset(prepared.catalog.indexes), frozenset()).store(pool.backend)
    reads = _catalogs_read(pool)
    pool_source(pool, "app", prepared=prepared).close()
    assert reads == [len(prepared.catalog.indexes)]
