"""The agent's master: imports everything once, then keeps spare workers forked.

Single-threaded on purpose (it forks). It holds ``agent.lock`` for its whole life, listens on
``agent.sock``, and loops over a notes pipe from its workers (``taken PID`` when a worker takes
a connection, ``request PID`` once its request came, ``done PID`` when it is done), an inotify
fd (``_watch``) and signals:

- it keeps ``SPARES`` idle workers, but while a command runs it forks a replacement only if no
  idle worker is left: forking and starting CRIU would otherwise compete with the command
  (a restore) for the machine's cores; the rest are forked when the command is done; none is
  forked while ``MAX_WAITING`` workers wait for their connection's request;
- a change to torpor's sources or the CRIU binary, or SIGHUP, makes it re-execute itself
  (idle workers are stopped first);
- SIGTERM/SIGINT stop it: idle workers are stopped; busy workers, and keepers, finish on their
  own. Workers that end are reaped here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path

from .. import _paths
from .._agent_status import launcher_dir, lock_path, pid_path, socket_path
from .._errors import AlreadyExistsError, TorporError
from .._images._manifest import now_iso
from .._process._proc import ref
from . import _watch, _worker

SPARES = 2
# Workers whose connection has not sent its request yet (each is declined after the worker's
# RECEIVE_TIMEOUT): no more are forked while this many wait, so silent connections cannot make
# the agent fork without bound; later connections wait in the backlog, or their launchers run
# the command themselves.
MAX_WAITING = 4
# A command running longer than this no longer holds back its replacement.
BUSY_GRACE = 2.0
# After a command, spares are refilled only this much later: a restored process is resuming
# then, and a fork plus a CRIU start on the other core would slow it (one spare is left).
REFILL_DELAY = 0.3
# Code changes are acted on once the tree has been quiet this long (pip writes many files).
RELOAD_QUIET = 0.5
# An idle worker that dies this soon after its fork, this many times in a row, means workers
# cannot start (a broken install): stop forking them instead of spinning.
CRASH_WINDOW = 1.0
CRASH_LIMIT = 5


def _preload() -> str | None:
    """Import what commands need, so workers start with it imported; the CRIU binary (None if
    there is none: commands then fail in the worker as they would in-process)."""
    import torpor._cli
    import torpor._cli._checkpoint
    import torpor._cli._images
    import torpor._cli._inspect
    import torpor._cli._restore
    import torpor._cli._run
    import torpor._coord
    import torpor._doctor
    import torpor._images._image
    import torpor._images._signature
    import torpor._images._store
    import torpor._lazy._poolimage  # a pool's lazy restore (a local one does not import it)
    import torpor._process._copies
    import torpor._process._dump
    import torpor._process._locks
    import torpor._process._manage
    from torpor._engine import _criu

    # Restores verify the image's signature: OpenSSL's Ed25519 through `cryptography` costs
    # ~25 ms to import, which must not land on a restore's path.
    with contextlib.suppress(ImportError):
        import cryptography.exceptions
        import cryptography.hazmat.primitives.asymmetric.ed25519  # noqa: F401
    torpor._cli.prebuild()
    try:
        criu = _criu.find_criu()
        _criu.criu_version()
    except TorporError:
        return None
    return criu


class _Master:
    def __init__(self, home: Path, lock_fd: int, log_fd: int, install: str | None) -> None:
        self.home = home
        self.lock_fd = lock_fd
        self.log_fd = log_fd
        self.idle: dict[int, float] = {}  # worker pid -> fork time
        self.busy: dict[int, float] = {}  # worker pid -> when it took its command
        self.waiting: set[int] = set()  # busy workers whose request has not come yet
        self.last_note = 0.0  # when a worker last took or finished a command
        self.changed_at: float | None = None  # when torpor's code last changed (unhandled)
        self.ctx = _worker.AgentContext.current(install)
        self.crashes = 0
        self.stop = False
        self.reload = False
        self.criu = _preload()
        self.watcher = self._watch()
        self.listener = self._listen()
        self.notes_r, self.notes_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.notes_r, False)
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def _watch(self) -> _watch.Watcher | None:
        import torpor

        try:
            return _watch.Watcher(Path(torpor.__file__).parent, [self.criu] if self.criu else [])
        except OSError as exc:
            print(f"{now_iso()} not watching for code changes: {exc}", flush=True)
            return None

    def _listen(self) -> socket.socket:
        path = socket_path(self.home)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead agent's: we hold the lock, so no live agent uses it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            # A socket is made 0777 less the umask: 0177 leaves 0600 (connecting needs write
            # permission only; the home's 0700 keeps others out as well).
            old = os.umask(0o177)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            long = len(os.fsencode(path)) >= 108
            raise TorporError(
                f"cannot listen on {path}: {exc.strerror or exc}",
                hint="a socket path must be under 108 bytes: set a shorter TORPOR_HOME"
                if long
                else None,
            ) from exc
        return sock

    def run(self, ready_fd: int | None) -> None:
        try:
            self._serve(ready_fd)
        finally:
            # However the loop ends (a signal, or an error such as fork failing under a pids
            # limit): idle workers are let go and the files removed, or the agent re-executes.
            self._shutdown()

    def _serve(self, ready_fd: int | None) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)
        me = ref(os.getpid())
        record = {
            "pid": me.pid,
            "start_time": me.start_time,
            "started": now_iso(),
            "socket": str(socket_path(self.home)),
        }
        # 0600 through an O_EXCL temporary file: never written through a planted symlink.
        _paths.write_home_file(pid_path(self.home).name, json.dumps(record).encode())
        # Objects that exist now are never collected: a collection would touch (and so copy)
        # every page a worker shares with us.
        gc.freeze()
        self._fill()
        print(f"{now_iso()} agent {me.pid} serving {socket_path(self.home)}", flush=True)
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
        fds = [self.notes_r, self.wake_r] + ([self.watcher.fd] if self.watcher else [])
        while not self.stop and not self.reload and self.crashes < CRASH_LIMIT:
            with contextlib.suppress(InterruptedError):
                select.select(fds, [], [], self._timeout())
            self._drain(self.wake_r)
            self._read_notes()
            if self.watcher is not None and (changed := self.watcher.changed()):
                print(f"{now_iso()} code changed ({', '.join(changed[:3])})", flush=True)
                self.changed_at = time.monotonic()
            if self.changed_at is not None and time.monotonic() - self.changed_at > RELOAD_QUIET:
                self.reload = True
            self._reap()
            if not self.stop and not self.reload:
                self._fill()
        if self.crashes >= CRASH_LIMIT:
            print(f"{now_iso()} workers keep dying right after they start: stopping", flush=True)

    def _timeout(self) -> float:
        """How long the loop may sleep: until a deferred refill or reload is due."""
        now = time.monotonic()
        due = [now + BUSY_GRACE]
        if len(self.idle) < SPARES:  # when the refill target can next rise
            due.append(self.last_note + REFILL_DELAY)
            due += [taken + BUSY_GRACE for taken in self.busy.values()]
        if self.changed_at is not None:
            due.append(self.changed_at + RELOAD_QUIET)
        return min(t for t in due if t > now) - now + 0.001

    def _read_notes(self) -> None:
        for line in self._drain(self.notes_r).decode().splitlines():
            what, _, pid_text = line.partition(" ")
            pid = int(pid_text)
            self.last_note = time.monotonic()
            if what == "taken":
                self.idle.pop(pid, None)
                self.busy[pid] = self.last_note
                self.waiting.add(pid)
                self.crashes = 0  # a worker that serves is a healthy one
            elif what == "request":
                self.waiting.discard(pid)
            else:
                self.busy.pop(pid, None)
                self.waiting.discard(pid)

    def _on_stop(self, *_: object) -> None:
        self.stop = True

    def _on_reload(self, *_: object) -> None:
        self.reload = True

    @staticmethod
    def _drain(fd: int) -> bytes:
        data = b""
        while True:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                return data
            if not chunk:
                return data
            data += chunk

    def _fill(self) -> None:
        now = time.monotonic()
        running = any(now - taken < BUSY_GRACE for taken in self.busy.values())
        settling = now - self.last_note < REFILL_DELAY
        target = 1 if running or settling else SPARES
        master = os.getpid()
        while (
            len(self.idle) < target
            and self.crashes < CRASH_LIMIT
            and len(self.waiting) < MAX_WAITING
        ):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the worker's side; exercised by integration tests
                self._become_worker(master)
            self.idle[pid] = time.monotonic()

    def _become_worker(self, master: int) -> None:
        try:
            # An idle worker must not outlive a master killed outright (SIGKILL, a crash):
            # it would go on serving old code. Cleared once it takes a command.
            _worker.set_parent_death_signal(signal.SIGTERM)
            if os.getppid() != master:  # the master died before that took effect
                os._exit(0)
            os.setsid()
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for fd in (self.lock_fd, self.notes_r, self.wake_r, self.wake_w):
                os.close(fd)
            if self.watcher is not None:
                self.watcher.close()
        except BaseException:
            os._exit(1)
        _worker.work(self.listener, self.notes_w, self.criu, self.log_fd, self.ctx)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.busy.pop(pid, None)
            self.waiting.discard(pid)
            forked = self.idle.pop(pid, None)
            if forked is not None:  # an idle worker died: it never took a command
                code = os.waitstatus_to_exitcode(status)
                print(f"{now_iso()} idle worker {pid} ended ({code})", flush=True)
                if time.monotonic() - forked < CRASH_WINDOW:
                    self.crashes += 1
                else:
                    self.crashes = 0

    def _shutdown(self) -> None:
        # Shutting the listener down wakes every worker in accept() (EINVAL) and makes later
        # accept() calls fail once the queue is empty: idle workers end themselves; a worker
        # that has taken a command goes on (a late one may still take a queued connection and
        # serve it). Connections still queued when the socket closes are reset: their launchers
        # have no ``ready`` yet, so they run the command themselves. Either way it runs once.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            self._read_notes()
            self._reap()
            if not self.idle:
                break
            time.sleep(0.01)
        if self.reload and not self.stop:  # a stop asked for meanwhile wins
            print(f"{now_iso()} agent {os.getpid()} re-executing (new code)", flush=True)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the new image handles it
            # The lock stays held across the exec: no other agent can start in between.
            os.set_inheritable(self.lock_fd, True)
            install = os.fsdecode(self.ctx.install)
            os.execv(
                sys.executable,
                [*agent_argv(install), "--lock-fd", str(self.lock_fd)],
            )
        with contextlib.suppress(FileNotFoundError):
            socket_path(self.home).unlink()
        with contextlib.suppress(FileNotFoundError):
            pid_path(self.home).unlink()
        print(f"{now_iso()} agent {os.getpid()} stopped", flush=True)


def agent_argv(install: str) -> list[str]:
    """The command that runs an agent for the launchers in ``install``: ``-P`` keeps the
    directory it was started from off ``sys.path`` (a stray ``torpor/`` there must not be
    imported by a root daemon)."""
    return [sys.executable, "-P", "-m", "torpor._agent", "--install", install]


def serve(
    ready_fd: int | None = None, lock_fd: int | None = None, install: str | None = None
) -> None:
    """Run the agent of this torpor home in the foreground until SIGTERM/SIGINT.

    ``ready_fd`` gets ``ready`` once commands are served; ``lock_fd`` is the lock a
    re-executing agent already holds; ``install`` is the directory of the launchers it serves
    (default: this process's, see :func:`torpor._agent_status.launcher_dir`). Raises
    :class:`AlreadyExistsError` if an agent serves this home already.
    """
    home = _paths.home()
    os.chdir("/")  # hold no directory busy
    if lock_fd is not None:
        os.set_inheritable(lock_fd, False)
    else:
        lock_fd = os.open(
            lock_path(home), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise AlreadyExistsError(
            f"an agent already serves {home}", hint="`torpor agent status` shows it"
        ) from exc
    log_fd = os.open(
        _paths.logs_dir() / "agent.log",
        os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
    )
    _Master(home, lock_fd, log_fd, install or launcher_dir()).run(ready_fd)
