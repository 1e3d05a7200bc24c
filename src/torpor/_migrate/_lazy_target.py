"""The target's restore of a lazy migration, in a keeper of this host.

The copy is restored by a keeper (:func:`torpor._process._keeper.spawn`), as every managed
process is, with :class:`torpor._lazy._restore.LazyCopy` doing what it does for a local lazy
restore: its own ``criu lazy-pages`` daemon (a child of the keeper), the userfaultfds held
by the keeper, and the watch that kills the copy (through a pidfd) and records why when its
pages cannot arrive (``<home>/lazy/NAME.json``, an event).

Only the page server differs: the pages come from the source's CRIU, over the migration's
channel. LazyCopy points its daemon at ``127.0.0.1:PORT`` of a :class:`RelayedPages`: a
listener that accepts one connection, and only the daemon's (its peer socket is looked up in
``/proc/net/tcp`` and must be held by the daemon's pid, as torpor's own page server checks;
anyone else is closed with nothing sent). It then hands that connection (``SCM_RIGHTS``) over
``ps_fd``, the local socket of the migration server's relay (:func:`._relay.start_relay` with
``daemon_socket``), which relays between the daemon and the TLS channel itself: no pump of
ours between them. This keeper keeps its own descriptor of the connection, so that the relay
ending (or the server dying) never closes it, and waits for the relay's verdict: ``K`` when
the daemon has sent ``PS_IOV_CLOSE`` (every page is in) and the source's end followed.
Anything else (``F`` and why, or the local socket closing) sets :attr:`error` and calls
``on_error``: the copy is killed while the daemon's connection is still open (a fault then
waits rather than reading zeros), then the connection is shut down, and the record says the
migration broke.

The keeper is forked before the image arrives (:class:`Prepared`, while the source still
dumps): its two forks and what it imports are then out of the downtime. It waits on a
socket of its own for the sealed image and the relay's socket, or for that socket's end (no
image comes: it ends, having restored nothing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import socket
import struct
import sys
import threading
from collections.abc import Callable

from .. import _paths
from .._engine import CriuEngine, RestoreOptions
from .._errors import TorporError
from .._images._image import Image
from .._images._manifest import now_iso
from .._lazy import _restore as _lazy
from .._lazy._server import _peer_inode, holds_socket
from .._lazy._source import LazyPageError, Range
from .._process import _copies, _keeper, _registry
from .._process._logs import open_log
from .._process._registry import ManagedProcess
from ._apart import Apart
from ._closehold import DAEMON_FAILED, DAEMON_OK
from ._relay import send_socket, verdict
from ._serve_sweep import release_addresses

ACCEPT_TIMEOUT = 30.0  # seconds for the daemon to connect once started
UNBLOCK = 2.0  # seconds a broken transfer leaves a restore waiting on a page before it ends
# Seconds a daemon that exited 0 waits for the relay's verdict: a relay that has the word
# ends one round trip later, or within _lazy.IDLE (8 s) of silence; under the source's fence
# (IDLE + 2 s of silence, then it thaws the original), so the copy is killed first.
VERDICT_TIMEOUT = 10.0


class RelayedPages:
    """A page server for LazyCopy whose pages come through ``ps_fd`` (module docstring)."""

    def __init__(
        self,
        image: Image,
        daemon_pid: Callable[[], int | None],
        on_error: Callable[[LazyPageError], None],
        ps_fd: int,
        source: str,
    ) -> None:
        self._image = image
        self._daemon_pid = daemon_pid
        self._on_error = on_error
        self._source = source
        self._ps = socket.socket(fileno=os.dup(ps_fd))
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=4)
        self._daemon: socket.socket | None = None
        self._error: LazyPageError | None = None
        self._closing = False  # the daemon asked to close: every page is in
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._judged = threading.Event()  # the relay's verdict came (or cannot)

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def error(self) -> LazyPageError | None:
        return self._error

    def start(self) -> None:
        t = threading.Thread(target=self._run, name="torpor-lazy-relay", daemon=True)
        self._threads.append(t)
        t.start()

    def close(self) -> None:
        for s in (self._listener, self._daemon, self._ps):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()

    def daemon_ended(self, ok: bool) -> None:
        """The daemon exited (``ok``: 0, its server without an error): the relay passes the
        daemon's close, held back, on to the source only once told so (``_relay``). Told
        ``ok``, wait for the relay's verdict before the copy is judged: resident only once
        the source has the close (its original is then killed); a verdict of failure (the
        close never went: the source keeps its original) is this server's error, and the
        copy is killed (:meth:`_fail`, from :meth:`_run`) while its pidfd is still held."""
        with contextlib.suppress(OSError):
            self._ps.send(DAEMON_OK if ok else DAEMON_FAILED)
        if ok and not self._judged.wait(VERDICT_TIMEOUT):
            self._fail(f"no verdict from the relay {VERDICT_TIMEOUT:g} s after the daemon's end")

    def warm_set(self, *, within: float | None = None) -> list[Range]:
        return []  # pages are asked for in the order the source's CRIU is asked: no warm set

    def prefetch(self, ranges: list[Range]) -> None:
        return None

    # -- the pumps -----------------------------------------------------------------------------

    def _fail(self, what: str) -> None:
        with self._lock:
            if self._error is not None:
                return
            self._error = error = LazyPageError(
                f"lazy migration from {self._source}: {what}; the pages not yet here cannot arrive",
                image=str(self._image.path),
            )
        # on_error kills the copy once CRIU has named it; while CRIU still restores (its
        # restore may wait on a page) it waits. The daemon's connection is closed once the
        # copy is dead, or after UNBLOCK seconds: the daemon then ends, the restore goes on
        # (a page it waited for reads as zeros) and the copy, restored stopped, is killed
        # before it ever runs (see _work).
        killed = threading.Event()

        def report() -> None:
            try:
                self._on_error(error)
            finally:
                killed.set()

        threading.Thread(target=report, name="torpor-lazy-fail", daemon=True).start()
        killed.wait(UNBLOCK)
        daemon = self._daemon
        if daemon is not None:
            with contextlib.suppress(OSError):
                daemon.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        try:
            try:
                conn = self._accept()
            except OSError as exc:
                self._fail(f"the lazy-pages daemon did not connect ({exc})")
                return
            self._daemon = conn
            try:
                # The server's relay speaks to the daemon itself; this keeps the connection
                # open (its own descriptor) until the copy is resident or killed.
                send_socket(self._ps, conn)
                why = verdict(self._ps)
            except OSError as exc:
                why = f"the relay to the source broke ({exc.strerror or exc})"
            if why is not None:
                self._fail(why)
        finally:
            self._judged.set()

    def _accept(self) -> socket.socket:
        self._listener.settimeout(ACCEPT_TIMEOUT)
        while True:
            conn, peer = self._listener.accept()
            pid = self._daemon_pid()
            inode = _peer_inode(conn.getsockname()[:2], peer[:2])
            if pid is not None and inode is not None and holds_socket(pid, inode):
                self._listener.close()
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return conn
            with contextlib.suppress(OSError):  # not the daemon: a reset, nothing sent
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()


MAX_GO = 64 << 20  # bytes of the image's description a prepared keeper reads
# Its pieces, each one SOCK_SEQPACKET message: a message must fit the socket's send buffer
# (net.core.wmem_default, 208 KiB here); an image of a few thousand files is bigger than that.
_PIECE = 64 << 10


class Prepared:
    """The keeper of the lazy copy ``name`` from ``source``, forked now, before its image is
    here (see the module docstring); :meth:`restore` once the image is sealed, or
    :meth:`cancel`."""

    def __init__(self, name: str, *, source: str) -> None:
        self.name = name
        self._ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            fd = theirs.fileno()
            self._apart = Apart(
                lambda: _keeper.spawn(_waiting(fd, name, source))[0],
                what=f"the lazy restore of {name}",
                keep=(fd,),
            )
        finally:
            theirs.close()
        self._ended = False

    def restore(self, image: Image, ps_fd: int) -> ManagedProcess:
        """Restore ``image`` there, its pages through ``ps_fd`` (the keeper gets its own
        duplicate: the caller still closes its own); the copy's record, or the error."""
        if self._ended:
            raise TorporError(f"the lazy restore of {self.name} was cancelled")
        self._ended = True
        try:
            # The image object crosses as a pickle: both ends are this server (a socketpair
            # made above, its child holding the other end), never a byte from outside. Its
            # size first, with the socket; then the pickle in pieces.
            data = pickle.dumps(image)
            if len(data) > MAX_GO:
                raise OSError(f"its image's description takes {len(data)} bytes, over {MAX_GO}")
            socket.send_fds(self._ctl, [struct.pack("!Q", len(data))], [ps_fd])
            for at in range(0, len(data), _PIECE):
                self._ctl.send(data[at : at + _PIECE])  # one message, whole or an error
        except OSError as exc:
            self._ctl.close()
            with contextlib.suppress(TorporError):
                self._apart.result()
            raise TorporError(f"the keeper of {self.name} is gone ({exc})") from exc
        try:
            return self._apart.result()
        finally:
            self._ctl.close()

    def cancel(self) -> None:
        """No image comes: the keeper ends, having restored nothing; its forks are reaped."""
        if self._ended:
            return
        self._ended = True
        self._ctl.close()
        with contextlib.suppress(TorporError):
            self._apart.result()


