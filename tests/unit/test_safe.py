"""The boundary module for outside names and files (``torpor._safe``)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from torpor._errors import UnsafeImageError, UnsafePathError
from torpor._safe import (
    MAX_NAME,
    TEMP_PREFIX,
    check_name,
    check_private,
    create_file,
    is_plain_name,
    kind_problem,
    lstat_entries,
    open_dir,
    open_regular,
    opened_dir,
    read_regular,
    replace_file,
)

PLAIN = ["pages-1.img", "core-4242.img", ".hidden", "a..b", "名前.img", "x" * MAX_NAME]
NOT_PLAIN = {
    "": "is empty",
    ".": "is a directory reference",
    "..": "is a directory reference",
    "../x": "is a path, not a plain name",
    "/etc/shadow": "is a path, not a plain name",
    "a/b": "is a path, not a plain name",
    "a\\b": "is a path, not a plain name",
    "a\nb": "holds control characters",
    "a\x00b": "holds control characters",
    "a\x7fb": "holds control characters",
    "\ud800": "is not valid UTF-8",
    "x" * (MAX_NAME + 1): f"is longer than {MAX_NAME} bytes",
    "é" * 128: f"is longer than {MAX_NAME} bytes",  # 256 bytes in UTF-8
}


@pytest.mark.parametrize("name", PLAIN)
def test_plain_names_pass(name: str) -> None:
    assert check_name(name, source="src") == name
    assert is_plain_name(name)


@pytest.mark.parametrize(("name", "problem"), NOT_PLAIN.items())
def test_other_names_are_refused_saying_why(name: str, problem: str) -> None:
    assert not is_plain_name(name)
    with pytest.raises(UnsafeImageError) as info:
        check_name(name, source="archive.tar")
    assert str(info.value).startswith(f"archive.tar: file name {name!r} {problem}; refused")
    assert (info.value.image, info.value.file) == ("archive.tar", name)


@pytest.mark.parametrize("value", [None, 5, b"x", ["x"]])
def test_a_name_that_is_not_a_string_is_refused(value: object) -> None:
    assert not is_plain_name(value)
    with pytest.raises(UnsafeImageError, match="is not a string"):
        check_name(value, source="record")


def test_open_dir_refuses_a_symlink_and_a_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "d")
    (tmp_path / "f").write_text("x")
    for name in ("link", "f"):
        with pytest.raises(UnsafePathError, match="is not a directory"):
            open_dir(tmp_path / name)
    with opened_dir(tmp_path / "d") as fd:
        assert stat.S_ISDIR(os.fstat(fd).st_mode)


def test_open_regular_reads_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"data")
    with opened_dir(tmp_path) as d:
        fd = open_regular(d, "f", source="img")
        try:
            assert os.read(fd, 10) == b"data"
            assert os.get_blocking(fd)
        finally:
            os.close(fd)


def _device(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers


@pytest.mark.parametrize(
    ("kind", "make"),
    [
        ("a symlink", lambda p: p.symlink_to("/dev/zero")),
        ("a FIFO", lambda p: os.mkfifo(p)),
        ("a directory", lambda p: p.mkdir()),
        ("a device", _device),
    ],
)
def test_open_regular_refuses_what_is_not_a_regular_file_at_once(
    tmp_path: Path, kind: str, make: object
) -> None:
    if kind == "a device" and os.geteuid() != 0:
        pytest.skip("mknod needs root")
    assert callable(make)
    make(tmp_path / "x")
    t0 = time.monotonic()
    with opened_dir(tmp_path) as d, pytest.raises(UnsafeImageError) as info:
        open_regular(d, "x", source="img")
    assert time.monotonic() - t0 < 2
    assert str(info.value).startswith(f"img: file x is {kind}, not a regular file; refused")
    assert kind_problem(os.lstat(tmp_path / "x").st_mode) == kind


def test_open_regular_checks_the_name(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_text("x")
    with opened_dir(tmp_path) as d, pytest.raises(UnsafeImageError, match="is a path"):
        open_regular(d, "sub/f", source="img")


def test_create_file_never_writes_through_an_existing_name(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("root's")
    (tmp_path / "link").symlink_to(victim)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with opened_dir(tmp_path) as d:
        for name in ("victim", "link", "dangling"):
            with pytest.raises(FileExistsError):
                create_file(d, name, source="img")
        fd = create_file(d, "new", source="img")
        os.close(fd)
    assert victim.read_text() == "root's"
    assert not (tmp_path / "nowhere").exists()
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o600


def test_check_private(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    assert check_private(d).st_ino == d.stat().st_ino
    for mode, who in ((0o775, "its group"), (0o757, "others")):
        os.chmod(d, mode)
        with pytest.raises(UnsafePathError) as info:
            check_private(d, what="image directory")
        assert str(info.value) == (
            f"image directory {d} is writable by {who} (mode {mode:04o}); refused — chmod go-w {d}"
        )
    os.chmod(d, 0o700)
    (tmp_path / "link").symlink_to(d)
    with pytest.raises(UnsafePathError, match="is not a directory"):
        check_private(tmp_path / "link")
    with opened_dir(d) as fd:
        d.rename(tmp_path / "moved")
        d.mkdir(mode=0o700)  # a private directory now at the path
        os.chmod(tmp_path / "moved", 0o777)
        with pytest.raises(UnsafePathError):
            check_private(d, fd=fd)  # the fd's directory is judged, not the path's


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_check_private_refuses_another_users_directory(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(UnsafePathError) as info:
        check_private(d)
    assert info.value.hint == f"chown 0 {d}"


def test_lstat_entries_does_not_follow(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 10)
    (tmp_path / "link").symlink_to("/dev/zero")
    with opened_dir(tmp_path) as d:
        entries = lstat_entries(d)
    assert set(entries) == {"f", "link"}
    assert stat.S_ISLNK(entries["link"].st_mode)
    assert entries["f"].st_size == 10


def test_read_regular_is_bounded(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 100)
    with opened_dir(tmp_path) as d:
        assert read_regular(d, "f", source="img", limit=100) == b"x" * 100
        with pytest.raises(UnsafeImageError, match="has 100 bytes or more, over the 99") as info:
            read_regular(d, "f", source="img", limit=99)
        assert info.value.file == "f"
        with pytest.raises(FileNotFoundError):
            read_regular(d, "absent", source="img", limit=99)


def test_replace_file_replaces_a_symlink_instead_of_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("root's")
    d = tmp_path / "d"
    d.mkdir()
    (d / "torpor.json").symlink_to(victim)
    with opened_dir(d) as fd:
        replace_file(fd, "torpor.json", b"new", source="img")
    assert victim.read_text() == "root's"
    assert not (d / "torpor.json").is_symlink()
    assert (d / "torpor.json").read_bytes() == b"new"
    assert (d / "torpor.json").stat().st_mode & 0o777 == 0o600
    assert os.listdir(d) == ["torpor.json"]


def test_replace_file_leaves_no_temporary_file_when_it_fails(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()  # a directory cannot be renamed over
    with opened_dir(tmp_path) as fd, pytest.raises(IsADirectoryError):
        replace_file(fd, "x", b"data", source="img")
    assert [n for n in os.listdir(tmp_path) if n.startswith(TEMP_PREFIX)] == []
