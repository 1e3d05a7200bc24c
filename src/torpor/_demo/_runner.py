"""The warm-start demo: cold start the demo app, checkpoint it, restore it, and prove the restored
app carries on with the state it had (the logic behind ``torpor demo``, usable from tests).

Steps: start ``app.py`` with :func:`torpor._process._manage.run` and time launch → first answer;
send it a few LOOKUPs so it has state; checkpoint it (the process stops); unless ``lazy=False``,
restore one copy lazily (post-copy memory) and time restore → first answer and → fully
resident, check it answers with the original's state, stop it; restore ``count`` copies
with :func:`torpor._process._manage.restore` and time restore → first answer; then ask every copy
for ``STATS``: the same warm-up token and index digest, the LOOKUP counter where the original left
it, the same answers to the same LOOKUPs, and each copy's counter moving on its own.

Everything started here is stopped by pid, and the image, the records and the app's log removed,
unless ``keep`` (then the copies keep running and the image stays, for the user to poke at).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .._engine import DumpOptions, find_criu
from .._errors import PermissionDeniedError, TorporError, UsageError
from .._images import _store
from .._process import _dump, _manage, _registry
from .._process._proc import ProcRef, running
from .._process._registry import ManagedProcess

APP_PATH = Path(__file__).with_name("app.py")
DEFAULT_ROWS = 1_000_000
# LOOKUPs sent before the checkpoint; the same keys are asked again after the restore.
KEYS = ("sku-000042", "sku-001337", "sku-004096", "sku-000007", "sku-000512")
READY_TIMEOUT = 120.0
# Between connection attempts while waiting for the app: short against a ~0.1 s restore, long
# enough not to steal the CPU the app (or CRIU) needs on a 2-core machine.
POLL_INTERVAL = 0.005
# How long the demo waits for its lazy copy's memory to be fully resident (it takes ~1 s).
LAZY_RESIDENT_TIMEOUT = 30.0

Progress = Callable[[str], None]


@dataclass(frozen=True)
class AppStats:
    """The app's answer to ``STATS``. ``pid`` identifies the answering process; everything
    else is the app's state, independent of the pid it runs under."""

    token: str
    served: int
    rows: int
    keys: int
    warmup_seconds: float
    digest: str
    pid: int

    @classmethod
    def from_answer(cls, data: dict[str, Any]) -> AppStats:
        """Parse a STATS answer."""
        try:
            return cls(
                token=str(data["token"]),
                served=int(data["served"]),
                rows=int(data["rows"]),
                keys=int(data["keys"]),
                warmup_seconds=float(data["warmup_seconds"]),
                digest=str(data["digest"]),
                pid=int(data["pid"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TorporError(f"the demo app answered STATS with {data!r}") from exc

    def same_warmup(self, other: AppStats) -> bool:
        """Whether both come from the same warm-up (token, index and its timing)."""
        return (self.token, self.rows, self.keys, self.warmup_seconds, self.digest) == (
            other.token,
            other.rows,
            other.keys,
            other.warmup_seconds,
            other.digest,
        )


@dataclass(frozen=True)
class CopyResult:
    """One restored copy: its STATS right after the restore, then after ``queries`` LOOKUPs."""

    name: str
    pid: int
    restored: AppStats
    queries: int
    after: AppStats
    answers_match: bool

    def continues(self, before: AppStats) -> bool:
        """Whether this copy carried on from ``before`` (the original's state at checkpoint)."""
        return (
            self.restored.same_warmup(before)
            and self.after.same_warmup(before)
            and self.restored.served == before.served
            and self.after.served == before.served + self.queries
            and self.answers_match
        )


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured and proved."""

    rows: int
    port: int
    cold_seconds: float
    checkpoint_seconds: float
    restore_seconds: float
    image_bytes: int
    before: AppStats
    copies: tuple[CopyResult, ...]
    image_path: str | None  # kept image, None when removed
    kept: tuple[str, ...]  # names of copies left running (``keep``)
    # The lazy row (None when not run): restore -> first answer, restore -> memory fully
    # resident (None if it did not get there in time), and whether that copy answered with
    # the original's state.
    lazy_seconds: float | None = None
    lazy_resident_seconds: float | None = None
    lazy_carries_on: bool | None = None

    @property
    def speedup(self) -> float:
        """Cold start to ready over restore to ready."""
        return self.cold_seconds / self.restore_seconds

    @property
    def state_continued(self) -> bool:
        """Whether every copy answered with the original's state and counted on from it."""
        return (
            bool(self.copies)
            and all(c.continues(self.before) for c in self.copies)
            and self.lazy_carries_on is not False
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form (with the derived figures)."""
        data = asdict(self)
        data["speedup"] = round(self.speedup, 2)
        if self.lazy_seconds is not None:
            data["lazy_speedup"] = round(self.cold_seconds / self.lazy_seconds, 2)
        data["state_continued"] = self.state_continued
        for c, d in zip(self.copies, data["copies"], strict=True):
            d["continues"] = c.continues(self.before)
        return data


# -- talking to the app ---------------------------------------------------------------------


class AppClosedError(TorporError):
    """The demo app closed a connection before it answered (it ended, most likely)."""


class Client:
    """One connection to the demo app (line protocol, one JSON answer per request)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    def ask(self, request: str) -> dict[str, Any]:
        """Send one request, return its answer."""
        self.sock.sendall(request.encode() + b"\n")
        while b"\n" not in self._buf:
            data = self.sock.recv(65536)
            if not data:
                raise AppClosedError(f"the demo app closed the connection during {request!r}")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        answer = json.loads(line)
        if not isinstance(answer, dict):
            raise TorporError(f"the demo app answered {request!r} with {answer!r}")
        return answer

    def stats(self) -> AppStats:
        """``STATS``."""
        return AppStats.from_answer(self.ask("STATS"))

    def close(self) -> None:
        """Half-close and wait for the app to close its end: once we see EOF the app holds no
        socket for this connection, so a checkpoint right after finds only its listener."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(5.0)
            while self.sock.recv(65536):
                pass
        self.sock.close()


def connect(port: int, timeout: float = 5.0) -> Client:
    """A connection to 127.0.0.1:``port`` (raises ``OSError`` if nothing listens)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Client(sock)


def wait_ready(
    port: int,
    pids: Sequence[int] | None,
    *,
    since: float,
    timeout: float = READY_TIMEOUT,
    log_path: str | None = None,
) -> tuple[float, AppStats]:
    """Poll until one of ``pids`` answers ``STATS`` on ``port``; return the seconds since
    ``since`` (a ``time.perf_counter()`` value) and the answer.

    An answer from any other process (a stranger on the same port) is an error, as is every
    one of ``pids`` dying first. ``pids=None`` takes an answer from any process (its pid is
    not known beforehand) and waits until ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            client = connect(port)
            try:
                stats = client.stats()
            finally:
                client.close()
        except (OSError, AppClosedError):
            # Not listening yet, or it accepted and then ended (a reset or an EOF instead of
            # an answer): look again, unless every one of ``pids`` has gone.
            if pids is not None and not any(running(p) for p in pids):
                raise TorporError(
                    "the demo app exited before answering"
                    + (f"; its log: {log_path}" if log_path else ""),
                    hint=_log_tail(log_path),
                ) from None
            if time.monotonic() > deadline:
                raise TorporError(
                    f"the demo app did not answer on 127.0.0.1:{port} within {timeout:.0f}s"
                ) from None
            time.sleep(POLL_INTERVAL)
            continue
        elapsed = time.perf_counter() - since
        if pids is not None and stats.pid not in pids:
            raise TorporError(
                f"pid {stats.pid} answered on port {port}, not the demo app (pids {list(pids)})",
                hint="another process listens on that port with SO_REUSEPORT",
            )
        return elapsed, stats


def reach_each(port: int, pids: Sequence[int], attempts: int = 400) -> dict[int, Client]:
    """One open connection to each of ``pids``, all listening on ``port`` with SO_REUSEPORT.

    The kernel spreads connections over a port's listeners by a hash of the client's address
    and port, so we connect until every copy has answered; surplus connections are closed.
    """
    found: dict[int, Client] = {}
    try:
        for _ in range(attempts):
            if len(found) == len(pids):
                return found
            client = connect(port)
            try:
                pid = client.stats().pid
            except BaseException:
                client.close()
                raise
            if pid in found or pid not in pids:
                client.close()
                if pid not in pids:
                    raise TorporError(f"pid {pid} answered on port {port}, not a restored copy")
                continue
            found[pid] = client
        missing = sorted(set(pids) - set(found))
        raise TorporError(f"restored copies {missing} never answered on port {port}")
    except BaseException:
        for c in found.values():
            c.close()
        raise


# -- the demo -------------------------------------------------------------------------------


def preflight() -> None:
    """Fail early, with the fix, if the demo cannot run here."""
    if os.geteuid() != 0:
        raise PermissionDeniedError(
            "the demo needs root (CRIU and PID namespaces)", hint="run it as root"
        )
    missing = [m for m in ("numpy", "pandas") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"the demo app needs {' and '.join(missing)}", hint="pip install 'torpor[demo]'"
        )
    find_criu()


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def app_command(port: int, rows: int) -> list[str]:
    """The command line of the demo app."""
    return [sys.executable, str(APP_PATH), "--port", str(port), "--rows", str(rows)]


def warm_page_cache() -> None:
    """Import numpy and pandas once, untimed: the cold start we time then reads warm files,
    like a restore reads a freshly written image; the comparison is not flattered by disk I/O."""
    subprocess.run(
        [sys.executable, "-c", "import numpy, pandas"],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        timeout=120,
    )


def run_demo(
    *,
    count: int = 1,
    rows: int = DEFAULT_ROWS,
    keep: bool = False,
    progress: Progress | None = None,
    lazy: bool = True,
) -> DemoResult:
    """Run the demo end to end (see the module docstring); needs root and CRIU.

    Must be called before the calling process starts any thread (it forks keepers).
    """
    if count < 1:
        raise UsageError(f"count must be at least 1, not {count}")
    if rows < 1:
        raise UsageError(f"rows must be at least 1, not {rows}")
    note = progress or (lambda _text: None)
    preflight()
    note("warming the page cache (importing numpy and pandas once, untimed)")
    warm_page_cache()

    tag = os.urandom(3).hex()
    name = _store.check_name(f"demo-{tag}")
    port = free_port()
    started: list[ManagedProcess] = []
    image_dir = _store.default_path(f"{name}-image")
    succeeded = False
    try:
        note(f"cold start: {APP_PATH.name} (numpy + pandas, {rows:,}-row index) on port {port}")
        t0 = time.perf_counter()
        original = _manage.run(app_command(port, rows), name=name)
        started.append(original)
        cold_seconds, _ = wait_ready(port, [original.pid], since=t0, log_path=original.log_path)

        client = connect(port)
        try:
            answers = [client.ask(f"LOOKUP {k}") for k in KEYS]
            before = client.stats()
        finally:
            client.close()

        note(f"checkpoint: pid {original.pid} -> {image_dir} (the process stops)")
        t0 = time.perf_counter()
        image = _dump.checkpoint_pid(original.pid, image_dir, DumpOptions(), name=image_dir.name)
        checkpoint_seconds = time.perf_counter() - t0
        _wait_gone(original)

        lazy_row: tuple[float | None, float | None, bool | None] = (None, None, None)
        if lazy:
            note(f"lazy restore: 1 copy of {image.path.name}, memory following as it is touched")
            lazy_row = _lazy_row(image, f"{name}-lazy", port, before, started)

        names = [f"{name}-r{i}" for i in range(1, count + 1)]
        note(f"restore: {count} cop{'y' if count == 1 else 'ies'} of {image.path.name}")
        t0 = time.perf_counter()
        copies = _manage.restore(image, names=names)
        started.extend(copies)
        # Each copy writes to a log of its own (not the original's); should they all end
        # before answering, the first one's says why (they are copies of one image).
        restore_seconds, _ = wait_ready(
            port, [c.pid for c in copies], since=t0, log_path=copies[0].log_path
        )

        results = _question_copies(port, copies, answers)
        succeeded = True
        return DemoResult(
            rows=rows,
            port=port,
            cold_seconds=cold_seconds,
            checkpoint_seconds=checkpoint_seconds,
            restore_seconds=restore_seconds,
            image_bytes=image.manifest.total_bytes,
            before=before,
            copies=results,
            image_path=str(image.path) if keep else None,
            kept=tuple(names) if keep else (),
            lazy_seconds=lazy_row[0],
            lazy_resident_seconds=lazy_row[1],
            lazy_carries_on=lazy_row[2],
        )
    finally:
        if not (keep and succeeded):
            _cleanup(started, image_dir, remove_log=succeeded)


def _lazy_row(
    image: Any, name: str, port: int, before: AppStats, started: list[ManagedProcess]
) -> tuple[float, float | None, bool]:
    """Restore one copy lazily: seconds to its first answer, to its memory fully resident
    (None if not within ``LAZY_RESIDENT_TIMEOUT``), and whether it answered with the
    original's state. The copy is stopped after (it holds the port the full restore needs)."""
    from .._lazy import _restore as lazy

    wall = time.time()
    t0 = time.perf_counter()
    [copy] = _manage.restore(image, names=[name], lazy=True)
    started.append(copy)
    seconds, stats = wait_ready(port, [copy.pid], since=t0, log_path=copy.log_path)
    carries_on = stats.same_warmup(before) and stats.served == before.served
    # wait_states settles on a copy whose daemon has gone: the keeper reaps the daemon a
    # moment before it records "resident", so look again until the record says.
    deadline = time.monotonic() + LAZY_RESIDENT_TIMEOUT
    st = None
    while time.monotonic() < deadline:
        left = max(deadline - time.monotonic(), 0.0)
        st = lazy.wait_states([name], timeout=left).get(name)
        if st is not None and st.state != lazy.FILLING:
            break
        time.sleep(0.01)
    resident = None
    if st is not None and st.state == lazy.RESIDENT and st.resident_at is not None:
        resident = st.resident_at - wall
    _stop([copy])
    with contextlib.suppress(OSError, TorporError):
        os.unlink(lazy.lazy_dir() / f"{name}.json")
    return seconds, resident, carries_on


def _question_copies(
    port: int, copies: Sequence[ManagedProcess], answers: Sequence[dict[str, Any]]
) -> tuple[CopyResult, ...]:
    """Read each copy's state, then send copy i (1-based) i LOOKUPs, so every counter moves by
    a different amount: the copies share the past and not the present."""
    by_pid = {c.pid: c for c in copies}
    clients = reach_each(port, list(by_pid))
    try:
        results = []
        for i, proc in enumerate(copies, start=1):
            client = clients[proc.pid]
            restored = client.stats()
            again = [client.ask(f"LOOKUP {k}") for k in KEYS[:i]]
            after = client.stats()
            results.append(
                CopyResult(
                    name=proc.name,
                    pid=proc.pid,
                    restored=restored,
                    queries=len(again),
                    after=after,
                    answers_match=again == list(answers[:i]),
                )
            )
        return tuple(results)
    finally:
        for c in clients.values():
            c.close()


# -- cleanup ----------------------------------------------------------------------------------


def _wait_gone(proc: ManagedProcess, timeout: float = 10.0) -> None:
    """Wait until ``proc`` has ended and its keeper has recorded it and exited (keepers are
    double-forked: not our children; a zombie keeper has finished its work)."""
    deadline = time.monotonic() + timeout
    ref = ProcRef(proc.pid, proc.start_time)
    while time.monotonic() < deadline:
        if not ref.alive() and not running(proc.keeper_pid):
            return
        time.sleep(0.01)


def _stop(procs: Sequence[ManagedProcess]) -> None:
    for p in procs:
        if ProcRef(p.pid, p.start_time).alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        _wait_gone(p)


def _cleanup(started: Sequence[ManagedProcess], image_dir: Path, *, remove_log: bool) -> None:
    """Stop what we started (by pid), then remove its records, the image and, after a success,
    the app's log (after a failure the log is the evidence)."""
    _stop(started)
    for p in started:
        with contextlib.suppress(TorporError, OSError):
            _registry.delete(p.name)
    shutil.rmtree(image_dir, ignore_errors=True)
    if remove_log:
        for log in {p.log_path for p in started if p.log_path}:
            with contextlib.suppress(OSError):
                os.unlink(log)


def _log_tail(log_path: str | None, lines: int = 5) -> str | None:
    if not log_path:
        return None
    try:
        text = Path(log_path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return None
    return " | ".join(text[-lines:]) or None
