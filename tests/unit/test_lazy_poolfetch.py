"""The early fetch of a pool image's local part (``torpor._lazy._poolfetch.Early``) is bounded:
a record's ``where`` is outside input, and one naming a pack per chunk must not make a lazy
restore pull a pool's worth of whole packs for a few chunks. Past its budget the ``where`` is
not used for that restore (one line on stderr names the pool and image) and the pool's
catalog finds the chunks: the image restores right, from the packs that hold them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from torpor._lazy import _poolfetch, _poolimage
from torpor._lazy._source import _is_pages
from torpor._pools._pack import PACK_TARGET
from torpor._pools._pool import Pool
from torpor._pools._record import Locations

from .test_pool_support import make_image, new_mem_pool, random_pages
from .test_pool_where import _doc, _put_doc

PAGES = 64
OTHERS = 6

_WARNING = re.compile(
    r"\S+ lazy restore: pool 'mem', image 'app': its record's where names (?:(\d+) packs for \d+ "
    r"bytes of chunks|packs of (over) \d+ bytes), over the early fetch's \d+ bytes; not used: "
    r"the pool's catalog says where its chunks are\n"
)


class _Gets:
    """A backend that records the packs fetched."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.packs: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get(self, key: str, limit: int | None = None) -> bytes:
        if key.startswith("packs/"):
            self.packs.append(key.rsplit("/", 1)[-1])
        data: bytes = self._inner.get(key, limit)
        return data


@pytest.fixture
def pool(tmp_path: Path, torpor_home: Path) -> Pool:
    """``app`` and :data:`OTHERS` images pushed before it, each with a pack of its own."""
    p = new_mem_pool()
    for n in range(OTHERS):
        pages = bytes(random_pages(PAGES, seed=10 + n))
        p.push(make_image(tmp_path / f"o{n}", f"other{n}", pages), f"other{n}")
    p.push(make_image(tmp_path / "app", "app", bytes(random_pages(PAGES, seed=2))), "app")
    return p


def _decoys(pool: Pool) -> list[str]:
    """The packs of the other images' pages that hold none of app's small files' chunks
    (those are shared by every image here: in the pack of the first pushed)."""
    app = pool._record("app")
    assert app.where is not None
    find = app.where.finder(app.files)
    small = {find(f.name, i) for f in app.files if not _is_pages(f.name) for i in range(f.count)}
    out = []
    for n in range(OTHERS):
        rec = pool._record(f"other{n}")
        assert rec.where is not None
        pack = rec.where.finder(rec.files)("pages-1.img", 0)
        assert pack is not None
        if pack not in small:
            out.append(pack)
    assert len(set(out)) >= OTHERS - 1
    return out


def _lie(pool: Pool, decoys: list[str]) -> None:
    """Make ``app``'s record put its small files' chunks each in the next of ``decoys``."""
    rec = pool._record("app")
    assert rec.where is not None
    find = rec.where.finder(rec.files)
    pack_of: list[str | None] = []
    left = iter(decoys)
    for f in rec.files:
        for i in range(f.count):
            pack_of.append(find(f.name, i) if _is_pages(f.name) else next(left))
    doc = _doc(pool, "app")
    doc["where"] = Locations.build(pack_of).to_dict()
    _put_doc(pool, "app", doc)


def _small_chunks(pool: Pool) -> int:
    return sum(f.count for f in pool._record("app").files if not _is_pages(f.name))


def _restore(pool: Pool) -> tuple[_poolimage.PoolLazyImage, _Gets]:
    gets = _Gets(pool.backend)
    pool.backend = gets
    image = _poolimage.materialise(pool, "app")
    return image, gets


def test_a_truthful_where_is_used_and_says_nothing(
    pool: Pool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_poolfetch, "EARLY_PACKS", 2)  # app's own packs fit still
    image, _ = _restore(pool)
    try:
        assert image._prepared is not None and image._prepared.located is not None
        assert (image.path / "core-1.img").read_bytes() == b"core" * 300
    finally:
        image.discard()
    assert capsys.readouterr().err == ""


def test_a_where_naming_a_pack_per_chunk_fetches_none_of_them(
    pool: Pool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """More packs than the budget allows for the small files: none fetched early, the
    catalog instead (without the bound: every one pulled, then the image refused)."""
    monkeypatch.setattr(_poolfetch, "EARLY_PACKS", 2)
    decoys = _decoys(pool)
    assert _small_chunks(pool) > 2
    _lie(pool, decoys)
    image, gets = _restore(pool)
    try:
        assert not set(gets.packs) & set(decoys)
        assert image._prepared is not None and image._prepared.located is None
        assert (image.path / "core-1.img").read_bytes() == b"core" * 300
        assert (image.path / "inventory.img").read_bytes() == b"inv"
    finally:
        image.discard()
    err = capsys.readouterr().err
    said = _WARNING.fullmatch(err)
    assert said is not None, err
    assert said.group(1) == str(_small_chunks(pool))


def test_a_where_whose_packs_come_to_more_than_the_budget_is_dropped(
    pool: Pool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Few packs, but big ones for the bytes wanted: the fetch stops trusting ``where`` at
    the first one over the budget; the image restores through the catalog."""
    monkeypatch.setattr(_poolfetch, "PACK_TARGET", 4096)  # allows ~3 packs of ~4 KiB
    monkeypatch.setattr(_poolfetch, "EARLY_PACKS", 2)
    decoys = _decoys(pool)
    rec = pool._record("app")
    assert rec.where is not None
    find = rec.where.finder(rec.files)
    # Two small files' chunks in 256 KiB packs of other images, the rest where they are.
    pack_of: list[str | None] = []
    wrong = 0
    for f in rec.files:
        for i in range(f.count):
            if f.name in ("core-1.img", "mm-1.img"):
                pack_of.append(decoys[wrong % 2])
                wrong += 1
            else:
                pack_of.append(find(f.name, i))
    assert len(set(pack_of) & set(decoys)) == 2
    doc = _doc(pool, "app")
    doc["where"] = Locations.build(pack_of).to_dict()
    _put_doc(pool, "app", doc)
    image, _ = _restore(pool)
    try:
        assert image._prepared is not None and image._prepared.located is None
        assert (image.path / "core-1.img").read_bytes() == b"core" * 300
    finally:
        image.discard()
    err = capsys.readouterr().err
    said = _WARNING.fullmatch(err)
    assert said is not None, err
    assert said.group(2) == "over"


def test_the_budget_is_twice_the_bytes_wanted_or_a_few_packs() -> None:
    few = _poolfetch.EARLY_PACKS * PACK_TARGET
    assert _poolfetch.budget(0) == few
    assert _poolfetch.budget(few) == 2 * few
