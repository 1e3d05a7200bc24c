"""Locks between torpor commands: one checkpoint of a process at a time, one start per name.

Each lock is an ``flock(2)`` on a file in ``<home>/locks`` (0700), taken without waiting: the
loser gets a one-line error naming the holder's pid. A lock goes when its holder closes it or
dies, so a killed command never leaves one held. Files are 0600, opened ``O_NOFOLLOW``
relative to the directory's fd and refused unless regular files of ours, and named from
numbers or a hash only, never from a string from outside.

- ``dump.<pid>-<start time>.lock``: held by the process that runs CRIU on that process, for
  the whole dump and commit: the detached checkpointer of ``torpor checkpoint`` (so a killed
  command does not let it go early, and a killed checkpointer does), or the keeper for a
  self-dump of its child.
- ``checkpoint.<pid>-<start time>.lock``: held by a ``torpor checkpoint`` command while it asks
  the process to checkpoint itself (coordinated): the process runs its hooks before the
  keeper takes the dump lock, and no plain dump may start meanwhile.
- ``name.<hash>.lock``: held by the keeper starting a managed process under that name, from
  before it starts anything until the process's record is written (see ``_registry``).

Processes are identified by pid *and* start time, so a lock of a process that ended never
stands in the way of a new one with its pid. The holder writes its pid and start time into
the file and unlinks the file before it lets go, so an existing file naming a live holder is
a held lock: :func:`holder_of` reads it without taking it (taking it to test would make a
taker fail). A taker checks that the file it locked is still the one at the path (a holder
letting go may have unlinked it meanwhile). Files left by killed holders are swept.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from .. import _paths, _safe
from .._errors import AlreadyExistsError, TorporError, UnsafePathError
from ._proc import ProcRef, start_time

_PREFIXES = ("dump.", "checkpoint.", "name.")
_SUFFIX = ".lock"
_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a planted FIFO never hangs
_MAX_HOLDER = 256  # bytes of a holder record
# A holder writes its record right after it took the lock: a loser reading too early waits
# this long for it.
_HOLDER_WAIT = 0.2  # seconds
_ATTEMPTS = 20  # files unlinked under a taker's feet, in a row, before it gives up


class CheckpointBusyError(AlreadyExistsError):
    """Another torpor command is checkpointing the process (``pid``); ``holder`` is the pid of
    the torpor process that holds the lock (None if it could not be read)."""

    def __init__(self, msg: str, *, pid: int, holder: int | None, hint: str | None = None):
        super().__init__(msg, hint=hint)
        self.pid = pid
        self.holder = holder


class Lock:
    """A held lock; :meth:`release` (or leaving the ``with`` block) lets it go."""

    def __init__(self, dir_fd: int, fd: int, file: str) -> None:
        self._dir_fd = dir_fd
        self._fd: int | None = fd
        self.file = file

    @property
    def held(self) -> bool:
        """Whether it is still held by this object."""
        return self._fd is not None

    def release(self) -> None:
        """Let go of the lock (unlinking its file first: see the module docstring)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                if _same_file(self._dir_fd, self.file, os.fstat(fd)):
                    os.unlink(self.file, dir_fd=self._dir_fd)
        finally:
            os.close(fd)
            os.close(self._dir_fd)

    def __enter__(self) -> Lock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class _Busy(Exception):
    def __init__(self, holder: int | None) -> None:
        super().__init__(holder)
        self.holder = holder


# -- the locks --------------------------------------------------------------------------------


def dumping(target: ProcRef, *, unless_requested: bool = False) -> Lock:
    """The dump lock of ``target``, for the process that runs CRIU on it.

    ``unless_requested``: also refuse while another command holds ``target``'s request lock
    (a plain dump must not start while the process checkpoints itself at someone's request).
    :class:`CheckpointBusyError` if another holds either."""
    try:
        lock = _take(_dump_file(target))
    except _Busy as busy:
        raise _busy(target, busy.holder) from None
    if unless_requested:
        holder = holder_of(_request_file(target))
        if holder is not None and holder != os.getpid() and holder not in _requesters:
            lock.release()
            raise _busy(target, holder)
    return lock


