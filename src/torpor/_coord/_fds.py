"""The process's open descriptors, classified, and what about each would break a restore.

Everything comes from /proc of the calling process: ``/proc/self/fd`` (what each descriptor
is), ``/proc/self/fdinfo`` (flags, position), ``/proc/self/net/{tcp,tcp6,udp,udp6,unix,...}``
(sockets by inode) and one ``NETLINK_SOCK_DIAG`` dump for the peer inode of every unix socket.
The *tree* is this process and its descendants, because CRIU dumps the tree: a pipe or a unix
socket is fine when its other end is held inside the tree.

What breaks (CRIU 4.2 on this project's machines; see shared/CRIU-NOTES.md):

- a regular file open for writing without ``O_APPEND``: a file that grows after the dump fails
  the restore (``has bad size``);
- a deleted file (memfd excepted);
- a terminal: needs ``shell_job``;
- a connected TCP socket, unless ``tcp_established``;
- a pipe, FIFO or stream/seqpacket unix socket whose other end is outside the tree;
- an anonymous inode CRIU cannot dump (io_uring, userfaultfd, perf, bpf...), and sockets of
  families torpor cannot identify.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .._process._proc import descendants

_O_ACCMODE = 0o3
_O_APPEND = 0o2000

# /proc/net/tcp state codes that mean "connected" (everything but LISTEN and CLOSE).
_TCP_STATES = {
    "01": "established",
    "02": "syn-sent",
    "03": "syn-recv",
    "04": "fin-wait1",
    "05": "fin-wait2",
    "06": "time-wait",
    "07": "close",
    "08": "close-wait",
    "09": "last-ack",
    "0A": "listen",
    "0B": "closing",
}
_UNIX_TYPES = {1: "stream", 2: "dgram", 5: "seqpacket"}
_UNIX_LISTENING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags
_DUMPABLE_ANON = frozenset(
    {"eventfd", "eventpoll", "signalfd", "timerfd", "inotify", "fanotify", "pidfd"}
)


@dataclass(frozen=True)
class SocketInfo:
    """What /proc/net says of a socket. ``local``/``remote`` are ``host:port`` (IPv6 in
    brackets) or a unix path (``@name`` for abstract); ``peer_inode`` for unix sockets."""

    proto: str
    type: str
    state: str
    local: str = ""
    remote: str = ""
    peer_inode: int | None = None


@dataclass(frozen=True)
class FdInfo:
    """One open descriptor of this process.

    ``kind`` is one of ``file`` (regular file or directory), ``device``, ``tty``, ``pipe``,
    ``fifo``, ``socket``, ``anon``. ``target`` is what /proc/self/fd shows; ``path`` the file
    path (or unix socket path) when there is one. ``peer_in_tree`` tells, for pipes, FIFOs and
    unix sockets, whether the other end is held inside this process tree (None: no other end).
    """

    fd: int
    kind: str
    target: str
    flags: int
    pos: int
    inode: int
    path: str | None = None
    deleted: bool = False
    socket: SocketInfo | None = None
    peer_in_tree: bool | None = None
    anon: str | None = None

    @property
    def writable(self) -> bool:
        """Open for writing (``O_WRONLY`` or ``O_RDWR``)."""
        return (self.flags & _O_ACCMODE) != os.O_RDONLY

    @property
    def append(self) -> bool:
        """Open with ``O_APPEND``."""
        return bool(self.flags & _O_APPEND)

    def describe(self) -> str:
        """``fd N: <kind> <what>``, the way an error line names it."""
        if self.socket is not None:
            s = self.socket
            ends = s.local or "unbound"
            if s.remote:
                ends += f" -> {s.remote}"
            return f"fd {self.fd}: {s.proto} {s.type} socket {ends} ({s.state})"
        what = self.target if self.deleted else (self.path or self.anon or self.target)
        mode = ("rw" if self.flags & _O_ACCMODE == os.O_RDWR else "w") if self.writable else "r"
        if self.append:
            mode += "+append"
        extra = f", {mode}" if self.kind in ("file", "fifo", "device", "tty") else ""
        return f"fd {self.fd}: {self.kind} {what}{extra}"


def problem(info: FdInfo, *, tcp_established: bool) -> str | None:
    """Why ``info`` would break the restore (or leak state), or None if CRIU handles it."""
    if info.kind == "file":
        if info.deleted:
            return "the file is deleted; CRIU cannot restore it"
        if info.writable and not info.append and not info.target.startswith("/memfd:"):
            return (
                "open for writing without O_APPEND; if the file grows after the dump the "
                "restore fails (close it before the checkpoint or reopen it with 'a')"
            )
        return None
    if info.kind == "tty":
        return "a terminal; CRIU restores terminals only as a shell job (redirect stdio)"
    if info.kind in ("pipe", "fifo"):
        if info.peer_in_tree is False:
            return f"a {info.kind} whose other end belongs to a process outside this process tree"
        return None
    if info.kind == "anon":
        if info.anon not in _DUMPABLE_ANON:
            return f"CRIU cannot dump a {info.anon} descriptor"
        return None
    if info.kind == "socket":
        return _socket_problem(info, tcp_established=tcp_established)
    return None


def _socket_problem(info: FdInfo, *, tcp_established: bool) -> str | None:
    s = info.socket
    if s is None or s.proto == "unknown":
        return "a socket of a family torpor cannot identify"
    if s.proto.startswith("tcp") and s.state not in ("listen", "close") and not tcp_established:
        return "an established TCP connection (close it, or checkpoint with tcp_established)"
    if s.proto == "unix" and s.type != "dgram" and info.peer_in_tree is False:
        return "a unix socket connected to a process outside this process tree"
    return None


def scan() -> list[FdInfo]:
    """Every open descriptor of this process, classified.

    Descriptors that close while we look are skipped. Socket tables and the tree's inodes are
    read only when some descriptor needs them.
    """
    base = "/proc/self"
    raw = []
    for name in os.listdir(f"{base}/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"{base}/fd/{fd}")
            st = os.stat(f"{base}/fd/{fd}")
            flags, pos = _fdinfo(f"{base}/fdinfo/{fd}")
        except OSError:
            continue
        raw.append((fd, target, st, flags, pos))
    raw.sort(key=lambda r: r[0])
    sockets = _SocketTables() if any(stat.S_ISSOCK(r[2].st_mode) for r in raw) else None
    tree = _TreeInodes(raw)
    return [
        _classify(fd, target, st, flags, pos, sockets, tree) for fd, target, st, flags, pos in raw
    ]


def _fdinfo(path: str) -> tuple[int, int]:
    flags = pos = 0
    with open(path, encoding="ascii") as fh:
        for line in fh:
            if line.startswith("flags:"):
                flags = int(line.split()[1], 8)
            elif line.startswith("pos:"):
                pos = int(line.split()[1])
    return flags, pos


def _classify(
    fd: int,
    target: str,
    st: os.stat_result,
    flags: int,
    pos: int,
    sockets: _SocketTables | None,
    tree: _TreeInodes,
) -> FdInfo:
    mode = st.st_mode
    ino = st.st_ino
    if stat.S_ISSOCK(mode):
        assert sockets is not None
        sock = sockets.lookup(ino)
        peer: bool | None = None
        path = None
        if sock.proto == "unix":
            path = sock.local or None
            if sock.peer_inode:
                peer = tree.holds_socket(sock.peer_inode)
        return FdInfo(
            fd, "socket", target, flags, pos, ino, path=path, socket=sock, peer_in_tree=peer
        )
    if stat.S_ISFIFO(mode):
        kind = "pipe" if target.startswith("pipe:") else "fifo"
        path = None if kind == "pipe" else target
        return FdInfo(
            fd,
            kind,
            target,
            flags,
            pos,
            ino,
            path=path,
            peer_in_tree=tree.pipe_peer(fd, ino, flags),
        )
    if stat.S_ISCHR(mode):
        kind = "tty" if _isatty(fd, target) else "device"
        return FdInfo(fd, kind, target, flags, pos, ino, path=target)
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISBLK(mode):
        if target.startswith("/memfd:"):
            return FdInfo(fd, "file", target, flags, pos, ino, path=target)
        deleted = st.st_nlink == 0 or target.endswith(" (deleted)")
        path = target.removesuffix(" (deleted)")
        return FdInfo(fd, "file", target, flags, pos, ino, path=path, deleted=deleted)
    anon = target.split(":", 1)[1] if ":" in target else target
    return FdInfo(fd, "anon", target, flags, pos, ino, anon=anon.strip("[]"))


def _isatty(fd: int, target: str) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return target.startswith(("/dev/pts/", "/dev/tty", "/dev/console"))


class _TreeInodes:
    """The pipe and socket inodes held by this process's descendants (read on first need)."""

    def __init__(self, own: Iterable[tuple[int, str, os.stat_result, int, int]]) -> None:
        self._own = {(r[2].st_ino, r[3] & _O_ACCMODE) for r in own if stat.S_ISFIFO(r[2].st_mode)}
        self._own_sockets = {r[2].st_ino for r in own if stat.S_ISSOCK(r[2].st_mode)}
        self._children: tuple[set[tuple[int, int]], set[int]] | None = None

    def _descendants(self) -> tuple[set[tuple[int, int]], set[int]]:
        if self._children is None:
            pipes: set[tuple[int, int]] = set()
            socks: set[int] = set()
            for child in descendants("self"):
                for fd, target in _links(child):
                    if target.startswith("socket:["):
                        socks.add(int(target[8:-1]))
                    elif target.startswith("pipe:[") or target.startswith("/"):
                        try:
                            st = os.stat(f"/proc/{child}/fd/{fd}")
                            if stat.S_ISFIFO(st.st_mode):
                                flags, _ = _fdinfo(f"/proc/{child}/fdinfo/{fd}")
                                pipes.add((st.st_ino, flags & _O_ACCMODE))
                        except OSError:
                            continue
            self._children = (pipes, socks)
        return self._children

    def holds_socket(self, ino: int) -> bool:
        return ino in self._own_sockets or ino in self._descendants()[1]

    def pipe_peer(self, fd: int, ino: int, flags: int) -> bool | None:
        """Whether the other end of this pipe is in the tree; None if nobody holds it."""
        other = os.O_WRONLY if flags & _O_ACCMODE == os.O_RDONLY else os.O_RDONLY
        if (ino, other) in self._own or (ino, os.O_RDWR) in self._own:
            return True
        pipes = self._descendants()[0]
        if (ino, other) in pipes or (ino, os.O_RDWR) in pipes:
            return True
        return None if _peer_gone(fd, flags) else False


