"""The push of a ``torpor checkpoint --pool`` image, done where the image was committed.

A ``--pool`` checkpoint commits its image in ``<home>/cache/.push-NAME-PID`` and then stores it
in the pool. The push runs in the detached checkpointer (``_checkpointer``), after the commit,
so the command's death (SIGKILL, a closed terminal) cannot stop it; the command only relays
its progress. Pushed, the cache copy is deleted. If the push fails (the pool is down, full,
refuses the name), the image is all there is of a stopped process: it is moved into the local
store under its name, so ``torpor restore NAME`` (the name ``torpor images`` shows) finds it,
and the error names where it is and how to push it again. Where the store cannot take it (an
image of that name is there, another disk), it stays in the cache, listed by ``torpor images``
at its path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import PoolError, TorporError
from .._images import _index
from .._images._image import Image

if TYPE_CHECKING:
    from .._pools._pool import PoolImage

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
# The temporaries of _keep_for_restore (".NAME.keep-PID") and _copy_to (".keep-NAME-PID").
_KEEP_TEMP = re.compile(r"\.(?:.+\.keep|keep-.+)-(\d{1,10})")


class UnpushedError(PoolError):
    """A checkpoint's image was made but not stored in the pool; ``kept`` is where it is."""

    def __init__(self, msg: str, *, pool: str, kept: str, hint: str | None = None) -> None:
        super().__init__(msg, pool=pool, hint=hint)
        self.kept = kept


def push(
    image: Image,
    name: str,
    pool_name: str,
    pid: int,
    *,
    progress: Callable[[int], None] | None = None,
) -> PoolImage:
    """Store the committed ``image`` in ``pool_name`` as ``name`` and delete the local copy;
    the image as stored (its ``stored_bytes``: what the pool did not have yet). A failed push
    raises :func:`unpushed`'s error (the image is kept, findable by ``name``)."""
    from .._pools import open_pool

    try:
        with open_pool(pool_name) as pool:
            stored = pool.push(image, name, progress=progress)
    except Exception as exc:  # whatever failed, the image must stay findable
        raise unpushed(image.path, name, pool_name, pid, exc) from exc
    if not _keep_for_restore(image, name):
        shutil.rmtree(image.path, ignore_errors=True)
    with contextlib.suppress(OSError, TorporError):
        _index.forget(image.path)
    return stored


def _keep_for_restore(image: Image, name: str) -> bool:
    """Keep a supervised process's newest checkpoint (a series member) as a local image of the
    same name in the store, verified and stamped: its restore after a crash then reads local
    files instead of pulling back what was just pushed (issue 8: crash to answering within a
    restore's time). Moved when on the store's disk, copied out of memory staging (after the
    app runs again, in the checkpointer). Older members' copies go when the series is pruned
    (``_supervise._series.prune``). False (the caller deletes the image) if it is not a series
    member or cannot be kept."""
    from .._images import _store
    from .._supervise._series import parse_series_name

    if parse_series_name(name) is None:
        return False
    try:
        dest = _store.default_path(name)
        if dest.exists():
            return False
        sweep_keep_temps(dest.parent)
        tmp = dest.with_name(f".{name}.keep-{os.getpid()}")
        if os.stat(image.path).st_dev == os.stat(dest.parent).st_dev:
            os.rename(image.path, tmp)  # the files, their stamp with them, unchanged
        else:
            shutil.copytree(image.path, tmp, symlinks=True)
        try:
            Image.open(tmp).verify(full=True)  # the bytes kept are the bytes hashed; stamped
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with contextlib.suppress(OSError, TorporError):
            _index.add(dest)
    except (OSError, TorporError):
        return False
    if image.path.exists():
        shutil.rmtree(image.path, ignore_errors=True)
    return True


def reported_push(
    image: Image, name: str, pool_name: str, pid: int, report_w: int
) -> dict[str, Any]:
    """:func:`push`, in the checkpointer: its progress told to the command over ``report_w``
    (never blocking: a command that stopped reading must not stall the push); the report's
    fields: where the image is and ``stored`` (and its manifest, and ``new_bytes``: what the
    pool grew by) or ``push_error``."""
    from ._report import encode_error

    total = image.manifest.total_bytes
    pending = [0, 0.0]  # bytes not yet told, when last told

    def progress(n: int) -> None:
        pending[0] += n
        now = time.monotonic()
        if now - pending[1] < 0.1:
            return
        # A report this small is written whole or not at all (PIPE_BUF).
        with contextlib.suppress(OSError):
            os.set_blocking(report_w, False)
            told = {"progress": pending[0], "total": total}
            os.write(report_w, json.dumps(told).encode() + b"\n")
            pending[0], pending[1] = 0, now
        with contextlib.suppress(OSError):
            os.set_blocking(report_w, True)

    try:
        stored = push(image, name, pool_name, pid, progress=progress)
    except UnpushedError as exc:
        return {"image": exc.kept, "push_error": encode_error(exc)}
    return {
        "stored": stored.name,
        "manifest": image.manifest.to_json(),
        "new_bytes": stored.stored_bytes,
    }


