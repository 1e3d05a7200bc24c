"""Decode a CRIU image directory into what a person wants to see: tasks, memory, files, sockets.

CRIU's metadata files share one framing: a 4-byte little-endian magic saying what the file is
(preceded by the common "img" magic on every file but ``inventory.img``), then entries, each a
4-byte little-endian length and a protobuf message of that length. A few kinds append raw bytes
after an entry (``tcp-stream-*.img`` carries the socket's queued data). ``pages-*.img`` hold raw
page contents and are never read here, only measured; ``pagemap-*.img`` say which virtual
addresses those pages belong to.

The messages are torpor's own declarations (``_criu_images/criu_images.proto``) of just the
fields shown here. Every decoding failure becomes an :class:`ImageCorruptedError` naming the file.

The directory is outside input (``torpor inspect`` runs as root on whatever it is given): it is
opened ``O_NOFOLLOW`` and checked like any image directory, its files are read relative to its
fd through :func:`torpor._safe.read_regular` (a symlink, FIFO or device is refused, never
followed or read), each at most :data:`MAX_METADATA` bytes and all together at most
:data:`MAX_TOTAL`, and no step costs more than a log factor over the size of what was read.

The values returned are in :mod:`._inspection`, the text report in :mod:`._inspect_text`; both
are re-exported here.
"""

from __future__ import annotations

import bisect
import fnmatch
import ipaddress
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from .._errors import ImageCorruptedError, ImageError, ImageNotFoundError
from .._safe import check_private, lstat_entries, open_dir, read_regular
from . import _manifest
from ._criu_images import criu_images_pb2 as pb
from ._inspect_text import render_text as render_text
from ._inspection import (
    NO_MEMORY,
    PAGE_SIZE,
    FileDesc,
    Inspection,
    MemorySummary,
    Socket,
    Task,
    TcpStream,
    Vma,
)
from ._layout import MANIFEST_NAME

_M = TypeVar("_M", bound=Message)

# Magic numbers (criu/include/magic.h).
_IMG_COMMON_MAGIC = 0x54564319
_PSTREE_MAGIC = 0x50273030
_CORE_MAGIC = 0x55053847
_IDS_MAGIC = 0x54432030
_MM_MAGIC = 0x57492820
_PAGEMAP_MAGIC = 0x56084025
_FDINFO_MAGIC = 0x56213732
_FILES_MAGIC = 0x56303138
_TCP_STREAM_MAGIC = 0x51465506

_U32 = struct.Struct("<I")
_HEADER = struct.Struct("<II")

# Bounds on what is read (see the module docstring). CRIU's metadata files are small: an mm
# file of a process with 262144 memory areas (a raised vm.max_map_count) is ~20 MiB.
MAX_METADATA = 32 << 20
MAX_TOTAL = 128 << 20

# Pagemap entry flags (criu/include/pagemap.h).
_PE_PARENT = 1 << 0
_PE_LAZY = 1 << 1
_PE_PRESENT = 1 << 2

# core_entry.tc.task_state (compel's task states).
_TASK_STATES = {1: "alive", 2: "dead", 3: "stopped", 6: "zombie"}
_TASKS_WITHOUT_MEMORY = {"dead", "zombie"}

# fd_types from CRIU's fdinfo.proto, named the way `torpor inspect` shows them.
_FD_TYPES = {
    1: "file",
    2: "pipe",
    3: "fifo",
    4: "inet",
    5: "unix",
    6: "eventfd",
    7: "epoll",
    8: "inotify",
    9: "signalfd",
    10: "packet",
    11: "tty",
    12: "fanotify",
    13: "netlink",
    14: "namespace",
    15: "tun",
    16: "external",
    17: "timerfd",
    18: "memfd",
    19: "bpfmap",
    20: "pidfd",
}

