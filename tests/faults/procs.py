"""The fault suite's view of processes: /proc read directly, and a subreaper that keeps every
process a test starts inside the test's own tree.

Read from /proc here rather than through torpor's own helpers, so the suite can judge any
version of torpor (``PYTHONPATH`` pointing at an old checkout) without depending on its
private modules.

Why a subreaper: torpor detaches its keepers and finalisers (double fork + ``setsid``), and
an agent's master, so they would be re-parented to init and be found by nothing but their
names. With the test process a child subreaper (``PR_SET_CHILD_SUBREAPER``) they are
re-parented to it instead: every process a test started, directly or not, is then one of its
descendants (and carries the tree's marker in its environment), and the test signals only
those (by pidfd, after checking the start time).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

PR_SET_CHILD_SUBREAPER = 36
CRIU_NAMES = ("criu",)


@dataclass(frozen=True)
class Stat:
    """The fields of /proc/PID/stat the suite uses."""

    state: str
    ppid: int
    start_time: int


def stat(pid: int) -> Stat | None:
    """``pid``'s state, parent and start time; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return Stat(state=fields[0], ppid=int(fields[1]), start_time=int(fields[19]))


@dataclass(frozen=True)
class Ref:
    """A process identity: pid and start time (pids are reused)."""

    pid: int
    start_time: int

    def alive(self) -> bool:
        """This very process exists and has not ended (a zombie has ended)."""
        st = stat(self.pid)
        return st is not None and st.start_time == self.start_time and st.state not in "ZX"

    def state(self) -> str | None:
        """Its state letter while it is this process, else None."""
        st = stat(self.pid)
        return st.state if st is not None and st.start_time == self.start_time else None


def ref(pid: int) -> Ref | None:
    """The identity of the live process ``pid`` now, or None."""
    st = stat(pid)
    return Ref(pid, st.start_time) if st is not None and st.state not in "ZX" else None


def children(pid: int) -> list[int]:
    """The children of every thread of ``pid``."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as fh:
                out.extend(int(k) for k in fh.read().split())
        except OSError:
            continue
    return out


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``, parents first (processes ending meanwhile are skipped)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        for kid in children(todo.pop()):
            out.append(kid)
            todo.append(kid)
    return out


def cmdline(pid: int) -> tuple[str, ...]:
    """``pid``'s argv (empty for a zombie or a gone process)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except OSError:
        return ()
    return tuple(os.fsdecode(a) for a in raw.split(b"\0")[:-1])


def environ(pid: int) -> set[str]:
    """``pid``'s environment as ``NAME=VALUE`` strings (empty if unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return set()
    return {os.fsdecode(e) for e in raw.split(b"\0") if e}


def is_criu(pid: int) -> bool:
    """Whether ``pid`` runs the CRIU binary (judged by its executable, not a name we signal by:
    the pid itself was found as a descendant)."""
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")) in CRIU_NAMES
    except OSError:
        return False


def fd_targets(pid: int) -> set[str]:
    """What ``pid``'s fds point at (``pipe:[N]``, paths...)."""
    out: set[str] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        with contextlib.suppress(OSError):
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def tracer(pid: int) -> int:
    """The pid tracing ``pid`` (0: none)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def frozen(pid: int) -> bool:
    """Whether ``pid``'s cgroup (v2) is frozen."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return False
    for line in lines:
        if line.startswith("0::"):
            try:
                with open(f"/sys/fs/cgroup{line[3:]}/cgroup.events", encoding="ascii") as fh:
                    return "frozen 1" in fh.read().splitlines()
            except OSError:
                return False
    return False


def signal_ref(target: Ref, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` to ``target`` if it is still that process (a pidfd pins it first);
    whether it was sent."""
    try:
        fd = os.pidfd_open(target.pid)
    except OSError:
        return False
    try:
        if not target.alive():
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def _set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Tree:
    """The test's process tree: this process made a subreaper for the test's span, every
    command started through :meth:`spawn`, orphans re-parented here reaped at once (as init
    would, but without init's delay), and every process the test started reachable as a
    descendant of a child that was not already ours when the tree was opened.

    Children started through :meth:`spawn` are the caller's to wait for; the reaper thread
    reaps only the others (re-parented orphans), so ``Popen.wait`` never loses a status.
    """

    def __init__(self) -> None:
        self.me = os.getpid()
        self._foreign = set(children(self.me))
        # Every command spawned carries it in its environment, and so does all it starts: a
        # child re-parented to us without it is not the test's, and is never signalled.
        self.marker = f"TORPOR_FAULT_TREE={os.urandom(8).hex()}"
        self._lock = threading.Lock()
        self._waited: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._reap_loop, name="fault-reaper", daemon=True)

    def __enter__(self) -> Tree:
        _set_subreaper(True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.kill_all()
        finally:
            self._stop.set()
            self._thread.join()
            _set_subreaper(False)

    def spawn(self, argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[str]:
        """Start ``argv`` (text pipes for stdout and stderr, stdin on /dev/null)."""
        with self._lock:
            proc: subprocess.Popen[str] = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=dict(env, TORPOR_FAULT_TREE=self.marker.split("=", 1)[1]),
            )
            self._waited.add(proc.pid)
        return proc

    def run(
        self, argv: Sequence[str], env: Mapping[str, str], timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to its end."""
        proc = self.spawn(argv, env)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            self.forget(proc)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    def forget(self, proc: subprocess.Popen[str]) -> None:
        """``proc`` was waited for: from now on its pid is the reaper's again."""
        if proc.poll() is None:
            r = ref(proc.pid)
            if r is not None:
                signal_ref(r)
            proc.wait()
        with self._lock:
            self._waited.discard(proc.pid)

    def roots(self) -> list[int]:
        """Our children that the test started, or that were re-parented to us meanwhile and
        carry the tree's marker."""
        with self._lock:
            waited = set(self._waited)
        return [
            k
            for k in children(self.me)
            if k not in self._foreign and (k in waited or self.marker in environ(k))
        ]

    def mine(self) -> list[Ref]:
        """Every live process the test started, directly or not, parents first."""
        out: list[Ref] = []
        for root in self.roots():
            for pid in (root, *descendants(root)):
                r = ref(pid)
                if r is not None:
                    out.append(r)
        return out

    def kill_all(
        self, keep: Callable[[Ref], bool] = lambda r: False, timeout: float = 10
    ) -> list[Ref]:
        """SIGKILL every process of the test but those ``keep`` spares (judged afresh each
        round: a process started meanwhile is judged too) and wait until they are gone; the
        ones that outlived ``timeout`` (none, normally)."""
        deadline = time.monotonic() + timeout
        while True:
            left = [r for r in self.mine() if not keep(r)]
            if not left or time.monotonic() > deadline:
                return left
            for r in left:
                signal_ref(r)
            time.sleep(0.02)

    def _reap_loop(self) -> None:
        while not self._stop.wait(0.005):
            self.reap()

    def reap(self) -> None:
        """Collect every zombie child that no ``Popen`` of ours waits for."""
        with self._lock:
            waited = set(self._waited)
        for kid in children(self.me):
            if kid in waited or kid in self._foreign:
                continue
            st = stat(kid)
            if st is not None and st.state == "Z":
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(kid, os.WNOHANG)


def wait_until(pred: Callable[[], object], timeout: float, step: float = 0.01) -> bool:
    """Poll ``pred()`` until truthy or ``timeout``; its last verdict."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
