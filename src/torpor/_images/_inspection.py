"""What ``torpor inspect`` shows about an image: typed, immutable values, and their JSON form.

Decoded from CRIU's files by :mod:`._inspect`; rendered for people by :mod:`._inspect_text`.
"""

from __future__ import annotations

import json
import mmap
import os
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ._manifest import Manifest

# The images record pages, not bytes; CRIU uses the machine's page size and images are only
# restorable on a machine of the same kind, so the inspecting host's page size is the image's.
PAGE_SIZE = mmap.PAGESIZE
MAP_SHARED = 0x1


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
            + ("s" if self.flags & MAP_SHARED else "p")
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
    page_size: int = PAGE_SIZE

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


NO_MEMORY = MemorySummary(vmas=0, mapped_bytes=0, pages_dumped=0, pages_lazy=0, pages_in_parent=0)


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
        return self._holders.get(file_id, ())

    @cached_property
    def _holders(self) -> dict[int, tuple[tuple[int, int], ...]]:
        # Indexed once: asked for every socket, a scan of every descriptor each time would be
        # quadratic in a hostile image.
        index: defaultdict[int, list[tuple[int, int]]] = defaultdict(list)
        for t in self.tasks:
            for f in t.files:
                index[f.file_id].append((t.pid, f.fd))
        return {k: tuple(v) for k, v in index.items()}

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
