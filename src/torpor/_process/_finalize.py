"""Finishing a self-dump of a process torpor did not start: the files CRIU wrote into a
staging directory become an image, through a detached finaliser.

Such a process (``_selfdump``) creates its staging directory and, before the dump, writes
into it what a checkpoint from outside writes (``_images._incomplete``): the record of what
the manifest needs (:class:`Pending`, stored as an ``_incomplete.Record``) and the space
reserve the commit needs, and it puts the image in the image index (``_images._index``). The
dumped process cannot hold the directory's lock (it is dumped with its fds), so the record says
the directory is the process's while it lives (``held_by_process``). CRIU writes
``stats-dump`` only after a successful dump. With ``leave_running`` the process finalises the
image itself, otherwise (CRIU killed it) the finaliser does, once CRIU has exited: one of the
two, never both, each under the directory's lock.

Finalising gives the reserve back and seals the directory on its fd (``_images._image.seal``:
the one place images are hashed, their manifest written and signed), then renames it to its
image name beside it (``publish``: ``renameat2`` relative to the parent's fd, never
replacing). If that fails — a full disk, a destination that appeared — the directory stays an
*incomplete* image that ``torpor images`` lists and ``torpor image repair`` finishes.

A keeper's self-dumps (``_keeper_dump``) seal and publish with the same functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import AlreadyExistsError, DumpError, TorporError
from .._images import _index
from .._images._image import Sealed, publish, seal
from .._images._incomplete import (
    SUCCESS_MARK,
    IncompleteImageError,
    Record,
    disk_problem,
    drop_bookkeeping,
    give_back,
    lock,
    mount_point,
    reserve,
)
from .._images._manifest import FileEntry, Manifest, now_iso
from .._safe import open_dir
from ._proc import descendants


@dataclass(frozen=True)
class ImageFacts:
    """What a self-dump's manifest says besides its files."""

    name: str
    pid: int
    cmdline: tuple[str, ...]
    rss_bytes: int
    criu_version: str
    tcp_established: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)

    def record(
        self, dest: str, *, start_time: int, leave_running: bool, held_by_process: bool
    ) -> Record:
        """The record a staging directory of this self-dump holds (see ``_incomplete``)."""
        return Record(
            dest=dest,
            name=self.name,
            pid=self.pid,
            start_time=start_time,
            cmdline=self.cmdline,
            rss_bytes=self.rss_bytes,
            criu_version=self.criu_version,
            tcp_established=self.tcp_established,
            shell_job=False,
            leave_running=leave_running,
            created=now_iso(),
            coordinated=True,
            labels=dict(self.labels),
            held_by_process=held_by_process,
        )


def before_dump(dir_fd: int, record: Record, *, staging: Path) -> None:
    """Prepare the empty staging directory ``dir_fd`` (at ``staging``) for the dump of
    ``record``: the record, the space reserve for the commit, and the image's index entry
    (best effort). A disk without room is one line naming it (:class:`DumpError`: nothing was
    done, the process keeps running); a record already there, ``FileExistsError`` (never
    written through)."""
    try:
        record.write(dir_fd)
    except FileExistsError:
        raise
    except OSError as exc:
        drop_bookkeeping(dir_fd)  # what we began to write
        raise _refused(record, staging, exc) from exc
    try:
        reserve(dir_fd, 1 + sum(1 for _ in descendants(record.pid)))
    except OSError as exc:
        drop_bookkeeping(dir_fd)
        raise _refused(record, staging, exc) from exc
    # Listed from now on: as incomplete if it cannot be finished, forgotten if no dump comes.
    _index.try_add(staging.parent / record.dest)


def _refused(record: Record, staging: Path, exc: OSError) -> DumpError:
    return DumpError(
        f"checkpoint of pid {record.pid} refused: {disk_problem(exc, staging.parent)}, where "
        "its image goes (nothing was done; the process keeps running)",
        pid=record.pid,
        image=staging.parent / record.dest,
        hint=f"free space on {mount_point(staging.parent)}, or checkpoint to another disk",
    )


def supervision_of(name: str | None) -> dict[str, Any] | None:
    """The supervision spec of managed process ``name`` as a manifest carries it (None when
    it is not supervised). A spec that cannot be read leaves the checkpoint without one:
    never a reason to fail the checkpoint itself."""
    if name is None:
        return None
    # Imported here: supervision sits above processes (it runs checkpoints and restores).
    from .._supervise import _spec

    try:
        spec = _spec.load(name)
    except (OSError, TorporError):
        return None
    return None if spec is None else spec.to_json()


def with_supervision(
    make: Callable[[list[FileEntry]], Manifest], supervision: Mapping[str, Any] | None
) -> Callable[[list[FileEntry]], Manifest]:
    """``make`` (a record's manifest maker) adding ``supervision`` to the manifest: it must
    be there when the manifest is first written, which is what its signature covers."""
    if supervision is None:
        return make
    return lambda files: make(files).evolve(supervision=dict(supervision))


def seal_reserved(
    dir_fd: int,
    staging: Path,
    record: Record,
    *,
    owner: tuple[int, int] | None = None,
    supervision: Mapping[str, Any] | None = None,
) -> Sealed:
    """Seal the successfully dumped staging directory ``dir_fd`` (at ``staging``) in the
    space it reserved, its files owned by ``owner`` if given (see
    :func:`~torpor._images._image.seal`), its manifest carrying ``supervision``; what was
    sealed. A full disk is :func:`not_finished`."""
    give_back(dir_fd)  # the reserve's space, for what follows
    try:
        return seal(
            dir_fd,
            with_supervision(record.manifest, supervision),
            source=str(staging),
            owner=owner,
        )
    except OSError as exc:
        raise not_finished(record, staging, exc) from exc


