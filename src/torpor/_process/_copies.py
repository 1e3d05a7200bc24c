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
import stat
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .. import _paths, _safe
from .._errors import CriuError, ImageCorruptedError, UsageError
from .._images._image import Image
from .._images._manifest import Manifest

T = TypeVar("T")

# The most copies one command restores. Each copy is a process tree, a keeper thread's worth of
# bookkeeping and a record; past this a mistyped K (10 000) is far likelier than a real need,
# and more copies of one image can still be restored by further commands.
MAX_COUNT = 100
# Memory left alone when K copies are admitted: at least this, or a twentieth of the machine.
MARGIN_MIN = 256 << 20
MARGIN_FRACTION = 20

_LOCK_BUCKETS = 64
_MAX_FILES_IMG = 64 << 20

# CRIU's image framing (criu/include/magic.h): two u32 magics, then entries each prefixed by
# its u32 length.
_HEADER = struct.Struct("<II")
_U32 = struct.Struct("<I")
_IMG_COMMON_MAGIC = 0x54564319
_FILES_MAGIC = 0x56303138
_REMAP_FPATH_MAGIC = 0x59133954
_PSTREE_MAGIC = 0x50273030
_IDS_MAGIC = 0x54432030
_CORE_MAGIC = 0x55053847
_FDINFO_MAGIC = 0x56213732
FILES_IMG = "files.img"
REMAP_FPATH_IMG = "remap-fpath.img"
PSTREE_IMG = "pstree.img"

# Field numbers and values of CRIU's images/*.proto that this module reads or writes.
_FE_TYPE, _FE_ID, _FE_REG, _FE_ISK, _FE_USK = 1, 2, 3, 4, 16  # file_entry
_FD_REG, _FD_INETSK, _FD_UNIXSK = 1, 4, 5  # fd_types
_REG_FLAGS, _REG_NAME, _REG_MODE = 2, 6, 10  # reg_file_entry
_PE_PID = 1  # pstree_entry.pid
_IDS_FILES = 2  # task_kobj_ids_entry.files_id
_CORE_IDS = 4  # core_entry.ids
_FDI_ID, _FDI_TYPE, _FDI_FD = 1, 3, 4  # fdinfo_entry
_ISK_PROTO, _ISK_STATE, _ISK_OPTS = 5, 6, 14  # inet_sk_entry
_SO_REUSEPORT = 17  # sk_opts_entry.so_reuseport
_USK_NAME, _USK_NAME_DIR = 11, 14  # unix_sk_entry
_RP_ORIG, _RP_REMAP, _RP_TYPE = 1, 2, 3  # remap_file_path_entry
_REMAP_GHOST = 1  # remap_type.GHOST
_OLD_GHOST_BIT = 1 << 31  # images without remap_type flag ghosts in remap_id
_IPPROTO_TCP = 6
_TCP_LISTEN = 10


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


# -- what an image's restore does ---------------------------------------------------------------


@dataclass(frozen=True)
class ImageFacts:
    """What restoring an image does that copies must know about (from its ``files.img`` and
    ``remap-fpath.img``)."""

    listeners: int  # listening TCP sockets
    solo_listeners: int  # of which without SO_REUSEPORT (each copy's would be a group alone)
    paths: tuple[str, ...]  # paths CRIU creates while restoring: ghost files, unix socket names


def read_facts(image_dir: Path) -> ImageFacts:
    """Read an image's :class:`ImageFacts`; a damaged file raises ImageCorruptedError."""
    source = str(image_dir)
    with _safe.opened_dir(image_dir) as dfd:
        files = _read_entries(dfd, FILES_IMG, _FILES_MAGIC, source)
        remaps = _read_entries(dfd, REMAP_FPATH_IMG, _REMAP_FPATH_MAGIC, source)
    reg_names: dict[int, str] = {}
    paths: set[str] = set()
    listeners = solo = 0
    for raw in files or ():
        entry = _Message.parse(raw, source, FILES_IMG)
        kind = entry.get_int(_FE_TYPE)
        if kind == _FD_REG and (reg := entry.get_message(_FE_REG)) is not None:
            reg_names[entry.get_int(_FE_ID)] = reg.get_text(_REG_NAME)
        elif kind == _FD_INETSK and (isk := entry.get_message(_FE_ISK)) is not None:
            if _is_listener(isk):
                listeners += 1
                opts = isk.get_message(_ISK_OPTS)
                solo += opts is None or not opts.get_int(_SO_REUSEPORT)
        elif kind == _FD_UNIXSK and (usk := entry.get_message(_FE_USK)) is not None:
            name = usk.get_bytes(_USK_NAME)
            if name and name[0] != 0:  # bound to a path (abstract names start with NUL)
                path = os.fsdecode(name.rstrip(b"\0"))
                paths.add(f"unix:{usk.get_text(_USK_NAME_DIR)}:{path}")
    for raw in remaps or ():
        remap = _Message.parse(raw, source, REMAP_FPATH_IMG)
        remap_id = remap.get_int(_RP_REMAP)
        ghost = (
            remap.get_int(_RP_TYPE) == _REMAP_GHOST
            if remap.has(_RP_TYPE)
            else bool(remap_id & _OLD_GHOST_BIT)
        )
        if ghost:
            orig = reg_names.get(remap.get_int(_RP_ORIG), f"#{remap.get_int(_RP_ORIG)}")
            # CRIU's ghost_path() (criu/files-reg.c).
            paths.add(f"ghost:{orig}.cr.{remap_id & ~_OLD_GHOST_BIT:x}.ghost")
    return ImageFacts(listeners, solo, tuple(sorted(paths)))


