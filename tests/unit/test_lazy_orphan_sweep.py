"""A lazy-pages daemon whose starters are gone (``torpor._lazy._sweep.end_orphans``), on fake
daemons (``criu lazy-pages`` as their command line): SIGKILLed and its work dir swept only
when idle (no userfaultfd, nothing connected); one that holds a userfaultfd or a connection,
or that a live process still claims, or a claim naming another process, is left alone."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._lazy import _daemon, _sweep
from torpor._process._proc import running, start_time

FAKE = """
import ctypes, os, socket, sys, time
mode = os.environ["FAKE_MODE"]
ready = open("ready.tmp", "w")
keep = []
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("lazy-pages.socket")
s.listen(1)
keep.append(s)
if mode == "uffd":
    fd = ctypes.CDLL(None, use_errno=True).syscall(323, os.O_CLOEXEC)  # userfaultfd(2)
    assert fd >= 0, ctypes.get_errno()
if mode in ("connected", "forged"):
    keep.extend(socket.socketpair())
if mode == "forged":  # /proc/net/unix lines, in a socket's name, saying the pair listens
    for k in keep[1:]:
        forged = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        line = f"0000000000000000: 00000002 00000000 00010000 0001 01 {os.fstat(k.fileno()).st_ino}"
        forged.bind(f"\\0x\\n{line} @y\\n".encode())
        forged.listen(1)
        keep.append(forged)
if mode == "nonroot":
    os.setresuid(65534, 65534, 65534)
ready.close()
os.rename("ready.tmp", "ready") if mode != "nonroot" else None
time.sleep(60)
"""


@pytest.fixture(autouse=True)
def criu_is_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake daemons run this python: it is "the CRIU binary torpor uses"."""
    monkeypatch.setattr(_sweep, "_criu_binary", lambda: sys.executable)


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
        while not (work / "ready").exists() and not (mode == "nonroot" and _nobody(proc.pid)):
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


