"""CRIU's ``criu lazy-pages`` daemon: started, waited for, and its userfaultfds held.

There is no RPC request to start it (see the migration notes): it is a child process,
``criu lazy-pages -D <image> -W <work dir> --status-fd N [--page-server --address 127.0.0.1
--port P]``. CRIU binds ``lazy-pages.socket`` in the work dir (the restore must run there: else
``uffd: connect to lazy-pages.socket failed``) and then writes one byte to the status fd: the
daemon is ready for the restore once that byte is read.

The image directory is handed over as an fd (``-D /proc/self/fd/N``): the daemon reads the very
directory torpor checked, whatever its path names by then.

**Why the keeper holds the userfaultfds too** (:meth:`Daemon.hold_uffds`): when the last
reference to a userfaultfd is closed, the kernel unregisters its ranges and wakes the faulting
threads, which then fault as if nothing were registered: a private anonymous page that never
arrived reads as zeros. A daemon that dies mid-restore would so hand the process silent zeros
instead of its memory, before anyone could stop it. A duplicate held by the keeper
(``pidfd_getfd``) keeps the ranges registered: a fault then waits, and the watch kills the
process. The duplicates are dropped the moment the daemon ends well (a later fault on a range
nobody serves would wait forever) or the process has been killed.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from pathlib import Path

from .._engine import _kdat
from .._engine._failures import log_errors
from .._errors import RestoreError
from ._fds import pidfd_getfd as _pidfd_getfd
from ._fds import uffds as _uffds

DAEMON_LOG = "lazy-pages.log"
SOCKET_NAME = "lazy-pages.socket"  # CRIU's LAZY_PAGES_SOCK_NAME, in the work dir
READY_TIMEOUT = 10.0  # seconds for the daemon to bind its socket (it takes ~10 ms)


class LazyDaemonError(RestoreError):
    """The ``criu lazy-pages`` daemon could not be started or ended badly."""


class Daemon:
    """One ``criu lazy-pages`` process serving one restored copy."""

    def __init__(
        self,
        binary: str,
        image_dir_fd: int,
        image: Path,
        work_dir: Path,
        *,
        page_server: tuple[str, int] | None = None,
        verbose: bool = False,
    ) -> None:
        self.binary = binary
        self._verbose = verbose  # log level 4: each fault is logged (``_eager.faults``)
        self.image = image
        self.work_dir = work_dir
        self.log_path = work_dir / DAEMON_LOG
        self._image_fd = image_dir_fd
        self._page_server = page_server
        self.proc: subprocess.Popen[bytes] | None = None
        self._status_r: int | None = None  # between spawn() and wait_ready()
        self._held: list[int] = []

    @property
    def pid(self) -> int | None:
        """The daemon's pid once started."""
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start the daemon and wait until it listens on its socket in the work dir."""
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the daemon (:meth:`wait_ready` next). It reads the image directory's
        ``inventory.img``, ``pstree.img`` and ``ids-*.img`` as it starts, the task pagemaps
        only once the restore hands it each task's userfaultfd: a caller may still write
        those meanwhile (``_restore.LazyCopy``: the warm image's)."""
        _kdat.ensure(self.binary)  # else CRIU probes the kernel first: ~30-65 ms here
        status_r, status_w = os.pipe()
        argv = [
            self.binary,
            "lazy-pages",
            "-D",
            f"/proc/self/fd/{self._image_fd}",
            "-W",
            str(self.work_dir),
            "-o",
            DAEMON_LOG,
            "--status-fd",
            str(status_w),
        ]
        if self._verbose:
            argv.append("-v4")
        if self._page_server is not None:
            host, port = self._page_server
            argv += ["--page-server", "--address", host, "--port", str(port)]
        try:
            self.proc = subprocess.Popen(
                argv,
                pass_fds=(self._image_fd, status_w),
                cwd=self.work_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            os.close(status_r)
            os.close(status_w)
            raise LazyDaemonError(
                f"cannot start {self.binary} lazy-pages: {exc.strerror}",
                image=str(self.image),
                hint="run `torpor doctor`",
            ) from exc
        os.close(status_w)
        self._status_r = status_r

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the daemon :meth:`spawn` started listens on its socket."""
        status_r, self._status_r = self._status_r, None
        assert status_r is not None and self.proc is not None, "spawn() first"
        try:
            poller = select.poll()  # (select.select refuses an fd >= 1024)
            poller.register(status_r, select.POLLIN)
            ready = bool(poller.poll(timeout * 1000))
            got = os.read(status_r, 1) if ready else b""
        finally:
            os.close(status_r)
        if got != b"\0":
            if ready:  # the status pipe closed: the daemon is ending; let it, to say how
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(2)
            how = "did not get ready" if self.proc.poll() is None else self.how_it_ended()
            self.stop()
            raise self.failure(f"CRIU's lazy-pages daemon {how} before the restore")

    @property
    def spawned(self) -> bool:
        """Started by :meth:`spawn`, not yet waited for (:meth:`wait_ready`)."""
        return self._status_r is not None

    def how_it_ended(self) -> str:
        """``exited N`` / ``was killed by SIGX`` / ``is running``."""
        code = self.proc.poll() if self.proc is not None else None
        if code is None:
            return "is running"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited {code}"

    def failure(self, what: str) -> LazyDaemonError:
        """An error saying ``what`` with the first real line of the daemon's log."""
        lines = log_errors(self.log_path)
        said = f"; its log says: {lines[0]}" if lines else ""
        return LazyDaemonError(
            f"lazy restore of {self.image}: {what}{said} (log: {self.log_path})",
            image=str(self.image),
            log_path=str(self.log_path),
            log_lines=lines,
            hint="restore again without --lazy, or see the log",
        )

    def hold_uffds(self, expected: int, timeout: float = 2.0) -> int:
        """Duplicate the daemon's userfaultfds into this process (see the module docstring),
        waiting up to ``timeout`` for ``expected`` of them (one per restored process; the
        daemon receives them from the restore as it goes). Returns how many are held."""
        if self.proc is None:
            return 0
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            deadline = time.monotonic() + timeout
            seen: set[int] = set()
            while True:
                for fd in _uffds(self.proc.pid) - seen:
                    with contextlib.suppress(OSError):
                        self._held.append(_pidfd_getfd(pidfd, fd))
                        seen.add(fd)
                if len(seen) >= expected or time.monotonic() > deadline:
                    return len(self._held)
                if self.proc.poll() is not None:
                    return len(self._held)
                time.sleep(0.002)
        finally:
            os.close(pidfd)

    def release_uffds(self) -> None:
        """Close the duplicated userfaultfds."""
        held, self._held = self._held, []
        for fd in held:
            with contextlib.suppress(OSError):
                os.close(fd)

    def stop(self) -> None:
        """SIGKILL the daemon (ours, by its pid, unreaped) and reap it."""
        self.release_uffds()
        status_r, self._status_r = self._status_r, None
        if status_r is not None:
            os.close(status_r)
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