def _peer_gone(fd: int, flags: int) -> bool:
    """A read end with no writer left polls HUP; a write end with no reader polls ERR."""
    p = select.poll()
    p.register(fd, 0)
    try:
        events = p.poll(0)
    except OSError:
        return False
    mask = events[0][1] if events else 0
    if flags & _O_ACCMODE == os.O_RDONLY:
        return bool(mask & select.POLLHUP)
    return bool(mask & select.POLLERR)


def _links(pid: int) -> Iterator[tuple[str, str]]:
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return
    for name in names:
        try:
            yield name, os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue


@dataclass
class _SocketTables:
    """/proc/self/net's socket tables, by inode."""

    by_inode: dict[int, SocketInfo] = field(default_factory=dict)
    _peers: dict[int, int] | None = None

    def __post_init__(self) -> None:
        for proto in ("tcp", "tcp6", "udp", "udp6"):
            self._read_inet(proto)
        self._read_unix()
        for proto in ("netlink", "packet", "raw", "raw6"):
            self._read_other(proto)

    def lookup(self, ino: int) -> SocketInfo:
        info = self.by_inode.get(ino)
        if info is None:
            return SocketInfo(proto="unknown", type="?", state="?")
        if info.proto == "unix" and info.peer_inode is None:
            peer = self._unix_peers().get(ino)
            if peer:
                info = SocketInfo(
                    info.proto, info.type, info.state, info.local, info.remote, peer_inode=peer
                )
        return info

    def _unix_peers(self) -> dict[int, int]:
        if self._peers is None:
            try:
                self._peers = unix_peers()
            except OSError:
                self._peers = {}
        return self._peers

    def _read_inet(self, proto: str) -> None:
        rows = _table(f"/proc/self/net/{proto}")
        kind = "stream" if proto.startswith("tcp") else "dgram"
        for cols in rows:
            if len(cols) < 10:
                continue
            state = _TCP_STATES.get(cols[3], cols[3])
            if not proto.startswith("tcp"):
                state = "connected" if cols[3] == "01" else "unconnected"
            remote = _inet_addr(cols[2])
            if remote.endswith(":0"):
                remote = ""
            self.by_inode[int(cols[9])] = SocketInfo(
                proto, kind, state, _inet_addr(cols[1]), remote
            )

    def _read_unix(self) -> None:
        for cols in _table("/proc/self/net/unix"):
            if len(cols) < 7:
                continue
            flags = int(cols[3], 16)
            kind = _UNIX_TYPES.get(int(cols[4], 16), cols[4])
            if flags & _UNIX_LISTENING:
                state = "listen"
            else:
                state = "connected" if cols[5] == "03" else "unconnected"
            path = cols[7] if len(cols) > 7 else ""
            self.by_inode[int(cols[6])] = SocketInfo("unix", kind, state, path)

    def _read_other(self, proto: str) -> None:
        rows = _table(f"/proc/self/net/{proto}")
        if not rows:
            return
        # The inode column is the last numeric one whose header is "Inode".
        header = _header(f"/proc/self/net/{proto}")
        if "Inode" in header:
            col = header.index("Inode")
        elif "inode" in header:
            col = header.index("inode")
        else:
            return
        for cols in rows:
            if len(cols) > col and cols[col].isdigit():
                self.by_inode.setdefault(int(cols[col]), SocketInfo(proto, "raw", "-"))


