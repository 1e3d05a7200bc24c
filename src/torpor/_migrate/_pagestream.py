"""Copy mode's memory pages streamed to the target while CRIU dumps them: no pages file here.

Without a base (:mod:`._dedup`) the pages are most of an image, and writing them to this
host's disk, then reading them back to send them, came after one another inside the freeze.
Instead CRIU's dump sends them to a CRIU page server on the target as it dumps, and only the
rest of the image (a few small files) goes the old way (:func:`._send.transfer_image`).

Facts from CRIU 4.2's source that decide how:

- A non-lazy dump over RPC takes ``opts.ps.fd``, an already connected socket, when CRIU runs as
  ``swrk`` (``criu/cr-service.c``, ``setup_opts_from_req``: ``opts.ps_socket``); it then
  skips its own TLS and sends every page there (``criu/page-xfer.c``) instead of writing
  ``pagemap-*.img`` and ``pages-*.img``. It ends with ``PS_IOV_FORCE_CLOSE`` and waits for the
  page server's 4-byte status: a stream that did not arrive whole fails the dump (CRIU then
  thaws the tree). All of it happens before ``post-dump`` (``cr_dump_finish``:
  ``disconnect_from_page_server`` first), so at ``post-dump`` the pages are on the target.
- ``criu page-server --ps-socket FD`` serves on that fd (it opens no port: "Reusing ps
  socket"), writes the pagemaps and pages into its ``--images-dir`` and exits once the
  dump's close is answered, 0 if the stream was whole.

The sockets given to the two CRIUs are local socketpairs; the bytes between them cross only
the mutually authenticated TLS channel (:func:`._relay.start_relay`, :func:`._relay.relay`).

**Why the image is still verified.** The target hashes every byte of the files its page server
wrote, as they grow (:class:`_Follower`), and seals those SHA-256 into the image's manifest
with the other files' (which are still compared with the source's). What the source no longer
does is hash the pages itself, since it never holds them as files. It is covered thus: TLS 1.3
authenticates every record (an altered, dropped or reordered byte fails decryption and breaks
the channel); the page-server protocol's final close and status make a stream cut short fail
the dump; and both ends count the bytes relayed, which must agree (a relay that lost or made up
bytes between the channel and a socketpair fails the migration). The restore then reads
exactly the bytes that were hashed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _paths, _safe
from .._engine import DUMP_LOG, CriuEngine, DumpOptions
from .._engine._cwdlock import held as cwd_held
from .._engine._failures import log_errors
from .._engine._options import rpc_opts
from .._engine._rpc import Connection, NotifyHandler, TransportError
from .._errors import DumpError, TorporError
from .._images._manifest import FileEntry
from .._proto import criu_rpc_pb2 as pb
from ._channel import ChannelError, Conn
from ._relay import RelayHandle, relay, start_relay

PAGE_FILES = ("pagemap-", "pages-")  # what CRIU's page server writes (``*.img``)
_SERVER_TIMEOUT = 30.0  # seconds a page server may take to exit once its stream ended
_READ = 1 << 20
_MAX_FILES = 4096  # as an image's
# Tests only: a path the target creates once the first pages have reached it, after which it
# passes no more of them on, so a test can kill it or cut its link mid-stream.
STREAM_HOLD_ENV = "TORPOR_TEST_MIGRATE_STREAM_HOLD"


def page_file(name: str) -> bool:
    """Whether ``name`` is one a page server writes (and so not one the source sends)."""
    return name.startswith(PAGE_FILES) and name.endswith(".img")


# -- the source ---------------------------------------------------------------------------------


def open_stream(conn: Conn, *, timeout: float) -> RelayHandle:
    """Ask the target for a page server (it answers ``pages-ready`` or ``failed``) and start
    relaying to it; give the handle's ``criu_sock`` to :func:`dump`."""
    conn.send({"type": "pages-stream"})
    reply = conn.recv()
    if reply.get("type") == "failed":
        raise ChannelError(f"{conn._who()} could not start a page server: {reply.get('error')}")
    if reply.get("type") != "pages-ready":
        raise ChannelError(f"{conn._who()} answered {reply.get('type')!r}, not pages-ready")
    return start_relay(conn, idle_timeout=timeout)


@dataclass(frozen=True)
class StreamEnd:
    """How a page stream ended: ``sent`` bytes from CRIU towards the target; ``error`` None
    if the target's page server took them whole, else why not (``disk``: its disk failed)."""

    sent: int
    error: str | None = None
    disk: bool = False
    files: Mapping[str, int] = field(default_factory=dict)  # name -> size, written there


