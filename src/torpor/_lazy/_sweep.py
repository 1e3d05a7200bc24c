"""What a killed keeper leaves of lazy restores, found and removed at the next restore.

A lazy copy's work dir (``<home>/lazy/<copy>-<8 hex>/``: the daemon's socket and log, the
restore's log, a warm image) and a pool image's local part (``<cache>/lazy-pool/<pid>-<16
hex>/``: small files and the non-lazy pages, secrets among them) are removed by the keeper
once its copies are resident, or kept (logs) when they failed. A keeper killed meanwhile
leaves them behind.

Each such directory holds one empty file per process using it (:func:`claim`):
``owner-<pid>-<start time>`` for the process that made it and the keeper,
``daemon-<pid>-<start time>`` for the copy's daemon. :func:`sweep` removes a directory only
when none of them is still that very process (pid *and* start time, as ``/proc/<pid>/stat``
says: a reused pid is another process), and one without any claim only once it is older than
:data:`GRACE` (it may be a moment from its first claim). Claims are pids: a claimant in
another PID namespace than the sweeper looks dead to it. A failed copy's work dir (marked
:data:`FAILED_MARK`) is never swept: its logs are what the failure's message names.

**A daemon outlives its starters only while it serves.** ``criu lazy-pages`` runs in a session
of its own (``_daemon``), and waits on its ``lazy-pages.socket`` for ever until a restore
connects. A starter killed between the spawn and the restore's connection (an agent worker
that began the copy, ``_prestart``; a keeper before its CRIU connected) would leave it
waiting, and its work dir with it. So a daemon claims the directories it uses (its work dir,
a pool image's local part) the moment it is spawned, and :func:`end_orphans` (run by
:func:`sweep` before judging a directory) SIGKILLs a daemon claimant of its *work dir* (the
directory that is its cwd, by device and inode) once every other claimant is gone *and* it is
idle (:func:`idle`): no userfaultfd among its fds, and no socket but one listening with no
connection queued, each socket asked through a duplicate of its fd (``pidfd_getfd``,
``SO_ACCEPTCONN``; ``/proc/<pid>/net/unix`` prints socket names raw, so anyone can forge its
lines). Elsewhere (a local part) a daemon is only a live claimant. A daemon that holds a
userfaultfd (it receives one per restored task once a restore connected) may be all that
serves a live copy whose keeper died: killing it would hand that copy zeros (see
``_daemon``), so it is left; one with a connection, accepted or queued, may be about to
receive them, so it is left too. The look and the kill are made atomic by freezing it: it is
sent SIGSTOP, looked at again once ``/proc/<pid>/stat`` says it is stopped (one that does
not stop within :data:`STOP_WAIT` is left), and SIGKILLed if still idle, else sent SIGCONT.
A restore's CRIU that connects to it between that look and the kill waits in its socket's
queue and fails cleanly (its restore fails, the image is intact) when the daemon dies.

The daemon is found by its claim (pid *and* start time, re-checked once a pidfd pins it:
the signals go through the pidfd, so to that very process or to none), and must be root's
``lazy-pages`` run from the CRIU binary torpor uses (``/proc/<pid>/exe`` by device and
inode). One killed between its spawn and its claim is found, as the directory is about to
go, as the ``lazy-pages`` process working in it, and judged the same way; so is one whose
claim is an ``owner-`` file (how daemons claimed before ``daemon-`` claims). ``/proc`` is
scanned at most once per sweep, only once a directory nobody claims is to be removed (each
`torpor restore` and `torpor ps` sweeps), and one sweep ends at most :data:`MAX_KILLS`
daemons. A
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
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from .._errors import TorporError
from . import _fds

GRACE = 120.0  # seconds an unclaimed directory may be young enough to be about to be claimed
STOP_WAIT = 1.0  # seconds for a daemon sent SIGSTOP to be stopped (else it is left)
MAX_KILLS = 32  # daemons one sweep may end
_OWNER = re.compile(r"owner-([1-9][0-9]{0,9})-([0-9]{1,20})")
_DAEMON = re.compile(r"daemon-([1-9][0-9]{0,9})-([0-9]{1,20})")
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


@dataclass
class _Daemon:
    """A ``criu lazy-pages`` process as the scan of ``/proc`` found it."""

    pid: int
    born: int
    cwd: tuple[int, int]  # (st_dev, st_ino) of its working directory


@dataclass
class _Budget:
    """The kills a sweep may still make (:data:`MAX_KILLS`)."""

    left: int = 0


def end_orphans(
    directory: Path, *, daemons: list[_Daemon] | None = None, budget: _Budget | None = None
) -> list[int]:
    """SIGKILL the idle lazy-pages daemons that alone still claim ``directory``, their work
    dir (see the module docstring); the pids of those that were killed and have exited.
    ``daemons``: the sweep's scan of ``/proc`` (made here if not given)."""
    try:
        names = os.listdir(directory)
        here = _ident(os.lstat(directory))
    except OSError:
        return []
    budget = _Budget(MAX_KILLS) if budget is None else budget
    found = None if daemons is None else {(d.pid, d.born) for d in daemons}
    claimants = list(_claims(names, _DAEMON))
    for pid, born in _claims(names, _OWNER):
        if _start_time(pid) != born:
            continue  # gone
        # A daemon's claim before daemon- claims were (c604987); asked of that pid alone
        # unless the sweep's scan is at hand.
        if (pid, born) in found if found is not None else _is_lazy_daemon(pid):
            claimants.append((pid, born))
        else:
            return []  # a starter or keeper lives: the daemon is theirs to stop
    return [pid for pid, born in claimants if _end_if_idle(here, pid, born, budget)]


