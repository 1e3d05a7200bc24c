"""A local lazy restore's daemon begun by the command (``torpor._lazy._prestart``): only where
the command's process hosts its keeper, only for a trusted image's kept warm image, taken by
the keeper's restore of that very image object, else stopped and its work dir removed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._images._image import Image
from torpor._lazy import _prestart, _warm, _warmcache
from torpor._lazy import _restore as lazy

from . import test_lazy_restore
from .test_lazy_eager import _image as eager_image
from .test_lazy_server import PAGE

criu = test_lazy_restore.criu  # the fake CRIU (a fixture)


@pytest.fixture
def image(tmp_path: Path, torpor_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Image]:
    monkeypatch.setenv("FAKE_LAZY", "hang")
    img = eager_image(tmp_path)
    _warm.save(img, [("pages-1.img", 3 * PAGE, PAGE)])
    assert _warmcache.ensure(img)
    yield img
    _prestart.drop()
    _prestart.allow(False)


def _alive(pid: int) -> bool:
    return (
        os.path.exists(f"/proc/{pid}")
        and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    )


def test_the_keepers_restore_takes_the_copy_the_command_began(image: Image, criu: str) -> None:
    _prestart.allow()
    _prestart.begin(lazy.LazyCopy, image, "app", criu)
    assert _prestart._begun is not None
    begun = _prestart._begun[2]
    assert begun.daemon is not None and begun.daemon.spawned  # not waited for yet
    copies = lazy.LazyCopies.for_image(image, criu)
    c = copies.start("app-2")  # the keeper renamed it
    try:
        assert c is begun and _prestart._begun is None
        assert c.name == "app-2" and c.state.name == "app-2"
        assert c.daemon is not None and not c.daemon.spawned  # ready now
        assert c.state.daemon_pid == c.daemon.pid and c.state.warm_bytes == PAGE
        assert c._on_end is not None and c._on_failure is not None
    finally:
        copies.abort()


def test_nothing_is_begun_where_the_command_does_not_host_its_keeper(
    image: Image, criu: str
) -> None:
    # Not allowed: a forked keeper would not be its parent.
    _prestart.begin(lazy.LazyCopy, image, "app", criu)
    assert _prestart._begun is None
    copies = lazy.LazyCopies.for_image(image, criu)
    c = copies.start("app")
    try:
        assert c.daemon is not None and c.state.daemon_pid == c.daemon.pid
    finally:
        copies.abort()


def test_a_copy_begun_and_not_taken_is_stopped_and_its_work_dir_removed(
    image: Image, criu: str
) -> None:
    _prestart.allow()
    _prestart.begin(lazy.LazyCopy, image, "app", criu)
    assert _prestart._begun is not None
    begun = _prestart._begun[2]
    assert begun.daemon is not None and begun.daemon.pid is not None and begun.work_dir
    pid, work = begun.daemon.pid, begun.work_dir
    # Another Image object of the same directory, or another CRIU: not the one begun for.
    assert _prestart.take(Image.open(image.path), criu) is None
    assert _prestart.take(image, "/usr/bin/false") is None
    _prestart.drop()
    assert _prestart._begun is None and not work.exists() and not _alive(pid)


def test_an_image_without_a_warm_set_begins_nothing(
    image: Image, criu: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_warmcache, "lookup", lambda image: None)
    monkeypatch.setattr(_warm, "load", lambda image: [])
    _prestart.allow()
    _prestart.begin(lazy.LazyCopy, image, "app", criu)
    assert _prestart._begun is None
    assert not [p for p in (lazy.lazy_dir()).iterdir() if p.name.startswith("app-")]