def _waiting(
    ctl_fd: int, name: str, source: str
) -> Callable[[_keeper.Keeper], list[ManagedProcess]]:
    """The keeper's work for :class:`Prepared`: wait for the image and the relay's socket
    on ``ctl_fd``, then :func:`_work`. The socket's end without them: nothing to restore."""

    def work(k: _keeper.Keeper) -> list[ManagedProcess]:
        with socket.socket(fileno=ctl_fd) as ctl:
            msg, fds, _, _ = socket.recv_fds(ctl, 8, 1)
            data = _pieces(ctl, msg) if len(fds) == 1 else None
        if data is None:
            for fd in fds:
                os.close(fd)
            raise TorporError(f"the migration of {name} from {source} ended before its image came")
        image = pickle.loads(data)
        return _work(image, name, fds[0], source)(k)

    return work


def _pieces(ctl: socket.socket, head: bytes) -> bytes | None:
    """The pickle :meth:`Prepared.restore` sends after ``head`` (its size), or None if the
    socket ends first."""
    if len(head) != 8:
        return None
    (size,) = struct.unpack("!Q", head)
    if size > MAX_GO:
        return None
    data = bytearray()
    while len(data) < size:
        piece = ctl.recv(_PIECE)
        if not piece:
            return None
        data += piece
    return bytes(data)


