"""The ``dir`` pool driver: the shared backend conformance suite, plus its on-disk layout."""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conformance.backend_suite import BackendConformance

from torpor._errors import PoolError
from torpor._images._incomplete import mount_point
from torpor._pools._backend import Backend
from torpor._pools._dir import DirBackend


class TestDirBackend(BackendConformance):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[DirBackend]:
        b = DirBackend(tmp_path / "pool")
        yield b
        b.close()

    def assert_private(self, backend: Backend, key: str) -> None:
        assert isinstance(backend, DirBackend)
        path = backend.root.joinpath(*(s + "+" for s in key.split("/")[:-1]), key.split("/")[-1])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        for directory in (backend.root, *path.parents):
            if directory == backend.root.parent:
                break
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


def test_layout_keeps_keys_inside_the_root(tmp_path: Path) -> None:
    b = DirBackend(tmp_path / "pool")
    b.put("images/web/manifest", b"m")
    b.put("images", b"i")
    assert (tmp_path / "pool" / "images+" / "web+" / "manifest").read_bytes() == b"m"
    assert (tmp_path / "pool" / "images").read_bytes() == b"i"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool"]


def test_delete_prunes_empty_directories(tmp_path: Path) -> None:
    b = DirBackend(tmp_path / "pool")
    b.put("a/b/c", b"x")
    b.put("a/d", b"y")
    b.delete("a/b/c")
    assert [p.name for p in (tmp_path / "pool" / "a+").iterdir()] == ["d"]
    b.delete("a/d")
    assert list((tmp_path / "pool").iterdir()) == []


def test_failed_put_leaves_no_temporary_file(tmp_path: Path) -> None:
    class Broken:
        def read(self, n: int = -1) -> bytes:
            raise OSError(5, "Input/output error")

    b = DirBackend(tmp_path / "pool")
    b.put("k", b"old")
    with pytest.raises(PoolError, match="cannot write key 'k'"):
        b.put_stream("k", Broken())  # type: ignore[arg-type]
    assert b.get("k") == b"old"
    assert [p.name for p in (tmp_path / "pool").iterdir()] == ["k"]


def test_temporary_files_are_not_listed(tmp_path: Path) -> None:
    b = DirBackend(tmp_path / "pool")
    b.put("k", b"v")
    (tmp_path / "pool" / "~leftover").write_bytes(b"partial")
    assert list(b.list()) == ["k"]


def test_os_errors_become_pool_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    b = DirBackend(tmp_path / "pool")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(PoolError) as info:
        b.put("k", b"v")
    # A full disk is named, with how much is free on it (which other writers change).
    mount = mount_point(tmp_path)
    assert re.fullmatch(
        re.escape(
            f"cannot write key 'k' in dir pool {tmp_path / 'pool'}: no space left on {mount} ("
        )
        + r"[0-9.]+ (B|KiB|MiB|GiB)"
        + re.escape(f" free) — free space on {mount}"),
        str(info.value),
    ), str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert not b.exists("k")
    assert list((tmp_path / "pool").iterdir()) == []


def test_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(PoolError, match=r"not a directory|cannot create"):
        DirBackend(tmp_path / "file")
