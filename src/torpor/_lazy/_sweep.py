"""What a killed keeper leaves of lazy restores, found and removed at the next restore.

A lazy copy's work dir (``<home>/lazy/<copy>-<8 hex>/``: the daemon's socket and log, the
restore's log, a warm image) and a pool image's local part (``<cache>/lazy-pool/<pid>-<16
hex>/``: small files and the non-lazy pages, secrets among them) are removed by the keeper
once its copies are resident, or kept (logs) when they failed. A keeper killed meanwhile
leaves them behind.

Each such directory holds one empty file ``owner-<pid>-<start time>`` per process using it
(:func:`claim`): the process that made it, the keeper, the copy's daemon. :func:`sweep`
removes a directory only when none of them is still that very process (pid *and* start time,
as ``/proc/<pid>/stat`` says: a reused pid is another process), and one without any owner
file only once it is older than :data:`GRACE` (it may be a moment from its first claim).
A failed copy's work dir (marked :data:`FAILED_MARK`) is never swept: its logs are what the
failure's message names.

**A daemon outlives its starters only while it serves.** ``criu lazy-pages`` runs in a session
of its own (``_daemon``), and waits on its ``lazy-pages.socket`` for ever until a restore
connects. A starter killed between the spawn and the restore's connection (an agent worker
that began the copy, ``_prestart``; a keeper before its CRIU connected) would leave it
waiting, and its work dir with it. So a daemon claims the directories it uses with a file of
its own, ``daemon-<pid>-<start time>``, written the moment it is spawned, and
:func:`end_orphans` (run by :func:`sweep` before judging a directory) SIGKILLs a daemon
claimant once every other claimant is gone *and* it is idle: no userfaultfd among its fds
and no socket but its listening one (:func:`idle`). A daemon that holds a userfaultfd (it
receives one per restored task once a restore connected) may be all that serves a live copy
whose keeper died: killing it would hand that copy zeros (see ``_daemon``), so it is left;
one with a connection may be about to receive them, so it is left too. Before the kill its
socket is removed (no restore can connect from then on) and, after :data:`SETTLE`, it is
looked at again (a connection made just before is accepted by then). The daemon is found by
its claim (pid *and* start time, re-checked once a pidfd pins it: the signal goes through
the pidfd, so to that very process or to none) and must be CRIU's ``lazy-pages``; one
killed between its spawn and its claim is found, as the directory is about to go, as the
``lazy-pages`` process working in it, and judged the same way. A
``PR_SET_PDEATHSIG`` would not do: it fires when the spawning *thread* ends, and the daemon
begun by one thread (the command's) is handed to others (the keeper's watch).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import stat
import time
from pathlib import Path

from .._errors import TorporError

GRACE = 120.0  # seconds an unclaimed directory may be young enough to be about to be claimed
SETTLE = 0.05  # seconds for a daemon to accept a connection made as its socket went
_OWNER = re.compile(r"owner-([1-9][0-9]{0,9})-([0-9]{1,20})")
_DAEMON = re.compile(r"daemon-([1-9][0-9]{0,9})-([0-9]{1,20})")
_SOCKET = "lazy-pages.socket"  # ``_daemon.SOCKET_NAME`` (CRIU's, in the work dir)
_UFFD_LINK = "anon_inode:[userfaultfd]"
_SO_ACCEPTCON = 0x10000  # a listening socket, in /proc/net/unix's flags
_EXIT_WAIT = 2.0  # seconds for a killed daemon to exit
_WORK_DIR = re.compile(r".+-[0-9a-f]{8}")
_LOCAL_PART = re.compile(r"[1-9][0-9]{0,9}-[0-9a-f]{16}")
FAILED_MARK = "failed"  # a failed copy's work dir: its logs are the evidence, kept


def _start_time(pid: int) -> int | None:
    """The start time of ``pid`` if it runs (a zombie has ended: this VM's init reaps
    orphans late, and a killed keeper's daemon is one)."""
    from .._process._proc import stat_fields  # (the process floor imports this one's)

    st = stat_fields(pid)
    return int(st[19]) if st is not None and st[0] not in ("Z", "X") else None


def claim(directory: Path, pid: int | None = None, *, daemon: bool = False) -> None:
    """Mark ``directory`` as used by process ``pid`` (default: this one) for as long as that
    very process lives (``daemon``: a lazy-pages daemon, ended by :func:`end_orphans` once it
    alone claims the directory and serves nothing)."""
    pid = os.getpid() if pid is None else pid
    born = _start_time(pid)
    if born is None:
        return  # gone already: nothing to keep the directory for
    fd = os.open(
        directory / f"{'daemon' if daemon else 'owner'}-{pid}-{born}",
        os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
    )
    os.close(fd)


def in_use(directory: Path, *, now: float | None = None) -> bool:
    """Whether a process that claimed ``directory`` still lives (or it is too young to say)."""
    try:
        names = os.listdir(directory)
        st = os.lstat(directory)
    except OSError:
        return True  # gone, or not ours to judge
    if FAILED_MARK in names:
        return True
    owners = _claims(names, _OWNER) + _claims(names, _DAEMON)
    if not owners:
        return (time.time() if now is None else now) - st.st_mtime < GRACE
    return any(_start_time(pid) == born for pid, born in owners)


def _claims(names: list[str], kind: re.Pattern[str]) -> list[tuple[int, int]]:
    return [(int(m.group(1)), int(m.group(2))) for n in names if (m := kind.fullmatch(n))]


def end_orphans(directory: Path) -> list[int]:
    """SIGKILL the idle lazy-pages daemons that alone still claim ``directory`` (see the
    module docstring); the pids of those ended."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    if any(_start_time(pid) == born for pid, born in _claims(names, _OWNER)):
        return []  # a starter or keeper lives: the daemon is theirs to stop
    return [pid for pid, born in _claims(names, _DAEMON) if _end_if_idle(directory, pid, born)]


def _end_if_idle(directory: Path, pid: int, born: int) -> bool:
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False  # gone already
    try:
        # The pidfd pins the process: checked now, it is the one that claimed the directory.
        if _start_time(pid) != born or not _is_lazy_daemon(pid) or not idle(pid):
            return False
        with contextlib.suppress(OSError):
            os.unlink(directory / _SOCKET)  # no restore can connect to it from now on
        time.sleep(SETTLE)
        if not idle(pid):
            return False
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return False
        select.select([pidfd], [], [], _EXIT_WAIT)  # readable once it has exited
        return True
    finally:
        os.close(pidfd)


def _unclaimed_daemons(directory: Path) -> bool:
    """Whether a lazy-pages daemon that did not claim ``directory`` still works in it once
    the idle ones are ended (its starter was killed between its spawn and its claim)."""
    busy = False
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            if os.readlink(f"/proc/{pid}/cwd") != str(directory):
                continue
        except OSError:
            continue
        born = _start_time(pid)
        if born is not None and _is_lazy_daemon(pid):
            busy = not _end_if_idle(directory, pid, born) or busy
    return busy


def _is_lazy_daemon(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read(4096).split(b"\0")
    except OSError:
        return False
    return len(argv) > 1 and argv[1] == b"lazy-pages"


def idle(pid: int) -> bool:
    """Whether the lazy-pages daemon ``pid`` serves nothing and nothing is connected to it:
    no userfaultfd among its fds, no socket but listening Unix ones. Whatever cannot be read
    counts as busy."""
    sockets = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue  # closed meanwhile
            if link == _UFFD_LINK:
                return False
            if link.startswith("socket:["):
                sockets.add(link[len("socket:[") : -1])
        with open(f"/proc/{pid}/net/unix", encoding="ascii", errors="replace") as fh:
            table = fh.read().splitlines()[1:]
    except OSError:
        return False
    listening = set()
    for line in table:
        cols = line.split()
        with contextlib.suppress(IndexError, ValueError):
            if int(cols[3], 16) & _SO_ACCEPTCON:
                listening.add(cols[6])
    return sockets <= listening


def sweep(parents: list[Path]) -> list[Path]:
    """Remove the lazy work dirs and local parts under ``parents`` nobody uses (see the module
    docstring); what was removed."""
    removed = []
    for parent in parents:
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for entry in entries:
            if not (_WORK_DIR.fullmatch(entry.name) or _LOCAL_PART.fullmatch(entry.name)):
                continue  # not one of ours (``warm/``, state files)
            with contextlib.suppress(OSError):
                if not stat.S_ISDIR(entry.stat(follow_symlinks=False).st_mode):
                    continue
                path = Path(entry.path)
                end_orphans(path)
                if not in_use(path) and not _unclaimed_daemons(path):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
    return removed


def sweep_home() -> list[Path]:
    """:func:`sweep` this home's lazy work dirs and pool local parts (best effort)."""
    from ._state import lazy_dir, lazy_pool_dir

    try:
        parents = [lazy_dir(), lazy_pool_dir()]
    except (OSError, TorporError):  # an unusable home is reported by what needs it
        return []
    return sweep(parents)