def unpushed(path: Path, name: str, pool_name: str, pid: int, exc: BaseException) -> UnpushedError:
    """The one-line error of an image made at ``path`` but not stored in the pool, once it is
    kept where ``torpor restore NAME`` finds it (the local store), if it can be."""
    kept = keep(path, name)
    if isinstance(exc, TorporError):
        why = exc.msg
    elif isinstance(exc, KeyboardInterrupt):
        why = "interrupted"
    elif isinstance(exc, OSError):
        why = str(exc.strerror)
    else:
        why = repr(exc)
    restore = f"`torpor restore {name}`" if kept != path else f"`torpor restore {kept}`"
    return UnpushedError(
        f"checkpoint of pid {pid}: the image was made but not stored in pool {pool_name!r} "
        f"({why}); it is kept at {kept}",
        pool=pool_name,
        kept=str(kept),
        hint=f"{restore} restores it; `torpor image push {kept} {name}@{pool_name}` stores it",
    )


def keep(path: Path, name: str) -> Path:
    """Move the committed image at ``path`` into the local store as ``name`` (never over
    anything there); where it is now (``path`` if it could not be moved)."""
    from .._images import _store

    try:
        dest = _store.default_path(name)
    except (OSError, TorporError):
        return path
    if path == dest:
        return path
    try:
        _rename_noreplace(path, dest)
    except OSError as exc:
        # Staged in memory (/dev/shm, see memory_staging) the image cannot be renamed onto
        # the disk: it is copied there, or a reboot would lose all there is of the process.
        if exc.errno != errno.EXDEV or not _copy_to(path, dest):
            return path  # still listed by `torpor images`, at its path (the index has it)
    with contextlib.suppress(OSError, TorporError):
        _index.forget(path)
    return dest


def _copy_to(path: Path, dest: Path) -> bool:
    """Copy the image at ``path`` to ``dest`` on another filesystem (through a temporary
    name beside it, never over anything), then remove ``path``; whether it was done."""
    sweep_keep_temps(dest.parent)
    tmp = dest.parent / f".keep-{dest.name}-{os.getpid()}"
    try:
        shutil.copytree(path, tmp, symlinks=True)
        _rename_noreplace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def sweep_keep_temps(store: Path) -> list[str]:
    """Remove the temporary directories that a keep or copy into ``store`` left when its
    process was killed midway (``.NAME.keep-PID``, ``.keep-NAME-PID``); the names removed.
    Only real directories (never followed links) whose PID no longer runs are touched: one of
    a live process is still being written. A reused PID only delays the sweep."""
    gone: list[str] = []
    try:
        entries = os.listdir(store)
    except OSError:
        return gone
    for entry in entries:
        m = _KEEP_TEMP.fullmatch(entry)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # alive (or not ours to signal): still in use
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        try:
            st = os.lstat(store / entry)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        shutil.rmtree(store / entry, ignore_errors=True)
        gone.append(entry)
    return gone


# -- staging in memory ---------------------------------------------------------------------------

# Room left beyond the process's RSS: CRIU's metadata files, and memory for everything else.
_SHM_MARGIN = 64 << 20
_SHM_ROOT = Path("/dev/shm")


def memory_staging(rss_bytes: int, *, root: Path = _SHM_ROOT) -> Path | None:
    """A private directory in memory-backed storage to stage a ``--pool`` checkpoint of a
    process of ``rss_bytes`` in, or None where it does not fit or cannot be had safely (the
    caller stages on disk then).

    CRIU writes the pages while the process is frozen: into tmpfs that takes a fraction of
    the time a disk takes (issue 8: 0.35 s instead of 2.1 s for 1 GiB), and the hashing,
    compression and push come once the process runs again. The directory is
    ``/dev/shm/torpor-<euid>-<hash of the torpor home>`` (one per home), made 0700 and used
    only if it is a real directory owned by us and closed to everyone else: /dev/shm is
    world-writable, so another user may have made that name first; being sticky, nobody but
    us can rename or remove ours once it is checked. The image fits if both the filesystem's
    free space and the memory available hold the RSS plus a quarter and a margin.
    """
    import hashlib

    from .. import _paths

    need = rss_bytes + rss_bytes // 4 + _SHM_MARGIN
    try:
        fs = os.statvfs(root)
        if fs.f_bavail * fs.f_frsize < need or _mem_available() < need:
            return None
        tag = hashlib.sha256(os.fsencode(_paths.home())).hexdigest()[:12]
        path = root / f"torpor-{os.geteuid()}-{tag}"
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
    except (OSError, TorporError):
        return None
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return None  # not ours, or open to others: never stage a process's pages there
    return path


def _mem_available() -> int:
    """``MemAvailable`` of /proc/meminfo, in bytes (0 if unknown: then nothing fits)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _rename_noreplace(old: Path, new: Path) -> None:
    """``renameat2(old, new, RENAME_NOREPLACE)``: ``FileExistsError`` if ``new`` exists, even
    as an empty directory; ``OSError`` where the call is missing (nothing is moved then)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), str(new))
    if fn(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), _RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(new))