def _work(
    image: Image, name: str, ps_fd: int, source: str
) -> Callable[[_keeper.Keeper], list[ManagedProcess]]:
    """What the keeper does: the lazy restore of one copy (as ``Keeper.restore`` does for a
    local lazy copy, with :class:`RelayedPages` as its page server)."""

    def factory(
        img: Image,
        daemon_pid: Callable[[], int | None],
        on_error: Callable[[LazyPageError], None],
    ) -> _lazy.Server:
        return RelayedPages(img, daemon_pid, on_error, ps_fd, source)

    def work(k: _keeper.Keeper) -> list[ManagedProcess]:
        # What it needs is imported with this module, in the server: not in each keeper.
        engine = CriuEngine()
        copies = _copies.Copies(image, 1)
        with _registry.reserve([name]) as held:
            copy = _lazy.LazyCopy(
                image, name, binary=engine.binary, server_factory=factory,
                on_failure=_failed(source), hold=k.holding,
            )  # fmt: skip
            log_path = None
            log_fd = None
            try:
                try:
                    copy.start()
                finally:
                    os.close(ps_fd)  # the page server holds its own duplicate
                if not image.trusted():
                    image.verify(full=True)
                options = RestoreOptions(
                    tcp_established=image.manifest.tcp_established,
                    shell_job=image.manifest.shell_job,
                    lazy_pages=True,
                    # Continued below only if its pages still flow: a transfer that broke
                    # while CRIU restored may have left it a page of zeros.
                    leave_stopped=True,
                )
                if copies.stdio:
                    log_path = _paths.logs_dir() / f"{name}.log"
                    log_fd = open_log(log_path)
                    options = dataclasses.replace(
                        options, inherit_fds={key: log_fd for key in copies.stdio}
                    )
                res = copy.engine(engine).restore(image.path, options)
                copy.restored(res.pid, tasks=_lazy.restored_tasks(res.pid))
            except BaseException:
                copy.abort()
                raise
            finally:
                if log_fd is not None:
                    os.close(log_fd)
            rec = ManagedProcess(
                name=name,
                pid=res.pid,
                start_time=_keeper._start_time(res.pid),
                keeper_pid=k.pid,
                command=image.manifest.cmdline,
                started=now_iso(),
                log_path=str(log_path) if log_path else None,
                managed_as=_registry.managed_name(res.pid),
                migrating=f"from {source}, pages in flight",
            )
            k._adopt(rec)
            try:
                recs = k.record([rec], held)  # (one not written: the copy is killed)
                if copy.server is not None and copy.server.error is None:
                    _keeper._continue_tree(res.pid)
                copy.watch()  # a copy left stopped is killed by the watch: its server failed
            except BaseException:
                k.discard([rec])  # never to run unwatched on memory that may not come
                copy.abort()  # its daemon and page server stop
                raise
            return recs

    return work


def _failed(source: str) -> Callable[[_lazy.LazyState], None]:
    """The keeper's report of a half-moved copy its watch killed: the event, and the copy's
    service addresses taken down here (those nothing alive holds:
    :func:`._serve_sweep.release_addresses`). The server's ``abandon`` does that too, but
    only while it runs; killed, it left them up here while the source takes them back for
    its resumed original."""

    def report(state: _lazy.LazyState) -> None:
        _release(state, source)
        with contextlib.suppress(OSError, TorporError, ValueError):
            from .._supervise import _events

            _events.append(
                state.name, "restore-failed", error=state.error, migrated_from=source,
                mode="lazy",
            )  # fmt: skip

    return report


def _release(state: _lazy.LazyState, source: str) -> None:
    """Take down the service addresses the record of the killed copy ``state`` names (only
    if the record is that very copy's: its pid)."""
    with contextlib.suppress(OSError, TorporError):
        rec = _registry.load(state.name)
        if state.pid is not None and rec.pid == state.pid and rec.service_addresses:
            for line in release_addresses(rec):
                print(f"{now_iso()} lazy migration from {source}: {line}", file=sys.stderr)
