"""Decode a CRIU image directory into what a person wants to see: tasks, memory, files, sockets.

CRIU's metadata files share one framing: a 4-byte little-endian magic saying what the file is
(preceded by the common "img" magic on every file but ``inventory.img``), then entries, each a
4-byte little-endian length and a protobuf message of that length. A few kinds append raw bytes
after an entry (``tcp-stream-*.img`` carries the socket's queued data). ``pages-*.img`` hold raw
page contents and are never read here, only measured; ``pagemap-*.img`` say which virtual
addresses those pages belong to.

The messages are torpor's own declarations (``_criu_images/criu_images.proto``) of just the
fields shown here. Every decoding failure becomes an :class:`ImageCorruptedError` naming the file.
"""

from __future__ import annotations

import ipaddress
import json
import mmap
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from .._errors import ImageCorruptedError, ImageError, ImageNotFoundError
from . import _manifest
from ._criu_images import criu_images_pb2 as pb
from ._manifest import MANIFEST_NAME, Manifest

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

# The images record pages, not bytes; CRIU uses the machine's page size and images are only
# restorable on a machine of the same kind, so the inspecting host's page size is the image's.
_PAGE_SIZE = mmap.PAGESIZE

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
_MAP_SHARED = 0x1
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


@dataclass(frozen=True)
class Vma:
    """One memory area of a task, and how many of its pages the image holds."""

    start: int
    end: int
    prot: int
    flags: int
    kind: str
    path: str | None
    pages_dumped: int

    @property
    def size(self) -> int:
        """Length of the area in bytes."""
        return self.end - self.start

    @property
    def file_backed(self) -> bool:
        """True if the area maps a file (``path`` then names it, when CRIU recorded it)."""
        return self.kind == "file"

    @property
    def perms(self) -> str:
        """Protection and sharing as ``/proc/PID/maps`` writes them, e.g. ``r-xp``."""
        return (
            ("r" if self.prot & 1 else "-")
            + ("w" if self.prot & 2 else "-")
            + ("x" if self.prot & 4 else "-")
            + ("s" if self.flags & _MAP_SHARED else "p")
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "start": self.start,
            "end": self.end,
            "size": self.size,
            "perms": self.perms,
            "prot": self.prot,
            "flags": self.flags,
            "kind": self.kind,
            "file_backed": self.file_backed,
            "path": self.path,
            "pages_dumped": self.pages_dumped,
        }


@dataclass(frozen=True)
class TcpStream:
    """The state CRIU saved for an established TCP connection (``tcp-stream-*.img``)."""

    inq_len: int
    inq_seq: int
    outq_len: int
    outq_seq: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "inq_len": self.inq_len,
            "inq_seq": self.inq_seq,
            "outq_len": self.outq_len,
            "outq_seq": self.outq_seq,
        }


@dataclass(frozen=True)
class Socket:
    """A unix or inet socket of the image (``file_id`` is its entry in ``files.img``).

    Inet sockets fill ``src_*``/``dst_*``; unix sockets fill ``name`` (``@`` starts an abstract
    name) and ``peer`` (the peer's inode).
    """

    file_id: int
    ino: int
    family: str
    type: str
    protocol: str
    state: str
    backlog: int
    src_addr: str | None = None
    src_port: int | None = None
    dst_addr: str | None = None
    dst_port: int | None = None
    name: str | None = None
    peer: int | None = None
    tcp_stream: TcpStream | None = None

    @property
    def local(self) -> str:
        """The local end, ``addr:port`` or the unix name (empty if unbound)."""
        if self.family == "unix":
            return self.name or ""
        return _endpoint(self.src_addr, self.src_port)

    @property
    def remote(self) -> str:
        """The remote end, ``addr:port`` or ``peer ino`` (empty if there is none)."""
        if self.family == "unix":
            return f"peer {self.peer}" if self.peer else ""
        return _endpoint(self.dst_addr, self.dst_port) if self.dst_port else ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "file_id": self.file_id,
            "ino": self.ino,
            "family": self.family,
            "type": self.type,
            "protocol": self.protocol,
            "state": self.state,
            "backlog": self.backlog,
            "src_addr": self.src_addr,
            "src_port": self.src_port,
            "dst_addr": self.dst_addr,
            "dst_port": self.dst_port,
            "name": self.name,
            "peer": self.peer,
            "tcp_stream": self.tcp_stream.to_dict() if self.tcp_stream else None,
        }