def _ident(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _end_if_idle(here: tuple[int, int], pid: int, born: int, budget: _Budget) -> bool:
    """SIGKILL the daemon ``pid`` if it is still the one born at ``born``, works in the
    directory ``here`` and is idle while stopped; True once it has exited."""
    if budget.left <= 0:
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False  # gone already
    try:
        # The pidfd pins the process: checked now, it is the one that claimed the directory.
        if not _is_daemon(pid, born, here) or not idle(pid, pidfd):
            return False
        already = _state(pid) == "T"  # stopped by someone else: left stopped
        killed = False
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
            if not _stopped(pid):
                return False  # it did not stop: it cannot be looked at still
            # Stopped, it accepts nothing and receives no userfaultfd: what is seen now is
            # what it has when it dies (a connection queued on its socket is seen too).
            if not _is_daemon(pid, born, here) or not idle(pid, pidfd):
                return False
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            killed = True
        except ProcessLookupError:
            return False
        finally:
            if not killed and not already:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, signal.SIGCONT)
        budget.left -= 1
        return _exited(pidfd)
    finally:
        os.close(pidfd)


def _state(pid: int) -> str | None:
    from .._process._proc import stat_fields  # (the process floor imports this one's)

    st = stat_fields(pid)
    return st[0] if st is not None else None


def _stopped(pid: int) -> bool:
    """Whether ``pid`` is (group-)stopped within :data:`STOP_WAIT`."""
    deadline = time.monotonic() + STOP_WAIT
    while _state(pid) != "T":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _exited(pidfd: int) -> bool:
    poller = select.poll()  # (select.select refuses an fd >= 1024)
    poller.register(pidfd, select.POLLIN)  # readable once it has exited
    return bool(poller.poll(_EXIT_WAIT * 1000))


def _criu_binary() -> str | None:
    """The CRIU torpor runs (``_engine._criu.find_criu``), None if there is none."""
    from .._engine._criu import find_criu

    try:
        return find_criu()
    except (OSError, TorporError):
        return None