# Pids of the commands that took a request lock in this process or in the one that forked it:
# a checkpointer forked by the command holding the request lock dumps on its behalf.
_requesters: set[int] = set()


def requesting(target: ProcRef) -> Lock:
    """The request lock of ``target``, held by a ``torpor checkpoint`` command around a
    coordinated request; refused (:class:`CheckpointBusyError`) if another command holds it or
    a dump of ``target`` is under way."""
    try:
        lock = _take(_request_file(target))
    except _Busy as busy:
        raise _busy(target, busy.holder) from None
    holder = holder_of(_dump_file(target))
    if holder is not None and holder != os.getpid():
        lock.release()
        raise _busy(target, holder)
    _requesters.add(os.getpid())
    return lock


def starting(name: str) -> Lock:
    """The lock of the managed process name ``name`` (checked by the caller), held while a
    process is started under it; :class:`~torpor.AlreadyExistsError` if another command
    holds it."""
    try:
        return _take(name_file(name))
    except _Busy as busy:
        who = f" (pid {busy.holder})" if busy.holder is not None else ""
        raise AlreadyExistsError(
            f"a managed process named {name!r} is being started by another torpor command{who}",
            hint="choose another --name",
        ) from None


def holder_of(file: str) -> int | None:
    """The pid of the live holder of lock file ``file``, or None if it is not held (no file,
    or its holder is gone). Reads the holder's record only: never takes the lock."""
    with _locks_dir() as dir_fd:
        return _live_holder(dir_fd, file)


def name_file(name: str) -> str:
    """The name of the lock file of managed process name ``name`` (a hash: names are not
    file names here)."""
    return f"name.{hashlib.sha256(name.encode()).hexdigest()[:40]}{_SUFFIX}"


def _dump_file(target: ProcRef) -> str:
    return f"dump.{int(target.pid)}-{int(target.start_time)}{_SUFFIX}"


def _request_file(target: ProcRef) -> str:
    return f"checkpoint.{int(target.pid)}-{int(target.start_time)}{_SUFFIX}"


def _busy(target: ProcRef, holder: int | None) -> CheckpointBusyError:
    who = f" (pid {holder})" if holder is not None else ""
    return CheckpointBusyError(
        f"pid {target.pid} is being checkpointed by another torpor command{who}",
        pid=target.pid,
        holder=holder,
        hint="wait for it to finish, then checkpoint again",
    )


# -- files ------------------------------------------------------------------------------------


def locks_path() -> Path:
    """``<home>/locks``, checked (made 0700 if missing)."""
    return _paths.private_dir(_paths.home() / "locks", what="locks directory")


