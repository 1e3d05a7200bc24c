"""torpor's page server: CRIU's page protocol, answering ``criu lazy-pages --page-server``.

The protocol (CRIU 4.2, facts from the source):

- Every message is a ``struct page_server_iov {u32 cmd; u64 nr_pages; u64 vaddr; u64
  dst_id;}``, native (little-endian) and unpacked: 4 bytes of padding after ``cmd``, 32 bytes
  (``criu/page-xfer.c``). ``cmd`` holds the command in its low 16 bits and flags above
  (``encode_ps_cmd``). Commands: ``PS_IOV_ADD=1, HOLE=2, OPEN=3, OPEN2=4, PARENT=5, ADD_F=6,
  GET=7, CLOSE=0x1023, FORCE_CLOSE=0x1024``.
- The lazy-pages daemon connects (plain TCP; no handshake, no OPEN: ``connect_to_page_server``)
  only once ``criu restore`` has handed it the tasks' userfaultfds (``lazy_pages_main`` in
  ``criu/uffd.c``), then sends ``PS_IOV_GET`` with ``nr_pages``, ``vaddr`` (the address in the
  image) and ``dst_id`` = the task's pid in the image, *not* encoded with a type
  (``request_remote_pages``; ``pr->img_id`` is the pid, ``maybe_read_page_remote`` in
  ``criu/pagemap.c``). Faults ask for 1 page (``handle_page_fault``); the background push
  asks for 64 KiB growing to 4 MiB (``MAX_XFER_LEN``) inside one lazy range (``xfer_pages``).
- Requests are asynchronous: several may be in flight and the daemon matches answers to them
  in order (``async_reads``, FIFO). Each answer is a ``page_server_iov`` with ``cmd =
  PS_IOV_ADD_F | PE_PRESENT << 16``, the same ``vaddr`` and ``dst_id`` and ``nr_pages`` no
  more than asked (fewer is allowed: the daemon copies what came and asks again for the rest,
  ``page_server_read``/``uffd_io_complete``), then exactly ``nr_pages * 4096`` bytes of pages
  (``page_server_get_pages``). CRIU's own server answers an unknown range by closing the
  session.
- At the end the daemon sends ``PS_IOV_CLOSE`` (all other fields 0) and waits for a 4-byte
  ``int32`` status (0 = fine) before closing (``disconnect_from_page_server``). A hangup
  before that fails the daemon (``page_server_hangup_event``); it exits non-zero.
- Which pages are lazy comes from the pagemap images in the daemon's ``-D`` directory
  (:mod:`._pagemap`).

Security: the server binds ``127.0.0.1`` on a free port and serves exactly one connection, and
only one whose peer socket is held by the lazy-pages daemon torpor started: the peer's socket
inode is looked up in ``/proc/net/tcp`` (and ``tcp6``) by its address and port, and must be
among ``/proc/<pid>/fd`` of the pid ``allowed_pid()`` returns. Any other connection is closed
with nothing sent, and the server keeps waiting for the daemon's. A request is answered only
from a lazy, present pagemap entry of that task (never beyond it) with bytes the
:class:`~._source.PageSource` verified.

On the first error (a :class:`~._source.LazyPageError` from the source, or a request no
pagemap answers) nothing more is sent: :attr:`PageServer.error` is set and :meth:`wait`
returns. The connection is then closed (which makes the daemon exit non-zero) only after
``on_error`` returns, or at :meth:`PageServer.close` if there is no ``on_error``. The order
matters: once the daemon is gone the kernel drops its userfaultfd registrations, and a page
never copied reads as zeros (anonymous memory). The restored tree must be killed *before*
the connection is closed; while it stays open the faulting thread just waits.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._pagemap import PAGE_SIZE, PE_PRESENT, Pagemap, load_pagemaps
from ._source import LazyPageError, PageSource, Range

PSI = struct.Struct("<I4xQQQ")
PS_IOV_ADD_F = 6
PS_IOV_GET = 7
PS_IOV_CLOSE = 0x1023
PS_IOV_FORCE_CLOSE = 0x1024
PS_CMD_MASK = 0xFFFF
PS_FLAGS_SHIFT = 16
REPLY_CMD = PS_IOV_ADD_F | PE_PRESENT << PS_FLAGS_SHIFT
STATUS = struct.Struct("<i")
# CRIU's daemon never asks more than MAX_XFER_LEN (4 MiB) at once; an answer is capped there.
MAX_ANSWER_PAGES = (4 << 20) // PAGE_SIZE
_POLL = 0.2


@dataclass(frozen=True)
class Request:
    """One answered request: when (seconds after the first), of which task, which pages, and
    where in which pages file they came from."""

    t: float
    pid: int
    vaddr: int
    nr_pages: int
    file: str
    offset: int
    length: int


def _peer_inode(local: tuple[str, int], peer: tuple[str, int]) -> int | None:
    """The inode of the socket at ``peer`` connected to ``local`` (both as seen by us), from
    ``/proc/net/tcp`` and ``tcp6`` (the peer's row has its address as local)."""
    want_local = _hex_addr(peer)
    want_remote = _hex_addr(local)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10:
                continue
            if _norm(cols[1]) == want_local and _norm(cols[2]) == want_remote:
                return int(cols[9])
    return None


def _hex_addr(addr: tuple[str, int]) -> tuple[bytes, int]:
    host, port = addr[0], addr[1]
    return socket.inet_pton(socket.AF_INET, host), port


def _norm(col: str) -> tuple[bytes, int] | None:
    """``0100007F:1F90`` (or its IPv4-mapped IPv6 form) as (IPv4 bytes, port)."""
    host, _, port = col.partition(":")
    try:
        raw = bytes.fromhex(host)
        p = int(port, 16)
    except ValueError:
        return None
    # /proc/net prints each 32-bit word in host (little-endian) order.
    words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]
    ip = b"".join(words)
    if len(ip) == 16 and ip[:12] == b"\0" * 10 + b"\xff\xff":
        ip = ip[12:]
    return (ip, p) if len(ip) == 4 else None


