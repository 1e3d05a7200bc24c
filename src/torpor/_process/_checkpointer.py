"""Checkpoints from outside that commit whatever happens to the command that asked for them.

``torpor checkpoint PID`` (and :func:`torpor.checkpoint_process`) does not dump in its own
process: it starts a *checkpointer*, a detached process (double fork + ``setsid``: not its
child, in a session of its own, so neither the command's death nor its terminal's signals
reach it) that dumps with CRIU, commits the image and reports over a pipe; the command relays
the report. Through the agent, the worker running the command starts it the same way.

The rule, at CRIU's notifications (``notify_scripts``):

- **Until CRIU has written the whole image the checkpoint can be aborted, and the process
  keeps running.** The command's interruption (Ctrl-C; SIGTERM and SIGHUP, which the CLI
  treats as Ctrl-C; an agent client that hangs up) or its death (the control pipe closes), or
  a SIGTERM to the checkpointer, aborts at CRIU's next notification: ``pre-dump`` (nothing
  done yet) or ``post-dump`` (CRIU thaws the tree instead of killing it).
- **At post-dump, with the tree still frozen, the checkpointer vouches for the image** before
  it lets CRIU kill the process: every file a regular one, hashed (the page files were hashed
  while CRIU wrote them). One it cannot vouch for is refused, and the process keeps running.
  It then renames its space reserve into the commit mark (``_images._incomplete``): from
  there on the image is kept, whatever happens. An interruption that comes later is too late:
  the checkpoint completes, and the command says so.
- **The commit** (manifest, signature, rename, stamp) comes once CRIU has ended, in the
  space reserved before CRIU started, so a disk CRIU filled cannot stop it. If it still
  fails, or the checkpointer dies, the staging directory stays as an *incomplete* image that
  ``torpor images`` lists and ``torpor image repair`` finishes (:class:`IncompleteImageError`
  names it).
- With ``leave_running`` CRIU never kills the process: post-dump only checks for an abort
  (the freeze is not made longer) and a failed commit simply fails (the process runs).

A disk that fills before CRIU starts or while it writes is one line naming the disk; the
process keeps running.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._engine import CriuEngine, DumpOptions, NotifyEvent, criu_version
from .._errors import DumpError, ProcessNotFoundError, TorporError
from .._images import _index
from .._images._hashing import GrowingHasher, hash_files
from .._images._image import Image, Staging, staged_files
from .._images._incomplete import (
    COMMITTING_NAME,
    RESERVE_NAME,
    IncompleteImageError,
    Record,
    disk_problem,
    drop_bookkeeping,
    free_bytes,
    give_back,
    lock,
    mount_point,
    no_space,
    reserve,
    sweep,
)
from .._images._manifest import FileEntry, now_iso
from .._images._stats import read_dump_stats_at
from .._safe import open_dir
from . import _locks, _registry
from ._finalize import supervision_of, with_supervision
from ._proc import ProcRef, descendants, detached, facts
from ._report import Outcome as Outcome
from ._report import decode_error as decode_error
from ._report import encode_error as encode_error
from ._report import orphaned, outcome_of

# Room for the manifest, signature and stamp (~250 bytes per file, ~12 files per process)
# and the temporary files they are written through, in whole blocks of any filesystem.
# A dump that fails with less than this free failed for want of space, whatever CRIU's log
# says (its own log lines are lost on a full disk).
_LOW_SPACE = 1 << 20
_NO_SPACE_TEXT = "No space left on device"
_ABORT = b"a"


class CheckpointAbortedError(DumpError):
    """The checkpoint was interrupted before CRIU had written the image; the process keeps
    running and nothing was kept."""


@dataclass(frozen=True)
class Job:
    """One checkpoint from outside: the process, where its image goes, how, under what name."""

    target: ProcRef
    dest: Path
    options: DumpOptions
    name: str
    pool: str | None = None  # once committed, the checkpointer pushes the image there


# -- the command's side --------------------------------------------------------------------------


def run(
    job: Job,
    *,
    engine: CriuEngine | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Outcome:
    """Checkpoint ``job`` through a detached checkpointer and return how it ended, or raise
    its error. A ``KeyboardInterrupt`` while waiting asks it to abort (see the module
    docstring); the wait goes on until it has answered. ``on_progress(bytes, total)`` is
    told how the push to ``job.pool`` goes."""
    staging = Staging(job.dest)  # its path is chosen here: we look at it if the checkpointer dies
    report_r, report_w = os.pipe()
    ctl_r, ctl_w = os.pipe()
    theirs = (report_w, ctl_r)
    ours = (report_r, ctl_w)
    stop = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    # Held back until we wait: an interruption must find us ready to pass it on.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        try:
            detached(lambda: _checkpointer(job, engine, staging, theirs, ours, old_mask))
        except OSError as exc:
            for fd in ours:
                os.close(fd)
            raise DumpError(
                f"checkpoint of pid {job.target.pid} failed: cannot start the checkpointer: "
                f"{exc.strerror} (nothing was done)",
                pid=job.target.pid,
            ) from exc
        finally:
            for fd in theirs:
                os.close(fd)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise
    try:
        return _relay(job, staging, report_r, ctl_w, old_mask, on_progress)
    finally:
        for fd in ours:
            os.close(fd)


def _relay(
    job: Job,
    staging: Staging,
    report_r: int,
    ctl_w: int,
    mask: set[int],
    on_progress: Callable[[int, int], None] | None,
) -> Outcome:
    asked = False
    buf = b""
    restored = False
    while True:
        try:
            if not restored:
                restored = True
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            chunk = os.read(report_r, 1 << 16)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if "ok" in msg:
                    return outcome_of(msg, interrupted=asked)
                if "progress" in msg and on_progress is not None:
                    on_progress(int(msg["progress"]), int(msg["total"]))
        except KeyboardInterrupt:
            if not asked:
                asked = True
                with contextlib.suppress(OSError):
                    os.write(ctl_w, _ABORT)
    return orphaned(job.target, job.dest, staging)


# -- the checkpointer's side -----------------------------------------------------------------


def _checkpointer(
    job: Job,
    engine: CriuEngine | None,
    staging: Staging,
    theirs: tuple[int, int],
    ours: tuple[int, int],
    mask: set[int],
) -> None:  # pragma: no cover - runs in the detached process; the integration tests drive it
    report_w, ctl_r = theirs
    for fd in ours:
        os.close(fd)  # our holding the command's ends would hide its death
    _drop_inherited(keep={report_w, ctl_r})
    control = Control(ctl_r)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, control.on_sigterm)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    _send(report_w, {"checkpointer": os.getpid()})
    try:
        # One checkpoint of a process at a time: the lock is held here, by the process that
        # dumps and commits, so the command's death does not let it go early and ours does.
        with _locks.dumping(job.target, unless_requested=True):
            image, warnings = Checkpointer(job, engine or CriuEngine(), staging, control).perform()
        msg: dict[str, Any] = {"ok": True, "image": str(image.path), "warnings": warnings}
        stats = read_dump_stats_at(image.path)  # before a push takes the local copy away
        msg["frozen_ms"] = stats.frozen_ms if stats is not None else None
    except BaseException as exc:
        msg = {"ok": False, "error": encode_error(exc)}
    if msg["ok"] and job.pool is not None:
        # After the commit, and still whatever happens to the command (it only relays).
        from ._topool import reported_push

        msg.update(reported_push(image, job.name, job.pool, job.target.pid, report_w))
    _send(report_w, msg)


def _send(fd: int, msg: Mapping[str, Any]) -> None:
    # The command may be gone: what we did stands, reported or not.
    with contextlib.suppress(OSError):
        os.write(fd, json.dumps(msg).encode() + b"\n")


def _drop_inherited(*, keep: set[int]) -> None:
    """Let go of every file the command had open (its terminal, its stdout pipe, an agent
    client's socket), keeping the fd numbers, which objects of the forked interpreter may
    still close: each becomes ``/dev/null``."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd != devnull and fd not in keep:
            with contextlib.suppress(OSError):
                os.dup2(devnull, fd, inheritable=fd <= 2)
    os.close(devnull)


class Control:
    """Whether the checkpointer has been asked to abort: by the command (a byte, or the end
    of the control pipe ``fd``: it is gone), or by a SIGTERM. ``fd`` None: never."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.reason: str | None = None
        self._sigterm = False

    def on_sigterm(self, signum: int, frame: object) -> None:
        """Signal handler: a SIGTERM to the checkpointer aborts if it is not too late."""
        self._sigterm = True

    def check(self) -> str | None:
        """Why to abort, or None."""
        if self.reason is None and self._sigterm:
            self.reason = "the checkpointer got SIGTERM"
        if self.reason is None and self.fd is not None:
            ready, _, _ = select.select([self.fd], [], [], 0)
            if ready:
                data = os.read(self.fd, 64)
                self.reason = "the command was interrupted" if data else "the command ended"
        return self.reason


class Checkpointer:
    """Dumps ``job`` into ``staging`` and commits it (see the module docstring). Runs in the
    detached process; :meth:`perform` can run in any process (the unit tests use fakes)."""

    def __init__(self, job: Job, engine: CriuEngine, staging: Staging, control: Control):
        self.job = job
        self.engine = engine
        self.staging = staging
        self.control = control
        self.committing = False  # CRIU was let kill the process: the image must be kept
        self.refused: BaseException | None = None
        self.hashed: dict[str, FileEntry] = {}
        self.supervision: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        """The dumped process's pid."""
        return self.job.target.pid

    def perform(self) -> tuple[Image, list[str]]:
        """The image and any warnings, or raise: :class:`CheckpointAbortedError`, a
        :class:`DumpError` (the process keeps running, nothing kept),
        :class:`IncompleteImageError` (the image is kept for ``torpor image repair``)."""
        job = self.job
        reason = self.control.check()
        if reason is not None:
            raise self._aborted(reason, "nothing was done")
        sweep(job.dest.parent)  # space of leftovers that cannot be used, back first
        if not job.target.alive():
            raise ProcessNotFoundError(f"no process with pid {self.pid}", pid=self.pid)
        cmdline, rss = facts(self.pid)
        tree = 1 + sum(1 for _ in descendants(self.pid))
        # Read now, while the process runs: the manifest carries it from its first write.
        with contextlib.suppress(OSError, TorporError):  # never a reason to fail
            managed = _registry.find_by_pid(self.pid)
            if managed is not None and managed.ref == job.target:
                self.supervision = supervision_of(managed.name)
        record = Record(
            dest=job.dest.name,
            name=job.name,
            pid=self.pid,
            start_time=job.target.start_time,
            cmdline=cmdline,
            rss_bytes=rss,
            criu_version=criu_version(),
            tcp_established=job.options.tcp_established,
            shell_job=job.options.shell_job,
            leave_running=job.options.leave_running,
            created=now_iso(),
        )
        try:
            self.staging.create()
        except OSError as exc:
            raise self._before(exc) from exc
        # Listed by `torpor images` wherever it goes (-o): as incomplete if it cannot be
        # finished; an entry whose checkpoint failed is dropped when its directory is not there.
        _index.try_add(job.dest)
        try:
            dir_fd = open_dir(self.staging.path)
        except BaseException:
            self.staging.discard()
            raise
        try:
            lock(dir_fd, wait=True)  # a sweep looking at it meanwhile lets go at once
            return self._staged(dir_fd, record, tree)
        finally:
            os.close(dir_fd)

    def _staged(self, dir_fd: int, record: Record, tree: int) -> tuple[Image, list[str]]:
        try:
            try:
                record.write(dir_fd)
                reserve(dir_fd, tree)
            except OSError as exc:
                raise self._before(exc) from exc
            self._dump(dir_fd)
            return self._commit(dir_fd, record)
        except BaseException as exc:
            if self.committing:
                raise self._kept(exc) from exc
            self.staging.discard()
            raise

    def _before(self, exc: OSError) -> DumpError:
        parent = self.job.dest.parent
        return DumpError(
            f"checkpoint of pid {self.pid} refused: {disk_problem(exc, parent)}, where its "
            "image goes (nothing was done; the process keeps running)",
            pid=self.pid,
            image=self.job.dest,
            hint=f"free space on {mount_point(parent)}, or checkpoint to another disk with -o",
        )

    # -- the dump --------------------------------------------------------------------------

    def _dump(self, dir_fd: int) -> None:
        options = self.job.options

        def notify(event: NotifyEvent) -> bool:
            if event.name not in ("pre-dump", "post-dump"):
                return True
            if self.control.check() is not None:
                return False  # before CRIU starts, or CRIU thaws the tree
            if event.name == "pre-dump" or options.leave_running:
                # Nothing is killed with leave_running: the commit waits until CRIU has
                # thawed the tree, not to make the freeze longer.
                return True
            try:
                assert hasher is not None  # made for every dump that is not leave_running
                self.hashed = self._vouch(dir_fd, hasher.entries())
                os.rename(RESERVE_NAME, COMMITTING_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                os.fsync(dir_fd)
            except (OSError, TorporError) as exc:
                self.refused = exc
                return False
            self.committing = True
            return True

        # Hashing the pages while CRIU writes them shortens the time to post-dump, where a
        # stopping checkpoint vouches for the image before CRIU kills the process. With
        # leave_running nothing waits for that, and on two cores the hashing thread competes
        # with CRIU while the process is frozen (1 GiB into tmpfs: frozen 431-487 ms hashed
        # after, 479-506 ms hashed during, bare CRIU 439-530 ms): hashed at the commit then,
        # once the process runs again.
        hasher = GrowingHasher(self.staging.path) if not options.leave_running else None
        with hasher if hasher is not None else contextlib.nullcontext():
            try:
                self.engine.dump(self.pid, self.staging.path, options, notify=notify)
            except DumpError as exc:
                if self.committing and not self.job.target.alive():
                    # CRIU failed after it was let kill the process: what it left, whole and
                    # vouched for at post-dump, is all there is of the process.
                    return
                self.committing = False  # the process lives: nothing need be kept
                raise self._dump_failure(exc) from exc

    def _vouch(self, dir_fd: int, vouched: Mapping[str, FileEntry]) -> dict[str, FileEntry]:
        """Every staged file, each a regular file, hashed (but those ``vouched`` for, hashed
        while CRIU wrote them, if their size is still the same)."""
        source = str(self.staging.path)
        entries = staged_files(dir_fd, source=source)
        known = {n: e for n, e in vouched.items() if n in entries and entries[n].st_size == e.size}
        fresh = hash_files(dir_fd, [n for n in entries if n not in known], source=source)
        return {**known, **{e.name: e for e in fresh}}

    def _dump_failure(self, exc: DumpError) -> DumpError:
        reason = self.control.check()
        if reason is not None:
            return self._aborted(reason, "CRIU thawed it")
        pid = self.pid
        if self.refused is not None:
            return DumpError(
                f"checkpoint of pid {pid} failed: its image could not be checked before the "
                f"process was stopped: {_why(self.refused, self.staging.path)} "
                f"({self._fate()})",
                pid=pid,
                image=self.job.dest,
                hint=getattr(self.refused, "hint", None),
            )
        if self._out_of_space(exc):
            mount = mount_point(self.staging.path)
            kept = self._fate()
            log = exc.log_path if exc.log_path and not _inside(exc.log_path, self.staging) else ""
            return DumpError(
                f"checkpoint of pid {pid} failed: {no_space(self.staging.path)} while CRIU "
                f"wrote the image ({kept}" + (f"; log: {log})" if log else ")"),
                pid=pid,
                image=self.job.dest,
                log_path=log or None,
                log_lines=exc.log_lines,
                hint=f"free space on {mount}, or checkpoint to another disk with -o",
            )
        return exc

    def _out_of_space(self, exc: DumpError) -> bool:
        if any(_NO_SPACE_TEXT in line for line in exc.log_lines):
            return True
        try:
            return free_bytes(self.staging.path) < _LOW_SPACE
        except OSError:
            return False

    def _aborted(self, reason: str, done: str) -> CheckpointAbortedError:
        return CheckpointAbortedError(
            f"checkpoint of pid {self.pid} aborted: {reason} before CRIU had written the image "
            f"({done}; {self._fate()})",
            pid=self.pid,
            image=self.job.dest,
        )

    def _fate(self) -> str:
        """What became of the process, checked (CRIU thaws it when a dump fails; it may have
        ended on its own meanwhile)."""
        return "the process keeps running" if self.job.target.alive() else "the process is gone"

    # -- the commit ------------------------------------------------------------------------

    def _commit(self, dir_fd: int, record: Record) -> tuple[Image, list[str]]:
        try:
            if not self.committing:  # leave_running: the files are checked now
                self.hashed = self._vouch(dir_fd, self.hashed)
            give_back(dir_fd)  # the reserve's space, for what follows
            image = self.staging.commit(
                with_supervision(record.manifest, self.supervision), self.hashed
            )
        except (OSError, TorporError) as exc:
            if self.committing:
                raise
            raise DumpError(
                f"checkpoint of pid {self.pid} failed: its image could not be finished: "
                f"{_why(exc, self.staging.path)} (the process keeps running)",
                pid=self.pid,
                image=self.job.dest,
            ) from exc
        self.committing = False
        drop_bookkeeping(dir_fd)
        warnings: list[str] = []
        if not self.job.options.leave_running:
            try:
                _registry.mark_checkpointed(self.job.target, image.path)
            except (OSError, TorporError) as exc:
                warnings.append(f"the process's record was not updated: {_why(exc, image.path)}")
        return image, warnings

    def _kept(self, exc: BaseException) -> IncompleteImageError:
        path = self.staging.path
        fix = (
            f"free space on {mount_point(path)}, then "
            if isinstance(exc, OSError) and "no space" in _why(exc, path)
            else ""
        )
        return IncompleteImageError(
            f"checkpoint of pid {self.pid} stopped the process but could not finish its image: "
            f"{_why(exc, path)}; the image is kept at {path}",
            image=path,
            hint=f"{fix}`torpor image repair {path}` finishes it",
        )


def _why(exc: BaseException, path: Path) -> str:
    if isinstance(exc, OSError):
        return disk_problem(exc, path)
    if isinstance(exc, TorporError):
        return exc.msg
    return repr(exc)


def _inside(path: str, staging: Staging) -> bool:
    return Path(path).parent == staging.path


@contextmanager
def interruptible_by(signals: tuple[int, ...]) -> Iterator[None]:
    """Within: each of ``signals`` raises ``KeyboardInterrupt`` as SIGINT does (only in the
    main thread; elsewhere nothing changes)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old: dict[int, Callable[..., Any] | int | None] = {}
    try:
        for sig in signals:
            old[sig] = signal.signal(sig, interrupt)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
