"""Many copies of one image (``torpor restore --count K``), restored so that real servers work.

Restoring K copies of a server at once meets four problems, each handled here (the keeper's
``restore`` uses this module around its CRIU calls; see ``docs/copies.md``):

- **Memory.** Each copy writes the image's pages into fresh memory. :func:`check_fits` refuses
  (one line, with the numbers and the fix) K copies that do not fit in ``MemAvailable`` (less a
  margin when K > 1), and any K above :data:`MAX_COUNT`.
- **Parallelism.** :func:`run_bounded` runs at most :func:`parallelism` CRIU restores at once
  (not one thread per copy) and starts no more once one has failed (all or nothing).
- **Paths CRIU creates.** A deleted-but-open file (every gunicorn worker's heartbeat file) is
  recreated by CRIU at the fixed path ``<original path>.cr.<remap id>.ghost`` and unlinked
  once the restored task opened it; a unix socket bound to a path is bound again after CRIU
  unlinks what is there. Two restores doing so at once collide (``Can't create ghost regfile:
  File exists``, ``Couldn't unlink remap``). A CRIU restore of an image that creates such
  paths holds an ``flock`` per path (hashed into :data:`_LOCK_BUCKETS` files under
  ``<home>/locks``) for its duration: restores of one image, or of two images of one process,
  by one command or by several, create each path one at a time; others do not wait.
- **Listening sockets.** CRIU binds every inet socket with ``SO_REUSEADDR`` and
  ``SO_REUSEPORT`` set, then puts back the image's values (usually off). K copies then all
  bind the port, but each listening socket is in a reuseport group of its own and the kernel
  gives every connection to one of them: K-1 deaf copies. For K > 1 (or when asked), the copies
  are restored from a *derived image* whose listening TCP sockets have ``SO_REUSEPORT`` on:
  they stay in one group and the kernel spreads connections over them.

A derived image is made only from a verified image: a private directory (0700) in the cache
holding a rewritten ``files.img`` (0600; made from bytes checked against the manifest's
SHA-256) and symlinks to the image's other files. Not hard links: linking changes the files'
ctime, which would make every later restore re-hash the image (see ``Image.verify``). CRIU
follows the links to the very files a plain restore of the image would open. The directory is
removed after the restore (a crashed keeper's is removed by the next derivation).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from .. import _paths, _safe
from .._errors import CriuError, ImageCorruptedError, UsageError
from .._images._image import Image
from .._images._manifest import Manifest
from ._imagefacts import FILES_IMG as FILES_IMG
from ._imagefacts import MAX_FILES_IMG, corrupt
from ._imagefacts import PSTREE_IMG as PSTREE_IMG
from ._imagefacts import REMAP_FPATH_IMG as REMAP_FPATH_IMG
from ._imagefacts import ImageFacts as ImageFacts
from ._imagefacts import read_facts as read_facts
from ._imagefacts import stdio_keys as stdio_keys
from ._imagefacts import with_reuseport as with_reuseport

T = TypeVar("T")

# The most copies one command restores. Each copy is a process tree, a keeper thread's worth of
# bookkeeping and a record; past this a mistyped K (10 000) is far likelier than a real need,
# and more copies of one image can still be restored by further commands.
MAX_COUNT = 100
# Memory left alone when K copies are admitted: at least this, or a twentieth of the machine.
MARGIN_MIN = 256 << 20
MARGIN_FRACTION = 20

_LOCK_BUCKETS = 64


# -- memory and bounds ------------------------------------------------------------------------


def copy_bytes(manifest: Manifest) -> int:
    """The memory one restored copy takes: its page files (what CRIU writes into fresh memory),
    or the dumped tree's RSS if the manifest lists none."""
    pages = sum(f.size for f in manifest.files if f.name.startswith("pages-"))
    return pages or manifest.rss_bytes