def _open_dir() -> tuple[int, Path]:
    path = locks_path()
    fd = _safe.open_dir(path)
    try:
        _safe.check_private(path, what="locks directory", fd=fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, path


@contextlib.contextmanager
def _locks_dir() -> Iterator[int]:
    fd, _ = _open_dir()
    try:
        yield fd
    finally:
        os.close(fd)


def _take(file: str) -> Lock:
    """Take lock file ``file`` without waiting; :class:`_Busy` if another holds it."""
    dir_fd, path = _open_dir()
    try:
        _sweep(dir_fd, path)
        for _ in range(_ATTEMPTS):
            fd = _open(dir_fd, path, file, os.O_RDWR | os.O_CREAT)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd)
                    if holder is not None and holder.alive():
                        raise _Busy(holder.pid) from None
                    if holder is None and _same_file(dir_fd, file, os.fstat(fd)):
                        raise _Busy(None) from None  # a holder that never said who it is
                    # A dead holder's file, held for a moment by a sweep removing it (or
                    # let go and unlinked meanwhile): try again.
                    os.close(fd)
                    time.sleep(0.005)
                    continue
                if not _same_file(dir_fd, file, os.fstat(fd)):
                    os.close(fd)  # unlinked by a holder letting go: take the new one
                    continue
                _write_holder(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            return Lock(dir_fd, fd, file)
        raise TorporError(f"cannot take lock {path / file}: it keeps being replaced")
    except BaseException as exc:
        os.close(dir_fd)
        if isinstance(exc, OSError):  # a full disk: one line naming it, not an OSError
            from .._images._incomplete import disk_problem, mount_point

            raise TorporError(
                f"cannot take lock {path / file}: {disk_problem(exc, path)} (nothing was done)",
                hint=f"free space on {mount_point(path)}",
            ) from exc
        raise


def _open(dir_fd: int, path: Path, file: str, flags: int) -> int:
    """Open lock file ``file`` (created 0600 with ``O_CREAT`` in ``flags``), refusing a
    symlink, anything but a regular file, or a file another user could change."""
    where = path / file
    try:
        fd = os.open(file, flags | _OPEN, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _unsafe(where, "is a symlink") from exc
        raise
    try:
        st = os.fstat(fd)
        problem = _safe.private_file_problem(st)
        if problem is not None:
            raise _unsafe(where, problem)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unsafe(where: Path, problem: str) -> UnsafePathError:
    return UnsafePathError(
        f"lock file {where} {problem}; refused",
        path=where,
        hint=f"torpor did not make it: remove {where}",
    )


def _same_file(dir_fd: int, file: str, st: os.stat_result) -> bool:
    try:
        now = os.stat(file, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _write_holder(fd: int) -> None:
    me = os.getpid()
    record = json.dumps({"pid": me, "start_time": start_time(me)}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)


def _holder(fd: int) -> ProcRef | None:
    """The holder recorded in an open lock file (waiting a moment for a holder that has just
    taken it to write it), or None."""
    deadline = time.monotonic() + _HOLDER_WAIT
    while True:
        ref = _parse_holder(os.pread(fd, _MAX_HOLDER + 1, 0))
        if ref is not None or time.monotonic() >= deadline:
            return ref
        time.sleep(0.005)


def _parse_holder(raw: bytes) -> ProcRef | None:
    if len(raw) > _MAX_HOLDER:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    pid, born = data.get("pid"), data.get("start_time")
    if type(pid) is not int or type(born) is not int or pid <= 0:
        return None
    return ProcRef(pid, born)


def _live_holder(dir_fd: int, file: str) -> int | None:
    ref = _recorded_holder(dir_fd, file)
    return ref.pid if ref is not None and ref.alive() else None


def _recorded_holder(dir_fd: int, file: str) -> ProcRef | None:
    """The holder recorded in ``file`` (None: no file, not ours, or no record yet)."""
    try:
        fd = os.open(file, os.O_RDONLY | _OPEN, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or _safe.owner_problem(st) is not None:
            return None  # not one of ours: taking it will say so
        return _parse_holder(os.pread(fd, _MAX_HOLDER + 1, 0))
    finally:
        os.close(fd)


def _sweep(dir_fd: int, path: Path) -> None:
    """Remove lock files whose recorded holder is gone without letting go (killed). One is
    only unlinked while locked by us, so a live holder's file is never removed; nor is one
    with no record yet (a taker creates the file, then locks it, then writes its record:
    locking it first would make that taker fail)."""
    with os.scandir(dir_fd) as it:
        names = [e.name for e in it if e.name.startswith(_PREFIXES) and e.name.endswith(_SUFFIX)]
    for file in names:
        try:
            holder = _recorded_holder(dir_fd, file)
            if holder is None or holder.alive():
                continue
            fd = _open(dir_fd, path, file, os.O_RDWR)
        except (OSError, TorporError):
            continue  # gone meanwhile, or not ours: left for the taker to refuse
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(dir_fd, file, os.fstat(fd)):
                os.unlink(file, dir_fd=dir_fd)
        except OSError:
            pass  # held (being taken right now) or gone
        finally:
            os.close(fd)
