"""Kept warm images (``torpor._lazy._warmcache``): made once per warm set, used as they are by
the next local lazy restore of the trusted image, never believed when not sound, never removed
while a restore or its daemon holds one."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from torpor._engine import CriuEngine
from torpor._errors import TorporError
from torpor._images._image import Image
from torpor._lazy import _eager, _warm, _warmcache
from torpor._lazy import _restore as lazy
from torpor._lazy._pagemap import parse_pagemap

from . import test_lazy_restore
from .test_lazy_eager import _image as eager_image
from .test_lazy_server import PAGE, PID

WARM = [("pages-1.img", 3 * PAGE, PAGE)]

criu = test_lazy_restore.criu  # the fake CRIU (a fixture)


@pytest.fixture
def image(tmp_path: Path, torpor_home: Path) -> Image:
    img = eager_image(tmp_path)
    _warm.save(img, WARM)
    return img


def _entries() -> list[str]:
    return sorted(n for n in os.listdir(_warmcache.cache_dir()) if not n.startswith("."))


def test_a_kept_warm_image_is_the_one_the_image_and_warm_set_make(
    image: Image, tmp_path: Path
) -> None:
    assert _warmcache.lookup(image) is None  # none yet
    assert _warmcache.ensure(image)
    kept = _warmcache.lookup(image)
    assert kept is not None
    try:
        made = _eager.warm_image(image, WARM, tmp_path / "fresh")
        assert made is not None and kept.warm_bytes == made[1] == PAGE
        name = f"pagemap-{PID}.img"
        assert (kept.path / name).read_bytes() == (made[0] / name).read_bytes()
        assert os.readlink(kept.path / "pages-1.img") == str(image.path / "pages-1.img")
        assert os.stat(kept.path).st_mode & 0o777 == 0o700
        # Share-locked through the fd handed out: an exclusive lock cannot be had.
        probe = os.open(kept.path, os.O_RDONLY | os.O_DIRECTORY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(probe)
    finally:
        os.close(kept.fd)
    assert _entries() == [kept.path.name]
    assert _warmcache.ensure(image) and _entries() == [kept.path.name]  # kept: not made again


def test_a_changed_warm_set_is_another_warm_image_and_the_old_one_goes(image: Image) -> None:
    assert _warmcache.ensure(image)
    [old] = _entries()
    _warm.save(image, [*WARM, ("pages-1.img", 6 * PAGE, PAGE)])
    assert _warmcache.lookup(image) is None  # the old one is not for this warm set
    assert _warmcache.ensure(image)
    [new] = _entries()
    assert new != old
    kept = _warmcache.lookup(image)
    assert kept is not None and kept.warm_bytes == 2 * PAGE
    os.close(kept.fd)


def test_a_warm_image_in_use_is_not_removed(image: Image) -> None:
    """A restore (and its daemon, which inherits the fd) holds the share lock: the warm image
    a newer warm set replaces stays until they let go, and goes at the next ensure after."""
    assert _warmcache.ensure(image)
    held = _warmcache.lookup(image)
    assert held is not None
    _warm.save(image, [*WARM, ("pages-1.img", 6 * PAGE, PAGE)])
    assert _warmcache.ensure(image)
    assert held.path.name in _entries() and len(_entries()) == 2
    assert (held.path / f"pagemap-{PID}.img").is_file()  # still whole
    os.close(held.fd)
    assert _warmcache.ensure(image)
    assert held.path.name not in _entries() and len(_entries()) == 1


def test_an_entry_left_without_its_stamp_is_replaced(image: Image) -> None:
    """A removal interrupted after the stamp went leaves the entry's name taken: the next
    ensure removes it and puts a whole one there (else every restore after missed)."""
    assert _warmcache.ensure(image)
    [name] = _entries()
    (_warmcache.cache_dir() / name / _warmcache.STAMP).unlink()
    assert _warmcache.lookup(image) is None
    assert _warmcache.ensure(image)
    kept = _warmcache.lookup(image)
    assert kept is not None and kept.path.name == name
    os.close(kept.fd)
    assert _entries() == [name]


def test_an_entry_left_without_its_stamp_is_kept_while_held(image: Image) -> None:
    assert _warmcache.ensure(image)
    [name] = _entries()
    (_warmcache.cache_dir() / name / _warmcache.STAMP).unlink()
    held = os.open(_warmcache.cache_dir() / name, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_SH)
        assert not _warmcache.ensure(image)  # not removed under its holder
        assert (_warmcache.cache_dir() / name / f"pagemap-{PID}.img").is_file()
        assert [n for n in os.listdir(_warmcache.cache_dir()) if n.startswith(".tmp-")] == []
    finally:
        os.close(held)
    assert _warmcache.ensure(image)
    kept = _warmcache.lookup(image)
    assert kept is not None
    os.close(kept.fd)


def _full(*args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_line_and_no_warm_image(
    image: Image, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_eager, "warm_image", _full)
    assert not _warmcache.ensure(image)
    assert capsys.readouterr().err.split(" ", 1)[1] == (
        f"lazy restore: warm image of {image.path} not kept: No space left on device\n"
    )
    assert os.listdir(_warmcache.cache_dir()) == []

    def gone(*args: object) -> None:
        raise TorporError("image 'x' is gone")

    monkeypatch.setattr(_eager, "warm_image", gone)
    assert not _warmcache.ensure(image)
    assert capsys.readouterr().err.split(" ", 1)[1] == (
        f"lazy restore: warm image of {image.path} not kept: image 'x' is gone\n"
    )


def test_a_kept_warm_image_that_is_not_sound_is_not_used(image: Image) -> None:
    assert _warmcache.ensure(image)
    kept = _warmcache.lookup(image)
    assert kept is not None
    os.close(kept.fd)
    stamp = kept.path / _warmcache.STAMP
    good = stamp.read_bytes()
    for bad in (
        b"not json",
        b"[]",
        json.dumps({**json.loads(good), "key": "0" * 32}).encode(),  # another key
        json.dumps({**json.loads(good), "image": "relative"}).encode(),
        json.dumps({"key": json.loads(good)["key"], "warm_bytes": PAGE}).encode(),  # no image
        json.dumps({**json.loads(good), "warm_bytes": True}).encode(),
        json.dumps({**json.loads(good), "extra": 1}).encode(),
    ):
        stamp.write_bytes(bad)
        assert _warmcache.lookup(image) is None, bad
    stamp.unlink()
    assert _warmcache.lookup(image) is None  # incomplete (or being removed)
    os.symlink(kept.path.parent / "elsewhere", stamp)
    (kept.path.parent / "elsewhere").write_bytes(good)
    assert _warmcache.lookup(image) is None  # a symlinked stamp is not read
    stamp.unlink()
    stamp.write_bytes(good)
    assert _warmcache.lookup(image) is not None
    os.chmod(kept.path, 0o770)  # group-writable: not ours alone
    assert _warmcache.lookup(image) is None
    os.chmod(kept.path, 0o700)


def test_a_lazy_restore_uses_the_kept_warm_image_without_working_it_out(
    image: Image,
    criu: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _warmcache.ensure(image)

    def no(*args: object) -> None:
        raise AssertionError("worked out on the path")

    monkeypatch.setattr(_eager, "plan", no)
    monkeypatch.setattr(_eager, "link", no)
    monkeypatch.setenv("FAKE_LAZY", "hang")
    c = lazy.LazyCopy(image, "app", binary=criu)
    c.start()
    try:
        kept = _warmcache.lookup(image)
        assert kept is not None
        os.close(kept.fd)
        assert c._warm_dir == kept.path and c.state.warm_bytes == PAGE
        assert c.work_dir is not None and not (c.work_dir / "image").exists()
        argv = (c.work_dir / "argv").read_text().split("\n")
        assert os.path.samefile(argv[argv.index("-D") + 1], kept.path)  # the daemon's too
        assert "-v4" in argv  # still recording faults
        engine = c.engine(CriuEngine(criu))
        assert isinstance(engine, _eager.WarmEngine) and engine._warm_fd == c._image_fd
    finally:
        c.abort()


def test_a_kept_warm_image_is_not_used_for_an_image_no_longer_trusted(
    image: Image,
    criu: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _warmcache.ensure(image)
    os.utime(image.path / f"pagemap-{PID}.img")  # its ctime moves: no longer trusted
    assert not image.trusted()
    monkeypatch.setenv("FAKE_LAZY", "hang")
    c = lazy.LazyCopy(image, "app", binary=criu)
    c.start()
    try:
        assert c._warm_dir is None and c.state.warm_bytes is None
    finally:
        c.abort()
    for name in _entries():
        assert _warmcache.remove(_warmcache.cache_dir(), name)
    assert not _warmcache.ensure(image) and _entries() == []  # nor made from it


def test_the_copy_made_resident_keeps_the_warm_image_for_the_next_restore(
    image: Image,
    criu: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_LAZY", "exit0")
    proc = subprocess.Popen(["sleep", "60"])
    try:
        c = lazy.LazyCopy(image, "app", binary=criu)
        c.start()  # made on the path (none kept yet)
        assert c._warm_dir is not None and c.work_dir is not None
        assert c._warm_dir == c.work_dir / "image"
        c.restored(proc.pid, tasks=0)
        c.watch()
        assert c.wait(10) and c.state.state == lazy.RESIDENT
    finally:
        proc.kill()
        proc.wait()
    kept = _warmcache.lookup(image)
    assert kept is not None and kept.warm_bytes == PAGE
    os.close(kept.fd)
    parse_pagemap((kept.path / f"pagemap-{PID}.img").read_bytes(), pid=PID, image="x")


def test_a_full_disk_while_keeping_the_warm_image_leaves_the_copy_resident(
    image: Image,
    criu: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FAKE_LAZY", "exit0")
    monkeypatch.setattr(_eager, "warm_image", _full)
    proc = subprocess.Popen(["sleep", "60"])
    try:
        c = lazy.LazyCopy(image, "app", binary=criu)
        c.start()
        c.restored(proc.pid, tasks=0)
        c.watch()
        assert c.wait(10) and c.state.state == lazy.RESIDENT
        assert proc.poll() is None  # not killed
    finally:
        proc.kill()
        proc.wait()
    assert _warmcache.lookup(image) is None
    said = [line.split(" ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert said == [f"lazy restore: warm image of {image.path} not kept: No space left on device"]


def test_a_local_lazy_restore_does_not_import_the_pool_code(image: Image) -> None:
    """``_poolimage`` (with the pool code it loads) took ~6 ms of a local restore's path."""
    code = (
        "import sys; from torpor._images._image import Image; "
        "from torpor._lazy import _restore, _warm; "
        f"c = _restore.LazyCopies.for_image(Image.open({str(image.path)!r}), 'criu'); "
        "assert c._factory is None; "
        "assert _warm.pool_image(c.image) is None; "
        "print('torpor._lazy._poolimage' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
