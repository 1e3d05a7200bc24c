"""What the kept warm images (``torpor._lazy._warmcache``) may take: each ensure drops those
of images deleted (or replaced), then the least recently used past the bound; never one a
restore or its daemon holds."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from torpor._images._image import Image
from torpor._lazy import _warm, _warmcache

from .test_lazy_eager import _image as eager_image
from .test_lazy_server import PAGE

WARM = [("pages-1.img", 3 * PAGE, PAGE)]


def _made(root: Path) -> Image:
    img = eager_image(root)
    _warm.save(img, WARM)
    return img


@pytest.fixture
def images(tmp_path: Path, torpor_home: Path) -> list[Image]:
    return [_made(tmp_path / n) for n in ("a", "b", "c")]


def _entry(image: Image) -> str:
    return f"{image.manifest.id}-{_warmcache.key(image, _warm.read_raw(image) or b'')}"


def _entries() -> set[str]:
    return {n for n in os.listdir(_warmcache.cache_dir()) if not n.startswith(".")}


def _size(name: str) -> int:
    path = _warmcache.cache_dir() / name
    total = os.lstat(path).st_blocks * 512
    for n in os.listdir(path):
        total += os.lstat(path / n).st_blocks * 512
    return total


def _used_at(image: Image, when: float) -> None:
    os.utime(_warmcache.cache_dir() / _entry(image), (when, when))


def test_the_entry_of_a_deleted_image_goes_at_the_next_ensure(images: list[Image]) -> None:
    a, b, _ = images
    assert _warmcache.ensure(a) and _warmcache.ensure(b)
    assert _entries() == {_entry(a), _entry(b)}
    gone = _entry(a)
    shutil.rmtree(a.path)
    assert _warmcache.ensure(b)
    assert _entries() == {_entry(b)} and gone not in _entries()


def test_the_entry_of_an_image_replaced_at_its_path_goes(
    images: list[Image], tmp_path: Path
) -> None:
    a, b, _ = images
    assert _warmcache.ensure(a)
    old = _entry(a)
    shutil.rmtree(a.path)
    other = _made(tmp_path / "b2")
    shutil.move(other.path, a.path)  # another image (another id) where a was
    assert _warmcache.ensure(b)
    assert old not in _entries() and _entries() == {_entry(b)}


def test_past_the_bound_the_least_recently_used_goes(
    images: list[Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = images
    assert _warmcache.ensure(a) and _warmcache.ensure(b)
    now = time.time()
    _used_at(a, now - 100)
    _used_at(b, now - 50)
    assert _warmcache.ensure(a)  # a used again since: b is the least recently used now
    assert os.stat(_warmcache.cache_dir() / _entry(a)).st_mtime > now - 10
    room = _size(_entry(a)) + _size(_entry(b))
    monkeypatch.setenv(_warmcache.CACHE_BYTES_ENV, str(room))  # two fit, not three
    assert _warmcache.ensure(c)
    assert _entries() == {_entry(a), _entry(c)}


def test_an_entry_in_use_is_not_evicted(
    images: list[Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = images
    assert _warmcache.ensure(a) and _warmcache.ensure(b)
    held = _warmcache.lookup(a)  # share-locked, as by a restore and its daemon
    assert held is not None
    try:
        monkeypatch.setenv(_warmcache.CACHE_BYTES_ENV, "0")  # keeps only the one just kept
        assert _warmcache.ensure(c)
        assert _entries() == {_entry(a), _entry(c)}
        assert (held.path / _warmcache.STAMP).is_file()  # still whole
    finally:
        os.close(held.fd)
    assert _warmcache.ensure(c)
    assert _entries() == {_entry(c)}


def test_the_bound_is_the_knob_and_a_tenth_of_the_free_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Vfs:
        f_bavail = 1000
        f_frsize = 4096

    def statvfs(path: Any) -> Vfs:
        return Vfs()

    monkeypatch.delenv(_warmcache.CACHE_BYTES_ENV, raising=False)
    monkeypatch.setattr(os, "statvfs", statvfs)
    assert _warmcache.limit(tmp_path, 96_000) == (4_096_000 + 96_000) // 10
    Vfs.f_bavail = 1 << 30
    assert _warmcache.limit(tmp_path, 0) == _warmcache.CACHE_BYTES
    Vfs.f_bavail = 1000
    monkeypatch.setenv(_warmcache.CACHE_BYTES_ENV, "1234")
    assert _warmcache.limit(tmp_path, 0) == 1234
    monkeypatch.setenv(_warmcache.CACHE_BYTES_ENV, "1G")
    assert _warmcache.limit(tmp_path, 0) == 409_600
    assert capsys.readouterr().err.split(" ", 1)[1] == (
        "lazy restore: TORPOR_WARM_CACHE_BYTES='1G' is not a number of bytes (digits only); "
        f"{_warmcache.CACHE_BYTES} used\n"
    )
