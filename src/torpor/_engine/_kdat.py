"""CRIU's cache of kernel facts (``/run/criu.kdat``), kept where CRIU cannot keep it itself.

Every CRIU process starts by probing the kernel (``kerndat_init`` in ``criu/kerndat.c``:
pagemap, network namespaces, the vDSO, uffd, ...). Measured here with ``-v4`` logs, that takes
~30-65 ms per process (``criu lazy-pages`` ready in 41-53 ms without the cache, 5-10 ms with
it). CRIU keeps the result in ``/run/criu.kdat`` and loads it instead (under 0.1 ms), but it
*writes* that file only when ``/run`` is a tmpfs (``kerndat_save_cache``): the cache holds facts
of the running kernel (the zero page's frame number, the vDSO's symbols), and a tmpfs is gone
at reboot. Where ``/run`` is a disk directory (this VM kind: ``/`` is ext4 and nothing mounts a
tmpfs on ``/run``), every CRIU process probes again: twice on a lazy restore's path (the
``criu lazy-pages`` daemon and the restore's ``criu swrk``, which probes when the request
arrives, so a CRIU started ahead of time does not help), once on every dump and full restore.

:func:`ensure` makes the cache exist there as CRIU itself would on a tmpfs ``/run``, once per
boot: it runs the CRIU binary (``criu check --feature uffd-noncoop``) in a private mount
namespace whose ``/run`` is a fresh tmpfs, where CRIU writes its own cache; then, in our mount
namespace, writes those bytes (checked: size, CRIU's magic) to a file on a small tmpfs of its
own and bind-mounts that file, read-only, over ``/run/criu.kdat`` (an empty file is made there
for the mount if missing; the tmpfs's own mount is detached at once, only the bind stays). A
mount does not outlive a reboot: after one, CRIU finds the empty file, which it treats as a
stale cache (removed, probed again), as on any host. A CRIU binary changed since the cache was
made (its ctime after the cache's mtime) gets a new one (the old mount detached first).

Nothing here is fatal, and nothing runs unless torpor is root and ``/run`` exists and is not a
tmpfs (where it is, CRIU keeps its cache itself): a failure leaves CRIU probing by itself, as
before, and is not retried by this process. ``TORPOR_CRIU_KDAT=off`` turns it off. Concurrent
torpor processes take ``/run/torpor/kdat.lock`` and look again before making one.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import secrets
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

ENV = "TORPOR_CRIU_KDAT"
RUN = Path("/run")
KDAT = RUN / "criu.kdat"  # CRIU's KERNDAT_CACHE_FILE (KDAT_RUNDIR "/run" by default)
_TORPOR_RUN = RUN / "torpor"
_LOCK = _TORPOR_RUN / "kdat.lock"
TMPFS_MAGIC = 0x01021994
KDAT_MAGIC = 0x57023458  # criu/include/magic.h: kdat.magic1, the file's first 4 bytes
_MAX = 1 << 16  # CRIU 4.2's struct kerndat_s is 912 bytes here
_PROBE_TIMEOUT = 30.0

_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_RDONLY = 2, 4, 8, 1
_MS_REMOUNT, _MS_BIND = 32, 4096
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_state = threading.Lock()
_gave_up = False  # this process tried and could not: CRIU probes by itself

# The child that asks CRIU for its cache: a private mount namespace (nothing it mounts is seen
# outside), a fresh tmpfs on /run there, CRIU run once, the file it wrote sent back on stdout.
_PROBE = r"""
import ctypes, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x00020000) != 0:
    sys.exit(10)
if libc.mount(b"none", b"/", None, (1 << 14) | (1 << 18), None) != 0:
    sys.exit(11)
if libc.mount(b"torpor-kdat", b"/run", b"tmpfs", 2 | 4 | 8, b"size=1m,mode=0755") != 0:
    sys.exit(12)
subprocess.run([sys.argv[1], "check", "--feature", "uffd-noncoop"], cwd="/run",
               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
               timeout=float(sys.argv[2]), check=False)
with open("/run/criu.kdat", "rb") as fh:
    sys.stdout.buffer.write(fh.read(int(sys.argv[3]) + 1))
