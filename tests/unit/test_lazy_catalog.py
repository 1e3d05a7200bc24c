"""The compact pool catalog a lazy restore reads before its first page (issue 10): pack
indexes kept as their tables, a chunk map built without an object per chunk, found the same
way as the old dict of entries did, and index cache files written only when asked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from torpor._paths import cache_dir
from torpor._pools._cas import ZERO_PAGE
from torpor._pools._memory import MemoryBackend
from torpor._pools._pack import ChunkEntry, Frame, PackIndex, index_key
from torpor._pools._reader import Catalog, PoolReader, Where
from torpor._pools._session import Condemned


def _index(pack_id: str, digests: list[bytes], created: float) -> PackIndex:
    frames = (Frame(8, 100, 4096 * len(digests), 1),)
    chunks = tuple(ChunkEntry(d, 0, i * 4096, 4096) for i, d in enumerate(digests))
    return PackIndex(pack_id, created, 4 << 20, frames, chunks)


def _naive(
    indexes: dict[str, PackIndex], condemned: Condemned
) -> dict[bytes, tuple[str, ChunkEntry]]:
    """The map as it was built before: a dict of entries, later packs winning."""
    order = sorted(indexes, key=lambda p: (p not in condemned.packs, indexes[p].created))
    out = {}
    for p in order:
        for c in indexes[p].chunks:
            out[c.digest] = (p, c)
    return out


def test_decoded_index_reads_its_table_like_the_objects() -> None:
    digests = [os.urandom(32) for _ in range(50)]
    idx = _index("a" * 32, digests, 1.0)
    back = PackIndex.decode(idx.pack_id, idx.encode())
    assert back == idx and back.count == 50
    assert back.digests() == digests
    assert [back.entry(i) for i in range(50)] == list(idx.chunks) == list(back.chunks)
    assert back.frame_chunks(0) == idx.chunks and back.frame_chunks(7) == ()


def test_where_finds_what_the_dict_of_entries_found() -> None:
    shared = [os.urandom(32) for _ in range(20)]
    indexes = {
        "a" * 32: _index("a" * 32, shared[:10] + [os.urandom(32) for _ in range(5)], 3.0),
        "b" * 32: _index("b" * 32, shared, 1.0),  # older: a's copies win
        "c" * 32: _index("c" * 32, shared[5:15], 9.0),  # newest, but condemned: loses
    }
    condemned = Condemned(frozenset({"c" * 32}), frozenset())
    naive = _naive(indexes, condemned)
    cat = Catalog(indexes, condemned)
    assert cat.where._built is None  # nothing built until asked
    wanted = [*naive, os.urandom(32)]
    located = cat.where.locate(wanted)
    assert cat.where._built is None  # locate did not need the whole map
    assert located == {d: p for d, (p, _) in naive.items()}
    for d in wanted:
        assert cat.where.get(d) == naive.get(d)
        assert cat.where.pack_of(d) == (naive[d][0] if d in naive else None)
    assert cat.where.locate(wanted) == located  # the same once built
    assert len(cat.where) == len(naive)
    kept = {d for p, i in indexes.items() if p != "c" * 32 for d in i.digests()}
    assert cat.present - kept == {ZERO_PAGE}


def test_catalog_saves_fetched_indexes_to_the_cache_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORPOR_HOME", str(tmp_path))
    backend = MemoryBackend()
    idx = _index("d" * 32, [os.urandom(32) for _ in range(3)], 1.0)
    backend.put(index_key(idx.pack_id), idx.encode())
    reader = PoolReader("p", backend, sessions=False)
    cached = cache_dir() / "index" / idx.pack_id
    cat = reader._catalog(save_later=True)
    assert cat.indexes == {idx.pack_id: idx}
    assert not cached.exists()
    cat.save_cache()
    assert cached.exists()
    cached.unlink()
    cat.save_cache()  # once only
    assert not cached.exists()
    reader._catalog()
    assert cached.exists()  # the default writes at once, as before


def test_where_of_no_pack() -> None:
    where = Where([])
    assert where.get(b"x" * 32) is None and where.locate([b"x" * 32]) == {}
