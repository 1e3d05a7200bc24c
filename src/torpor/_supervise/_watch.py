"""What the supervisor daemon waits on: CLI subprocesses (:class:`Job`), the records directory
(:class:`DirWatch`, inotify), and how it runs the torpor CLI (:func:`cli_argv`).

Everything here is an fd for one ``poll`` loop: no thread, no sleep. A job's output goes to
memory files (``memfd``), never to a pipe a chatty child could fill and block on.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

_IN_CLOSE_WRITE = 0x08
_IN_MOVED_TO = 0x80
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_MAX_OUTPUT = 1 << 20


def cli_argv() -> list[str]:
    """How the daemon runs a torpor command: the native ``torpor`` launcher next to the
    interpreter when there is one (it hands the command to the agent when one serves, saving
    Python's start-up on a restore), else this interpreter with ``-P`` (the current directory
    is never on ``sys.path`` of a root process)."""
    launcher = Path(sys.executable).with_name("torpor")
    if launcher.is_file() and os.access(launcher, os.X_OK):
        return [str(launcher)]
    return [sys.executable, "-P", "-m", "torpor"]


class Job:
    """One torpor CLI command run by the daemon: :attr:`fd` (a pidfd) is readable once it has
    ended; then :meth:`finish` collects its exit code and output."""

    def __init__(self, argv: Sequence[str], *, what: str, env: dict[str, str] | None = None):
        self.what = what
        self.argv = list(argv)
        self.started = time.monotonic()
        self._out = os.memfd_create("torpor-job-out", os.MFD_CLOEXEC)
        self._err = os.memfd_create("torpor-job-err", os.MFD_CLOEXEC)
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=self._err,
                env=env,
                close_fds=True,
            )
            self.fd = os.pidfd_open(self._proc.pid)
        except BaseException:
            os.close(self._out)
            os.close(self._err)
            raise
        self.returncode: int | None = None
        self.stdout = ""
        self.stderr = ""

    @property
    def pid(self) -> int:
        """The command's pid (our child)."""
        return self._proc.pid

    def finish(self) -> int:
        """Reap the ended command; its exit code (output in :attr:`stdout`, :attr:`stderr`)."""
        self.returncode = self._proc.wait()
        self.stdout = _read_all(self._out)
        self.stderr = _read_all(self._err)
        for fd in (self.fd, self._out, self._err):
            os.close(fd)
        return self.returncode

    def terminate(self) -> None:
        """Ask the command to stop (SIGTERM: a checkpoint aborts before CRIU has written the
        image, and the app keeps running)."""
        if self.returncode is None:
            self._proc.terminate()

    def error_line(self) -> str:
        """The command's last stderr line (its one-line error), or its exit code."""
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        if lines:
            return lines[-1].removeprefix("torpor: error: ")
        return f"exited {self.returncode}"


def _read_all(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, _MAX_OUTPUT)
    return data.decode(errors="replace")


class DirWatch:
    """inotify on a directory: :attr:`fd` is readable when a file there was written or
    renamed into place (a registry record replaced by its keeper). :meth:`drain` empties it."""

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        wd = libc.inotify_add_watch(fd, os.fsencode(path), _IN_CLOSE_WRITE | _IN_MOVED_TO)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, os.strerror(err))
        self.fd: int = fd

    def drain(self) -> None:
        """Read every pending event (what changed is re-read by the caller)."""
        while True:
            try:
                if not os.read(self.fd, 1 << 16):
                    return
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    return
                raise

    def close(self) -> None:
        """Stop watching."""
        os.close(self.fd)
