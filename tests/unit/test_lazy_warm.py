"""A pool's warm set is outside input: one that lies (ranges out of the image, more pages than a
warm set may hold, bad encoding, another image's) is ignored as a whole at one boundary
(``_poolimage._read_warm`` -> ``_warm.check``), never fatal to the restore, never used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torpor._lazy import _poolimage, _warm
from torpor._pools._pool import Pool

from .test_pool_support import PAGE, make_image, new_mem_pool, random_pages

PAGES = 16


@pytest.fixture
def pool(tmp_path: Path, torpor_home: Path) -> Pool:
    p = new_mem_pool()
    p.push(make_image(tmp_path / "images", "app", bytes(random_pages(PAGES))), "app")
    return p


def _warm_of(pool: Pool, raw: bytes) -> list[tuple[str, int, int]]:
    """The warm set a lazy restore of ``app`` takes from the pool holding ``raw`` as it."""
    pool.backend.put(_poolimage.warm_key("app"), raw)
    image = _poolimage.materialise(pool, "app")
    try:
        return image.warm
    finally:
        image.discard()


def _doc(pool: Pool, ranges: object, image: object = None) -> bytes:
    ident = pool._record("app").manifest.id if image is None else image
    return json.dumps({"image": ident, "ranges": ranges}).encode()


def test_a_sound_warm_set_is_taken(pool: Pool) -> None:
    got = _warm_of(pool, _doc(pool, [["pages-1.img", 3 * PAGE, 2 * PAGE]]))
    assert got == [("pages-1.img", 3 * PAGE, 2 * PAGE)]


@pytest.mark.parametrize(
    "ranges",
    [
        [["pages-1.img", (PAGES - 1) * PAGE, 2 * PAGE]],  # past the end of the file
        [["pages-1.img", -PAGE, PAGE]],  # before its start
        [["pages-1.img", 0, 0]],  # empty
        [["pages-1.img", 1, PAGE]],  # not page-aligned
        [["pages-1.img", 0, PAGE + 1]],
        [["core-1.img", 0, PAGE]],  # not a pages file
        [["../pages-1.img", 0, PAGE]],  # not a file of the image
        [["pages-1.img", 0, 1 << 70]],  # a huge count
        [["pages-1.img", 0, PAGE]] * (_warm.MAX_BYTES // PAGE + 1),  # more than a warm set holds
        [["pages-1.img", 0.0, PAGE]],  # not integers
        [["pages-1.img", True, PAGE]],
        [["pages-1.img", 0, PAGE, 0]],  # not a triple
        [{"file": "pages-1.img"}],
        {"pages-1.img": [0, PAGE]},  # not a list
        "pages-1.img",
    ],
)
def test_a_lying_warm_set_is_ignored_as_a_whole(pool: Pool, ranges: object) -> None:
    good = ["pages-1.img", 0, PAGE]
    body = [good, *ranges] if isinstance(ranges, list) else ranges
    assert _warm_of(pool, _doc(pool, body)) == []


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe not json",
        b"[" * 100_000,  # nesting deeper than the decoder recurses
        b"null",
        b"[]",
        json.dumps({"image": None, "ranges": [], "more": 1}).encode(),
    ],
    ids=["bytes", "deep", "null", "list", "extra-key"],
)
def test_a_badly_encoded_warm_set_is_ignored(pool: Pool, raw: bytes) -> None:
    assert _warm_of(pool, raw) == []


def test_another_images_warm_set_is_ignored(pool: Pool) -> None:
    assert _warm_of(pool, _doc(pool, [["pages-1.img", 0, PAGE]], image="0" * 32)) == []


def test_a_warm_set_over_the_size_bound_is_not_read(pool: Pool) -> None:
    sound = _doc(pool, [["pages-1.img", 0, PAGE]])
    assert _warm_of(pool, sound + b" " * (_poolimage._MAX_WARM - len(sound))) != []
    assert _warm_of(pool, sound + b" " * (_poolimage._MAX_WARM + 1 - len(sound))) == []
