"""Whom a base is believed by (``torpor._migrate._dedup_source``, ``_dedup_target``): the
source uses its own copy of a base only while that copy is trusted (its files as when they
were hashed), and the target's error about a base it suspects names the base, never its path
there. Real images in a real home; no channel (the plans are checked as made)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from torpor._images import _manifest
from torpor._images._image import Image, staging
from torpor._migrate import _dedup_source, _dedup_target
from torpor._migrate._dedup import OP_BASE, Counts, content_id, layout
from torpor._migrate._dedup_source import SourceBase, plan
from torpor._pools._cas import PAGE_SIZE, digest


def page(n: int) -> bytes:
    return n.to_bytes(4, "little") * (PAGE_SIZE // 4)


PAGES = b"".join(page(i + 1) for i in range(8))
FILES = {"inventory.img": b"inv", "pstree.img": b"tree", "pages-1.img": PAGES}


def make_image(root: Path, name: str, files: dict[str, bytes]) -> Image:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    with staging(root / name) as st_:
        for fname, data in files.items():
            (st_.path / fname).write_bytes(data)
        return st_.commit(
            lambda entries: _manifest.build(
                name=name, pid=4242, files=entries, criu_version="4.2.1",
                cmdline=("app",), rss_bytes=1,
            )
        )  # fmt: skip


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    h.mkdir(mode=0o700)
    monkeypatch.setenv("TORPOR_HOME", str(h))
    return h


def _damage(image: Image, at: int, data: bytes) -> None:
    """Change this copy's pages file in place (bit rot, a stray write): its stamp no longer
    vouches for it."""
    fd = os.open(image.path / "pages-1.img", os.O_WRONLY)
    try:
        os.pwrite(fd, data, at)
        st = os.fstat(fd)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # whatever the clock's grain
    finally:
        os.close(fd)


def _theirs(image: Image) -> SourceBase:
    """The base as the target sends it: the good content's ids."""
    lay = layout(image.manifest.files)
    lists = [
        [digest(FILES[f.name][p : p + f.chunk]) for p in range(0, f.size, f.chunk)] for f in lay
    ]
    return SourceBase(content_id(image.manifest), lay, lists)


def test_a_damaged_local_base_is_neither_offered_nor_compared_with(home: Path) -> None:
    mine = make_image(home / "images", "base", FILES)
    good = _dedup_source.candidates([str(mine.path)])
    assert list(good) == [content_id(mine.manifest)]
    theirs = _theirs(mine)
    # The process's page 3 changed since the base; this host's copy was changed the same way
    # (not as the base's content id says): the target's good copy does not hold it.
    dump = bytearray(PAGES)
    dump[3 * PAGE_SIZE : 4 * PAGE_SIZE] = page(99)
    _damage(mine, 3 * PAGE_SIZE, page(99))
    assert not Image.open(mine.path).trusted()
    assert _dedup_source.candidates([str(mine.path)]) == {}
    theirs.open_local(str(mine.path))
    try:
        assert theirs.local == []
        runs, counts = plan(bytes(dump), "pages-1.img", 0, theirs)
    finally:
        theirs.close()
    # Page 3 goes literally (the target could not rebuild it from its base), the rest from it.
    assert counts.sent == PAGE_SIZE and counts.from_base == 7 * PAGE_SIZE
    base_pages = {b + k for op, _f, b, n in runs if op == OP_BASE for k in range(n)}
    assert 3 not in base_pages


def test_a_trusted_local_base_is_compared_with(home: Path) -> None:
    mine = make_image(home / "images", "base", FILES)
    theirs = _theirs(mine)
    theirs.open_local(str(mine.path))
    try:
        assert len(theirs.local) == 3
    finally:
        theirs.close()


def test_the_target_names_a_suspect_base_but_not_where_it_is(home: Path) -> None:
    image = make_image(home / "images", "web-base", FILES)
    cid = content_id(image.manifest)
    held = _dedup_target.BaseCache().hold([cid], lambda _: None)
    assert held is not None
    try:
        said = held.suspect(Counts(from_base=4096))
    finally:
        held.close()
    assert "'web-base'" in said and cid[:16] in said
    assert str(home) not in said and "/" not in said
    assert held.suspect(Counts(sent=1)) == ""


# -- the target's cache of chunk lists, bounded ------------------------------------------------


def _hold(cache: _dedup_target.BaseCache, image: Image) -> str:
    logged: list[str] = []
    held = cache.hold([content_id(image.manifest)], logged.append)
    assert held is not None
    held.close()
    return logged[-1]


def _bases(home: Path, n: int) -> list[Image]:
    return [
        make_image(home / "images", f"b{i}", {**FILES, "pstree.img": b"tree%d" % i})
        for i in range(n)
    ]


def test_the_cache_keeps_the_most_recently_used_lists_only(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = _bases(home, 10)
    cache = _dedup_target.BaseCache()
    for image in images:
        assert " computed in " in _hold(cache, image)
    kept = list(cache._lists)
    assert kept == [content_id(i.manifest) for i in images[-_dedup_target.MAX_CACHED :]]
    # A list used again is the most recent: it stays when a new one comes.
    assert " cached in " in _hold(cache, images[-_dedup_target.MAX_CACHED])
    assert " computed in " in _hold(cache, images[0])
    assert content_id(images[-_dedup_target.MAX_CACHED].manifest) in cache._lists
    assert content_id(images[-_dedup_target.MAX_CACHED + 1].manifest) not in cache._lists
    # And by bytes: room for two of these lists, not three.
    one = len(cache._lists[content_id(images[0].manifest)].ids)
    monkeypatch.setattr(_dedup_target, "MAX_CACHED_BYTES", 2 * one)
    _hold(cache, images[1])
    assert list(cache._lists) == [content_id(i.manifest) for i in (images[0], images[1])]


def test_the_cache_drops_the_lists_of_images_that_are_gone(home: Path) -> None:
    a, b = _bases(home, 2)
    cache = _dedup_target.BaseCache()
    _hold(cache, a)
    shutil.rmtree(a.path)
    _hold(cache, b)
    assert list(cache._lists) == [content_id(b.manifest)]