def stream_result(conn: Conn, handle: RelayHandle, *, timeout: float) -> StreamEnd:
    """Once the dump has let go of its page server: the stream's end as the target tells it
    (its ``pages-in``, whose byte count must be what was sent, or its ``failed``). The relay's
    error if the channel broke."""
    try:
        stats = handle.wait(timeout)
    finally:
        conn.settimeout(timeout)  # the relay leaves the socket blocking, without one
    reply = conn.recv()
    if reply.get("type") == "pages-in":
        if reply.get("bytes") != stats.sent:
            raise ChannelError(
                f"{conn._who()} took {reply.get('bytes')!r} bytes of the page stream, not the "
                f"{stats.sent} sent"
            )
        files = reply.get("files")
        if (
            not isinstance(files, dict)
            or len(files) > _MAX_FILES
            or not all(
                page_file(n) and isinstance(z, int) and not isinstance(z, bool) and z >= 0
                for n, z in files.items()
            )
        ):
            raise ChannelError(f"{conn._who()} named malformed page files")
        return StreamEnd(stats.sent, files=files)
    if reply.get("type") == "failed":
        return StreamEnd(stats.sent, str(reply.get("error")), reply.get("cause") == "disk")
    raise ChannelError(f"{conn._who()} answered {reply.get('type')!r} after the page stream")


def dump(
    pid: int,
    images_dir: Path,
    ps_sock: socket.socket,
    options: DumpOptions,
    *,
    notify: NotifyHandler,
) -> None:
    """Dump the tree rooted at ``pid`` into ``images_dir``, its pages sent on the connected
    socket ``ps_sock`` (closed here once CRIU holds it). Returns after the dump; on failure
    :class:`DumpError` (the tree is thawed by CRIU) with CRIU's log moved to the logs dir."""
    engine = CriuEngine()
    log_path = images_dir / DUMP_LOG
    dfd = _safe.open_dir(images_dir)
    try:
        with cwd_held(pid):
            opts = rpc_opts(options, images_dir_fd=dfd, log_file=DUMP_LOG, notify=notify)
            opts.pid = pid
            opts.ps.fd = ps_sock.fileno()
            try:
                conn = Connection.spawn(engine.binary, pass_fds=(dfd, ps_sock.fileno()))
            except OSError as exc:
                raise DumpError(f"cannot start {engine.binary}: {exc}", pid=pid) from exc
            finally:
                ps_sock.close()  # CRIU's now: its close is the stream's end
            try:
                resp = conn.call(pb.Req(type=pb.DUMP, opts=opts), notify)
            except TransportError as exc:
                raise _failed(pid, log_path, f"CRIU ended without answering ({exc})") from exc
            finally:
                conn.close()
            if not resp.success:
                why = "a notification failed" if conn.notify_error is not None else "CRIU failed"
                raise _failed(pid, log_path, why) from conn.notify_error
    finally:
        os.close(dfd)


def _failed(pid: int, log_path: Path, what: str) -> DumpError:
    lines = log_errors(log_path)
    kept = _paths.logs_dir() / f"dump-{pid}-{time.strftime('%Y%m%dT%H%M%S')}.log"
    try:
        shutil.move(str(log_path), kept)
    except OSError:
        kept = log_path
    said = f"; its log says: {lines[0]}" if lines else ""
    return DumpError(
        f"dump of pid {pid} (pages streamed to the target): {what}{said}",
        pid=pid,
        log_path=str(kept),
        log_lines=lines,
    )


# -- the target ---------------------------------------------------------------------------------


class PagesFailed(TorporError):
    """The target's page server did not take the stream whole; ``answered``: the source was
    told why already."""

    answered = True