def stdio_keys(image_dir: Path) -> tuple[str, ...]:
    """CRIU's ``inherit_fd`` keys (the path without its leading ``/``) of the regular files
    the image's root task writes its stdout and stderr to (a ``torpor run`` log), so that
    each restored copy can be given a log of its own in their place. Empty if they are not
    regular files (``/dev/null``, a pipe, a terminal) or the image does not say; a damaged
    file raises ImageCorruptedError."""
    source = str(image_dir)
    with _safe.opened_dir(image_dir) as dfd:
        tree = _read_entries(dfd, PSTREE_IMG, _PSTREE_MAGIC, source)
        if not tree:
            return ()
        root = _Message.parse(tree[0], source, PSTREE_IMG).get_int(_PE_PID)
        files_id = _files_id(dfd, root, source)
        if files_id is None:
            return ()
        fdinfo = f"fdinfo-{files_id}.img"
        fds = _read_entries(dfd, fdinfo, _FDINFO_MAGIC, source) or []
        wanted = set()
        for raw in fds:
            fi = _Message.parse(raw, source, fdinfo)
            if fi.get_int(_FDI_FD) in (1, 2) and fi.get_int(_FDI_TYPE) == _FD_REG:
                wanted.add(fi.get_int(_FDI_ID))
        files = _read_entries(dfd, FILES_IMG, _FILES_MAGIC, source) if wanted else None
        keys = set()
        for raw in files or ():
            entry = _Message.parse(raw, source, FILES_IMG)
            reg = entry.get_message(_FE_REG)
            if entry.get_int(_FE_ID) not in wanted or reg is None:
                continue
            name = reg.get_text(_REG_NAME)
            mode = reg.get_int(_REG_MODE) if reg.has(_REG_MODE) else None
            regular = stat.S_ISREG(mode) if mode is not None else not name.startswith("/dev/")
            writes = (reg.get_int(_REG_FLAGS) & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
            if regular and writes and name.startswith("/") and len(name) > 1:
                keys.add(name[1:])
    return tuple(sorted(keys))


def _files_id(dfd: int, pid: int, source: str) -> int | None:
    """Which ``fdinfo-N.img`` holds task ``pid``'s descriptors (from ``ids-PID.img``, or its
    core file's ids in newer images)."""
    ids = _read_entries(dfd, f"ids-{pid}.img", _IDS_MAGIC, source)
    if ids:
        return _Message.parse(ids[0], source, f"ids-{pid}.img").get_int(_IDS_FILES)
    core = _read_entries(dfd, f"core-{pid}.img", _CORE_MAGIC, source)
    if not core:
        return None
    kobj = _Message.parse(core[0], source, f"core-{pid}.img").get_message(_CORE_IDS)
    return kobj.get_int(_IDS_FILES) if kobj is not None and kobj.has(_IDS_FILES) else None


def _is_listener(isk: _Message) -> bool:
    return isk.get_int(_ISK_STATE) == _TCP_LISTEN and isk.get_int(_ISK_PROTO) == _IPPROTO_TCP


def with_reuseport(data: bytes, *, source: str = "") -> tuple[bytes, int]:
    """``files.img`` content ``data`` with ``SO_REUSEPORT`` on in every listening TCP socket's
    options, and how many sockets changed. Every other byte is kept as it was. ``source``
    (the image directory) is named in errors."""
    _check_header(data, _FILES_MAGIC, source, FILES_IMG)
    out = [data[: _HEADER.size]]
    changed = 0
    for raw in _split_entries(data, source, FILES_IMG):
        entry = _Message.parse(raw, source, FILES_IMG)
        isk = entry.get_message(_FE_ISK) if entry.get_int(_FE_TYPE) == _FD_INETSK else None
        if isk is not None and _is_listener(isk):
            opts = isk.get_message(_ISK_OPTS) or _Message([], source, FILES_IMG)
            if not opts.get_int(_SO_REUSEPORT):
                opts.set_int(_SO_REUSEPORT, 1)
                isk.set_bytes(_ISK_OPTS, opts.encode())
                entry.set_bytes(_FE_ISK, isk.encode())
                raw = entry.encode()
                changed += 1
        out.append(_U32.pack(len(raw)))
        out.append(raw)
    return b"".join(out), changed


def _read_entries(dfd: int, name: str, magic: int, source: str) -> list[bytes] | None:
    try:
        data = _safe.read_regular(dfd, name, source=source, limit=_MAX_FILES_IMG)
    except FileNotFoundError:
        return None
    _check_header(data, magic, source, name)
    return _split_entries(data, source, name)


def _check_header(data: bytes, magic: int, source: str, name: str) -> None:
    if len(data) < _HEADER.size or _HEADER.unpack_from(data) != (_IMG_COMMON_MAGIC, magic):
        raise _corrupt(source, name, "does not start with its CRIU magic")


def _split_entries(data: bytes, source: str, name: str) -> list[bytes]:
    entries = []
    pos = _HEADER.size
    while pos < len(data):
        if pos + _U32.size > len(data):
            raise _corrupt(source, name, f"is truncated at offset {pos}")
        (size,) = _U32.unpack_from(data, pos)
        end = pos + _U32.size + size
        if end > len(data):
            raise _corrupt(source, name, f"is truncated: entry at offset {pos}")
        entries.append(data[pos + _U32.size : end])
        pos = end
    return entries


def _corrupt(source: str, name: str, what: str) -> ImageCorruptedError:
    return ImageCorruptedError(
        f"{source}/{name} {what}" if source else f"{name} {what}",
        image=source,
        file=name,
        hint="the image is damaged; checkpoint again",
    )


class _Message:
    """A protobuf message as its fields in wire order, so that one field can be changed and the
    rest written back byte for byte (including fields this module knows nothing of). Only the
    few fields used here are interpreted; CRIU's ``.proto`` files give their numbers."""

    def __init__(self, fields: list[tuple[int, int, bytes]], source: str, name: str) -> None:
        self.fields = fields  # (field number, wire type, raw value: varint bytes or payload)
        self.source = source
        self.name = name

    @classmethod
    def parse(cls, data: bytes, source: str, name: str) -> _Message:
        fields: list[tuple[int, int, bytes]] = []
        pos = 0
        try:
            while pos < len(data):
                key, pos = _varint(data, pos)
                number, wire = key >> 3, key & 7
                if wire == 0:
                    _, end = _varint(data, pos)
                elif wire == 1:
                    end = pos + 8
                elif wire == 2:
                    size, pos = _varint(data, pos)
                    end = pos + size
                elif wire == 5:
                    end = pos + 4
                else:
                    raise ValueError(f"wire type {wire}")
                if end > len(data) or number == 0:
                    raise ValueError("field past the end")
                fields.append((number, wire, data[pos:end]))
                pos = end
        except (ValueError, IndexError) as exc:
            raise _corrupt(source, name, f"has an undecodable entry ({exc})") from exc
        return cls(fields, source, name)

    def encode(self) -> bytes:
        out = bytearray()
        for number, wire, raw in self.fields:
            out += _encode_varint(number << 3 | wire)
            if wire == 2:
                out += _encode_varint(len(raw))
            out += raw
        return bytes(out)

    def _last(self, number: int, wire: int) -> bytes | None:
        # As protobuf parsers do, the last occurrence of a non-repeated field wins.
        found = None
        for n, w, raw in self.fields:
            if n == number and w == wire:
                found = raw
        return found

    def has(self, number: int) -> bool:
        return any(n == number for n, _, _ in self.fields)

    def get_int(self, number: int) -> int:
        raw = self._last(number, 0)
        return _varint(raw, 0)[0] if raw is not None else 0

    def get_bytes(self, number: int) -> bytes:
        return self._last(number, 2) or b""

    def get_text(self, number: int) -> str:
        return self.get_bytes(number).decode("utf-8", errors="surrogateescape")

    def get_message(self, number: int) -> _Message | None:
        raw = self._last(number, 2)
        return None if raw is None else _Message.parse(raw, self.source, self.name)

    def _set(self, number: int, wire: int, raw: bytes) -> None:
        # In the place of its first occurrence (field order is kept), other occurrences dropped.
        out: list[tuple[int, int, bytes]] = []
        placed = False
        for field in self.fields:
            if field[0] != number:
                out.append(field)
            elif not placed:
                out.append((number, wire, raw))
                placed = True
        if not placed:
            out.append((number, wire, raw))
        self.fields = out

    def set_int(self, number: int, value: int) -> None:
        self._set(number, 0, _encode_varint(value))

    def set_bytes(self, number: int, value: bytes) -> None:
        self._set(number, 2, value)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("bad varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


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
        raise _corrupt(source, FILES_IMG, "is not in the manifest")
    path = parent / f"{os.getpid()}-{secrets.token_hex(6)}"
    os.mkdir(path, 0o700)
    try:
        origin = image.path.absolute()
        with _safe.opened_dir(origin) as sfd, _safe.opened_dir(path) as dfd:
            data = _safe.read_regular(sfd, FILES_IMG, source=source, limit=_MAX_FILES_IMG)
            # The bytes rewritten are the bytes verified, whatever happened to the file since.
            if len(data) != want.size or hashlib.sha256(data).hexdigest() != want.sha256:
                raise _corrupt(source, FILES_IMG, "does not match its SHA-256")
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
