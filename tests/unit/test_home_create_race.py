"""Making the torpor home never changes a file it does not make (review finding 2).

Every torpor command makes the home if it is missing, as root. Made by path (``mkdir``,
``lstat``, ``chmod``), a directory on the way that another user can write to lets that user
swap a level just made for a symlink between the calls: the ``chmod`` follows it and changes
the mode of any file root can reach. The way to what exists is now checked before anything is
made, and each level is made and set through fds (``mkdir``/``open`` relative to its parent,
``O_NOFOLLOW``, ``fchmod``).

No CRIU here: the attacker is a child of the test running as uid 65534 in a directory it owns.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor import TorporError, UnsafePathError, _paths

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the attacker is another uid")

NOBODY = 65534
RACE_SECONDS = 2.5
RACE_TRIES = 3000

# Swaps ``x`` and ``s`` (a symlink to the sentinel) in its cwd for ever, as uid 65534.
_SWAPPER = textwrap.dedent(
    """
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    os.chdir(sys.argv[1])
    os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
    print("up", flush=True)
    while True:
        libc.renameat2(-100, b"x", -100, b"s", 2)  # AT_FDCWD, RENAME_EXCHANGE
    """
)


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A root-owned 0600 file the attacker would like to open up."""
    path = tmp_path / "secret"
    path.write_bytes(b"root's\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def theirs(tmp_path: Path) -> Path:
    """A directory uid 65534 owns (and may change as it likes)."""
    path = tmp_path / "theirs"
    path.mkdir(mode=0o755)
    os.chown(path, NOBODY, NOBODY)
    return path


@pytest.fixture
def swapper(theirs: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", _SWAPPER, str(theirs)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"
    yield proc
    os.kill(proc.pid, signal.SIGCONT)
    proc.kill()
    proc.wait()


def _reset(theirs: Path, sentinel: Path, proc: subprocess.Popen[bytes]) -> None:
    """With the swapper stopped: no ``x``, and ``s`` a symlink (theirs) to the sentinel."""
    os.kill(proc.pid, signal.SIGSTOP)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)
    for name in ("x", "s"):
        p = theirs / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            for sub in p.iterdir():
                sub.rmdir()
            p.rmdir()
    (theirs / "s").symlink_to(sentinel)
    os.lchown(theirs / "s", NOBODY, NOBODY)
    os.kill(proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("home", ["x/home", "x"], ids=["a parent", "the home"])
def test_a_level_swapped_for_a_symlink_never_changes_its_target(
    theirs: Path,
    sentinel: Path,
    swapper: subprocess.Popen[bytes],
    monkeypatch: pytest.MonkeyPatch,
    home: str,
) -> None:
    """The reviewer's attack: ``x`` (the home's parent, or the home) swapped with a symlink to
    a root-owned 0600 file while root makes the home, thousands of times. The file keeps its
    mode, and nothing is made in a directory another user owns."""
    monkeypatch.setenv("TORPOR_HOME", str(theirs / home))
    deadline = time.monotonic() + RACE_SECONDS
    tries = 0
    while tries < RACE_TRIES and time.monotonic() < deadline:
        tries += 1
        _reset(theirs, sentinel, swapper)
        with pytest.raises(TorporError):
            _paths.home()
        mode = stat.S_IMODE(os.stat(sentinel).st_mode)
        assert (tries, mode) == (tries, 0o600)
    assert tries > 100  # the race was run, not skipped
    _reset(theirs, sentinel, swapper)
    os.kill(swapper.pid, signal.SIGSTOP)
    assert sorted(os.listdir(theirs)) == ["s"]


def test_a_home_under_a_directory_of_another_user_is_refused_before_anything_is_made(
    theirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = theirs / "a" / "home"
    monkeypatch.setenv("TORPOR_HOME", str(home))
    with pytest.raises(UnsafePathError) as info:
        _paths.home()
    assert str(info.value) == (
        f"torpor home {home} is refused: {theirs} on the way to it is owned by uid {NOBODY},"
        f" not by root — chown 0 {theirs}"
    )
    assert os.listdir(theirs) == []


@pytest.mark.parametrize("swap_in", ["symlink", "directory"])
@pytest.mark.parametrize("level", ["a", "home"])
def test_a_level_replaced_right_after_it_is_made_is_refused_and_never_chmod_ed(
    tmp_path: Path,
    sentinel: Path,
    monkeypatch: pytest.MonkeyPatch,
    level: str,
    swap_in: str,
) -> None:
    """The window between ``mkdir`` and the use of what it made, hit every time: the level
    is replaced (as only root could here) by a symlink to the sentinel or by another user's
    directory. Neither is used or chmod-ed, and the refusal names the level."""
    base = tmp_path / "base"
    base.mkdir(mode=0o700)
    home = base / "a" / "home"
    target = home if level == "home" else base / "a"
    monkeypatch.setenv("TORPOR_HOME", str(home))
    real_mkdir = os.mkdir
    swapped: list[str] = []

    def mkdir_then_swap(path: str, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode, dir_fd=dir_fd)
        if os.path.basename(path) == target.name and not swapped:
            swapped.append(path)
            target.rename(tmp_path / "moved")
            if swap_in == "symlink":
                target.symlink_to(sentinel)
            else:
                real_mkdir(target, 0o777)
                os.chmod(target, 0o777)
                os.chown(target, NOBODY, NOBODY)

    old = os.umask(0o277)  # so that a mode is set after the mkdir: the home's 0700
    try:
        monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
        with pytest.raises(UnsafePathError) as info:
            _paths.home()
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert swapped  # the window was hit
    assert stat.S_IMODE(os.stat(sentinel).st_mode) == 0o600
    problem = (
        "is not a directory (a symlink or a file)"
        if swap_in == "symlink"
        else "is not the directory torpor just made there"
    )
    assert str(info.value) == (
        f"torpor home {home} is refused: {target} on the way to it {problem} — {target} was"
        f" replaced while torpor made it: check who can write to {target.parent}"
    )
    if swap_in == "directory":
        assert stat.S_IMODE(target.lstat().st_mode) == 0o777


def test_missing_levels_are_made_under_a_sticky_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As under /tmp: a sticky directory others may write to is a fine place to start."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    home = sticky / "new" / "home"
    monkeypatch.setenv("TORPOR_HOME", str(home))
    assert _paths.home() == home
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (home.parent, home)}
    assert modes == {"new": 0o755, "home": 0o700}


def test_a_level_planted_in_a_sticky_directory_by_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made meanwhile by someone else (here: before the home is made, under the missing
    home's parent): refused, not used, and its mode left alone."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    planted = sticky / "new"
    home = planted / "home"
    monkeypatch.setenv("TORPOR_HOME", str(home))
    real_mkdir = os.mkdir

    def plant_first(path: str, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        if os.path.basename(path) == "new" and not planted.exists():
            real_mkdir(planted, 0o755)
            os.chown(planted, NOBODY, NOBODY)
        real_mkdir(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", plant_first)
    with pytest.raises(UnsafePathError) as info:
        _paths.home()
    monkeypatch.undo()
    assert str(info.value) == (
        f"torpor home {home} is refused: {planted} on the way to it is owned by uid {NOBODY},"
        f" not by root — chown 0 {planted}"
    )
    assert os.listdir(planted) == []