def receive(
    conn: Conn, staging: Path, *, where: str, timeout: float, log: Callable[[str], None]
) -> dict[str, FileEntry]:
    """Serve one page stream into ``staging`` (the source asked: ``pages-stream``): a CRIU
    page server on one end of a socketpair, the channel relayed to the other, every file it
    writes hashed as it grows. The files (name -> entry, hashed), once it exited whole
    (answered ``pages-in`` with the bytes relayed and the files' sizes); else
    :class:`PagesFailed`, answered."""
    binary = CriuEngine().binary
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    log_path = _paths.logs_dir() / f"page-server-{os.getpid()}-{os.urandom(3).hex()}.log"
    cmd = [binary, "page-server", "--images-dir", str(staging), "--ps-socket",
           str(theirs.fileno()), "--log-file", str(log_path), "-v2"]  # fmt: skip
    try:
        server = subprocess.Popen(
            cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    except OSError as exc:
        ours.close()
        conn.send({"type": "failed", "error": f"its page server did not start: {exc}"})
        raise PagesFailed(f"page server did not start: {exc}") from exc
    finally:
        theirs.close()
    follower = _Follower(staging)
    pump = _Pump(ours)
    relayed: int | str = 0
    try:
        conn.send({"type": "pages-ready"})
        try:
            relayed = relay(conn, pump.relay_end, idle_timeout=timeout).received
        except ChannelError as exc:
            relayed = exc.msg
        finally:
            pump.relay_end.close()
            conn.settimeout(timeout)  # the relay leaves the socket blocking, without one
        pump.join(_SERVER_TIMEOUT)
        try:
            code = server.wait(_SERVER_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
        follower.finish()
    except BaseException:
        if server.poll() is None:
            server.kill()
            server.wait()
        follower.finish()
        raise
    if isinstance(relayed, str):  # the channel broke: nobody to answer
        raise ChannelError(f"the page stream broke: {relayed}")
    why = _why(code, log_path, follower, staging, where)
    if why is not None:
        full = why.startswith("the disk of ")
        conn.send({"type": "failed", "error": why, **({"cause": "disk"} if full else {})})
        raise PagesFailed(why)
    with contextlib.suppress(OSError):
        log_path.unlink()
    sizes = {n: e.size for n, e in follower.files.items()}
    conn.send({"type": "pages-in", "bytes": relayed, "files": sizes})
    log(
        f"page stream: {relayed} bytes relayed, {sum(sizes.values())} bytes in {len(sizes)} "
        "files, hashed as written"
    )
    return follower.files


def _why(code: int, log_path: Path, follower: _Follower, staging: Path, where: str) -> str | None:
    """Why the stream was not taken whole (None: it was)."""
    lines = log_errors(log_path)
    err = follower.error
    full = isinstance(err, OSError) and err.errno == errno.ENOSPC
    if full or any(os.strerror(errno.ENOSPC) in line for line in lines):
        return (
            f"the disk of {where} failed while the pages were received: {staging.parent}: "
            f"{os.strerror(errno.ENOSPC)}"
        )
    if follower.error is not None:
        return f"the pages written on {where} could not be read back: {follower.error}"
    if code != 0:
        said = f": {lines[0]}" if lines else ""
        return f"its page server failed (exit {code}; log {log_path}){said}"
    bad = [n for n in follower.files if not page_file(n)]
    if bad:
        return f"its page server wrote {bad[0]}, not a pages file"
    return None


class _Follower:
    """Hashes the files a page server writes into a directory while it writes them (CRIU
    appends to each: pages by ``splice``, pagemap entries in order); :meth:`finish`, once the
    writer has exited, reads the rest. :attr:`files`: what was hashed, whole."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files: dict[str, FileEntry] = {}
        self.error: BaseException | None = None
        self._open: dict[str, tuple[int, Any, list[int]]] = {}  # name -> fd, hash, [offset]
        self._stop = threading.Event()
        self._dir_fd = _safe.open_dir(directory)
        self._buf = bytearray(_READ)
        self._thread = threading.Thread(target=self._run, name="torpor-pages-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._pass():
                    self._stop.wait(0.002)
            self._pass()  # the writer has exited: what is left
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def _pass(self) -> bool:
        """Hash what each file gained; whether anything was read."""
        moved = False
        for name in os.listdir(self._dir_fd):
            if name not in self._open:
                fd = _safe.open_regular(self._dir_fd, name, source=str(self.directory))
                self._open[name] = (fd, hashlib.sha256(), [0])
        view = memoryview(self._buf)
        for fd, h, at in self._open.values():
            while n := os.preadv(fd, [view], at[0]):
                h.update(view[:n])
                at[0] += n
                moved = True
        return moved

    def finish(self) -> None:
        """Once the writer has exited: hash the rest, close the files."""
        self._stop.set()
        self._thread.join()
        for name, (fd, h, at) in self._open.items():
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_size != at[0] and self.error is None:
                    self.error = OSError(f"{name} changed size after it was read")
            os.close(fd)
            self.files[name] = FileEntry(name, at[0], h.hexdigest())
        self._open.clear()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1


class _Pump:
    """Between the relay (:attr:`relay_end`) and the page server's socket: the stream goes on
    to it (``splice``, no copy here) and its answers come back; once the page server is gone
    (its disk full, say) the rest of the stream is read and dropped, and its end passed on, so
    that the relay ends cleanly both ways and the source hears why from this side."""

    def __init__(self, server: socket.socket) -> None:
        self.server = server
        self.relay_end, self._ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._threads = [
            threading.Thread(target=fn, name="torpor-pages-pump", daemon=True)
            for fn in (self._down, self._up)
        ]
        for t in self._threads:
            t.start()

    def _down(self) -> None:
        """The stream, towards the page server."""
        src, dst = self._ours.fileno(), self.server.fileno()
        r, w = os.pipe()
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _READ)
            gone = False
            while True:
                try:
                    n = os.splice(src, w, _READ)
                except OSError:
                    break
                if not n:
                    break
                hold = os.environ.get(STREAM_HOLD_ENV)
                if hold:  # tests only: the stream stops here
                    with open(hold, "x"):
                        pass
                    time.sleep(3600)
                while n and not gone:
                    try:
                        n -= os.splice(r, dst, n)
                    except OSError:
                        gone = True  # the page server ended: drop the rest
                if gone:
                    while n:
                        n -= len(os.read(r, n))
        finally:
            os.close(r)
            os.close(w)
            with contextlib.suppress(OSError):
                self.server.shutdown(socket.SHUT_WR)

    def _up(self) -> None:
        """The page server's answers, towards the relay."""
        with contextlib.suppress(OSError):
            while data := self.server.recv(_READ):
                self._ours.sendall(data)
        with contextlib.suppress(OSError):
            self._ours.shutdown(socket.SHUT_WR)

    def join(self, timeout: float) -> None:
        """Wait for both ways to end (the relay's end closed first), then close."""
        for t in self._threads:
            t.join(timeout)
        self._ours.close()
        self.server.close()
