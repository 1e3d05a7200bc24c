"""A lazy (post-copy) dump whose page server speaks over a socket we hand CRIU: no port.

Facts from CRIU 4.2's source that decide how:

- Over RPC, ``opts.ps`` is used by a lazy dump for its port only (``criu/cr-service.c``,
  ``setup_opts_from_req``: ``ps.fd`` and ``ps.address`` are read only ``if
  (!opts.lazy_pages)``). The lazy page server would then ``bind`` INADDR_ANY and ``listen(sk,
  1)``: the first TCP client to connect gets the process's memory.
- But ``opts.config_file`` (an RPC config file) is parsed *after* the RPC options and may set
  any command-line option, ``ps-socket N`` included (``opts.ps_socket``). ``cr_page_server``
  (``criu/page-xfer.c``) then logs "Reusing ps socket", opens no server socket at all and
  serves the pages on that fd, plain bytes (``tls`` stays off). The fd must be one CRIU's
  ``swrk`` process holds: we pass it at the same number when starting it.
- Order (``cr_dump_finish`` in ``criu/cr-dump.c``): everything but the lazy pages is written,
  the ``post-dump`` notification is sent with the tree frozen, then ``cr_lazy_mem_dump``
  serves pages (sending ``status-ready`` first) until the peer closes, and only then is the
  tree switched to its final state: killed if the dump and the transfer succeeded, *thawed*
  (``TASK_ALIVE``) if ``post-dump`` was answered false or the transfer failed.
- The page server (``page_server_serve``) treats an EOF at a message boundary as the end of a
  good transfer (the original is then killed) and an unknown command as a failure (the
  original is thawed). :data:`FAIL_COMMAND` is such a command: writing it is how the source
  tells CRIU "the transfer failed, resume the original".
- ``post-dump`` answered false still serves pages (``cr_lazy_mem_dump`` runs whenever the dump
  itself succeeded); it ends at the first EOF, and the tree is thawed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from .. import _paths, _safe
from .._engine import DUMP_LOG, CriuEngine, DumpOptions
from .._engine._failures import log_errors
from .._engine._options import rpc_opts
from .._engine._rpc import Connection, NotifyHandler, TransportError
from .._errors import DumpError
from .._proto import criu_rpc_pb2 as pb
from ._relay import Gate

# A ``page_server_iov`` (u32 cmd, 4 bytes pad, u64 nr_pages, vaddr, dst_id) whose command 0 is
# none CRIU knows: its page server answers it by failing the transfer ("Unknown command").
FAIL_COMMAND = struct.pack("<I4xQQQ", 0, 0, 0, 0)
PSI_SIZE = len(FAIL_COMMAND)


@contextlib.contextmanager
def _config(ps_fd: int) -> Iterator[Path]:
    """A private RPC config file naming ``ps_fd`` as the page server's socket."""
    d = _paths.private_dir(_paths.home() / "migrate", what="migration directory")
    path = d / f"lazy-{os.getpid()}-{os.urandom(4).hex()}.conf"
    with _safe.opened_dir(d) as dfd:
        fd = os.open(path.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                     dir_fd=dfd)  # fmt: skip
        try:
            os.write(fd, f"ps-socket {ps_fd}\n".encode())
        finally:
            os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def lazy_dump(
    pid: int,
    images_dir: Path,
    ps_fd: int,
    *,
    notify: NotifyHandler,
    tcp_established: bool = False,
) -> None:
    """Dump the tree rooted at ``pid`` into ``images_dir`` with lazy pages served on the
    connected socket ``ps_fd`` (see the module docstring). Returns once the transfer ended
    and CRIU killed the tree; :class:`DumpError` if the dump or the transfer failed (the tree
    is then thawed by CRIU, unless a notification answered otherwise)."""
    engine = CriuEngine()
    log_path = images_dir / DUMP_LOG
    options = DumpOptions(tcp_established=tcp_established)
    dfd = _safe.open_dir(images_dir)
    try:
        with _config(ps_fd) as conf:
            opts = rpc_opts(options, images_dir_fd=dfd, log_file=DUMP_LOG, notify=notify)
            opts.pid = pid
            opts.lazy_pages = True
            opts = _with_config_file(opts, str(conf))
            try:
                conn = Connection.spawn(engine.binary, pass_fds=(dfd, ps_fd))
            except OSError as exc:
                raise DumpError(f"cannot start {engine.binary}: {exc}", pid=pid) from exc
            try:
                resp = conn.call(pb.Req(type=pb.DUMP, opts=opts), notify)
            except TransportError as exc:
                raise _failed(
                    pid, images_dir, log_path, f"CRIU ended without answering ({exc})"
                ) from exc
            finally:
                conn.close()
            if conn.notify_error is not None and not resp.success:
                raise _failed(pid, images_dir, log_path, "a notification failed") from (
                    conn.notify_error
                )
            if not resp.success:
                raise _failed(pid, images_dir, log_path, "CRIU failed")
    finally:
        os.close(dfd)