# VMA status bits (criu/include/image.h): special areas first, then how the area is backed.
_VMA_KINDS = (
    (1 << 3, "vdso"),
    (1 << 12, "vvar"),
    (1 << 2, "vsyscall"),
    (1 << 1, "stack"),
    (1 << 5, "heap"),
    (1 << 10, "sysvipc"),
    (1 << 11, "socket"),
    (1 << 13, "aio"),
    (1 << 14, "memfd"),
    (1 << 15, "shadow-stack"),
    (1 << 17, "uprobes"),
    (1 << 6, "file"),
    (1 << 7, "file"),
    (1 << 8, "anon-shared"),
    (1 << 9, "anon"),
)
_VMA_FILE = (1 << 6) | (1 << 7)
_MAP_GROWSDOWN = 0x100

_FAMILIES = {1: "unix", 2: "inet", 10: "inet6", 16: "netlink", 17: "packet"}
_SOCK_TYPES = {1: "stream", 2: "dgram", 3: "raw", 5: "seqpacket", 10: "packet"}
_PROTOCOLS = {0: "", 1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 136: "udplite"}
# Linux keeps TCP's state numbers for every socket (unix ones use ESTABLISHED/LISTEN/CLOSE).
_SOCK_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}
_FD_CLOEXEC = 1


# --- reading ----------------------------------------------------------------------------------