def holds_socket(pid: int, inode: int) -> bool:
    """Whether process ``pid`` has the socket ``inode`` among its open descriptors."""
    want = f"socket:[{inode}]"
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == want:
                return True
        except OSError:
            continue
    return False


class PageServer:
    """Serves the pages of the image in ``image_dir`` from ``source`` to one lazy-pages daemon
    (see the module docstring)."""

    def __init__(
        self,
        image_dir: Path,
        source: PageSource,
        *,
        allowed_pid: Callable[[], int | None],
        on_error: Callable[[LazyPageError], None] | None = None,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.source = source
        self.port = 0
        #: ``(vaddr, nr_pages)`` of every request answered, in order.
        self.faults: list[tuple[int, int]] = []
        #: Every request answered, with where its pages came from.
        self.requests: list[Request] = []
        self.error: LazyPageError | None = None
        #: Connections refused because their peer was not the daemon.
        self.refused = 0
        #: Seconds from :meth:`start` to the first answer sent (None before it).
        self.first_answer: float | None = None
        self._allowed_pid = allowed_pid
        self._on_error = on_error
        self._pagemaps: dict[int, Pagemap] = load_pagemaps(self.image_dir)
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._started = 0.0
        self._t0: float | None = None
        self.clean = False  # the daemon closed the session with PS_IOV_CLOSE

    def start(self) -> None:
        """Bind ``127.0.0.1`` on a free port (:attr:`port`) and serve in a thread."""
        lsk = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsk.bind(("127.0.0.1", 0))
        lsk.listen(4)
        self._listener = lsk
        self.port = lsk.getsockname()[1]
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="torpor-page-server", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the daemon's session ended (all served and closed, or :attr:`error`);
        whether it did within ``timeout``."""
        return self._done.wait(timeout)

    def close(self) -> None:
        """Stop serving and close every socket (the daemon, if still connected, then fails)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
        self._close_sockets()
        self._done.set()

    def warm_set(self, *, within: float | None = None) -> list[Range]:
        """The pages the restored app touched, as ``(file, offset, length)`` in first-touch
        order: the 1-page requests (what a fault asks; the background push asks for 64 KiB or
        more, except for a lazy range of one page) answered within ``within`` seconds of the
        first request (all if None), each range once."""
        seen: set[Range] = set()
        out: list[Range] = []
        for r in self.requests:
            if r.nr_pages != 1 or (within is not None and r.t > within):
                continue
            key = (r.file, r.offset, r.length)
            if key not in seen:
                seen.add(key)
                out.append(key)
        return out

    # -- the serving thread --------------------------------------------------------------

    def _close_sockets(self) -> None:
        for sk in (self._conn, self._listener):
            if sk is not None:
                with contextlib.suppress(OSError):
                    sk.close()
        self._conn = self._listener = None

    def _run(self) -> None:
        try:
            conn = self._accept()
            if conn is None:
                return
            self._conn = conn
            self._serve(conn)
        except LazyPageError as exc:
            self._fail(exc)
        except OSError:
            pass  # the daemon hung up or we were closed: wait() reports it, error stays None
        finally:
            if self.error is None or self._on_error is not None or self._stop.is_set():
                self._close_sockets()
            self._done.set()

    def _fail(self, exc: LazyPageError) -> None:
        self.error = exc
        self._done.set()
        if self._on_error is not None:
            try:
                self._on_error(exc)
            finally:
                self._close_sockets()
            return
        # Hold the connection: the faulting task waits instead of reading zeros.
        self._stop.wait()

    def _accept(self) -> socket.socket | None:
        lsk = self._listener
        assert lsk is not None
        while not self._stop.is_set():
            ready, _, _ = select.select([lsk], [], [], _POLL)
            if not ready:
                continue
            conn, peer = lsk.accept()
            if self._is_daemon(conn, peer):
                lsk.close()
                self._listener = None
                return conn
            self.refused += 1
            # Nothing is sent: RST rather than a FIN the peer could take as an answer.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
        return None

    def _is_daemon(self, conn: socket.socket, peer: tuple[str, int]) -> bool:
        pid = self._allowed_pid()
        if pid is None or pid <= 0:
            return False
        local = conn.getsockname()
        inode = _peer_inode((local[0], local[1]), (peer[0], peer[1]))
        return inode is not None and holds_socket(pid, inode)

    def _recv_exact(self, conn: socket.socket, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            if self._stop.is_set():
                return None
            ready, _, _ = select.select([conn], [], [], _POLL)
            if not ready:
                continue
            part = conn.recv(n - len(buf))
            if not part:
                if buf:
                    raise self._protocol("hung up in the middle of a request")
                return None
            buf += part
        return bytes(buf)

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            msg = self._recv_exact(conn, PSI.size)
            if msg is None:
                return  # hung up without PS_IOV_CLOSE: the daemon failed, or we were closed
            cmd, nr_pages, vaddr, dst_id = PSI.unpack(msg)
            if cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                conn.sendall(STATUS.pack(0))
                self.clean = True
                return
            if cmd & PS_CMD_MASK != PS_IOV_GET:
                raise self._protocol(f"sent command {cmd:#x}, not PS_IOV_GET")
            self._answer(conn, nr_pages, vaddr, dst_id)

    def _answer(self, conn: socket.socket, nr_pages: int, vaddr: int, dst_id: int) -> None:
        pm = self._pagemaps.get(dst_id)
        found = pm.lookup(vaddr, min(nr_pages, MAX_ANSWER_PAGES)) if pm is not None else None
        if pm is None or found is None:
            raise self._protocol(
                f"asked for {nr_pages} pages at {vaddr:#x} of task {dst_id}, "
                "which no lazy pagemap entry of the image holds"
            )
        offset, n = found
        length = n * PAGE_SIZE
        data = self.source.read(pm.pages_file, offset, length)
        if len(data) != length:
            raise LazyPageError(
                f"image {self.image_dir}: {pm.pages_file} gave {len(data)} of {length} bytes",
                image=self.image_dir,
                file=pm.pages_file,
            )
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        self.faults.append((vaddr, nr_pages))
        self.requests.append(
            Request(now - self._t0, dst_id, vaddr, n, pm.pages_file, offset, length)
        )
        conn.sendall(PSI.pack(REPLY_CMD, n, vaddr, dst_id) + data)
        if self.first_answer is None:
            self.first_answer = time.monotonic() - self._started

    def _protocol(self, what: str) -> LazyPageError:
        return LazyPageError(
            f"lazy restore of {self.image_dir}: the lazy-pages daemon {what}",
            image=self.image_dir,
            hint="the restored process cannot get its memory: stop it and restore again",
        )
