"""Staging directories a checkpoint left behind: removed when CRIU never finished (the process
was left running), kept as *incomplete* images otherwise, and finished by
``torpor image repair``.

A checkpoint from outside (``torpor._process._checkpointer``) stages its image in
``.NAME.partial-XXXX`` beside the destination (:class:`~torpor._images._image.Staging`) and
keeps there, until the image is committed (a self-dump too, through its keeper or its detached
finaliser, ``torpor._process._keeper_dump`` and ``_finalize``):

- :data:`RECORD_NAME`: what the manifest needs besides the files (:class:`Record`), written
  before CRIU starts, so the image can be finished without the checkpointer;
- :data:`RESERVE_NAME`: space allocated before CRIU starts and given back only to write the
  manifest, signature and stamp, so a disk CRIU filled cannot stop the commit. Once CRIU has
  written the whole image and it is hashed, just before CRIU is let kill the process, it is
  renamed :data:`COMMITTING_NAME`: from then on the image must be kept, whatever happens;
- an ``flock`` on the directory, held by the checkpointer (or the keeper) for as long as it
  lives; a self-dump through a detached finaliser is held by the dumped process instead
  (:attr:`Record.held_by_process`): the directory is in use while it lives.

Both files carry :data:`torpor._safe.TEMP_PREFIX`, so they are torpor's bookkeeping, never part
of an image (``_layout``); the commit removes them.

A leftover whose checkpointer is gone (its lock is free) is :data:`INCOMPLETE` if CRIU may
have killed the process — the commit mark, or ``stats-dump``, which CRIU writes only after a
successful dump — and :data:`STALE` otherwise (CRIU never finished, so it left the process
running): stale ones are removed by the next command that looks (:func:`sweep`). Directories
without a record (an older torpor's) are not ours and are left alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._errors import (
    AlreadyExistsError,
    ImageError,
    ImageNotFoundError,
    TorporError,
    UnsafePathError,
    UsageError,
)
from .._safe import (
    TEMP_PREFIX,
    check_private,
    create_file,
    drop_spares,
    is_plain_name,
    lstat_entries,
    open_dir,
    read_regular,
    reserve_spares,
)
from . import _manifest
from ._image import STAGING_MARK, Image, Staging
from ._manifest import FileEntry, Manifest

RECORD_NAME = f"{TEMP_PREFIX}checkpoint.json"
RESERVE_NAME = f"{TEMP_PREFIX}reserve"
COMMITTING_NAME = f"{TEMP_PREFIX}committing"
SUCCESS_MARK = "stats-dump"  # CRIU writes it only after a successful dump
_MAX_RECORD = 1 << 20
# Room for the manifest, signature and stamp (~250 bytes per file, ~12 files per process)
# and the temporary files they are written through, in whole blocks of any filesystem.
RESERVE_BASE = 64 << 10
RESERVE_PER_PROCESS = 8 << 10

IN_USE = "in use"
INCOMPLETE = "incomplete"
STALE = "stale"


class IncompleteImageError(ImageError):
    """A checkpoint whose process may be gone left an image it could not finish; it is kept
    (``image`` names the staging directory) for ``torpor image repair``."""


@dataclass(frozen=True)
class Record:
    """What a checkpoint's manifest says besides its files, and where the image goes
    (``dest``, a plain name beside the staging directory)."""

    dest: str
    name: str
    pid: int
    start_time: int
    cmdline: tuple[str, ...]
    rss_bytes: int
    criu_version: str
    tcp_established: bool
    shell_job: bool
    leave_running: bool
    created: str
    #: A self-dump's (the app asked): its manifest says so and carries the app's labels.
    coordinated: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    #: The directory is the dumped process's own while it lives (a self-dump through a
    #: detached finaliser, which cannot hold the lock through the dump: the process is dumped
    #: with its fds); otherwise its lock says whether it is in use.
    held_by_process: bool = False

    def write(self, dir_fd: int) -> None:
        """Store in the staging directory ``dir_fd`` (a new file, never through a symlink),
        its data durably (the directory's entry is made durable with the commit mark)."""
        data = json.dumps(
            dict(asdict(self), cmdline=list(self.cmdline), labels=dict(self.labels))
        ).encode()
        fd = create_file(dir_fd, RECORD_NAME, source="staging directory")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    @classmethod
    def read(cls, dir_fd: int, *, source: str) -> Record:
        """Load from the staging directory ``dir_fd``: ``FileNotFoundError`` if there is none,
        :class:`ImageError` if it is not one a checkpoint wrote."""
        raw = read_regular(dir_fd, RECORD_NAME, source=source, limit=_MAX_RECORD)
        try:
            d = json.loads(raw)
            ints = ("pid", "start_time", "rss_bytes")
            bools = ("tcp_established", "shell_job", "leave_running")
            # Records of older torpors lack the optional fields.
            optional = {"coordinated": False, "labels": {}, "held_by_process": False}
            d = {**optional, **d} if isinstance(d, dict) else d
            labels = d["labels"]
            ok = (
                isinstance(d, dict)
                and is_plain_name(d["dest"])
                and all(isinstance(d[k], str) for k in ("name", "criu_version", "created"))
                and all(type(d[k]) is int for k in ints)
                and all(type(d[k]) is bool for k in (*bools, "coordinated", "held_by_process"))
                and isinstance(d["cmdline"], list)
                and all(isinstance(a, str) for a in d["cmdline"])
                and isinstance(labels, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
            )
            if ok:
                return cls(**dict(d, cmdline=tuple(d["cmdline"]), labels=dict(labels)))
        except (ValueError, KeyError, TypeError, RecursionError):
            pass
        raise ImageError(f"{source}: {RECORD_NAME} is not a checkpoint's record", image=source)

    def manifest(self, files: list[FileEntry], *, name: str | None = None) -> Manifest:
        """The image's manifest, listing ``files``."""
        return _manifest.build(
            name=name or self.name,
            pid=self.pid,
            files=files,
            criu_version=self.criu_version,
            cmdline=self.cmdline,
            rss_bytes=self.rss_bytes,
            tcp_established=self.tcp_established,
            shell_job=self.shell_job,
            coordinated=self.coordinated,
            labels=dict(self.labels),
        )

    def holder_alive(self) -> bool:
        """Whether the directory is held by its dumped process (:attr:`held_by_process`),
        which still lives."""
        return self.held_by_process and _alive(self.pid, self.start_time)


@dataclass(frozen=True)
class Leftover:
    """A staging directory of ours: ``state`` is :data:`IN_USE`, :data:`INCOMPLETE` or
    :data:`STALE`; ``size`` the bytes of its files."""

    path: Path
    record: Record
    state: str
    size: int

    @property
    def dest(self) -> Path:
        """Where its image goes once finished."""
        return self.path.parent / self.record.dest


# -- locks -------------------------------------------------------------------------------------


def lock(dir_fd: int, *, wait: bool) -> bool:
    """Take the staging directory's lock (held until ``dir_fd`` is closed); False if another
    process holds it and not ``wait``."""
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


@contextmanager
def _locked(path: Path) -> Iterator[int | None]:
    """The staging directory ``path`` opened and locked; None if its lock is taken."""
    fd = open_dir(path)
    try:
        yield fd if lock(fd, wait=False) else None
    finally:
        os.close(fd)


# -- finding leftovers -----------------------------------------------------------------------


def is_staging_name(name: str) -> bool:
    """Whether ``name`` is one :class:`~torpor._images._image.Staging` gives its directories."""
    return name.startswith(".") and STAGING_MARK in name


def classify(dir_fd: int, *, source: str) -> tuple[Record, str, int] | None:
    """The record, state (:data:`INCOMPLETE` or :data:`STALE`: the caller holds the lock;
    :data:`IN_USE` while the process that holds it, :attr:`Record.held_by_process`, lives) and
    size of the staging directory ``dir_fd``; None if it is not one of ours (no record, or a
    directory someone else could have written in: its record and files are not to be
    trusted)."""
    try:
        check_private(source, what="staging directory", fd=dir_fd)
        record = Record.read(dir_fd, source=source)
    except (FileNotFoundError, ImageError, UnsafePathError):
        return None
    entries = lstat_entries(dir_fd)
    done = COMMITTING_NAME in entries or SUCCESS_MARK in entries
    size = sum(st.st_blocks * 512 for st in entries.values())
    if record.holder_alive():
        return record, IN_USE, size
    return record, INCOMPLETE if done else STALE, size


def _alive(pid: int, start_time: int) -> bool:
    """Whether the process ``pid`` started at ``start_time`` (clock ticks since boot, as
    ``/proc/PID/stat`` says; within a tick, as a process in a time namespace reckons its own,
    ``_finalize.host_start_time``) still runs."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            data = fh.read()
    except OSError:
        return False
    fields = data[data.rindex(")") + 2 :].split()
    return (
        len(fields) > 19
        and fields[19].isdigit()
        and abs(int(fields[19]) - start_time) <= 1
        and fields[0] not in ("Z", "X")
    )


def scan(parent: Path) -> list[Leftover]:
    """Our staging directories in ``parent``, oldest first (an unreadable entry is skipped)."""
    out: list[Leftover] = []
    try:
        names = sorted(n for n in os.listdir(parent) if is_staging_name(n))
    except OSError:
        return out
    for name in names:
        path = parent / name
        try:
            with _locked(path) as fd:
                if fd is None:
                    found = _peek(path)
                    if found is not None:
                        out.append(Leftover(path, found, IN_USE, 0))
                    continue
                got = classify(fd, source=str(path))
        except (OSError, TorporError):
            continue
        if got is not None:
            out.append(Leftover(path, *got))
    return sorted(out, key=lambda left: left.record.created)


def _peek(path: Path) -> Record | None:
    try:
        fd = open_dir(path)
    except (OSError, TorporError):
        return None
    try:
        return Record.read(fd, source=str(path))
    except (OSError, ImageError):
        return None
    finally:
        os.close(fd)


def sweep(parent: Path) -> list[Leftover]:
    """Remove the stale staging directories of ``parent`` (their dump never succeeded: the
    process was left running, nothing of them can be used) and return the others (in use, or
    incomplete: kept). Best effort: what cannot be removed stays."""
    kept: list[Leftover] = []
    for left in scan(parent):
        if left.state == STALE and _remove_if_stale(left.path):
            continue
        kept.append(left)
    return kept


def _remove_if_stale(path: Path) -> bool:
    try:
        with _locked(path) as fd:
            got = classify(fd, source=str(path)) if fd is not None else None
            if got is None or got[1] != STALE:
                return False
            # Under the lock: no checkpointer can take the directory meanwhile.
            shutil.rmtree(path)
    except (OSError, TorporError):
        return False
    return True


def find(arg: str, images_dir: Path) -> Leftover:
    """The incomplete image ``arg`` names: a staging directory's path, an image path its
    checkpoint was writing, or the name of a local image."""
    if "/" in arg or arg in (".", ".."):
        path = Path(arg).absolute()
        if is_staging_name(path.name):
            lefts = [left for left in scan(path.parent) if left.path == path]
        else:
            lefts = [left for left in scan(path.parent) if left.record.dest == path.name]
    else:
        lefts = [left for left in scan(images_dir) if arg in (left.record.dest, left.record.name)]
    if not lefts:
        raise ImageNotFoundError(
            f"no incomplete image {arg!r}",
            image=arg,
            hint="`torpor images` lists local images, incomplete ones too",
        )
    if len(lefts) > 1:
        raise UsageError(
            f"{len(lefts)} incomplete images are named {arg!r}: "
            + ", ".join(str(left.path) for left in lefts),
            hint="repair one by its path",
        )
    return lefts[0]


# -- finishing ---------------------------------------------------------------------------------


def repair(left: Leftover, *, name: str | None = None) -> Image:
    """Finish the incomplete image ``left``: hash every file, write the manifest (its name
    ``name``, else the recorded one) and signature, rename it to ``name`` (else its recorded
    destination) beside it. One-line errors: the directory in use, a dump that never
    succeeded (removed), an existing destination, no space (the image stays)."""
    dest = left.path.parent / (name or left.record.dest)
    path = left.path
    with _locked(path) as fd:
        got = classify(fd, source=str(path)) if fd is not None else None
        if fd is None or (got is not None and got[1] == IN_USE):
            raise ImageError(
                f"{path} is still being written by a checkpoint",
                image=path,
                hint="wait for it to end, then look at `torpor images`",
            )
        if got is None:
            raise ImageNotFoundError(f"{path} is not a checkpoint's staging directory")
        record, state, _ = got
        if state == STALE:
            shutil.rmtree(path, ignore_errors=True)
            raise ImageError(
                f"nothing to repair in {path}: its dump never succeeded (CRIU left the "
                "process running); removed it",
                image=path,
                hint="checkpoint the process again",
            )
        give_back(fd)
        staging = Staging(dest)
        staging.path = path
        try:
            image = staging.commit(lambda files: record.manifest(files, name=name))
        except AlreadyExistsError as exc:
            raise AlreadyExistsError(
                f"cannot finish {path}: image directory {dest} exists already",
                path=str(dest),
                hint="give the image another name: `torpor image repair PATH --name NEW`",
            ) from exc
        except OSError as exc:
            raise IncompleteImageError(
                f"cannot finish the image in {path}: {disk_problem(exc, path)}",
                image=path,
                hint=f"free space, then run `torpor image repair {path}` again",
            ) from exc
        drop_bookkeeping(fd)
    return image


def reserve(dir_fd: int, processes: int) -> None:
    """Allocate in the staging directory ``dir_fd`` the space the commit of an image of
    ``processes`` processes needs (``ENOSPC`` if the disk has not got it): the mark
    :data:`RESERVE_NAME` and three spares the commit writes its manifest, signature and stamp
    into (``_safe.replace_file``), so a disk filled meanwhile, even by another writer racing
    for any space :func:`give_back` frees, cannot stop the commit."""
    size = RESERVE_BASE + processes * RESERVE_PER_PROCESS
    fd = create_file(dir_fd, RESERVE_NAME, source="staging directory")
    try:
        os.posix_fallocate(fd, 0, 4096)
    finally:
        os.close(fd)
    reserve_spares(dir_fd, [size // 2, 8192, size // 2], source="staging directory")


def give_back(dir_fd: int) -> None:
    """Free the space the staging directory ``dir_fd`` reserved (its reserve or commit mark,
    kept empty: the mark still says the image must be kept)."""
    for name in (RESERVE_NAME, COMMITTING_NAME):
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)


def drop_bookkeeping(dir_fd: int) -> None:
    """Remove the checkpoint's own files from a committed image directory ``dir_fd`` (best
    effort: left behind they are harmless bookkeeping)."""
    for name in (RESERVE_NAME, COMMITTING_NAME, RECORD_NAME):
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
    drop_spares(dir_fd)


# -- disks -------------------------------------------------------------------------------------


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding ``path`` (or its nearest existing parent)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    dev = os.stat(p).st_dev
    while p != p.parent and os.stat(p.parent).st_dev == dev:
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``path``."""
    st = os.statvfs(mount_point(path))
    return st.f_bavail * st.f_frsize


def no_space(path: Path) -> str:
    """``no space left on MOUNT (N free)`` for the filesystem holding ``path``."""
    mount = mount_point(path)
    try:
        free = free_bytes(mount)
    except OSError:
        return f"no space left on {mount}"
    return f"no space left on {mount} ({size_text(free)} free)"


def disk_problem(exc: OSError, path: Path) -> str:
    """What an ``OSError`` met while writing in ``path`` means, in words."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return no_space(path)
    return f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")


def size_text(n: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