def not_finished(record: Record, staging: Path, exc: OSError | AlreadyExistsError) -> TorporError:
    """The error of a self-dump whose image could not be sealed or published (``exc``).

    Unless ``record.leave_running`` the dumped process is gone: the directory is left as it
    is, an incomplete image, and :class:`IncompleteImageError` names it and the repair. With
    ``leave_running`` it is a :class:`DumpError` (the process keeps running; its caller
    removes the directory), or for a destination that appeared ``exc`` itself (naming the
    sealed directory)."""
    dest = staging.parent / record.dest
    if isinstance(exc, AlreadyExistsError) and record.leave_running:
        return exc  # the process runs on: the image is sealed, kept where its error says
    exists = not isinstance(exc, OSError)
    why = (
        disk_problem(exc, staging)
        if isinstance(exc, OSError)
        else f"image directory {dest} appeared meanwhile"
    )
    if record.leave_running and not exists:
        return DumpError(
            f"checkpoint of pid {record.pid} failed: its image could not be finished: {why} "
            "(the process keeps running)",
            pid=record.pid,
            image=dest,
        )
    fix = (
        f"`torpor image repair {staging} --name NEW` finishes it under another name"
        if exists
        else f"free space on {mount_point(staging)}, then `torpor image repair {staging}` "
        "finishes it"
    )
    return IncompleteImageError(
        f"checkpoint of pid {record.pid} stopped the process but could not finish its image: "
        f"{why}; the image is kept at {staging}",
        image=staging,
        hint=fix,
    )


def finish(dir_fd: int, parent_fd: int, staging: Path, record: Record) -> Path:
    """:func:`seal_reserved` the staging directory ``dir_fd`` (at ``staging``, a name in
    ``parent_fd``) and publish it as ``record.dest`` beside it; the image's path. A failure
    leaves the directory as it is (:func:`not_finished`)."""
    seal_reserved(dir_fd, staging, record)
    try:
        publish(parent_fd, staging.name, record.dest, where=staging.parent, dir_fd=dir_fd)
    except (OSError, AlreadyExistsError) as exc:
        raise not_finished(record, staging, exc) from exc
    drop_bookkeeping(dir_fd)
    return staging.parent / record.dest


# -- a process torpor did not start ----------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """What a self-dump through a detached finaliser records before it starts; ``dest`` is
    the image's name beside the staging directory."""

    dest: str
    facts: ImageFacts
    leave_running: bool

    def write(self, dir_fd: int) -> None:
        """Prepare the staging directory ``dir_fd`` for the dump (:func:`before_dump`), the
        calling process being the one dumped: the directory is its own while it lives."""
        record = self.facts.record(
            self.dest,
            start_time=host_start_time(),
            leave_running=self.leave_running,
            held_by_process=True,
        )
        staging = Path(os.readlink(f"/proc/self/fd/{dir_fd}"))
        before_dump(dir_fd, record, staging=staging)


def host_start_time() -> int:
    """Our start time as the host's ``/proc/PID/stat`` shows it (clock ticks since boot), which
    is what says whether we still live: read from ``/proc/self`` (``/proc/<pid>`` may be
    another PID namespace's process), less the boot-time offset of the time namespace a
    restore put us in (``stat`` shows the reader's boot time). Within one tick: the kernel
    rounds each."""
    with open("/proc/self/stat", encoding="ascii", errors="replace") as fh:
        data = fh.read()
    ticks = int(data[data.rindex(")") + 2 :].split()[19])
    offset_ns = 0
    try:
        with open("/proc/self/timens_offsets", encoding="ascii") as fh:
            for line in fh:
                clock, secs, nsecs = line.split()
                if clock == "boottime":
                    offset_ns = int(secs) * 1_000_000_000 + int(nsecs)
    except (OSError, ValueError):
        pass  # no time namespaces: no offset
    return ticks - round(offset_ns * os.sysconf("SC_CLK_TCK") / 1_000_000_000)


def finalize(staging: Path) -> Path | None:
    """Turn a successfully dumped staging directory (of a process torpor did not start) into
    its image (see :func:`finish`); its path, or None if there is nothing to do (no record:
    already finalised, or repaired; no success mark: the dump failed)."""
    parent_fd = open_dir(staging.parent)
    try:
        try:
            dir_fd = open_dir(staging.name, dir_fd=parent_fd)
        except FileNotFoundError:
            return None
        try:
            lock(dir_fd, wait=True)  # a repair, or the other of process and finaliser
            try:
                record = Record.read(dir_fd, source=str(staging))
            except FileNotFoundError:
                return None
            if SUCCESS_MARK not in os.listdir(dir_fd):
                return None
            return finish(dir_fd, parent_fd, staging, record)
        finally:
            os.close(dir_fd)
    finally:
        os.close(parent_fd)


def finish_after_criu(staging: Path) -> Path | None:
    """What the detached finaliser does once CRIU has exited: finalise the image if CRIU
    killed the process (with ``leave_running`` the process does it itself). None when there
    is nothing to finalise."""
    try:
        dir_fd = open_dir(staging)
    except FileNotFoundError:
        return None
    try:
        record = Record.read(dir_fd, source=str(staging))
    except FileNotFoundError:
        return None
    finally:
        os.close(dir_fd)
    return None if record.leave_running else finalize(staging)