@dataclass(frozen=True)
class FileDesc:
    """One open descriptor of a task.

    ``type`` is CRIU's kind of file (``file``, ``pipe``, ``inet``, ``unix``, ``tty``,
    ``eventfd``, ``epoll``...). Regular files fill ``path``, ``flags`` (open(2) flags), ``pos``
    and ``size``; pipes and fifos ``pipe_id``; sockets ``socket``; ttys and fifos ``path``.
    """

    fd: int
    type: str
    file_id: int
    cloexec: bool
    path: str | None = None
    flags: int | None = None
    pos: int | None = None
    size: int | None = None
    pipe_id: int | None = None
    socket: Socket | None = None

    @property
    def summary(self) -> str:
        """A one-line description of what the descriptor points at."""
        if self.socket is not None:
            s = self.socket
            what = " ".join(p for p in (s.family, s.type, s.protocol, s.state) if p)
            ends = " -> ".join(e for e in (s.local, s.remote) if e)
            return f"{what} {ends}".rstrip()
        parts: list[str] = []
        if self.path is not None:
            parts.append(self.path)
        if self.pipe_id is not None:
            parts.append(f"pipe:[{self.pipe_id}]")
        if self.flags is not None:
            parts.append(_open_mode(self.flags))
        if self.pos is not None:
            parts.append(f"pos {self.pos}")
        if self.size is not None:
            parts.append(f"size {self.size}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "fd": self.fd,
            "type": self.type,
            "file_id": self.file_id,
            "cloexec": self.cloexec,
            "path": self.path,
            "flags": self.flags,
            "pos": self.pos,
            "size": self.size,
            "pipe_id": self.pipe_id,
            "socket": self.socket.to_dict() if self.socket else None,
        }


@dataclass(frozen=True)
class MemorySummary:
    """Memory of a task, or of the whole image.

    ``pages_dumped`` are in this image's ``pages-*.img``; ``pages_lazy`` are left for a page
    server to send during restore; ``pages_in_parent`` are in the parent (pre-dump) image.
    """

    vmas: int
    mapped_bytes: int
    pages_dumped: int
    pages_lazy: int
    pages_in_parent: int
    page_size: int = _PAGE_SIZE

    @property
    def bytes_dumped(self) -> int:
        """Bytes of page data this image holds."""
        return self.pages_dumped * self.page_size

    def __add__(self, other: MemorySummary) -> MemorySummary:
        return MemorySummary(
            vmas=self.vmas + other.vmas,
            mapped_bytes=self.mapped_bytes + other.mapped_bytes,
            pages_dumped=self.pages_dumped + other.pages_dumped,
            pages_lazy=self.pages_lazy + other.pages_lazy,
            pages_in_parent=self.pages_in_parent + other.pages_in_parent,
            page_size=self.page_size,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "vmas": self.vmas,
            "mapped_bytes": self.mapped_bytes,
            "pages_dumped": self.pages_dumped,
            "bytes_dumped": self.bytes_dumped,
            "pages_lazy": self.pages_lazy,
            "pages_in_parent": self.pages_in_parent,
            "page_size": self.page_size,
        }


_NO_MEMORY = MemorySummary(vmas=0, mapped_bytes=0, pages_dumped=0, pages_lazy=0, pages_in_parent=0)