_CONFIG_FILE_FIELD = 51  # ``criu_opts.config_file`` in CRIU 4.2's rpc.proto


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _with_config_file(opts: pb.Opts, path: str) -> pb.Opts:
    """``opts`` with ``config_file`` set. torpor's generated ``Opts`` lacks the field (it was
    generated from a trimmed rpc.proto), so it is appended in protobuf's wire form (a
    length-delimited field 51); parsed back, the field is kept as an unknown one and sent."""
    data = path.encode()
    field = _varint(_CONFIG_FILE_FIELD << 3 | 2) + _varint(len(data)) + data
    return pb.Opts.FromString(opts.SerializeToString() + field)


def _failed(pid: int, images_dir: Path, log_path: Path, what: str) -> DumpError:
    lines = log_errors(log_path)
    said = f"; its log says: {lines[0]}" if lines else ""
    return DumpError(
        f"lazy dump of pid {pid}: {what}{said}",
        pid=pid,
        image=str(images_dir),
        log_path=str(log_path),
        log_lines=lines,
    )


class Guard(Gate):
    """The source's :class:`._relay.Gate` on CRIU's page server socket (``criu``, the relay's
    plain socket): the target daemon's 32-byte requests reach CRIU only whole, its
    ``PS_IOV_CLOSE`` is noted (every page is in: :attr:`closed_by_target`), and the end of
    the relay never reaches CRIU. CRIU takes an EOF at a request boundary for the end of a
    good transfer and kills the original; an end without the daemon's close is instead
    answered by :meth:`fail_criu`, when the caller decides, and CRIU thaws the original."""

    def __init__(self, criu: socket.socket, *, stall: str | None = None) -> None:
        super().__init__(requests_to_plain=True, stall=stall)
        self.criu = criu
        self._lock = threading.Lock()
        self._failed = False

    @property
    def closed_by_target(self) -> bool:
        return self.closed

    def fail_criu(self) -> None:
        """Make CRIU's transfer fail (once): the tree is thawed, not killed. Called when no
        relay runs on ``criu`` (before it started, or after it ended): a request the relay
        wrote only in part is completed first, so that CRIU reads the command whole."""
        with self._lock:
            if self._failed or self.closed:
                return
            self._failed = True
            rest = -self.written % PSI_SIZE
            with contextlib.suppress(OSError):
                self.criu.setblocking(True)
                self.criu.sendall(bytes(self.out[:rest]) + FAIL_COMMAND)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.criu.close()


_SYS_PIDFD_GETFD = 438  # x86_64 and the generic table alike
_TCP_REPAIR = 19
_TCP_REPAIR_OFF = 0  # off, with a window probe that makes the peer resend what is missing


def repair_off(pids: list[int]) -> int:
    """Take the TCP sockets of ``pids`` out of repair mode; how many were switched.

    A dump with ``tcp_established`` puts the tree's connections in repair mode; CRIU takes
    them out only on its own failure path (``network_unlock``), not when a lazy transfer
    fails and it thaws the tree: the connections would stay dead. Repair mode belongs to the
    socket, so a duplicate of the fd (``pidfd_getfd``) can switch it off."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    done = 0
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for name in fds:
                with contextlib.suppress(OSError):
                    if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:["):
                        continue
                dup = int(libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0))
                if dup < 0:
                    continue
                sock = socket.socket(fileno=dup)
                try:
                    if sock.type == socket.SOCK_STREAM and sock.family in (
                        socket.AF_INET,
                        socket.AF_INET6,
                    ):
                        with contextlib.suppress(OSError):
                            sock.setsockopt(socket.IPPROTO_TCP, _TCP_REPAIR, _TCP_REPAIR_OFF)
                            done += 1
                finally:
                    sock.close()
        finally:
            os.close(pidfd)
    return done
