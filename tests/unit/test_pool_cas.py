"""Chunking, chunk-list patches, and the deduplication arithmetic of pools."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._pools import MemoryBackend, Pool, _cas

from .test_pool_support import (
    FAST,
    PAGE,
    make_image,
    new_mem_pool,
    random_pages,
    stored_total,
    touch_pages,
)


@pytest.fixture
def mem_pool(torpor_home: Path) -> Iterator[Pool]:
    pool = new_mem_pool()
    yield pool
    pool.close()


def test_pages_files_are_cut_in_pages_and_others_in_mib() -> None:
    assert _cas.chunk_size_for("pages-1.img") == PAGE
    assert _cas.chunk_size_for("pages-12.img") == PAGE
    assert _cas.chunk_size_for("pagemap-1.img") == 1 << 20
    assert _cas.chunk_size_for("core-1.img") == 1 << 20


def test_iter_chunks_and_lengths_agree() -> None:
    data = random.Random(0).randbytes(3 * PAGE + 100)
    chunks = [bytes(c) for c in _cas.iter_chunks(io.BytesIO(data), PAGE)]
    assert b"".join(chunks) == data
    assert [len(c) for c in chunks] == list(_cas.chunk_lengths(len(data), PAGE))
    assert _cas.chunk_count(len(data), PAGE) == 4
    assert list(_cas.chunk_lengths(0, PAGE)) == []


def test_zero_page_has_a_fixed_id() -> None:
    assert _cas.digest(bytes(PAGE)) == _cas.ZERO_PAGE
    assert _cas.digest(b"x" * PAGE) != _cas.ZERO_PAGE


def _digests(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_patch_round_trip_on_edits(seed: int) -> None:
    rng = random.Random(seed)
    base = _digests(2000, seed)
    new = list(base)
    for i in rng.sample(range(len(new)), 20):  # scattered changes
        new[i] = rng.randbytes(32)
    del new[500:530]  # memory unmapped
    new[1000:1000] = _digests(40, seed + 100)  # memory mapped
    new += [_cas.ZERO_PAGE] * 30
    patch = _cas.make_patch(base, new)
    assert _cas.apply_patch(base, patch) == new
    # ~20 changed + 40 inserted + 30 zero digests of 32 bytes, plus a few ops
    assert len(patch) < 32 * 100 + 200


def test_patch_of_unrelated_lists_is_all_literals() -> None:
    base, new = _digests(100, 1), _digests(100, 2)
    assert _cas.apply_patch(base, _cas.make_patch(base, new)) == new
    assert _cas.apply_patch([], _cas.make_patch([], new)) == new
    assert _cas.apply_patch(base, _cas.make_patch(base, [])) == []


@pytest.mark.parametrize(
    "patch", [b"\x01\x05", b"\x01\x00\xff\x01", b"\x02\x05abc", b"\x09", b"\x01\x80"]
)
def test_malformed_patches_are_refused(patch: bytes) -> None:
    with pytest.raises(ValueError):
        _cas.apply_patch(_digests(10, 0), patch)


def test_one_percent_changed_costs_about_one_percent(torpor_home: Path, tmp_path: Path) -> None:
    backend = MemoryBackend()
    pool = Pool("p", backend, timing=FAST)
    pages = random_pages(4096)  # 16 MiB, incompressible
    full = pool.push(make_image(tmp_path, "c0", bytes(pages)), "c0")
    touched = touch_pages(pages, 0.01, random.Random(7))
    second = pool.push(make_image(tmp_path, "c1", bytes(pages)), "c1")
    changed_bytes = touched * PAGE
    # the changed pages themselves, plus a patch (~33 bytes a page), indexes and a manifest
    assert changed_bytes <= second.stored_bytes < changed_bytes * 1.3
    assert second.stored_bytes < 0.015 * full.stored_bytes
    assert stored_total(backend) == pytest.approx(full.stored_bytes + second.stored_bytes, rel=0.01)


def test_ten_checkpoints_cost_less_than_one_and_a_half_images(
    torpor_home: Path, tmp_path: Path
) -> None:
    backend = MemoryBackend()
    pool = Pool("p", backend, timing=FAST)
    pages = random_pages(4096, seed=3)
    rng = random.Random(3)
    pushed = []
    for i in range(10):
        if i:
            touch_pages(pages, 0.01, rng)
        pushed.append(pool.push(make_image(tmp_path, f"c{i}", bytes(pages)), f"c{i}"))
    assert stored_total(backend) < 1.5 * pushed[0].stored_bytes
    assert all(p.stored_bytes < 0.015 * pushed[0].stored_bytes for p in pushed[1:])
    # the last one (a patch against the first one's list) comes back intact
    assert pool.pull("c9").path.joinpath("pages-1.img").read_bytes() == bytes(pages)


def test_identical_pages_of_different_processes_are_stored_once(
    mem_pool: Pool, tmp_path: Path
) -> None:
    shared = random_pages(1024, seed=11)  # the same warm-up, shared libraries' data
    own_a, own_b = random_pages(64, seed=12), random_pages(64, seed=13)
    a = mem_pool.push(make_image(tmp_path, "a", bytes(shared + own_a), cmdline=("a",)), "a")
    b = mem_pool.push(make_image(tmp_path, "b", bytes(own_b + shared), cmdline=("b",)), "b")
    assert a.stored_bytes > len(shared)
    # b pays for its own pages and its own (new) chunk list, not for the shared ones
    assert b.stored_bytes < len(own_b) + 1100 * 32 + 20_000


def test_zero_pages_are_never_stored(mem_pool: Pool, tmp_path: Path) -> None:
    pages = bytes(2048 * PAGE)  # 8 MiB of zeros
    pushed = mem_pool.push(make_image(tmp_path, "z", pages), "z")
    assert pushed.stored_bytes < 50_000
    assert mem_pool.stats().chunk_bytes < 20_000
    image = mem_pool.pull("z")
    path = image.path / "pages-1.img"
    assert path.read_bytes() == pages
    assert path.stat().st_blocks * 512 < len(pages)  # written as a hole


def test_compressible_memory_is_compressed(mem_pool: Pool, tmp_path: Path) -> None:
    pages = (b"the same old heap object %d\n" * 100_000)[: 2048 * PAGE]
    pushed = mem_pool.push(make_image(tmp_path, "t", pages), "t")
    assert pushed.stored_bytes < len(pages) / 5


def test_same_image_pushed_twice_costs_a_manifest(mem_pool: Pool, tmp_path: Path) -> None:
    image = make_image(tmp_path, "x", bytes(random_pages(512)))
    mem_pool.push(image, "one")
    again = mem_pool.push(image, "two")
    assert again.stored_bytes < 5_000
