"""CRIU's kernel-facts cache (``_engine._kdat``): when a file counts as a cache CRIU loads and
that ends with the boot, and when nothing is done. The mount itself needs root and a private
mount namespace: ``tests/integration/test_lazy_kdat_real.py``."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest

from torpor._engine import _kdat

SHM = Path("/dev/shm")


def _on_tmpfs(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _kdat.fs_type(fd) == _kdat.TMPFS_MAGIC
    finally:
        os.close(fd)


@pytest.fixture
def shm_dir(tmp_path: Path) -> Path:
    if not SHM.is_dir() or not _on_tmpfs(SHM):
        pytest.skip("no tmpfs at /dev/shm")
    d = SHM / f"torpor-test-kdat-{os.getpid()}-{time.monotonic_ns()}"
    d.mkdir(mode=0o700)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def _cache(path: Path, magic: int = _kdat.KDAT_MAGIC, size: int = 912) -> Path:
    path.write_bytes(struct.pack("<II", magic, 7) + bytes(size - 8))
    return path


def _binary(path: Path) -> Path:
    path.write_bytes(b"#!/bin/sh\n")
    return path


def test_a_cache_on_tmpfs_made_after_the_binary_is_current(shm_dir: Path, tmp_path: Path) -> None:
    binary = _binary(tmp_path / "criu")
    time.sleep(0.01)
    cache = _cache(shm_dir / "criu.kdat")
    assert _kdat.current(str(binary), cache)


def test_a_binary_changed_since_the_cache_makes_it_outdated(shm_dir: Path, tmp_path: Path) -> None:
    cache = _cache(shm_dir / "criu.kdat")
    time.sleep(0.01)
    binary = _binary(tmp_path / "criu")  # ctime after the cache's mtime
    assert not _kdat.current(str(binary), cache)


def test_not_criu_s_magic_or_size_is_no_cache(shm_dir: Path, tmp_path: Path) -> None:
    binary = _binary(tmp_path / "criu")
    time.sleep(0.01)
    assert not _kdat.current(str(binary), _cache(shm_dir / "a", magic=0x12345678))
    assert not _kdat.current(str(binary), _cache(shm_dir / "b", size=(1 << 16) + 8))
    (shm_dir / "c").write_bytes(b"")  # the mount point CRIU finds after a reboot
    assert not _kdat.current(str(binary), shm_dir / "c")
    assert not _kdat.current(str(binary), shm_dir / "missing")


def test_a_symlink_is_no_cache(shm_dir: Path, tmp_path: Path) -> None:
    binary = _binary(tmp_path / "criu")
    time.sleep(0.01)
    real = _cache(shm_dir / "real")
    (shm_dir / "link").symlink_to(real)
    assert _kdat.current(str(binary), real)
    assert not _kdat.current(str(binary), shm_dir / "link")


def test_a_cache_on_disk_would_outlive_the_boot(tmp_path: Path) -> None:
    if _on_tmpfs(tmp_path):
        pytest.skip("the temporary directory is a tmpfs here")
    binary = _binary(tmp_path / "criu")
    time.sleep(0.01)
    assert not _kdat.current(str(binary), _cache(tmp_path / "criu.kdat"))


def test_turned_off_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_kdat.ENV, "off")
    assert not _kdat.enabled()
    called = []
    monkeypatch.setattr(_kdat, "probe", lambda b: called.append(b) or b"")
    assert _kdat.ensure("/nonexistent/criu") is False
    assert called == []


def test_install_refuses_what_is_not_a_cache(tmp_path: Path) -> None:
    with pytest.raises(_kdat.KdatError):
        _kdat.install(b"\0" * 912, tmp_path / "criu.kdat")
    assert not (tmp_path / "criu.kdat").exists()


def test_a_failed_attempt_is_not_retried_by_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_kdat, "_gave_up", False)
    monkeypatch.setattr(_kdat, "enabled", lambda: True)
    monkeypatch.setattr(_kdat, "current", lambda binary, path=_kdat.KDAT: False)
    monkeypatch.setattr(_kdat, "_locked", _no_lock)
    calls = []

    def probe(binary: str) -> bytes:
        calls.append(binary)
        raise _kdat.KdatError("no cache")

    monkeypatch.setattr(_kdat, "probe", probe)
    assert _kdat.ensure("criu") is False
    assert _kdat.ensure("criu") is False
    assert calls == ["criu"]


class _no_lock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
