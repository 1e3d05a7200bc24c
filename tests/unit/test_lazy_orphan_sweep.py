"""A lazy-pages daemon whose starters are gone (``torpor._lazy._sweep.end_orphans``), on fake
daemons (``criu lazy-pages`` as their command line): SIGKILLed and its work dir swept only
when idle (no userfaultfd, nothing connected); one that holds a userfaultfd or a connection,
or that a live process still claims, or a claim naming another process, is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._lazy import _sweep
from torpor._process._proc import running, start_time

FAKE = """
import ctypes, os, socket, sys, time
mode = os.environ["FAKE_MODE"]
keep = []
if mode in ("idle", "uffd", "connected"):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind("lazy-pages.socket")
    s.listen(1)
    keep.append(s)
if mode == "uffd":
    fd = ctypes.CDLL(None, use_errno=True).syscall(323, os.O_CLOEXEC)  # userfaultfd(2)
    assert fd >= 0, ctypes.get_errno()
if mode == "connected":
    keep.extend(socket.socketpair())
open("ready", "w").close()
time.sleep(60)
"""


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[object]:
    """Start a fake daemon (``criu lazy-pages`` as its argv) working in a new dir."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, mode: str, claim: bool = True) -> tuple[Path, subprocess.Popen[bytes]]:
        work = tmp_path / "lazy" / f"{name}-0123abcd"
        work.mkdir(parents=True)
        (work / "lazy-pages").write_text(FAKE)  # what python runs as ``criu lazy-pages``
        proc = subprocess.Popen(
            ["criu", "lazy-pages"],
            executable=sys.executable,
            cwd=work,
            # (its argv[0] is no path: where its library is must be said)
            env=dict(os.environ, FAKE_MODE=mode, PYTHONHOME=sys.base_prefix),
        )
        procs.append(proc)
        deadline = time.monotonic() + 10
        while not (work / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        if claim:
            _sweep.claim(work, proc.pid, daemon=True)
        return work, proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _dead_claim(path: Path) -> None:
    proc = subprocess.Popen(["sleep", "30"])
    _sweep.claim(path, proc.pid)
    proc.kill()
    proc.wait()


def test_an_idle_daemon_whose_starters_died_is_killed_and_its_dir_swept(
    tmp_path: Path, spawn: object
) -> None:
    work, proc = spawn("idle", "idle")  # type: ignore[operator]
    _dead_claim(work)
    assert _sweep.sweep([tmp_path / "lazy"]) == [work]
    assert proc.wait(5) == -signal.SIGKILL
    assert not work.exists()


def test_an_idle_daemon_killed_before_its_claim_is_found_working_in_the_dir(
    tmp_path: Path, spawn: object
) -> None:
    idle, p_idle = spawn("idle", "idle", False)  # type: ignore[operator]
    busy, p_busy = spawn("busy", "uffd", False)  # type: ignore[operator]
    for work in (idle, busy):
        _dead_claim(work)
    assert _sweep.sweep([tmp_path / "lazy"]) == [idle]
    assert p_idle.wait(5) == -signal.SIGKILL
    assert p_busy.poll() is None and busy.exists()


def test_a_daemon_serving_or_connected_or_still_claimed_is_left(
    tmp_path: Path, spawn: object
) -> None:
    uffd, p_uffd = spawn("uffd", "uffd")  # type: ignore[operator]
    conn, p_conn = spawn("conn", "connected")  # type: ignore[operator]
    claimed, p_claimed = spawn("claimed", "idle")  # type: ignore[operator]
    for work in (uffd, conn, claimed):
        _dead_claim(work)
    _sweep.claim(claimed)  # this process: a starter that lives
    assert _sweep.sweep([tmp_path / "lazy"]) == []
    for work, proc in ((uffd, p_uffd), (conn, p_conn), (claimed, p_claimed)):
        assert proc.poll() is None, work
        assert (work / "lazy-pages.socket").exists()  # a restore may still connect
        assert work.exists()


def test_a_claim_naming_another_process_kills_nothing(tmp_path: Path) -> None:
    lazy = tmp_path / "lazy"
    reused = lazy / "reused-0123abcd"  # the daemon's pid, now another process's
    reused.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        born = start_time(sleeper.pid)
        assert born is not None
        (reused / f"daemon-{sleeper.pid}-{born + 1}").touch()
        _dead_claim(reused)
        not_criu = lazy / "notcriu-0123abcd"  # a claim of a process that is no lazy-pages
        not_criu.mkdir()
        _sweep.claim(not_criu, sleeper.pid, daemon=True)
        _dead_claim(not_criu)
        assert _sweep.end_orphans(reused) == [] and _sweep.end_orphans(not_criu) == []
        assert running(sleeper.pid)
        assert _sweep.sweep([lazy]) == [reused]  # not_criu: its "daemon" still runs
    finally:
        sleeper.kill()
        sleeper.wait()


def test_what_cannot_be_read_counts_as_busy() -> None:
    assert not _sweep.idle(2**22 + 12345)  # no such process
