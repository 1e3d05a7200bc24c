"""Staging of ``--pool`` checkpoints in memory (``_process._topool.memory_staging``): a private
directory per home under /dev/shm, refused when someone else could reach it or the process
does not fit; and an image staged there that could not be pushed is copied into the local
store (a rename cannot cross filesystems), not left in memory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from torpor._images import _store
from torpor._process._topool import keep, memory_staging

from .test_pool_support import make_image, random_pages

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")


def _expected(home: Path, root: Path) -> Path:
    tag = hashlib.sha256(os.fsencode(home)).hexdigest()[:12]
    return root / f"torpor-{os.geteuid()}-{tag}"


def test_a_private_directory_per_home(torpor_home: Path) -> None:
    path = memory_staging(1 << 20)
    assert path == _expected(torpor_home, SHM)
    try:
        st = os.lstat(path)
        assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o700)
        assert memory_staging(1 << 20) == path  # found again, not made anew
    finally:
        os.rmdir(path)


def test_a_process_that_does_not_fit_is_staged_on_disk(torpor_home: Path) -> None:
    assert memory_staging(1 << 60) is None
    assert not _expected(torpor_home, SHM).exists()


@pytest.mark.parametrize("planted", ["open", "symlink", "file"])
def test_a_name_someone_else_made_is_not_used(
    torpor_home: Path, tmp_path: Path, planted: str
) -> None:
    root = tmp_path / "shm"
    root.mkdir()
    os.chmod(root, 0o1777)
    target = _expected(torpor_home, root)
    if planted == "open":
        target.mkdir()
        os.chmod(target, 0o777)
    elif planted == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        target.symlink_to(tmp_path / "elsewhere")
    else:
        target.write_bytes(b"")
    assert memory_staging(1 << 20, root=root) is None


def test_an_unpushed_image_in_memory_is_copied_into_the_store(torpor_home: Path) -> None:
    staged = SHM / f"torpor-test-{os.getpid()}"
    staged.mkdir(mode=0o700)
    try:
        image = make_image(staged, "x", bytes(random_pages(8)))
        before = {p.name: p.read_bytes() for p in image.path.iterdir()}
        kept = keep(image.path, "keptname")
        assert kept == _store.default_path("keptname")
        assert not image.path.exists()
        assert {p.name: p.read_bytes() for p in kept.iterdir()} == before
        assert sorted(os.listdir(kept.parent)) == ["keptname"]  # no temporary left
    finally:
        import shutil

        shutil.rmtree(staged, ignore_errors=True)