def _is_daemon(pid: int, born: int, here: tuple[int, int] | None = None) -> bool:
    """Whether ``pid`` is the process born at ``born``, runs as root the CRIU binary torpor
    uses as ``criu lazy-pages``, and (``here``) works in that directory."""
    if _start_time(pid) != born or not _is_lazy_daemon(pid):
        return False
    try:
        return here is None or _ident(os.stat(f"/proc/{pid}/cwd")) == here
    except OSError:
        return False


def _is_lazy_daemon(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read(4096).split(b"\0")
        if len(argv) < 2 or argv[1] != b"lazy-pages" or (criu := _criu_binary()) is None:
            return False
        with open(f"/proc/{pid}/status", "rb") as fh:
            uids = [ln.split()[1:] for ln in fh.read(8192).splitlines() if ln.startswith(b"Uid:")]
        if uids != [[b"0"] * 4]:
            return False
        return _ident(os.stat(f"/proc/{pid}/exe")) == _ident(os.stat(criu))
    except (OSError, IndexError):
        return False


def _scan() -> list[_Daemon]:
    """The lazy-pages daemons that run now (one pass over ``/proc``)."""
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        pid = int(name)
        born = _start_time(pid)
        if born is None or not _is_lazy_daemon(pid):
            continue
        with contextlib.suppress(OSError):
            found.append(_Daemon(pid, born, _ident(os.stat(f"/proc/{pid}/cwd"))))
    return found


def _unclaimed_daemons(directory: Path, daemons: list[_Daemon], budget: _Budget) -> bool:
    """Whether a lazy-pages daemon still works in ``directory`` once the idle ones are ended
    (one that did not claim it: its starter was killed between its spawn and its claim)."""
    try:
        here = _ident(os.lstat(directory))
    except OSError:
        return True
    busy = False
    for d in daemons:
        if d.cwd == here and _start_time(d.pid) == d.born:
            busy = not _end_if_idle(here, d.pid, d.born, budget) or busy
    return busy


def idle(pid: int, pidfd: int | None = None) -> bool:
    """Whether the lazy-pages daemon ``pid`` serves nothing and nothing is connected to it:
    no userfaultfd among its fds and no socket but one listening with nothing queued, each
    asked through a duplicate of its fd (``pidfd``: one open on ``pid``). Whatever cannot be
    read counts as busy."""
    own = pidfd is None
    try:
        if pidfd is None:
            pidfd = os.pidfd_open(pid)
        try:
            listening = 0
            for fd, link in _fds.links(pid).items():
                if link == _fds.UFFD_LINK:
                    return False
                if link.startswith(_fds.SOCKET_LINK):
                    if not _listening_empty(pidfd, fd):
                        return False
                    listening += 1
            return listening <= 1  # CRIU's daemon listens on one socket
        finally:
            if own:
                os.close(pidfd)
    except OSError:
        return False


def _listening_empty(pidfd: int, fd: int) -> bool:
    """Whether the socket ``fd`` of the process ``pidfd`` listens with no connection queued."""
    dup = _fds.pidfd_getfd(pidfd, fd)
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        raise
    with sock:
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False
        poller = select.poll()
        poller.register(sock, select.POLLIN)  # a listening socket: readable if one is queued
        return not poller.poll(0)


def sweep(parents: list[Path]) -> list[Path]:
    """Remove the lazy work dirs and local parts under ``parents`` nobody uses (see the module
    docstring); what was removed."""
    removed = []
    # /proc is scanned only once a directory nobody claims is to be removed (a daemon that
    # never claimed it may work there): a sweep finds none, most times, and runs before
    # every `torpor restore` and `torpor ps`.
    scanned: list[list[_Daemon]] = []

    def daemons() -> list[_Daemon]:
        if not scanned:
            scanned.append(_scan())
        return scanned[0]

    budget = _Budget(MAX_KILLS)
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
                end_orphans(path, budget=budget)
                if not in_use(path) and not _unclaimed_daemons(path, daemons(), budget):
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