@dataclass(frozen=True)
class Task:
    """One process of the dumped tree."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    threads: tuple[int, ...]
    comm: str
    state: str
    exe: str | None
    vmas: tuple[Vma, ...]
    memory: MemorySummary
    files: tuple[FileDesc, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "pid": self.pid,
            "ppid": self.ppid,
            "pgid": self.pgid,
            "sid": self.sid,
            "threads": list(self.threads),
            "comm": self.comm,
            "state": self.state,
            "exe": self.exe,
            "memory": self.memory.to_dict(),
            "vmas": [v.to_dict() for v in self.vmas],
            "files": [f.to_dict() for f in self.files],
        }


@dataclass(frozen=True)
class Inspection:
    """Everything ``torpor inspect`` shows about one image directory."""

    path: Path
    tasks: tuple[Task, ...]
    sockets: tuple[Socket, ...]
    memory: MemorySummary
    pages_file_bytes: int
    manifest: Manifest | None

    def holders(self, file_id: int) -> tuple[tuple[int, int], ...]:
        """The ``(pid, fd)`` pairs that hold the open file ``file_id``."""
        return tuple((t.pid, f.fd) for t in self.tasks for f in t.files if f.file_id == file_id)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (plain dicts, lists, strings, numbers and None)."""
        return {
            "path": str(self.path),
            "tasks": [t.to_dict() for t in self.tasks],
            "sockets": [
                {**s.to_dict(), "holders": [list(h) for h in self.holders(s.file_id)]}
                for s in self.sockets
            ],
            "memory": self.memory.to_dict(),
            "pages_file_bytes": self.pages_file_bytes,
            "manifest": _manifest_dict(self.manifest),
        }


# --- reading ----------------------------------------------------------------------------------


class _EntryFile:
    """One CRIU image file, read whole (metadata files are small) and walked entry by entry."""

    def __init__(self, image_dir: Path, name: str, magic: int) -> None:
        self.image_dir = image_dir
        self.name = name
        try:
            self._data = (image_dir / name).read_bytes()
        except OSError as exc:
            raise self.error(f"cannot be read ({exc.strerror or exc})") from exc
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
        except DecodeError as exc:
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


def _open(image_dir: Path, name: str, magic: int, *, required: bool) -> _EntryFile | None:
    if not (image_dir / name).exists():
        if required:
            raise ImageCorruptedError(
                f"{image_dir / name} is missing",
                image=image_dir,
                file=name,
                hint="the image is incomplete; checkpoint again",
            )
        return None
    return _EntryFile(image_dir, name, magic)


def inspect_image(path: str | os.PathLike[str]) -> Inspection:
    """Decode the CRIU image directory ``path`` (with or without a torpor manifest).

    Raises :class:`ImageNotFoundError` if ``path`` is not a directory, :class:`ImageError` if it
    holds no CRIU image, and :class:`ImageCorruptedError` naming the first file that cannot be
    decoded.
    """
    image_dir = Path(path)
    if not image_dir.is_dir():
        raise ImageNotFoundError(f"no image directory {image_dir}", image=str(image_dir))
    if not (image_dir / "pstree.img").exists():
        raise ImageError(
            f"{image_dir} holds no CRIU image (no pstree.img)",
            image=image_dir,
            hint="give the directory a checkpoint wrote",
        )
    pstree = _EntryFile(image_dir, "pstree.img", _PSTREE_MAGIC).rest(pb.PstreeEntry)
    files = _read_files(image_dir)
    sockets = {fid: _socket(image_dir, fid, entry) for fid, entry in files.items()}
    tasks = tuple(_task(image_dir, e, files, sockets) for e in pstree)
    memory = _NO_MEMORY
    for t in tasks:
        memory += t.memory
    manifest = _manifest.read(image_dir) if (image_dir / MANIFEST_NAME).exists() else None
    return Inspection(
        path=image_dir,
        tasks=tasks,
        sockets=tuple(s for s in sockets.values() if s is not None),
        memory=memory,
        pages_file_bytes=sum(p.stat().st_size for p in image_dir.glob("pages-*.img")),
        manifest=manifest,
    )


def _read_files(image_dir: Path) -> dict[int, pb.FileEntry]:
    reader = _open(image_dir, "files.img", _FILES_MAGIC, required=False)
    if reader is None:
        return {}
    return {e.id: e for e in reader.rest(pb.FileEntry)}


