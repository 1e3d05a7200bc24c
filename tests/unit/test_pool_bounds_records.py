"""A hostile record's own numbers never set a read bound beyond what torpor writes.

The chunk-list bound comes from the record (its file's chunk count): a record naming a
16 TiB file must not make an 8 GiB list object (a sparse file in a ``dir`` pool) be read
whole. The read runs in a child under an address-space limit far below 8 GiB, as in
:mod:`tests.unit.test_pool_bounds`; nothing of GiB size is read in the test runner.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import zstandard

from torpor._errors import ImageCorruptedError, PoolError
from torpor._pools import Pool, _reader
from torpor._pools._backend import PoolObjectTooLargeError
from torpor._pools._dir import DirBackend
from torpor._pools._gc import GC_LOCK_PREFIX, wait_for_sessions
from torpor._pools._memory import MemoryBackend
from torpor._pools._pack import (
    MAX_INDEX,
    MAX_PACK_CHUNKS,
    PACK_TARGET,
    PackIndex,
    PackWriter,
    index_key,
)
from torpor._pools._record import MAX_FILE_SIZE, MAX_LIST, _compress_bound, image_key, list_limit
from torpor._pools._session import MAX_BEAT, SESSIONS_PREFIX, read_beat

from .capped import AS_HEADROOM, HOSTILE_DIR_POOL, HUGE, RSS_GROWTH, run_capped
from .test_pool_support import FAST, make_image, random_pages

_SETUP = (
    HOSTILE_DIR_POOL
    + """
    def run(args):
        if op == "list":
            rec = pool._record("app")
            (f,) = [f for f in rec.files if f.list_id is not None]
            pool._load_list(f)
        elif op == "catalog":
            pool._catalog()
