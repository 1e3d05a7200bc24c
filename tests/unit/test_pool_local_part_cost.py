"""What a lazy restore from a pool does per chunk before the resume is kept to the chunks it
wants: a pack's chunks are found by digest (``PackIndex.position``), not by a walk making an
entry of every chunk of the pack; the verified chunks are written in runs (``_poolfetch.
_write_runs``: one ``pwritev`` per run of chunks that continue each other in a file); and a
warm set the page server recorded, one range per page asked for, is stored coalesced."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from torpor._lazy import _poolfetch, _poolimage, _warm
from torpor._pools import MemoryBackend
from torpor._pools._pack import PackIndex, PackWriter, index_key, iter_pack, pack_key


def _pack(n: int, seed: int) -> tuple[MemoryBackend, PackIndex, dict[bytes, bytes]]:
    rng = random.Random(seed)
    chunks = {}
    for _ in range(n):
        data = rng.randbytes(4096)
        chunks[hashlib.sha256(data).digest()] = data
    backend = MemoryBackend()
    writer = PackWriter(backend)
    for d, data in chunks.items():
        writer.add(d, data)
    (idx,) = writer.finish()
    decoded = PackIndex.decode(idx.pack_id, backend.get(index_key(idx.pack_id)))
    return backend, decoded, chunks


def test_a_wanted_chunk_is_found_by_digest_without_an_entry_per_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend, idx, chunks = _pack(300, 1)
    made: list[int] = []
    real = PackIndex.entry
    monkeypatch.setattr(PackIndex, "entry", lambda self, i: made.append(i) or real(self, i))
    digests = list(chunks)
    wanted = {digests[5], digests[200], hashlib.sha256(b"in no pack").digest()}
    got = dict(iter_pack(backend.get(pack_key(idx.pack_id)), idx, wanted))
    assert got == {d: chunks[d] for d in (digests[5], digests[200])}
    assert sorted(made) == sorted([idx.position(digests[5]), idx.position(digests[200])])
    assert idx._chunks is None  # the pack's entries were never all made
    assert idx.position(digests[7]) == digests.index(digests[7])
    assert idx.position(b"\0" * 32) is None


def test_every_chunk_without_wanted_is_unchanged() -> None:
    backend, idx, chunks = _pack(50, 2)
    assert dict(iter_pack(backend.get(pack_key(idx.pack_id)), idx)) == chunks


def _pieces(fd: int, order: list[int]) -> list[tuple[int, int, bytes]]:
    return [(fd, i * 4096, bytes([i % 251]) * 4096) for i in order]


def test_chunks_are_written_in_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int]] = []
    real = os.pwritev

    def pwritev(fd: int, bufs: list[bytes], offset: int) -> int:
        calls.append((fd, offset, len(bufs)))
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    a = os.open(tmp_path / "a", os.O_RDWR | os.O_CREAT, 0o600)
    b = os.open(tmp_path / "b", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # a: 0-2 and 5-6 in a shuffled order; b: 3 alone; a run past IOV_MAX splits
        pieces = _pieces(a, [6, 1, 0, 5, 2]) + _pieces(b, [3]) + _pieces(a, list(range(10, 1040)))
        random.Random(3).shuffle(pieces)
        _poolfetch._write_runs(pieces)
        runs = [(a, 0, 3), (a, 5 * 4096, 2), (b, 3 * 4096, 1), (a, 10 * 4096, 1024)]
        assert sorted(calls) == sorted([*runs, (a, 1034 * 4096, 6)])
        for fd, order in ((a, [0, 1, 2, 5, 6, *range(10, 1040)]), (b, [3])):
            for i in order:
                assert os.pread(fd, 4096, i * 4096) == bytes([i % 251]) * 4096
        assert os.pread(a, 4096, 3 * 4096) == bytes(4096)  # a hole stays one
    finally:
        os.close(a)
        os.close(b)


def test_a_short_pwritev_is_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda fd, bufs, off: real(fd, [bufs[0][:100]], off))
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _poolfetch._write_runs(_pieces(fd, [0, 1, 2]))
        assert os.pread(fd, 3 * 4096, 0) == b"".join(bytes([i]) * 4096 for i in range(3))
    finally:
        os.close(fd)


def test_the_pools_warm_set_is_stored_coalesced(monkeypatch: pytest.MonkeyPatch) -> None:
    stored: dict[str, bytes] = {}

    class _Pool:
        backend: Any = type("B", (), {"put": lambda self, k, v: stored.__setitem__(k, v)})()

        def __enter__(self) -> _Pool:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr("torpor._pools.open_pool", lambda name: _Pool())
    image = object.__new__(_poolimage.PoolLazyImage)
    image.pool_name = "p"
    image.record = type("R", (), {"name": "app"})()
    image.manifest = type("M", (), {"id": "abc"})()
    pages = [("pages-1.img", i * 4096, 4096) for i in (0, 1, 2, 3, 9, 10, 4)]
    _poolimage.PoolLazyImage.save_warm(image, pages)
    data = json.loads(stored[_poolimage.warm_key("app")])
    assert data == {
        "image": "abc",
        "ranges": [["pages-1.img", 0, 4 * 4096], ["pages-1.img", 9 * 4096, 2 * 4096],
                   ["pages-1.img", 4 * 4096, 4096]],
    }  # fmt: skip
    assert [tuple(r) for r in data["ranges"]] == _warm.coalesce(pages)