def _nobody(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    return "Uid:\t65534\t65534\t65534\t65534" in status.splitlines()


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


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_daemon_connected_to_between_its_stop_and_the_look_is_continued_not_killed(
    tmp_path: Path, spawn: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    work, proc = spawn("late", "idle")  # type: ignore[operator]
    _dead_claim(work)
    stopped = _sweep._stopped
    clients = []

    def then_a_restore_connects(pid: int) -> bool:
        was = stopped(pid)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(work / "lazy-pages.socket"))  # queued: the daemon cannot accept
        clients.append(c)
        return was

    monkeypatch.setattr(_sweep, "_stopped", then_a_restore_connects)
    assert _sweep.sweep([tmp_path / "lazy"]) == []
    assert len(clients) == 1
    assert proc.poll() is None and _state(proc.pid) != "T"  # SIGCONTed
    clients[0].close()


def test_a_daemon_that_does_not_stop_is_left_running(
    tmp_path: Path, spawn: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    work, proc = spawn("nostop", "idle")  # type: ignore[operator]
    _dead_claim(work)
    monkeypatch.setattr(_sweep, "_stopped", lambda pid: False)
    assert _sweep.sweep([tmp_path / "lazy"]) == []
    assert proc.poll() is None and _state(proc.pid) != "T"


def test_a_forged_proc_net_unix_does_not_make_a_connected_daemon_idle(
    tmp_path: Path, spawn: object
) -> None:
    work, proc = spawn("forged", "forged")  # type: ignore[operator]
    _dead_claim(work)
    assert _sweep.sweep([tmp_path / "lazy"]) == []
    assert proc.poll() is None and work.exists()


def test_a_daemon_is_found_working_in_the_dir_by_inode_not_by_path(
    tmp_path: Path, spawn: object
) -> None:
    work, proc = spawn("unclaimed", "idle", False)  # type: ignore[operator]
    _dead_claim(work)
    (tmp_path / "via").symlink_to(tmp_path / "lazy")  # its cwd's path is not the one swept
    assert _sweep.sweep([tmp_path / "via"]) == [tmp_path / "via" / work.name]
    assert proc.wait(5) == -signal.SIGKILL


def test_a_daemon_not_root_or_not_torpors_criu_is_not_killed(
    tmp_path: Path, spawn: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    nobody, p_nobody = spawn("nobody", "nonroot")  # type: ignore[operator]
    _dead_claim(nobody)
    assert _sweep.end_orphans(nobody) == [] and p_nobody.poll() is None
    other, p_other = spawn("other", "idle")  # type: ignore[operator]
    _dead_claim(other)
    monkeypatch.setattr(_sweep, "_criu_binary", lambda: "/bin/sh")
    assert _sweep.end_orphans(other) == [] and p_other.poll() is None


def test_a_daemon_is_ended_only_from_its_own_work_dir(tmp_path: Path, spawn: object) -> None:
    work, proc = spawn("pooled", "idle")  # type: ignore[operator]
    part = tmp_path / "lazy-pool" / "123-0123456789abcdef"  # a pool image's local part
    part.mkdir(parents=True)
    _sweep.claim(part, proc.pid, daemon=True)
    for d in (work, part):
        _dead_claim(d)
    assert _sweep.end_orphans(part) == [] and proc.poll() is None
    assert _sweep.sweep([tmp_path / "lazy-pool"]) == []  # it still claims the part
    assert _sweep.sweep([tmp_path / "lazy", tmp_path / "lazy-pool"]) == [work, part]
    assert proc.wait(5) == -signal.SIGKILL


def test_a_sweep_kills_at_most_max_kills(
    tmp_path: Path, spawn: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = [spawn(f"d{i}", "idle") for i in range(2)]  # type: ignore[operator]
    for work, _ in started:
        _dead_claim(work)
    monkeypatch.setattr(_sweep, "MAX_KILLS", 1)
    assert len(_sweep.sweep([tmp_path / "lazy"])) == 1
    assert sorted(p.poll() is None for _, p in started) == [False, True]


def test_an_old_owner_claim_of_a_daemon_counts_as_its_daemon_claim(
    tmp_path: Path, spawn: object
) -> None:
    work, proc = spawn("old", "idle", False)  # type: ignore[operator]
    _sweep.claim(work, proc.pid)  # ``owner-<pid>-<start time>``, as before c604987
    _dead_claim(work)
    assert _sweep.end_orphans(work) == [proc.pid]
    assert proc.wait(5) == -signal.SIGKILL


def test_an_exit_is_waited_for_on_a_pidfd_above_1023() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), max(hard, 2048)))
    proc = subprocess.Popen(["true"])
    pidfd = os.pidfd_open(proc.pid)
    high = os.dup2(pidfd, 1500)
    try:
        proc.wait()
        assert _sweep._exited(high)
    finally:
        os.close(high)
        os.close(pidfd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_daemon_is_waited_for_on_a_status_fd_above_1023(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), max(hard, 2048)))
    r, w = os.pipe()
    high = os.dup2(r, 1501)
    os.close(r)
    d = _daemon.Daemon("criu", -1, tmp_path, tmp_path)
    d.proc = subprocess.Popen(["sleep", "30"])
    d._status_r = high  # as spawn() leaves it
    try:
        os.write(w, b"\0")  # the daemon's "ready"
        d.wait_ready(5)  # (select.select: ValueError, filedescriptor out of range)
        assert d.proc.poll() is None
    finally:
        os.close(w)
        d.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_sweep_scans_proc_only_for_a_directory_nobody_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep runs before every `torpor restore` and `torpor ps`: with nothing to remove it
    must not walk /proc (3-6 ms with 70 processes here, more on a busy host)."""
    scans: list[int] = []
    monkeypatch.setattr(_sweep, "_scan", lambda: scans.append(1) or [])
    live = tmp_path / "live-img-0123abcd"
    live.mkdir()
    (live / f"owner-{os.getpid()}-{start_time(os.getpid())}").touch()  # claimed by us
    assert _sweep.sweep([tmp_path]) == [] and scans == []
    dead = tmp_path / "dead-img-4567cdef"
    dead.mkdir()
    (dead / "owner-999999999-1").touch()  # its claimant is gone
    assert _sweep.sweep([tmp_path]) == [dead] and scans == [1]  # once, for that one
    assert live.exists()