"""
)


def _child(op: str, root: str, headroom: str) -> dict[str, Any]:
    return run_capped(_SETUP, int(headroom), op, root)


@pytest.fixture
def pool(tmp_path: Path, torpor_home: Path) -> Pool:
    """A dir pool holding image ``app`` (its pages file's chunk list in a list object)."""
    p = Pool("hostile", DirBackend(tmp_path / "pool"), timing=FAST)
    p.push(make_image(tmp_path / "local", "app", bytes(random_pages(300, seed=5))), "app")
    return p


def _doc(pool: Pool) -> dict[str, Any]:
    raw = zstandard.ZstdDecompressor().decompress(pool.backend.get(image_key("app")))
    doc: dict[str, Any] = json.loads(raw)
    return doc


def _put_doc(pool: Pool, doc: dict[str, Any]) -> None:
    raw = json.dumps(doc).encode()
    pool.backend.put(image_key("app"), zstandard.ZstdCompressor().compress(raw))


def _grow_listed_file(doc: dict[str, Any], size: int, chunk_size: int | None = None) -> str:
    """Make the record's listed file ``size`` bytes (in the record and its manifest, as an
    attacker who writes the record would; unsigned, no ``where``); its list id."""
    doc.pop("signature", None)
    doc.pop("where", None)
    (f,) = [f for f in doc["files"] if "list" in f]
    f["size"] = size
    if chunk_size is not None:
        f["chunk_size"] = chunk_size
    (m,) = [m for m in doc["manifest"]["files"] if m["name"] == f["name"]]
    m["size"] = size
    return str(f["list"])


def test_a_huge_file_s_list_object_is_refused_unread(pool: Pool) -> None:
    doc = _doc(pool)
    list_id = _grow_listed_file(doc, MAX_FILE_SIZE)  # 2^32 pages: 128 GiB of digests
    _put_doc(pool, doc)
    (f,) = [f for f in pool._record("app").files if f.list_id is not None]
    bound = list_limit(f)
    assert bound == _compress_bound(MAX_LIST)  # not the 128 GiB the count says
    root = pool.backend.root  # type: ignore[attr-defined]
    os.truncate(Path(root, "lists+", list_id), HUGE)  # a hole: 8 GiB to whoever reads it
    out = _child("list", str(root), str(AS_HEADROOM))
    assert out["type"] == "PoolObjectTooLargeError", out
    assert "\n" not in out["error"]
    assert f"'lists/{list_id}'" in out["error"]
    assert f"is {HUGE} bytes, over the {bound} bytes" in out["error"]
    assert out["grew"] < RSS_GROWTH, out


@pytest.mark.parametrize("chunk_size", [1, 512, 8192, 64 << 20])
def test_a_chunk_size_torpor_never_writes_is_refused(pool: Pool, chunk_size: int) -> None:
    doc = _doc(pool)
    _grow_listed_file(doc, MAX_FILE_SIZE, chunk_size)
    _put_doc(pool, doc)
    with pytest.raises(ImageCorruptedError) as info:
        pool._record("app")
    assert f"chunk size {chunk_size} is out of range (torpor writes 4096 or 1048576)" in str(
        info.value
    )


# --- pack indexes: bounded by what the packer writes, decoded as they arrive ---------------


def test_the_packer_s_largest_index_is_within_max_index() -> None:
    backend = MemoryBackend()
    writer = PackWriter(backend, pack_target=PACK_TARGET)
    for n in range(MAX_PACK_CHUNKS + 5):  # one byte each: the most chunks a pack can take
        writer.add(os.urandom(32), n.to_bytes(4, "little")[:1])
    indexes = writer.finish()
    assert sorted(i.count for i in indexes) == [5, MAX_PACK_CHUNKS]
    big = max(indexes, key=lambda i: i.count)
    blob = backend.get(index_key(big.pack_id))
    assert len(blob) <= MAX_INDEX < 16 << 20  # its digests are random: stored all but raw
    assert PackIndex.decode(big.pack_id, blob) == big
    # Every frame its own chunk, the most frames an index can have: still within.
    frames = tuple(big.frames[0].__class__(n, 1, 1, 0) for n in range(MAX_PACK_CHUNKS))
    worst = PackIndex(big.pack_id, big.created, big.size, frames, table=big.table)
    assert len(worst.encode()) <= MAX_INDEX


INDEXES = 128  # sparse objects of MAX_INDEX bytes: ~1.8 GiB if every one were kept


def test_the_catalog_holds_a_window_of_index_blobs_not_all(pool: Pool) -> None:
    root = pool.backend.root  # type: ignore[attr-defined]
    for n in range(INDEXES):
        path = Path(root, "index+", f"{n:032x}")
        path.touch()
        os.truncate(path, MAX_INDEX)  # at the bound: read, then skipped as damaged
    out = _child("catalog", str(root), str(3 << 30))
    assert out["type"] is None, out
    assert out["grew"] < INDEXES * MAX_INDEX // 2, out  # at most the fetch window's


def test_a_listing_s_records_are_bounded_in_total(
    pool: Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool.push(make_image(tmp_path / "other", "app", bytes(random_pages(50, seed=6))), "web")
    held = [pool._record(n).held for n in ("app", "web")]
    monkeypatch.setattr(_reader, "MAX_RECORDS_TOTAL", sum(held))
    assert len(pool.list_images()) == 2  # at the bound
    monkeypatch.setattr(_reader, "MAX_RECORDS_TOTAL", sum(held) - 1)
    with pytest.raises(PoolError) as info:
        pool.list_images()
    message = str(info.value)
    assert "\n" not in message
    assert f"its image manifests hold over {sum(held) - 1} bytes" in message


# --- an oversized beat or index: typed, and what can be skipped is ------------------------


def test_an_oversized_session_beat_is_a_long_dead_one(pool: Pool) -> None:
    key = SESSIONS_PREFIX + "0" * 20 + "-" + "a" * 32
    pool.backend.put(key, b" " * (MAX_BEAT + 1))  # one over: in this process, 64 KiB
    assert read_beat(pool.backend, key) == {"beat": 0.0}
    lock = GC_LOCK_PREFIX + "0" * 20 + "-" + "b" * 32
    pool.backend.put(lock, b" " * (MAX_BEAT + 1))
    # Neither blocks a collection: each is deleted as stale.
    assert wait_for_sessions(pool.backend, {key}, FAST, timeout=5.0, pool="hostile") < 5.0
    pool.gc(wait=5.0)
    assert not pool.backend.exists(key) and not pool.backend.exists(lock)


def test_a_beat_that_cannot_be_read_otherwise_is_not_taken_for_dead(pool: Pool) -> None:
    class Broken:
        def get(self, key: str, limit: int | None = None) -> bytes:
            raise PoolError("ceph pool p: timed out")

    with pytest.raises(PoolError, match="timed out"):
        read_beat(Broken(), "sessions/x")  # type: ignore[arg-type]


def test_an_oversized_index_is_skipped_unless_strict(pool: Pool, tmp_path: Path) -> None:
    (pack_id,) = [k[len("index/") :] for k in pool.backend.list("index/")]
    pool.push(make_image(tmp_path / "b", "b", bytes(random_pages(20, seed=7))), "b")
    root = pool.backend.root  # type: ignore[attr-defined]
    os.truncate(Path(root, "index+", pack_id), MAX_INDEX + 1)
    fresh = Pool("again", DirBackend(root), timing=FAST, cache=False)
    indexes = fresh._load_indexes()
    assert pack_id not in indexes and indexes  # the others are read
    with pytest.raises(PoolObjectTooLargeError) as info:
        fresh._load_indexes(strict=True)
    assert (info.value.key, info.value.size, info.value.limit) == (
        index_key(pack_id),
        MAX_INDEX + 1,
        MAX_INDEX,
    )