"""


class KdatError(Exception):
    """The cache could not be made (internal: :func:`ensure` never raises it)."""


def enabled() -> bool:
    """Whether :func:`ensure` may act here: root, ``/run`` a directory that is not a tmpfs,
    and not turned off."""
    if os.environ.get(ENV, "").strip().lower() in ("0", "off", "no", "false"):
        return False
    if os.geteuid() != 0:
        return False
    try:
        fd = os.open(RUN, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fs_type(fd) != TMPFS_MAGIC
    finally:
        os.close(fd)


def fs_type(fd: int) -> int:
    """``fstatfs(fd).f_type`` (Python has no wrapper; ``f_type`` is the first field)."""
    buf = ctypes.create_string_buffer(256)
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(struct.unpack_from("l", buf.raw)[0])


def current(binary: str, path: Path = KDAT) -> bool:
    """Whether ``path`` holds a cache CRIU will load and that does not outlive this boot: a
    regular file of ours (root's, when :func:`ensure` acts) on a tmpfs, with CRIU's magic,
    made after ``binary`` last changed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or not 8 <= st.st_size <= _MAX:
            return False
        if fs_type(fd) != TMPFS_MAGIC:
            return False
        if st.st_mtime_ns < os.stat(binary).st_ctime_ns:
            return False  # CRIU changed since: its cache may be another build's
        return _valid(os.pread(fd, 8, 0))
    except OSError:
        return False
    finally:
        os.close(fd)


def _valid(data: bytes) -> bool:
    return 8 <= len(data) <= _MAX and struct.unpack_from("<I", data)[0] == KDAT_MAGIC


def ensure(binary: str) -> bool:
    """Make CRIU's cache available before ``binary`` runs (see the module docstring); True if
    CRIU will load one. Never raises; costs a few system calls once the cache exists."""
    global _gave_up
    if _gave_up or not enabled():
        return False
    if current(binary):
        return True
    with _state:
        if _gave_up:
            return False
        try:
            with _locked():
                if current(binary):
                    return True
                install(probe(binary))
        except (OSError, KdatError, subprocess.SubprocessError):
            _gave_up = True
            return False
    return current(binary)


def probe(binary: str) -> bytes:
    """The cache ``binary`` writes when ``/run`` is a tmpfs (made in a private namespace)."""
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _PROBE, binary, str(_PROBE_TIMEOUT), str(_MAX)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=_PROBE_TIMEOUT + 5,
        check=False,
    )
    if out.returncode != 0 or not _valid(out.stdout):
        raise KdatError(f"no cache from {binary} (exit {out.returncode})")
    return out.stdout


def install(data: bytes, path: Path = KDAT) -> None:
    """Bind-mount a read-only tmpfs file holding ``data`` over ``path`` (replacing a mount of
    ours already there)."""
    if not _valid(data):
        raise KdatError("not a CRIU kdat cache")
    src = path.parent / "torpor" / f"kdat-{secrets.token_hex(4)}"
    os.makedirs(src.parent, mode=0o755, exist_ok=True)
    os.mkdir(src, 0o700)
    try:
        _mount(b"torpor-kdat", src, b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, b"size=64k")
        try:  # (mounted: from here on it is detached whatever happens)
            fd = os.open(src / "criu.kdat", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            _mount_point(path)
            _mount(str(src / "criu.kdat").encode(), path, None, _MS_BIND, None)
            with contextlib.suppress(OSError):  # read-only: a mistaken write cannot change it
                _mount(None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY, None)
        finally:
            _umount(src)  # the bind keeps the file; the tmpfs's own mount goes
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(src)


def _mount_point(path: Path) -> None:
    """``path`` as a place to mount on: an empty regular file made if missing; a mount of ours
    already there (an older cache) detached first."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise KdatError(f"{path} is not a regular file") from None
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                mounted = fs_type(fd) == TMPFS_MAGIC  # /run itself is not a tmpfs here
            finally:
                os.close(fd)
            if mounted:
                _umount(path)
    else:
        os.close(fd)


def _mount(
    source: bytes | None, target: Path, fstype: bytes | None, flags: int, data: bytes | None
) -> None:
    if _libc.mount(source, str(target).encode(), fstype, flags, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _umount(target: Path) -> None:
    if _libc.umount2(str(target).encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """``/run/torpor/kdat.lock`` held (every torpor home of the host shares it)."""
    os.makedirs(_TORPOR_RUN, mode=0o755, exist_ok=True)
    fd = os.open(_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
