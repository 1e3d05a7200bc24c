"""Records of managed processes (started by ``torpor run`` or ``torpor restore``).

One JSON file per process under ``<home>/procs``, written atomically (0600, ``O_EXCL``). The
keeper that parents a process writes its exit status there when it ends.

A record names a pid that root will signal (``torpor kill``) or dump (``torpor checkpoint
NAME``), so nothing in one is believed as read:

- a record file is opened relative to the records directory with ``O_NOFOLLOW``, must be a
  regular file owned by the effective user or root and not writable by group or others, and
  must hold exactly the fields and types torpor writes (else: skipped by :func:`list_all`, a
  clear error when named);
- before its pid is acted on, :func:`open_checked` re-checks the live process: the same
  ``(pid, start time)``, a child of the recorded keeper (same pid and start time), and that
  keeper a torpor keeper (it holds the keeper socket of its own pid, which a process that only
  knows a pid cannot fake). A pidfd is taken first, so the process checked is the process
  signalled even if the pid is reused meanwhile;
- a process whose keeper is gone (killed: its pid is dead or names another process) is still
  torpor's if it proves it itself: the same ``(pid, start time)``, pid 1 of its own PID
  namespace (``NSpid``), and ``TORPOR_MANAGED=<managed_as>`` in its initial environment (set
  by the keeper at exec, kept by restored copies). ``torpor ps`` says ``running (no
  keeper)`` for it: its exit status will not be recorded (the record stays until then).

Records match what runs (issue 12 item 4):

- a name is taken for a new process by :func:`reserve` before anything is started: the name's
  lock (``_locks.starting``) is held until the record is written, and a name whose record
  says it is running is refused. Two commands starting one name: exactly one gets it;
- a record is written only once its process runs as asked (a restore whose copies were
  killed, or a ``run`` that failed, leaves none), replacing an ended one atomically (rename);
- every read-modify-write of a record (the keeper noting an exit, a checkpoint noting where
  the process went) holds the records directory's ``flock`` and changes a record only if it
  still names the very process (pid and start time): a newer process under the name is never
  overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .. import _paths, _safe
from .._errors import (
    AlreadyExistsError,
    PermissionDeniedError,
    ProcessNotFoundError,
    TorporError,
    UnsafePathError,
    UsageError,
)
from .._images._store import check_name
from . import _locks, _proc
from ._keeper_address import address
from ._locks import Lock
from ._proc import ProcRef

MAX_RECORD = 1 << 20  # bytes; a record is a few hundred, argv at most a few MiB


class RecordError(TorporError):
    """A record in the torpor home that is not one torpor wrote (bad JSON, fields, types)."""


@dataclass(frozen=True)
class ManagedProcess:
    """A process torpor started (or restored) and keeps a parent (keeper) for."""

    name: str
    pid: int
    start_time: int
    keeper_pid: int
    command: tuple[str, ...]
    started: str
    log_path: str | None = None
    restored_from: str | None = None
    exit_status: int | None = None
    ended: str | None = None
    checkpointed_to: str | None = None
    # The keeper's start time: with ``keeper_pid``, the keeper's identity (pids are reused).
    # Filled in by :func:`save` in the keeper itself; records of older torpors lack it.
    keeper_start_time: int | None = None
    # The name the process's tree was first started under (``TORPOR_MANAGED`` in its initial
    # environment, which a restored copy keeps from the original): how it is still known to
    # be torpor's once its keeper is gone (see check_live). None: not known (older records).
    managed_as: str | None = None
    # Set (to why) while the keeper restores the process: written as soon as CRIU names its
    # pid, before the restore is known to succeed; cleared once it has. A process whose keeper
    # died with this set is killed by the command that started it (see kill_unfinished).
    restoring: str | None = None
    # torpor migrate (docs/migration.md): ``migrating`` while under way, then ``migrated_to``
    # (source) / ``migrated_from`` (target); ``service_addresses`` (ADDR/PREFIX) move with it.
    migrating: str | None = None
    migrated_to: str | None = None
    migrated_from: str | None = None
    service_addresses: tuple[str, ...] = ()

    @property
    def ref(self) -> ProcRef:
        """The process identity."""
        return ProcRef(self.pid, self.start_time)

    @property
    def state(self) -> str:
        """``running``, ``checkpointed`` (killed by a checkpoint), ``exited N`` or ``gone``."""
        if self.ended is None and self.ref.alive():
            return "running"  # (``torpor ps`` adds "no keeper" when its keeper is gone)
        if self.migrated_to and self.exit_status in (None, -9):
            return f"migrated-to {self.migrated_to}"
        if self.checkpointed_to and self.exit_status in (None, -9):
            return "checkpointed"
        if self.exit_status is None:
            return "gone"
        if self.exit_status < 0:
            return f"killed (signal {-self.exit_status})"
        return f"exited {self.exit_status}"

    def evolve(self, **changes: Any) -> ManagedProcess:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)


# field -> the types its JSON value may have (bool is refused where int is meant)
_INT, _OPT_INT, _STR, _OPT_STR = (int,), (int, type(None)), (str,), (str, type(None))
_TYPES: dict[str, tuple[type, ...]] = {
    "name": _STR,
    "pid": _INT,
    "start_time": _INT,
    "keeper_pid": _INT,
    "command": (list,),
    "started": _STR,
    "log_path": _OPT_STR,
    "restored_from": _OPT_STR,
    "exit_status": _OPT_INT,
    "ended": _OPT_STR,
    "checkpointed_to": _OPT_STR,
    "keeper_start_time": _OPT_INT,
    "managed_as": _OPT_STR,
    "restoring": _OPT_STR,
    "migrating": _OPT_STR,
    "migrated_to": _OPT_STR,
    "migrated_from": _OPT_STR,
    "service_addresses": (list,),
}
_REQUIRED = {f.name for f in fields(ManagedProcess) if f.default is MISSING}
assert set(_TYPES) == {f.name for f in fields(ManagedProcess)}


# A managed process's output goes to ``logs/NAME.log``: these names are torpor's own logs.
RESERVED_NAMES = frozenset({"keeper", "agent"})


def _file_name(name: str) -> str:
    check_name(name, what="process name")
    if name in RESERVED_NAMES:
        raise UsageError(
            f"{name!r} is reserved (logs/{name}.log is torpor's own log)",
            hint="choose another --name",
        )
    return f"{name}.json"


@contextlib.contextmanager
def _procs(*, locked: bool = False) -> Iterator[tuple[int, Path]]:
    """The records directory, checked, opened (``O_NOFOLLOW``) and checked again by fd;
    ``locked``: with its ``flock`` held (exclusive) for a read-modify-write. The lock is
    per open file, so a locked section must not open it again (it would wait for itself)."""
    path = _paths.procs_dir()
    fd = _safe.open_dir(path)
    try:
        _safe.check_private(path, what="records directory", fd=fd)
        if locked:
            fcntl.flock(fd, fcntl.LOCK_EX)  # let go with the fd
        yield fd, path
    finally:
        os.close(fd)


def save(rec: ManagedProcess) -> None:
    """Write (or replace) a record atomically: a new 0600 file (``O_EXCL``, ``O_NOFOLLOW``)
    renamed over the old one."""
    with _procs(locked=True) as (dir_fd, _):
        _write(dir_fd, rec)


def _write(dir_fd: int, rec: ManagedProcess) -> None:
    if rec.keeper_start_time is None and rec.keeper_pid == os.getpid():
        # Records are written by their keeper (the process that started them): it knows its
        # own start time, which makes it recognisable later (see open_checked).
        own = _proc.start_time(os.getpid())
        rec = rec.evolve(keeper_start_time=own)
    final = _file_name(rec.name)
    data = json.dumps(asdict(rec), indent=2, sort_keys=True).encode()
    try:
        _safe.replace_file(dir_fd, final, data, source="records directory", durable=False)
    except OSError as exc:  # a full disk (blocks or inodes): one line naming it
        from .._images._incomplete import disk_problem, mount_point

        where = _paths.procs_dir()
        raise TorporError(
            f"cannot write the record of {rec.name!r} in {where}: {disk_problem(exc, where)}",
            hint=f"free space on {mount_point(where)}",
        ) from exc


def update(name: str, target: ProcRef, **changes: Any) -> bool:
    """Apply ``changes`` to the record ``name`` if it still names ``target`` (pid and start
    time); whether it did. A record gone, untrusted or naming a newer process is left as it
    is."""
    with _procs(locked=True) as (dir_fd, path):
        try:
            rec = _read(dir_fd, path, _file_name(name), name)
        except TorporError:
            return False
        if rec.ref != target:
            return False
        _write(dir_fd, rec.evolve(**changes))
        return True


# -- names ------------------------------------------------------------------------------------

# Fresh names tried for one taken automatic name before giving up.
_FRESH_ATTEMPTS = 8


def fresh_name(base: str) -> str:
    """``base`` with a random suffix (for an automatic name that is taken)."""
    return f"{base[:100]}-{secrets.token_hex(3)}"


class Reservation:
    """Names held for processes about to be started (see :func:`reserve`): :attr:`names`, in
    the order asked, each held until the reservation is closed. :meth:`commit` writes the
    record of a process started under one of them."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._locks: dict[str, Lock] = {}

    def _hold(self, name: str, rename_taken: bool) -> None:
        wanted = name
        for _ in range(_FRESH_ATTEMPTS):
            try:
                lock = _locks.starting(name)
            except AlreadyExistsError:
                if not rename_taken:
                    raise
                name = fresh_name(wanted)
                continue
            try:
                _check_free(name)
            except AlreadyExistsError:
                lock.release()
                if not rename_taken:
                    raise
                name = fresh_name(wanted)
                continue
            except BaseException:
                lock.release()
                raise
            self._locks[name] = lock
            self.names.append(name)
            return
        raise AlreadyExistsError(
            f"no free managed process name like {wanted!r} (tried {_FRESH_ATTEMPTS})",
            hint="choose a --name",
        )

    def commit(self, rec: ManagedProcess) -> None:
        """Write ``rec``, whose name this reservation holds (replacing an ended record)."""
        lock = self._locks.get(rec.name)
        if lock is None or not lock.held:
            raise TorporError(f"internal error: name {rec.name!r} is not reserved")
        with _procs(locked=True) as (dir_fd, _):
            _write(dir_fd, rec)

    def close(self) -> None:
        """Let go of every name (started or not)."""
        for lock in self._locks.values():
            lock.release()
        self._locks.clear()