class _ImageDir:
    """The image directory being inspected: its fd, its entries, and the reading budget."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        # Whether a file exists is looked up here, not with a syscall per name: a hostile
        # files.img may name millions of sockets whose tcp-stream files do not exist.
        self.entries = lstat_entries(fd)
        self.budget = MAX_TOTAL

    def read(self, name: str) -> bytes | None:
        """The content of ``name`` (None if there is none)."""
        if name not in self.entries:
            return None
        try:
            data = read_regular(self.fd, name, source=str(self.path), limit=MAX_METADATA)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ImageCorruptedError(
                f"{self.path / name} cannot be read ({exc.strerror or exc})",
                image=self.path,
                file=name,
                hint="the image is damaged; checkpoint again",
            ) from exc
        self.budget -= len(data)
        if self.budget < 0:
            raise ImageError(
                f"{self.path}: the image's metadata files hold more than {MAX_TOTAL} bytes, "
                "more than inspect reads",
                image=self.path,
                hint="this is not an image torpor made",
            )
        return data

    def entry_file(self, name: str, magic: int, *, required: bool) -> _EntryFile | None:
        """``name`` to walk entry by entry; a missing one is None or, if ``required``, an
        error."""
        if required:
            return self.required_file(name, magic)
        data = self.read(name)
        return None if data is None else _EntryFile(self.path, name, magic, data)

    def required_file(self, name: str, magic: int) -> _EntryFile:
        """``name`` to walk entry by entry; a missing one is an error."""
        data = self.read(name)
        if data is None:
            raise ImageCorruptedError(
                f"{self.path / name} is missing",
                image=self.path,
                file=name,
                hint="the image is incomplete; checkpoint again",
            )
        return _EntryFile(self.path, name, magic, data)


class _EntryFile:
    """One CRIU image file, read whole (metadata files are small) and walked entry by entry."""

    def __init__(self, image_dir: Path, name: str, magic: int, data: bytes) -> None:
        self.image_dir = image_dir
        self.name = name
        self._data = data
        if len(self._data) < _HEADER.size:
            raise self.error(f"is truncated: {len(self._data)} bytes, shorter than its header")
        common, kind = _HEADER.unpack_from(self._data)
        if (common, kind) != (_IMG_COMMON_MAGIC, magic):
            raise self.error(
                f"has magic {common:#010x} {kind:#010x}, expected "
                f"{_IMG_COMMON_MAGIC:#010x} {magic:#010x}",
                hint="it is not the CRIU file its name says; the image is damaged",
            )
        self._pos = _HEADER.size

    def error(self, what: str, *, hint: str | None = None) -> ImageCorruptedError:
        """An error naming this file."""
        return ImageCorruptedError(
            f"{self.image_dir / self.name} {what}",
            image=self.image_dir,
            file=self.name,
            hint=hint or "the image is damaged; checkpoint again",
        )

    def next(self, cls: type[_M]) -> _M | None:
        """The next entry decoded as ``cls``, or None at the end of the file."""
        start = self._pos
        if start == len(self._data):
            return None
        if start + _U32.size > len(self._data):
            raise self.error(f"is truncated: partial entry length at offset {start}")
        (size,) = _U32.unpack_from(self._data, start)
        end = start + _U32.size + size
        if end > len(self._data):
            raise self.error(
                f"is truncated: entry at offset {start} has {size} bytes, "
                f"only {len(self._data) - start - _U32.size} remain"
            )
        msg = cls()
        try:
            msg.ParseFromString(self._data[start + _U32.size : end])
        except (DecodeError, RecursionError) as exc:
            raise self.error(f"has an undecodable entry at offset {start} ({exc})") from exc
        self._pos = end
        return msg

    def first(self, cls: type[_M]) -> _M:
        """The first entry; a file without one is an error."""
        msg = self.next(cls)
        if msg is None:
            raise self.error("has no entries")
        return msg

    def rest(self, cls: type[_M]) -> list[_M]:
        """Every remaining entry."""
        out: list[_M] = []
        while (msg := self.next(cls)) is not None:
            out.append(msg)
        return out

    def skip(self, n: int) -> None:
        """Skip ``n`` bytes of raw data that follow an entry."""
        if self._pos + n > len(self._data):
            raise self.error(f"is truncated: {n} bytes of data expected at offset {self._pos}")
        self._pos += n


def inspect_image(path: str | os.PathLike[str]) -> Inspection:
    """Decode the CRIU image directory ``path`` (with or without a torpor manifest).

    Raises :class:`ImageNotFoundError` if ``path`` is not a directory,
    :class:`~torpor.UnsafePathError` if it is a symlink or another user could change it,
    :class:`ImageError` if it holds no CRIU image or more than inspect reads, and
    :class:`ImageCorruptedError` naming the first file that cannot be decoded or is not a
    regular file.
    """
    image_dir = Path(path)
    try:
        fd = open_dir(image_dir)
    except FileNotFoundError as exc:
        raise ImageNotFoundError(f"no image directory {image_dir}", image=str(image_dir)) from exc
    try:
        check_private(image_dir, what="image directory", fd=fd)
        return _inspect(_ImageDir(image_dir, fd))
    finally:
        os.close(fd)


def _inspect(d: _ImageDir) -> Inspection:
    pstree_file = d.entry_file("pstree.img", _PSTREE_MAGIC, required=False)
    if pstree_file is None:
        raise ImageError(
            f"{d.path} holds no CRIU image (no pstree.img)",
            image=d.path,
            hint="give the directory a checkpoint wrote",
        )
    pstree = pstree_file.rest(pb.PstreeEntry)
    files = _read_files(d)
    sockets = {fid: _socket(d, fid, entry) for fid, entry in files.items()}
    tasks = tuple(_task(d, e, files, sockets) for e in pstree)
    memory = NO_MEMORY
    for t in tasks:
        memory += t.memory
    manifest = _manifest.read(d.path, dir_fd=d.fd) if MANIFEST_NAME in d.entries else None
    return Inspection(
        path=d.path,
        tasks=tasks,
        sockets=tuple(s for s in sockets.values() if s is not None),
        memory=memory,
        pages_file_bytes=sum(
            st.st_size
            for name, st in d.entries.items()
            if fnmatch.fnmatchcase(name, "pages-*.img") and stat.S_ISREG(st.st_mode)
        ),
        manifest=manifest,
    )


def _read_files(d: _ImageDir) -> dict[int, pb.FileEntry]:
    reader = d.entry_file("files.img", _FILES_MAGIC, required=False)
    if reader is None:
        return {}
    return {e.id: e for e in reader.rest(pb.FileEntry)}


def _task(
    d: _ImageDir,
    entry: pb.PstreeEntry,
    files: dict[int, pb.FileEntry],
    sockets: dict[int, Socket | None],
) -> Task:
    pid = entry.pid
    core = d.required_file(f"core-{pid}.img", _CORE_MAGIC).first(pb.CoreEntry)
    state = _TASK_STATES.get(core.tc.task_state, f"state {core.tc.task_state}")
    # Zombies and dead helpers have no memory or descriptors of their own.
    live = state not in _TASKS_WITHOUT_MEMORY
    ids_file = d.entry_file(f"ids-{pid}.img", _IDS_MAGIC, required=False)
    ids = ids_file.first(pb.TaskKobjIdsEntry) if ids_file is not None else core.ids

    vmas: tuple[Vma, ...] = ()
    memory = NO_MEMORY
    exe = None
    mm_file = d.entry_file(f"mm-{pid}.img", _MM_MAGIC, required=live)
    if mm_file is not None:
        mm = mm_file.first(pb.MmEntry)
        exe = _reg_path(files, mm.exe_file_id) if mm.HasField("exe_file_id") else None
        pagemap = d.entry_file(f"pagemap-{pid}.img", _PAGEMAP_MAGIC, required=live)
        page_entries = _read_pagemap(pagemap) if pagemap is not None else []
        vmas, memory = _memory(mm.vmas, page_entries, files)

    fds: tuple[FileDesc, ...] = ()
    fdinfo = d.entry_file(f"fdinfo-{ids.files_id}.img", _FDINFO_MAGIC, required=live)
    if fdinfo is not None:
        fds = tuple(
            _file_desc(fi, files, sockets)
            for fi in sorted(fdinfo.rest(pb.FdinfoEntry), key=lambda fi: fi.fd)
        )
    return Task(
        pid=pid,
        ppid=entry.ppid,
        pgid=entry.pgid,
        sid=entry.sid,
        threads=tuple(entry.threads),
        comm=core.tc.comm,
        state=state,
        exe=exe,
        vmas=vmas,
        memory=memory,
        files=fds,
    )


def _read_pagemap(reader: _EntryFile) -> list[pb.PagemapEntry]:
    reader.first(pb.PagemapHead)
    return reader.rest(pb.PagemapEntry)


def _memory(
    vma_entries: Iterable[pb.VmaEntry],
    page_entries: list[pb.PagemapEntry],
    files: dict[int, pb.FileEntry],
) -> tuple[tuple[Vma, ...], MemorySummary]:
    dumped: list[tuple[int, int]] = []
    lazy = parent = 0
    for pe in page_entries:
        nr = pe.nr_pages if pe.HasField("nr_pages") else pe.compat_nr_pages
        # Images older than the flags field mark only pages kept in the parent.
        flags = pe.flags if pe.HasField("flags") else (_PE_PARENT if pe.in_parent else _PE_PRESENT)
        if flags & _PE_PRESENT:
            dumped.append((pe.vaddr, pe.vaddr + nr * PAGE_SIZE))
        elif flags & _PE_PARENT:
            parent += nr
        elif flags & _PE_LAZY:
            lazy += nr
    covered = _Coverage(dumped)
    vmas = []
    for ve in vma_entries:
        kind = next((name for bit, name in _VMA_KINDS if ve.status & bit), "other")
        # CRIU does not mark the main stack; it is the anonymous area that grows down.
        if kind == "anon" and ve.flags & _MAP_GROWSDOWN:
            kind = "stack"
        # One pagemap entry can span adjacent areas, so count the overlap with each.
        overlap = covered.within(ve.start, ve.end)
        vmas.append(
            Vma(
                start=ve.start,
                end=ve.end,
                prot=ve.prot,
                flags=ve.flags,
                kind=kind,
                path=_reg_path(files, ve.shmid) if ve.status & _VMA_FILE else None,
                pages_dumped=overlap // PAGE_SIZE,
            )
        )
    memory = MemorySummary(
        vmas=len(vmas),
        mapped_bytes=sum(v.size for v in vmas),
        pages_dumped=sum((end - start) // PAGE_SIZE for start, end in dumped),
        pages_lazy=lazy,
        pages_in_parent=parent,
    )
    return tuple(vmas), memory


class _Coverage:
    """The union of address ranges, asked how much of ``[lo, hi)`` it covers in log time (a
    loop over every range for every memory area would be quadratic in a hostile image)."""

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for start, end in sorted(r for r in ranges if r[1] > r[0]):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self._starts = [r[0] for r in merged]
        self._ends = [r[1] for r in merged]
        self._below = [0]  # _below[i]: length covered by the ranges before the i-th
        for start, end in merged:
            self._below.append(self._below[-1] + end - start)

    def _upto(self, x: int) -> int:
        i = bisect.bisect_right(self._starts, x) - 1
        if i < 0:
            return 0
        return self._below[i] + min(x, self._ends[i]) - self._starts[i]

    def within(self, lo: int, hi: int) -> int:
        """Bytes of ``[lo, hi)`` covered."""
        return max(0, self._upto(hi) - self._upto(lo))


def _reg_path(files: dict[int, pb.FileEntry], file_id: int) -> str | None:
    entry = files.get(file_id)
    if entry is None or not entry.HasField("reg"):
        return None
    return entry.reg.name


def _file_desc(
    fi: pb.FdinfoEntry, files: dict[int, pb.FileEntry], sockets: dict[int, Socket | None]
) -> FileDesc:
    base = FileDesc(
        fd=fi.fd,
        type=_FD_TYPES.get(fi.type, f"type {fi.type}"),
        file_id=fi.id,
        cloexec=bool(fi.flags & _FD_CLOEXEC),
    )
    entry = files.get(fi.id)
    if entry is None:
        return base
    if entry.HasField("reg"):
        r = entry.reg
        return replace(
            base, path=r.name, flags=r.flags, pos=r.pos, size=r.size if r.HasField("size") else None
        )
    if entry.HasField("pipe"):
        return replace(base, pipe_id=entry.pipe.pipe_id, flags=entry.pipe.flags)
    if entry.HasField("fifo"):
        return replace(base, pipe_id=entry.fifo.pipe_id, path=_reg_path(files, entry.fifo.regf_id))
    if entry.HasField("tty"):
        regf = entry.tty.regf_id if entry.tty.HasField("regf_id") else entry.tty.id
        return replace(base, path=_reg_path(files, regf), flags=entry.tty.flags)
    socket = sockets.get(fi.id)
    if socket is not None:
        return replace(base, socket=socket)
    return base


def _socket(d: _ImageDir, file_id: int, entry: pb.FileEntry) -> Socket | None:
    if entry.HasField("isk"):
        s = entry.isk
        proto = _PROTOCOLS.get(s.proto, str(s.proto))
        stream = None
        reader = d.entry_file(f"tcp-stream-{s.ino:x}.img", _TCP_STREAM_MAGIC, required=False)
        if reader is not None:
            ts = reader.first(pb.TcpStreamEntry)
            # The queued data follows the entry; skipping it checks the file is whole.
            reader.skip(ts.inq_len + ts.outq_len)
            stream = TcpStream(
                inq_len=ts.inq_len, inq_seq=ts.inq_seq, outq_len=ts.outq_len, outq_seq=ts.outq_seq
            )
        return Socket(
            file_id=file_id,
            ino=s.ino,
            family=_FAMILIES.get(s.family, str(s.family)),
            type=_SOCK_TYPES.get(s.type, str(s.type)),
            protocol=proto,
            state=_SOCK_STATES.get(s.state, str(s.state)),
            backlog=s.backlog,
            src_addr=_ip(s.src_addr),
            src_port=s.src_port,
            dst_addr=_ip(s.dst_addr),
            dst_port=s.dst_port,
            tcp_stream=stream,
        )
    if entry.HasField("usk"):
        u = entry.usk
        return Socket(
            file_id=file_id,
            ino=u.ino,
            family="unix",
            type=_SOCK_TYPES.get(u.type, str(u.type)),
            protocol="",
            state=_SOCK_STATES.get(u.state, str(u.state)),
            backlog=u.backlog,
            name=_unix_name(u.name),
            peer=u.peer or None,
        )
    return None


def _ip(words: Iterable[int]) -> str | None:
    # CRIU copies the address's bytes (network order) into u32 words in host (little-endian)
    # memory order: one word for IPv4, four for IPv6.
    words = list(words)
    if len(words) not in (1, 4):
        return None
    return str(ipaddress.ip_address(struct.pack(f"<{len(words)}I", *words)))


def _unix_name(raw: bytes) -> str | None:
    if not raw:
        return None
    if raw.startswith(b"\0"):
        return "@" + raw[1:].decode(errors="backslashreplace")
    return raw.decode(errors="backslashreplace")
