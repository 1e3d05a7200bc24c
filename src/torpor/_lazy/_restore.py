"""A lazy (post-copy) restore of one copy: its work dir, its daemon, the restore, the watch.

The keeper's restore (``Keeper.restore``) does what it does for any restore (records, the
verdict on the image's checksums, ``--count``) and, for each copy restored ``--lazy``, uses a
:class:`LazyCopy`:

1. :meth:`LazyCopy.start`: a private work dir ``<home>/lazy/<copy>-<random>/`` (CRIU's
   ``lazy-pages.socket``, the daemon's log and the restore's log live there: each copy has its
   own daemon), then ``criu lazy-pages`` (``_daemon``) serving the image's pages: by default
   from the verified image directory itself (CRIU's own reader, the fastest), or through
   torpor's page server (``LazyCopies(serve=True)``: warm set recorded, pool sources);
2. :meth:`LazyCopy.engine`: the CRIU engine whose work dir is that directory, for the restore
   with ``lazy_pages``;
3. :meth:`LazyCopy.watch`: once CRIU named the restored root, a thread of the keeper (which
   outlives the command) waits for the daemon. Exit 0: every page has moved
   (time-to-fully-resident is recorded). Any other end (killed, crashed), or the page server
   reporting a bad or missing chunk: the restored root is SIGKILLed through a pidfd taken while
   it was still our unreaped child (so that very process, only it: it is pid 1 of its PID
   namespace, whose other tasks die with it), and why is recorded.

**Verification comes first.** A lazy restore must never run unverified memory: the keeper
applies the same verdict as for any restore. An image whose checksums are trusted
(``Image.trusted()``: unchanged since hashed) restores at once; one that is not is hashed in
full while CRIU restores it *stopped* (``leave_stopped``), and the copy is continued only once
the verdict is good (the daemon may meanwhile push pages into the stopped copy: nothing runs
them unless they are the verified bytes). The pages the daemon serves later are read from the
very directory verified (handed to it as an fd). From a pool, pages are checked chunk by chunk
against their SHA-256 by the page source before a byte of them is served.

**What is recorded** (:class:`LazyState`, ``<home>/lazy/<copy>.json``, 0600, written by the
keeper): the copy's pid, the daemon's pid, ``filling`` → ``resident`` (with the wall-clock time
it became so) or ``failed`` (with the one-line error naming image, file and chunk when known).
The registry record ends as for any killed process (signal 9); for a supervised copy an event
``restore-failed`` is appended too. ``torpor restore`` reads these to print
time-to-fully-resident.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .. import _safe
from .._engine import CriuEngine
from .._errors import TorporError
from .._images._image import Image
from .._images._manifest import now_iso
from . import _eager, _prestart, _sweep, _trace, _warm, _warmcache, _warmcopy
from ._daemon import Daemon
from ._served import Server as Server
from ._served import ServerFactory as ServerFactory
from ._served import local_pages, served_from
from ._source import LazyPageError, PageSource, Range
from ._state import ENDED as ENDED
from ._state import FAILED as FAILED
from ._state import FILLING as FILLING
from ._state import LAZY_DIR as LAZY_DIR
from ._state import RESIDENT as RESIDENT
from ._state import LazyState as LazyState
from ._state import lazy_dir as lazy_dir
from ._state import read_state as read_state
from ._state import report_failure as _report_failure
from ._state import restored_tasks as restored_tasks
from ._state import wait_states as wait_states
from ._state import write_state as write_state

_POLL = 0.05  # seconds between looks at the page server's error while the daemon runs


class LazyCopy:
    """One copy restored lazily (see the module docstring)."""

    def __init__(
        self,
        image: Image,
        name: str,
        *,
        binary: str,
        server_factory: ServerFactory | None = None,
        on_failure: Callable[[LazyState], None] | None = None,
        hold: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        self.image = image
        self.name = name
        self.binary = binary
        self._on_end = on_end  # once the watch ended (after the copy's cleanup)
        self._server_factory = server_factory
        self._on_failure = on_failure
        self._hold = hold
        self.work_dir: Path | None = None
        self.daemon: Daemon | None = None
        self.server: Server | None = None
        self._image_fd: int | None = None
        # A local copy: the warm image it restores from (``_eager``), or whether the daemon
        # logs its faults to record a warm set (none yet).
        self._warm_dir: Path | None = None
        self._recording = False
        self._warm_used: list[Range] = []  # the warm set the warm image was made of
        self._pidfd: int | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        # Set once CRIU named the root (or the restore failed): a serving error waits for it.
        self._named = threading.Event()
        self._fail_lock = threading.Lock()
        self.state = LazyState(name=name, image=str(image.path), state=FILLING)

    # -- before the restore -------------------------------------------------------------------

    def start(self) -> None:
        """Make the work dir and start the daemon (and page server); ready for the restore."""
        if self.begin():
            self.ready()
            return
        try:
            self._start_rest()
        except BaseException:
            self.abort()
            raise

    def begin(self) -> bool:
        """The work dir and, for a local image with a warm set, its daemon spawned on the
        warm image (True: :meth:`ready` next; ``_prestart`` calls it before the keeper)."""
        _trace.mark("copy-start")
        self.state = replace(self.state, started_at=time.time())
        self.work_dir = lazy_dir() / f"{self.name}-{secrets.token_hex(4)}"
        os.mkdir(self.work_dir, 0o700)
        try:
            _sweep.claim(self.work_dir)  # the keeper; swept once it and the daemon are gone
            if self._server_factory is None:  # a local image: CRIU's daemon reads it
                self._recording = True  # its faults are logged: the next warm set
                return self._early()  # started on the warm image
        except BaseException:
            self.abort()
            raise
        return False

    def ready(self) -> None:
        """Wait for the daemon :meth:`begin` spawned (it is then ready for the restore)."""
        assert self.daemon is not None
        try:
            self.daemon.wait_ready()
        except BaseException:
            self.abort()
            raise
        _trace.mark("daemon-ready")
        self._claim_for(self.daemon.pid)
        self.state = replace(self.state, daemon_pid=self.daemon.pid)

    def _start_rest(self) -> None:
        """:meth:`start` when :meth:`begin` spawned no daemon (on the image, or served)."""
        assert self.work_dir is not None
        if self._server_factory is not None:
            made = _warmcopy.served_warm(self.image, self.work_dir)
            if made is not None:
                self._warm_dir, self._warm_used = made[0], made[1]
                self.state = replace(self.state, warm_bytes=made[2])
            _trace.mark("warm-image")
        if self._warm_dir is not None:
            self._image_fd = _safe.open_dir(self._warm_dir)
        else:
            with self.image.opened() as fd:
                self._image_fd = os.dup(fd)  # the daemon's -D: this very directory
        if self._server_factory is not None:
            self.server = self._server_factory(
                self.image, lambda: self.daemon_pid, self._server_failed
            )
        if self.server is not None:
            warm = _warm.of(self.image)
            if warm and self._warm_dir is None:  # fetched before they are asked for
                self.server.prefetch(warm)
            self.server.start()
            _trace.mark("server")
        where = ("127.0.0.1", self.server.port) if self.server is not None else None
        self.daemon = Daemon(
            self.binary,
            self._image_fd,
            self.image.path,
            self.work_dir,
            page_server=where,
            verbose=self._recording,
        )
        pool = _warm.pool_image(self.image)
        if pool is not None:
            pool.restoring()
        self._launch()
        self.daemon.wait_ready()
        _trace.mark("daemon-ready")
        self._claim_for(self.daemon.pid)
        self.state = replace(self.state, daemon_pid=self.daemon.pid)

    def _claim_for(self, pid: int | None) -> None:
        """The daemon ``pid`` (and this keeper) use the work dir and a pool image's local
        part: swept only once both are gone (``_sweep``)."""
        dirs = [self.work_dir] + ([self.image.path.parent] if _warm.pool_image(self.image) else [])
        for d in dirs:
            if d is not None:
                _sweep.claim(d)
                if pid is not None:
                    _sweep.claim(d, pid, daemon=True)

    def _early(self) -> bool:
        """A local image with a warm set, trusted: its daemon is started as soon as the warm
        image has the files it reads as it starts (``_eager.link``), and the task pagemaps
        are worked out and written while it starts (``_eager.plan``, ``fill``: it reads them
        only once the restore, which starts after :meth:`start`, hands it the userfaultfds).
        If the warm image turns out of no use, or the image is no longer trusted once it is
        made, the daemon is started again on the image itself. One kept from an earlier
        restore for this very warm set (``_warmcache``) is used as it is: nothing is worked
        out or written on the path. False: no warm image (the daemon reads the image)."""
        assert self.work_dir is not None
        kept = _warmcache.lookup(self.image)
        if kept is not None and not self.image.trusted():
            os.close(kept.fd)
            return False
        if kept is not None:  # share-locked: not removed while we or the daemon hold it
            self._image_fd, self._warm_dir = kept.fd, kept.path
            self.state = replace(self.state, warm_bytes=kept.warm_bytes)
            self._spawn(verbose=True)
            _trace.mark("warm-image")
            return True
        warm = _warm.load(self.image)
        if not warm or not self.image.trusted():
            return False
        into = self.work_dir / "image"
        _eager.link(self.image, into)
        self._image_fd = _safe.open_dir(into)
        self._spawn(verbose=True)
        try:
            made = _eager.plan(self.image, warm)
            if made is not None:
                _eager.fill(self.image, into, made[0])
        except (OSError, TorporError) as exc:  # a hint lost, not a failure
            print(f"{now_iso()} lazy restore: warm set not used: {exc}", file=sys.stderr)
            made = None
        _trace.mark("warm-image")
        if made is None or not self.image.trusted():
            self._plain(verbose=True)  # the daemon must read what the restore reads
            return True
        self._warm_dir = into
        self._warm_used = warm
        self.state = replace(self.state, warm_bytes=made[1])
        return True

    def _spawn(self, *, verbose: bool) -> None:
        """Spawn the daemon on ``_image_fd`` (``start`` waits for it)."""
        assert self.work_dir is not None and self._image_fd is not None
        self._recording = verbose
        self.daemon = Daemon(
            self.binary, self._image_fd, self.image.path, self.work_dir, verbose=verbose
        )
        self._launch()
        _trace.mark("daemon-spawned")

    def _launch(self) -> None:
        """Spawn the daemon, and record it a claimant of the work dir at once: should its
        starters die before a restore connects, ``_sweep`` ends it (it would wait for ever)."""
        assert self.daemon is not None and self.work_dir is not None
        self.daemon.spawn()
        _sweep.claim(self.work_dir, self.daemon.pid, daemon=True)

    def _plain(self, *, verbose: bool = False) -> None:
        """A derived image restored (see ``_copies``), or a warm image not used after all:
        the daemon must read the restore's pagemaps, so it is started again on the image
        itself (``verbose``: logging its faults). Only spawned if ``ready`` waits for it."""
        assert self.daemon is not None and self.work_dir is not None
        waiting = self.daemon.spawned
        self.daemon.stop()
        self._warm_dir = None
        self._warm_used = []
        self.state = replace(self.state, warm_bytes=None)
        if self._image_fd is not None:
            os.close(self._image_fd)
        with self.image.opened() as fd:
            self._image_fd = os.dup(fd)
        self.daemon = Daemon(
            self.binary, self._image_fd, self.image.path, self.work_dir, verbose=verbose
        )
        self._launch()
        if waiting:
            return
        self.daemon.wait_ready()
        self._claim_for(self.daemon.pid)
        self.state = replace(self.state, daemon_pid=self.daemon.pid)

    @property
    def daemon_pid(self) -> int | None:
        """The pid of the daemon this copy started (the only peer its page server serves)."""
        return self.daemon.pid if self.daemon is not None else None

    def engine(self, base: CriuEngine) -> CriuEngine:
        """``base``'s CRIU with the copy's work dir: CRIU connects to the daemon's
        ``lazy-pages.socket`` in its work dir, and writes the restore's log there."""
        assert self.work_dir is not None, "start() first"
        _trace.mark("restore")
        if self._warm_dir is not None:
            return _eager.WarmEngine(
                base.binary, self.work_dir, image=self.image.path, warm=self._warm_dir,
                warm_fd=self._image_fd, other_dir=self._plain,
            )  # fmt: skip
        return CriuEngine(base.binary, log_dir=self.work_dir)

    def abort(self) -> None:
        """The restore failed (nothing restored runs): stop the daemon and server. The work
        dir stays (the failure's message names the logs in it)."""
        self._named.set()
        if self.daemon is not None:
            self.daemon.stop()
        self._close()
        self._mark_failed()

    def _mark_failed(self) -> None:
        """Keep the work dir (its logs are the failure's evidence) from ``_sweep``."""
        if self.work_dir is not None:
            with contextlib.suppress(OSError):
                os.close(
                    os.open(self.work_dir / _sweep.FAILED_MARK, os.O_CREAT | os.O_WRONLY, 0o600)
                )

    # -- after CRIU named the root --------------------------------------------------------

    def restored(self, pid: int, *, tasks: int = 1) -> None:
        """CRIU restored the copy as ``pid`` (our unreaped child: its pid cannot be reused
        before we reap it): take its pidfd and hold the daemon's userfaultfds (``tasks``
        processes were restored, one userfaultfd each)."""
        _trace.mark("restored")
        self._pidfd = os.pidfd_open(pid)
        assert self.daemon is not None
        self.daemon.hold_uffds(tasks)
        _trace.mark("uffds-held")
        self.state = replace(self.state, pid=pid)
        self._named.set()

    def _server_failed(self, error: LazyPageError) -> None:
        """The page server cannot serve a page verified (called from its thread, before it
        drops the daemon's connection: until then a fault waits). Kill the copy first."""
        # An error while CRIU still restores: the root is named (or the restore fails) soon.
        self._named.wait(60)
        if self._pidfd is not None:  # else the restore failed, and its error says so
            self._fail(str(error))

    def watch(self) -> None:
        """The copy runs: record it, and start the thread that waits for its daemon."""
        _trace.mark("resumed")
        self.state = replace(self.state, resumed_at=time.time())
        with contextlib.suppress(OSError, TorporError):  # (a full disk): the watch matters more
            self._write()
        held = self._hold()
        held.__enter__()  # left by the watch when it ends

        def run() -> None:
            try:
                self._watch()
            finally:
                held.__exit__(None, None, None)

        self._thread = threading.Thread(target=run, name=f"lazy-{self.name}", daemon=True)
        try:
            self._thread.start()
        except BaseException as exc:  # (can't start new thread): none may run unwatched
            try:
                self._unwatched(exc)
            finally:
                held.__exit__(None, None, None)

    def _unwatched(self, exc: BaseException) -> None:
        """The watch could not start: kill the copy and record why, as a failing watch does
        (nothing would kill it should its memory stop arriving)."""
        try:
            self._fail(
                f"lazy restore of {self.image.path}: the keeper could not start the thread "
                f"that watches the copy ({exc}); free threads or memory and restore again"
            )
            if self.daemon is not None:
                self.daemon.stop()
        finally:
            self._end_watch()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the watch ended (resident, failed or the copy ended); True if it did."""
        return self._done.wait(timeout)

    def _watch(self) -> None:
        daemon = self.daemon
        assert daemon is not None and daemon.proc is not None
        try:
            while True:
                try:
                    code = daemon.proc.wait(_POLL)
                except subprocess.TimeoutExpired:  # still moving pages
                    error = self.server.error if self.server is not None else None
                    if error is not None:
                        self._fail(f"{error}")
                        daemon.stop()
                        return
                    continue
                break
            ok = code == 0 and (self.server is None or self.server.error is None)
            if ok:
                daemon.release_uffds()  # no more faults to serve: none may wait forever
            ended = getattr(self.server, "daemon_ended", None)  # (a migration's relay: it
            if ended is not None:  # may wait, the pidfd still held for a kill)
                ended(ok)
            error = self.server.error if self.server is not None else None
            if code == 0 and error is None:
                resident = self._alive()
                if resident:
                    self.state = replace(self.state, state=RESIDENT, resident_at=time.time())
                    if self.server is None:  # read from the daemon's log: before the record,
                        self._save_warm()  # so that a restore right after finds it
                else:
                    self.state = replace(self.state, state=ENDED)
                with contextlib.suppress(OSError, TorporError):  # never kill a resident copy
                    self._write()
                if resident and self.server is not None:  # storing it in a pool takes a while
                    self._save_warm()
                return
            if error is not None:
                self._fail(f"{error}")
            else:
                what = daemon.failure(f"CRIU's lazy-pages daemon {daemon.how_it_ended()}")
                self._fail(str(what))
        except BaseException as exc:  # never leave a copy whose memory nobody serves
            self._fail(f"lazy restore of {self.image.path}: the watch failed: {exc!r}")
        finally:
            self._end_watch()

    def _end_watch(self) -> None:
        self._close()
        self._cleanup()
        if self._on_end is not None:
            with contextlib.suppress(Exception):
                self._on_end()
        self._done.set()

    def _save_warm(self) -> None:
        log = self.daemon.log_path if self._recording and self.daemon is not None else None
        _warmcopy.save_warm(
            self.image, server=self.server, faults_log=log, used=self._warm_used,
            warm_dir=self._warm_dir,
        )  # fmt: skip

    def _fail(self, why: str) -> None:
        """Kill the copy (through its pidfd) and record why (once)."""
        with self._fail_lock:
            if self.state.state == FAILED:
                return
            self._fail_locked(why)

    def _fail_locked(self, why: str) -> None:
        killed = self._kill()
        if self.daemon is not None:
            self.daemon.release_uffds()  # after the kill: no fault could read zeros meanwhile
        msg = f"{why}; copy {self.name} (pid {self.state.pid}) " + (
            "was killed" if killed else "had already ended"
        )
        self.state = replace(self.state, state=FAILED, error=msg)
        self._mark_failed()
        print(f"{now_iso()} lazy restore: {msg}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError, TorporError):
            self._write()
        if self._on_failure is not None:
            with contextlib.suppress(Exception):
                self._on_failure(self.state)

    def _kill(self) -> bool:
        if self._pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def _alive(self) -> bool:
        if self._pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(self._pidfd, 0)
        except ProcessLookupError:
            return False
        return True

    def _write(self) -> None:
        write_state(self.state)

    def _close(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.close()
        with self._fail_lock:  # a serving error's kill may be using the pidfd
            for attr in ("_image_fd", "_pidfd"):
                fd = getattr(self, attr)
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    setattr(self, attr, None)

    def _cleanup(self) -> None:
        """A copy that became resident leaves nothing; a failed one keeps its logs."""
        if self.work_dir is not None and self.state.state in (RESIDENT, ENDED):
            shutil.rmtree(self.work_dir, ignore_errors=True)


class LazyCopies:
    """The lazy copies of one ``Keeper.restore`` call (each its own daemon)."""

    def __init__(
        self,
        image: Image,
        binary: str,
        *,
        source: Callable[[Image], PageSource] | None = None,
        serve: bool = False,
        hold: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        self.image = image
        self.binary = binary
        # Keeps the keeper alive while a watch runs (``Keeper.holding``).
        self._hold = hold
        # With ``serve``: torpor's page server reading ``source`` (default: the image dir,
        # verified), which records the warm set and is what a pool needs. Without (the default
        # for a local image): CRIU's daemon reads the verified image dir itself, through the fd
        # torpor checked. Measured on a 256 MiB app: first answer ~0.6 s vs ~1.1 s served (the
        # server's imports and per-fault Python round trips), a full restore ~0.85-1.0 s.
        self._factory = served_from(source or local_pages) if serve else None
        self.copies: list[LazyCopy] = []
        self._lock = threading.Lock()
        self._cleanup = cleanup  # once every copy's watch ended, or the restore failed
        self._running = 0

    @classmethod
    def for_image(
        cls,
        image: Image,
        binary: str,
        *,
        hold: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> LazyCopies:
        """The lazy copies of ``image``: a pool image's local part
        (``_poolimage.PoolLazyImage``) is served by torpor's page server from its pool (and
        removed once its copies ended); a local image as the defaults say."""
        pool = _warm.pool_image(image)
        if pool is not None:
            return cls(
                pool, binary, source=pool.page_source, serve=True, hold=hold,
                cleanup=pool.discard,
            )  # fmt: skip
        return cls(image, binary, hold=hold)

    def _ended(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last and self._cleanup is not None:
            self._cleanup()

    def start(self, name: str) -> LazyCopy:
        """A started :class:`LazyCopy` for the copy ``name`` (the one the command began for
        this very image, if any: ``_prestart``)."""
        early = _prestart.take(self.image, self.binary) if self._factory is None else None
        copy = early or LazyCopy(self.image, name, binary=self.binary, server_factory=self._factory)
        copy.name, copy.state = name, replace(copy.state, name=name)
        copy._on_failure, copy._hold, copy._on_end = _report_failure, self._hold, self._ended
        if early is not None:
            copy.ready()
        else:
            copy.start()
        with self._lock:
            self.copies.append(copy)
        return copy

    def abort(self) -> None:
        """The restore failed as a whole (its copies are killed): stop every daemon."""
        for copy in self.copies:
            copy.abort()
        if self._cleanup is not None:
            with contextlib.suppress(Exception):
                self._cleanup()

    def watch(self) -> None:
        """Every copy runs: watch each."""
        with self._lock:
            self._running = len(self.copies)
        for copy in self.copies:  # one whose failing watch fails too: the others still run
            with contextlib.suppress(Exception):
                copy.watch()
