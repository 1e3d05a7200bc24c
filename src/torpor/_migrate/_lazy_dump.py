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

# A ``page_server_iov`` (u32 cmd, 4 bytes pad, u64 nr_pages, vaddr, dst_id) whose command 0 is
# none CRIU knows: its page server answers it by failing the transfer ("Unknown command").
FAIL_COMMAND = struct.pack("<I4xQQQ", 0, 0, 0, 0)
PSI_SIZE = len(FAIL_COMMAND)
CLOSE_COMMANDS = (0x1023, 0x1024)  # PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE


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


class Guard:
    """Between CRIU's page server socket (``criu``) and the relay (:attr:`relay_sock`): it
    passes the target daemon's 32-byte requests to CRIU only whole, notes its
    ``PS_IOV_CLOSE`` (every page is in: :attr:`closed_by_target`), and never lets the end of
    the relay reach CRIU otherwise. CRIU takes an EOF at a request boundary for the end of a
    good transfer and kills the original; an end without the daemon's close is instead
    answered by :meth:`fail_criu`, when the caller decides, and CRIU thaws the original."""

    def __init__(self, criu: socket.socket, *, stall: str | None = None) -> None:
        self.criu = criu
        self.relay_sock, self._ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.closed_by_target = False
        self.pages = 0  # bytes CRIU sent towards the target
        self._stall = Path(stall) if stall else None
        self._lock = threading.Lock()
        self._failed = False

    def start(self) -> None:
        for fn in (self._up, self._down):
            threading.Thread(target=fn, name="torpor-lazy-guard", daemon=True).start()

    def fail_criu(self) -> None:
        """Make CRIU's transfer fail (once): the tree is thawed, not killed."""
        with self._lock:
            if self._failed or self.closed_by_target:
                return
            self._failed = True
            with contextlib.suppress(OSError):
                self.criu.sendall(FAIL_COMMAND)

    def close(self) -> None:
        for s in (self.criu, self.relay_sock, self._ours):
            with contextlib.suppress(OSError):
                s.close()

    def _up(self) -> None:
        """The daemon's requests, towards CRIU."""
        pending = b""
        try:
            while data := self._ours.recv(1 << 20):
                pending += data
                whole = len(pending) - len(pending) % PSI_SIZE
                units, pending = pending[:whole], pending[whole:]
                with self._lock:
                    if self._failed:
                        continue
                    for at in range(0, len(units), PSI_SIZE):
                        cmd = int.from_bytes(units[at : at + 4], "little") & 0xFFFF
                        if cmd in CLOSE_COMMANDS:
                            self.closed_by_target = True
                    self.criu.sendall(units)
        except OSError:
            pass
        # The relay's end: towards CRIU only if the daemon closed (then CRIU has ended anyway).
        with contextlib.suppress(OSError):
            self._ours.shutdown(socket.SHUT_WR)

    def _down(self) -> None:
        """CRIU's answers (pages), towards the target."""
        stalled = False
        with contextlib.suppress(OSError):
            while data := self.criu.recv(1 << 20):
                if stalled:
                    continue
                self._ours.sendall(data)
                self.pages += len(data)
                if self._stall is not None and self.pages >= 1 << 20:
                    self._stall.touch()  # tests: pages stop flowing here
                    stalled = True
        with contextlib.suppress(OSError):
            self._ours.shutdown(socket.SHUT_WR)


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