def _task(
    image_dir: Path,
    entry: pb.PstreeEntry,
    files: dict[int, pb.FileEntry],
    sockets: dict[int, Socket | None],
) -> Task:
    pid = entry.pid
    core = _EntryFile(image_dir, f"core-{pid}.img", _CORE_MAGIC).first(pb.CoreEntry)
    state = _TASK_STATES.get(core.tc.task_state, f"state {core.tc.task_state}")
    # Zombies and dead helpers have no memory or descriptors of their own.
    live = state not in _TASKS_WITHOUT_MEMORY
    ids_file = _open(image_dir, f"ids-{pid}.img", _IDS_MAGIC, required=False)
    ids = ids_file.first(pb.TaskKobjIdsEntry) if ids_file is not None else core.ids

    vmas: tuple[Vma, ...] = ()
    memory = _NO_MEMORY
    exe = None
    mm_file = _open(image_dir, f"mm-{pid}.img", _MM_MAGIC, required=live)
    if mm_file is not None:
        mm = mm_file.first(pb.MmEntry)
        exe = _reg_path(files, mm.exe_file_id) if mm.HasField("exe_file_id") else None
        pagemap = _open(image_dir, f"pagemap-{pid}.img", _PAGEMAP_MAGIC, required=live)
        page_entries = _read_pagemap(pagemap) if pagemap is not None else []
        vmas, memory = _memory(mm.vmas, page_entries, files)

    fds: tuple[FileDesc, ...] = ()
    fdinfo = _open(image_dir, f"fdinfo-{ids.files_id}.img", _FDINFO_MAGIC, required=live)
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
            dumped.append((pe.vaddr, pe.vaddr + nr * _PAGE_SIZE))
        elif flags & _PE_PARENT:
            parent += nr
        elif flags & _PE_LAZY:
            lazy += nr
    vmas = []
    for ve in vma_entries:
        kind = next((name for bit, name in _VMA_KINDS if ve.status & bit), "other")
        # CRIU does not mark the main stack; it is the anonymous area that grows down.
        if kind == "anon" and ve.flags & _MAP_GROWSDOWN:
            kind = "stack"
        # One pagemap entry can span adjacent areas, so count the overlap with each.
        overlap = sum(max(0, min(end, ve.end) - max(start, ve.start)) for start, end in dumped)
        vmas.append(
            Vma(
                start=ve.start,
                end=ve.end,
                prot=ve.prot,
                flags=ve.flags,
                kind=kind,
                path=_reg_path(files, ve.shmid) if ve.status & _VMA_FILE else None,
                pages_dumped=overlap // _PAGE_SIZE,
            )
        )
    memory = MemorySummary(
        vmas=len(vmas),
        mapped_bytes=sum(v.size for v in vmas),
        pages_dumped=sum((end - start) // _PAGE_SIZE for start, end in dumped),
        pages_lazy=lazy,
        pages_in_parent=parent,
    )
    return tuple(vmas), memory


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


def _socket(image_dir: Path, file_id: int, entry: pb.FileEntry) -> Socket | None:
    if entry.HasField("isk"):
        s = entry.isk
        proto = _PROTOCOLS.get(s.proto, str(s.proto))
        stream = None
        reader = _open(image_dir, f"tcp-stream-{s.ino:x}.img", _TCP_STREAM_MAGIC, required=False)
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


def _endpoint(addr: str | None, port: int | None) -> str:
    host = addr or "*"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port or 0}"


def _open_mode(flags: int) -> str:
    mode = {os.O_RDONLY: "r", os.O_WRONLY: "w", os.O_RDWR: "rw"}.get(flags & os.O_ACCMODE, "?")
    extra = [
        name for bit, name in ((os.O_APPEND, "append"), (os.O_NONBLOCK, "nonblock")) if flags & bit
    ]
    return "+".join([mode, *extra])


def _manifest_dict(manifest: Manifest | None) -> dict[str, Any] | None:
    if manifest is None:
        return None
    data: dict[str, Any] = json.loads(manifest.to_json())
    return data