def check_count(count: int) -> None:
    """Refuse a ``--count`` below 1 or above :data:`MAX_COUNT`."""
    if count < 1:
        raise UsageError(f"--count must be at least 1, not {count}")
    if count > MAX_COUNT:
        raise UsageError(
            f"--count {count} is more than the {MAX_COUNT} copies one restore makes",
            hint=f"restore at most {MAX_COUNT} copies per command (run it again for more)",
        )


def check_fits(image: Image, count: int, *, meminfo: Path = Path("/proc/meminfo")) -> None:
    """Refuse ``count`` copies of ``image`` that the machine's free memory cannot hold (see
    :func:`copy_bytes`), and any count :func:`check_count` refuses. Several copies must leave a
    margin free (:data:`MARGIN_MIN` or a :data:`MARGIN_FRACTION`-th of the memory, whichever is
    more); one copy only has to fit: refusing a restore the machine can hold helps nobody."""
    check_count(count)
    available, total = _memory(meminfo)
    if available is None:
        return  # no MemAvailable (kernels before 3.14): nothing to judge by
    per_copy = copy_bytes(image.manifest)
    need = per_copy * count
    if count == 1:
        if need > available:
            raise UsageError(
                f"image {image.name!r} needs {_size(need)} of memory but only "
                f"{_size(available)} is available",
                hint="free memory first",
            )
        return
    margin = max(MARGIN_MIN, (total or 0) // MARGIN_FRACTION)
    room = max(0, available - margin)
    if need <= room:
        return
    fit = room // per_copy if per_copy else count
    raise UsageError(
        f"{count} copies of image {image.name!r} need {_size(need)} of memory ({count} x "
        f"{_size(per_copy)}) but only {_size(room)} is free for them ({_size(available)} "
        f"available less a {_size(margin)} margin)",
        hint=f"restore at most {fit} cop{'y' if fit == 1 else 'ies'}, or free memory"
        if fit
        else "free memory first",
    )


def _memory(meminfo: Path) -> tuple[int | None, int | None]:
    """``MemAvailable`` and ``MemTotal`` in bytes (None when missing)."""
    values: dict[str, int] = {}
    try:
        text = meminfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None, None
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key in ("MemAvailable", "MemTotal") and parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024  # reported in kB
    return values.get("MemAvailable"), values.get("MemTotal")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


# -- bounded parallelism ------------------------------------------------------------------------


def parallelism() -> int:
    """How many CRIU restores run at once: the CPUs this process may use, at least 2 (a restore
    also waits on the disk and on CRIU's own start-up)."""
    return max(2, len(os.sched_getaffinity(0)))


def run_bounded(
    count: int, fn: Callable[[int], T], *, workers: int | None = None
) -> list[T | BaseException | None]:
    """Call ``fn(0) .. fn(count - 1)`` on at most ``workers`` threads (default
    :func:`parallelism`), lowest index first; return each call's result or exception, in index
    order. Once one call has failed no further call starts (its slot stays None): the caller
    undoes the others, so starting more would only cost time."""
    results: list[T | BaseException | None] = [None] * count
    lock = threading.Lock()
    state = {"next": 0, "failed": False}

    def worker() -> None:
        while True:
            with lock:
                i = state["next"]
                if state["failed"] or i >= count:
                    return
                state["next"] = i + 1
            try:
                results[i] = fn(i)
            except BaseException as exc:
                results[i] = exc
                with lock:
                    state["failed"] = True

    n = max(1, min(count, workers or parallelism()))
    threads = [threading.Thread(target=worker, name=f"torpor-restore-{k}") for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# -- locks on the paths a restore creates -------------------------------------------------------


@contextmanager
def path_locks(paths: Sequence[str]) -> Iterator[None]:
    """Hold, exclusively, the lock of each of ``paths`` (blocking until free). Paths hash into
    :data:`_LOCK_BUCKETS` lock files so the home does not fill with them; two paths sharing a
    bucket only wait for each other. Buckets are taken in order, so holders never deadlock."""
    if not paths:
        yield
        return
    buckets = sorted(
        {int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) % _LOCK_BUCKETS for p in paths}
    )
    with contextlib.ExitStack() as stack:
        dfd = _safe.open_dir(_paths.private_dir(_paths.home() / "locks"))
        stack.callback(os.close, dfd)
        for b in buckets:
            fd = os.open(
                f"restore-path-{b:02d}.lock",
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dfd,
            )
            stack.callback(os.close, fd)
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when the fd closes
        yield


# -- the derived image with SO_REUSEPORT ----------------------------------------------------------


@contextmanager
def reuseport_image(image: Image) -> Iterator[Path]:
    """A private copy of the (verified) ``image`` whose listening TCP sockets have
    ``SO_REUSEPORT`` on (see the module docstring), removed on exit."""
    path = _derive(image)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _derive(image: Image) -> Path:
    parent = _paths.private_dir(_paths.cache_dir() / "derived")
    _sweep(parent)
    source = str(image.path)
    want = next((f for f in image.manifest.files if f.name == FILES_IMG), None)
    if want is None:
        raise corrupt(source, FILES_IMG, "is not in the manifest")
    path = parent / f"{os.getpid()}-{secrets.token_hex(6)}"
    os.mkdir(path, 0o700)
    try:
        origin = image.path.absolute()
        with _safe.opened_dir(origin) as sfd, _safe.opened_dir(path) as dfd:
            data = _safe.read_regular(sfd, FILES_IMG, source=source, limit=MAX_FILES_IMG)
            # The bytes rewritten are the bytes verified, whatever happened to the file since.
            if len(data) != want.size or hashlib.sha256(data).hexdigest() != want.sha256:
                raise corrupt(source, FILES_IMG, "does not match its SHA-256")
            derived, _ = with_reuseport(data, source=source)
            fd = _safe.create_file(dfd, FILES_IMG, source="derived image")
            with os.fdopen(fd, "wb") as fh:
                fh.write(derived)
            for f in image.manifest.files:
                if f.name != FILES_IMG:
                    name = _safe.check_name(f.name, source=source)
                    os.symlink(origin / name, name, dir_fd=dfd)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def _sweep(parent: Path) -> None:
    """Remove derived images whose keeper is gone (killed mid-restore)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            pid, _, _ = entry.name.partition("-")
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the plan for one restore --------------------------------------------------------------------


class Copies:
    """How ``count`` copies of ``image`` are restored.

    ``reuseport``: None restores listening sockets with ``SO_REUSEPORT`` when ``count > 1``;
    True always (so that copies restored later, by other commands, share the port too); False
    never. :attr:`derives` says whether a derived image is needed, which the caller must only
    ask for (:meth:`images_dir`) once the image is verified.
    """

    def __init__(self, image: Image, count: int, *, reuseport: bool | None = None) -> None:
        self.image = image
        self.count = count
        self.facts = read_facts(image.path)
        # Where the root's stdout/stderr went (a log): each copy gets a log of its own there.
        # A damaged file here is for the verification (or CRIU) to report, as for any file.
        try:
            self.stdio = stdio_keys(image.path)
        except ImageCorruptedError:
            self.stdio = ()
        wanted = count > 1 if reuseport is None else reuseport
        self.derives = wanted and self.facts.solo_listeners > 0
        self._derived: Path | None = None

    @contextmanager
    def images_dir(self) -> Iterator[Path]:
        """The directory CRIU restores from: the image, or a derived image (see
        :attr:`derives`) for as long as the context lasts."""
        if not self.derives:
            yield self.image.path
            return
        with reuseport_image(self.image) as path:
            self._derived = path
            try:
                yield path
            finally:
                self._derived = None

    @contextmanager
    def criu_turn(self) -> Iterator[None]:
        """Hold around one CRIU restore call: waits while another restore creates one of the
        paths this image's restore creates (see :func:`path_locks`). A CRIU error names the
        image, not the derived image it was restored through (which is gone by then)."""
        derived = self._derived
        try:
            with path_locks(self.facts.paths):
                yield
        except CriuError as exc:
            if derived is not None:
                exc.msg = exc.msg.replace(str(derived), str(self.image.path))
                exc.image = str(self.image.path)
            raise