@contextlib.contextmanager
def reserve(names: Sequence[str], *, rename_taken: bool = False) -> Iterator[Reservation]:
    """Hold ``names`` for processes about to be started, until the block ends.

    A name is refused (:class:`~torpor.AlreadyExistsError`) while another command starts a
    process under it or its record says it is running; with ``rename_taken`` (automatic
    names) a taken name is replaced by :func:`fresh_name` instead. Nothing of a refused
    reservation is held."""
    held = Reservation()
    try:
        for name in names:
            held._hold(name, rename_taken)
        yield held
    finally:
        held.close()


def _check_free(name: str) -> None:
    """Refuse ``name`` if its record says it is running."""
    try:
        rec = load(name)
    except ProcessNotFoundError:
        return
    if rec.state == "running":
        raise AlreadyExistsError(
            f"a managed process named {name!r} is running (pid {rec.pid})",
            hint="choose another --name",
        )


def load(name: str) -> ManagedProcess:
    """The record named ``name``: :class:`ProcessNotFoundError` if there is none,
    :class:`~torpor.UnsafePathError` or :class:`RecordError` if it cannot be trusted."""
    file = _file_name(name)
    with _procs() as (dir_fd, path):
        return _read(dir_fd, path, file, name)


def _read(dir_fd: int, dir_path: Path, file: str, name: str) -> ManagedProcess:
    path = dir_path / file
    try:
        fd = os.open(
            file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except FileNotFoundError as exc:
        raise ProcessNotFoundError(
            f"no managed process named {name!r}", hint="`torpor ps` lists managed processes"
        ) from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _unsafe(path, "is a symlink") from exc
        raise RecordError(f"cannot read record {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        problem = _safe.private_file_problem(st)
        if problem is not None:
            raise _unsafe(path, problem)
        raw = os.read(fd, MAX_RECORD + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_RECORD:
        raise _malformed(path, f"is larger than {MAX_RECORD} bytes")
    return _parse(raw, path, name)


def _parse(raw: bytes, path: Path, name: str) -> ManagedProcess:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _malformed(path, "is not JSON") from exc
    if not isinstance(data, dict):
        raise _malformed(path, "is not a JSON object")
    missing = sorted(_REQUIRED - data.keys())
    if missing:
        raise _malformed(path, f"lacks {', '.join(missing)}")
    values: dict[str, Any] = {}
    for key, types in _TYPES.items():
        if key not in data:
            continue
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise _malformed(path, f"has a bad {key} ({type(value).__name__})")
        values[key] = value
    for key in ("command", "service_addresses"):
        if not all(isinstance(a, str) for a in values.get(key, ())):
            raise _malformed(path, f"has a bad {key} (not a list of strings)")
        if key in values:
            values[key] = tuple(values[key])
    if values["name"] != name:
        raise _malformed(path, f"names another process ({values['name']!r})")
    for key in ("pid", "keeper_pid"):
        if values[key] <= 0:
            raise _malformed(path, f"has a bad {key} ({values[key]})")
    return ManagedProcess(**values)


def _unsafe(path: Path, problem: str) -> UnsafePathError:
    return UnsafePathError(
        f"record {path} {problem}; refused",
        path=path,
        hint=f"torpor did not write it: remove {path}",
    )


def _malformed(path: Path, problem: str) -> RecordError:
    return RecordError(
        f"record {path} {problem}; refused", hint=f"torpor did not write it: remove {path}"
    )


def list_all(skipped: list[TorporError] | None = None) -> list[ManagedProcess]:
    """Every record, oldest first. Records that cannot be trusted are left out (and their
    errors appended to ``skipped``, when given)."""
    with _procs() as (dir_fd, path):
        return _list(dir_fd, path, skipped)


def _list(
    dir_fd: int, path: Path, skipped: list[TorporError] | None = None
) -> list[ManagedProcess]:
    out = []
    with os.scandir(dir_fd) as it:
        for entry in it:
            if entry.name.startswith(".") or not entry.name.endswith(".json"):
                continue  # temporary files of save()
            try:
                out.append(_read(dir_fd, path, entry.name, entry.name[: -len(".json")]))
            except (TorporError, OSError) as exc:
                if skipped is not None:
                    skipped.append(exc if isinstance(exc, TorporError) else RecordError(str(exc)))
    return sorted(out, key=lambda r: r.started)


def find_by_pid(pid: int) -> ManagedProcess | None:
    """The running managed process with host pid ``pid``, if any."""
    for rec in list_all():
        if rec.pid == pid and rec.state == "running":
            return rec
    return None


def mark_checkpointed(target: ProcRef, image: Path) -> None:
    """Record that the managed process ``target`` (if it is one) ended in a checkpoint."""
    with _procs(locked=True) as (dir_fd, path):
        for rec in _list(dir_fd, path):
            if rec.ref == target:
                _write(dir_fd, rec.evolve(checkpointed_to=str(image)))


def delete(name: str) -> None:
    """Forget a record."""
    file = _file_name(name)
    with _procs(locked=True) as (dir_fd, _), contextlib.suppress(FileNotFoundError):
        os.unlink(file, dir_fd=dir_fd)


def delete_if(name: str, target: ProcRef) -> bool:
    """Forget the record ``name`` if it still names ``target``; whether it did."""
    with _procs(locked=True) as (dir_fd, path):
        try:
            rec = _read(dir_fd, path, _file_name(name), name)
        except TorporError:
            return False
        if rec.ref != target:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_file_name(name), dir_fd=dir_fd)
        return True


# -- acting on a record's pid ---------------------------------------------------------------


def open_checked(rec: ManagedProcess) -> int:
    """A pidfd of the process ``rec`` names, once it is known to be the very process torpor
    started (see the module docstring); the caller closes it and signals through it
    (``signal.pidfd_send_signal``), so a pid reused since cannot be hit.

    :class:`ProcessNotFoundError` if it has ended; :class:`~torpor.PermissionDeniedError` if
    the live process is not torpor's (a stale or planted record) or the record is too old to
    tell."""
    try:
        pidfd = os.pidfd_open(rec.pid)
    except ProcessLookupError as exc:
        raise _ended(rec) from exc
    try:
        check_live(rec)
    except BaseException:
        os.close(pidfd)
        raise
    return pidfd


def check_live(rec: ManagedProcess) -> None:
    """Refuse (as :func:`open_checked`) unless ``rec`` names a live process torpor started."""
    if rec.ended is not None or not rec.ref.alive():
        raise _ended(rec)
    if rec.keeper_start_time is None:
        raise PermissionDeniedError(
            f"record {rec.name!r} does not say which keeper started pid {rec.pid} (written by "
            "an older torpor), so torpor cannot tell it is its own; nothing signalled",
            hint=f"check it (`ps -o pid,ppid,args -p {rec.pid}`), then stop it with kill",
        )
    problem = _foreign(rec, rec.keeper_start_time)
    if problem is not None and not keeper_alive(rec) and _proves_own(rec):
        problem = None  # its keeper was killed; the process is still the one torpor started
    if problem is not None:
        raise PermissionDeniedError(
            f"record {rec.name!r} names pid {rec.pid}, which torpor did not start "
            f"({problem}); nothing signalled",
            hint="the record is stale or planted: remove "
            f"{_paths.procs_dir() / _file_name(rec.name)}",
        )


def _foreign(rec: ManagedProcess, keeper_start: int) -> str | None:
    """Why the live process of ``rec`` is not torpor's, or None."""
    parent = _proc.parent_pid(rec.pid)
    if parent != rec.keeper_pid:
        return f"its parent is pid {parent}, not the recorded keeper {rec.keeper_pid}"
    if not ProcRef(rec.keeper_pid, keeper_start).alive():
        return f"its parent {parent} is not the recorded keeper (another start time)"
    name = "@" + address(rec.keeper_pid)[1:].decode()
    if not _proc.holds_unix_socket(rec.keeper_pid, name):
        return f"its parent {parent} is not a torpor keeper"
    return None


def keeper_alive(rec: ManagedProcess) -> bool:
    """Whether the keeper ``rec`` names still runs (same pid and start time)."""
    return rec.keeper_start_time is not None and (
        ProcRef(rec.keeper_pid, rec.keeper_start_time).alive()
    )


def managed_name(pid: int) -> str | None:
    """``TORPOR_MANAGED`` in the initial environment of ``pid`` (None if absent, or if the
    process is not there)."""
    try:
        fd = os.open(f"/proc/{pid}/environ", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        env = b""
        while len(env) < MAX_RECORD and (chunk := os.read(fd, 1 << 16)):
            env += chunk  # /proc gives at most a page per read
    except OSError:
        return None
    finally:
        os.close(fd)
    for entry in env.split(b"\0"):
        if entry.startswith(b"TORPOR_MANAGED="):
            return entry[len(b"TORPOR_MANAGED=") :].decode(errors="replace")
    return None


def _proves_own(rec: ManagedProcess) -> bool:
    """Whether the live process of ``rec`` (its keeper gone) is still the one torpor started:
    the same ``(pid, start time)``, pid 1 of its own PID namespace and started with
    ``TORPOR_MANAGED=<managed_as>`` (see the module docstring)."""
    if rec.managed_as is None:
        return False
    try:
        if not _proc.is_namespace_init(rec.pid):
            return False
    except (OSError, ValueError):
        return False
    # Checked after the reads: still the very process (a pid reused meanwhile proves nothing).
    return managed_name(rec.pid) == rec.managed_as and rec.ref.alive()


def kill_unfinished(keeper: ProcRef) -> list[str]:
    """After the keeper ``keeper`` died before reporting: SIGKILL every live process its
    records still mark as ``restoring`` (same pid and start time; restored, perhaps stopped
    until verified, never continued by it) and forget those records. The names killed.

    A restore is all or nothing: its copies are killed rather than left stopped for ever or
    running as half of what was asked. Copies whose restore the keeper finished are left."""
    import signal

    killed = []
    for rec in list_all():
        if (rec.keeper_pid, rec.keeper_start_time) != (keeper.pid, keeper.start_time):
            continue
        if rec.restoring is None or rec.ended is not None:
            continue
        try:
            pidfd = os.pidfd_open(rec.pid)
        except OSError:
            pidfd = None
        if pidfd is not None:
            try:
                if rec.ref.alive():  # the very process, checked through the pidfd's pid
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    killed.append(rec.name)
            finally:
                os.close(pidfd)
        delete_if(rec.name, rec.ref)
    return sorted(killed)


def _ended(rec: ManagedProcess) -> ProcessNotFoundError:
    return ProcessNotFoundError(
        f"managed process {rec.name!r} (pid {rec.pid}) is not running ({rec.state})",
        pid=rec.pid,
        hint="`torpor ps -a` lists ended ones",
    )