# --- text -------------------------------------------------------------------------------------


def render_text(inspection: Inspection) -> str:
    """A readable report: manifest, process tree, memory per task, files, sockets."""
    out: list[str] = [f"Image {inspection.path}"]
    m = inspection.manifest
    if m is not None:
        out += [
            f"  name {m.name!r}, id {m.id}, created {m.created}",
            f"  host {m.host}, kernel {m.kernel}, CRIU {m.criu_version}, pid {m.pid}",
            f"  command {' '.join(m.cmdline) or '?'}",
            f"  {len(m.files)} files, {_human(m.total_bytes)}"
            + "".join(
                f", {flag}"
                for flag, on in (
                    ("tcp-established", m.tcp_established),
                    ("shell-job", m.shell_job),
                    ("coordinated", m.coordinated),
                )
                if on
            ),
        ]
        out += [f"  label {k}={v}" for k, v in sorted(m.labels.items())]
    else:
        out.append("  (no torpor manifest: a bare CRIU image)")

    out += ["", "Processes"]
    depth = _depths(inspection.tasks)
    out += _table(
        ("PID", "PPID", "PGID", "SID", "THREADS", "STATE", "COMMAND"),
        [
            (
                t.pid,
                t.ppid,
                t.pgid,
                t.sid,
                len(t.threads),
                t.state,
                "  " * depth[t.pid] + t.comm + (f" ({t.exe})" if t.exe else ""),
            )
            for t in inspection.tasks
        ],
    )

    total = inspection.memory
    out += [
        "",
        f"Memory: {total.pages_dumped} pages dumped ({_human(total.bytes_dumped)}) "
        f"in {total.vmas} areas mapping {_human(total.mapped_bytes)}; "
        f"pages-*.img hold {_human(inspection.pages_file_bytes)}",
    ]
    if total.pages_lazy or total.pages_in_parent:
        out.append(
            f"  {total.pages_lazy} pages lazy (page server), "
            f"{total.pages_in_parent} pages in the parent image"
        )
    for t in inspection.tasks:
        mem = t.memory
        out += [
            "",
            f"  {t.pid} {t.comm}: {mem.vmas} areas, {_human(mem.mapped_bytes)} mapped, "
            f"{mem.pages_dumped} pages ({_human(mem.bytes_dumped)}) dumped",
        ]
        out += [
            "  " + line
            for line in _table(
                ("START", "END", "SIZE", "PERMS", "KIND", "PAGES", "PATH"),
                [
                    (
                        f"{v.start:x}",
                        f"{v.end:x}",
                        _human(v.size),
                        v.perms,
                        v.kind,
                        v.pages_dumped or "",
                        v.path or "",
                    )
                    for v in t.vmas
                ],
            )
        ]

    out += ["", "Open files"]
    out += _table(
        ("PID", "FD", "TYPE", "WHAT"),
        [(t.pid, f.fd, f.type, f.summary) for t in inspection.tasks for f in t.files],
    )

    out += ["", "Sockets"]
    if inspection.sockets:
        out += _table(
            ("FAMILY", "TYPE", "PROTO", "STATE", "LOCAL", "REMOTE", "QUEUES", "HELD BY"),
            [
                (
                    s.family,
                    s.type,
                    s.protocol,
                    s.state,
                    s.local,
                    s.remote,
                    f"in {s.tcp_stream.inq_len}, out {s.tcp_stream.outq_len}"
                    if s.tcp_stream
                    else "",
                    " ".join(f"{pid}:{fd}" for pid, fd in inspection.holders(s.file_id)),
                )
                for s in inspection.sockets
            ],
        )
    else:
        out.append("  none")
    return "\n".join(out)


def _depths(tasks: Iterable[Task]) -> dict[int, int]:
    depth: dict[int, int] = {}
    # pstree.img lists parents before their children.
    for t in tasks:
        depth[t.pid] = depth[t.ppid] + 1 if t.ppid in depth else 0
    return depth


def _table(headers: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    cells = [list(headers)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]


def _human(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"