def _table(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            next(fh, None)
            return [line.split() for line in fh]
    except OSError:
        return []


def _header(path: str) -> list[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.readline().split()
    except OSError:
        return []


def _inet_addr(text: str) -> str:
    hexaddr, hexport = text.split(":")
    port = int(hexport, 16)
    raw = bytes.fromhex(hexaddr)
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{port}"
    # IPv6: four 32-bit words, each in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{port}"


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_UDIAG_SHOW_PEER = 0x4
_UNIX_DIAG_PEER = 2
_NLMSG_HDR = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIII8x")
_UNIX_DIAG_MSG = struct.Struct("=BBBxI8x")
_RTA = struct.Struct("=HH")


def unix_peers() -> dict[int, int]:
    """Inode -> peer inode of every connected unix socket in this network namespace, from one
    ``NETLINK_SOCK_DIAG`` dump (what ``ss -x`` shows as the peer)."""
    req = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, _UDIAG_SHOW_PEER)
    msg = (
        _NLMSG_HDR.pack(
            _NLMSG_HDR.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
        )
        + req
    )
    peers: dict[int, int] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
        nl.sendto(msg, (0, 0))
        while True:
            data = nl.recv(1 << 16)
            off = 0
            while off + _NLMSG_HDR.size <= len(data):
                length, kind, _, _, _ = _NLMSG_HDR.unpack_from(data, off)
                if kind == _NLMSG_DONE:
                    return peers
                if kind == _NLMSG_ERROR:
                    (errno_neg,) = struct.unpack_from("=i", data, off + _NLMSG_HDR.size)
                    raise OSError(-errno_neg, os.strerror(-errno_neg), "sock_diag")
                body = off + _NLMSG_HDR.size
                _, _, _, ino = _UNIX_DIAG_MSG.unpack_from(data, body)
                attr = body + _UNIX_DIAG_MSG.size
                end = off + length
                while attr + _RTA.size <= end:
                    alen, atype = _RTA.unpack_from(data, attr)
                    if alen < _RTA.size:
                        break
                    if atype == _UNIX_DIAG_PEER:
                        (peers[ino],) = struct.unpack_from("=I", data, attr + _RTA.size)
                    attr += (alen + 3) & ~3
                off += (length + 3) & ~3
            if not data:
                return peers
