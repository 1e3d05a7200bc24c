"""Holding the other threads across a checkpoint, with a fake engine: they run no application
code from the dump until the after-restore hooks ran; marked threads go after torpor's own
resources; the watchdog; threads held threads start; no parking inside the standard library;
a thread's own trace function put back."""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

import torpor._coord._checkpoint as checkpoint_module
from torpor._coord import (
    Context,
    Coordinator,
    _contexts,
    _hold,
    configure_hold,
    release_before_hooks,
)
from torpor._coord._fds import FdInfo
from torpor._coord._hold import HoldStage, available, is_app_code
from torpor._errors import DumpError


@dataclass(frozen=True)
class Outcome:
    restored: bool
    image: Path | None


class State:
    """What the threads of a test share. Attribute reads and writes are single bytecodes: a
    held thread that reads ``started`` as True ran after the dump began."""

    def __init__(self) -> None:
        self.started = False  # the engine is dumping (or the copy came back)
        self.reseeded = False  # torpor's own resources are back
        self.flag = False  # the application's hook ran
        self.stop = False


class Engine:
    """Marks the dump as begun, lets time pass (as a dump does), returns ``outcome``."""

    def __init__(self, state: State, outcome: Outcome | Exception, during: float = 0.05) -> None:
        self.state, self.outcome, self.during = state, outcome, during
        self.on_start: Callable[[], None] = lambda: None

    def __call__(
        self,
        dest: Path,
        *,
        leave_running: bool,
        tcp_established: bool,
        name: str | None,
        labels: Mapping[str, str],
    ) -> Outcome:
        self.state.started = True
        self.on_start()
        time.sleep(self.during)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


class Reseed:
    """Stands for torpor's built-in resources (the system context)."""

    def __init__(self, state: State, log: list[str]) -> None:
        self.state, self.log = state, log

    def before_checkpoint(self, context: Context) -> None:
        pass

    def after_restore(self, context: Context) -> None:
        time.sleep(0.02)  # widen the window a thread that is not held would run in
        self.state.reseeded = True
        self.log.append("reseed")


def no_fds() -> list[FdInfo]:
    return []


def coordinator(
    state: State,
    engine: Engine,
    hook: Callable[[], None],
    log: list[str],
    *,
    hold: bool | None = None,
) -> tuple[Coordinator, list[object]]:
    """A coordinator over a root context shaped as torpor's: system, stage marker, app."""
    root, system, app = Context("root"), Context("system"), Context("app")
    keep: list[object] = [Reseed(state, log), HoldStage()]
    system._register_strong(keep[0])  # type: ignore[arg-type]
    root._register_strong(system)
    root._register_strong(keep[1])  # type: ignore[arg-type]
    root._register_strong(app)
    from torpor._coord._context import FunctionHook

    app._register_strong(FunctionHook("after_restore", hook, (), {}))
    return Coordinator(engine, root, scan=no_fds, hold=hold), keep


@pytest.fixture(autouse=True)
def hold_settings() -> Iterator[None]:
    enabled, timeout = configure_hold()
    interval = sys.getswitchinterval()
    yield
    configure_hold(enabled=enabled, timeout=timeout)
    assert sys.getswitchinterval() == interval


@pytest.fixture
def threads() -> Iterator[Callable[..., threading.Thread]]:
    """Starts daemon threads; joins them at the end (their loops watch ``State.stop``)."""
    started: list[tuple[threading.Thread, State]] = []

    def start(target: Callable[[], None], state: State) -> threading.Thread:
        t = threading.Thread(target=target, daemon=True)
        started.append((t, state))
        t.start()
        return t

    yield start
    for _, state in started:
        state.stop = True
    for t, _ in started:
        t.join(5)
        assert not t.is_alive()


def looper(state: State, seen: list[tuple[bool, bool]]) -> Callable[[], None]:
    """A thread of the application: each iteration records what it saw, then sleeps."""

    def loop() -> None:
        while not state.stop:
            seen.append((state.started, state.flag))
            time.sleep(0.0005)

    return loop


def wait_until(pred: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + 5
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_hold_is_available_on_this_interpreter() -> None:
    assert available()


@pytest.mark.parametrize(
    "outcome",
    [Outcome(True, None), Outcome(False, None), DumpError("criu failed")],
    ids=["restored copy", "original after leave_running", "failed dump rolled back"],
)
def test_other_threads_run_no_app_code_from_the_dump_until_the_hooks_ran(
    outcome: Outcome | Exception, threads: Callable[..., threading.Thread]
) -> None:
    state, log, seen = State(), [], []
    threads(looper(state, seen), state)
    wait_until(lambda: len(seen) > 5, "the thread to run")

    def hook() -> None:
        time.sleep(0.02)
        state.flag = True
        log.append("hook")

    coord, _ = coordinator(state, Engine(state, outcome), hook, log)
    if isinstance(outcome, Exception):
        with pytest.raises(DumpError):
            coord.checkpoint("/tmp/img")
    else:
        coord.checkpoint("/tmp/img")
    assert log == ["reseed", "hook"]
    wait_until(lambda: seen[-1] == (True, True), "the thread to go on after the hooks")
    # Never once between the start of the dump and the end of the hooks.
    assert (True, False) not in seen


def test_without_the_hold_threads_run_during_the_dump(
    threads: Callable[..., threading.Thread],
) -> None:
    state, log, seen = State(), [], []
    threads(looper(state, seen), state)
    wait_until(lambda: len(seen) > 5, "the thread to run")
    configure_hold(enabled=False)
    coord, _ = coordinator(state, Engine(state, Outcome(True, None)), lambda: None, log)
    coord.checkpoint("/tmp/img")
    assert (True, False) in seen


def test_marked_threads_go_after_torpors_resources_and_serve_the_hooks(
    threads: Callable[..., threading.Thread],
) -> None:
    state, log = State(), []
    early_seen: list[tuple[bool, bool]] = []
    held_seen: list[tuple[bool, bool]] = []
    jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def loop_thread() -> None:  # an event loop the hooks hand work to
        release_before_hooks()
        while not state.stop:
            early_seen.append((state.started, state.reseeded))
            try:
                job = jobs.get(timeout=0.001)
            except queue.Empty:
                continue
            job()

    threads(loop_thread, state)
    threads(looper(state, held_seen), state)
    wait_until(lambda: early_seen and held_seen, "the threads to run")

    def hook() -> None:
        served = threading.Event()
        jobs.put(lambda: (log.append("served"), served.set()))
        assert served.wait(3), "the marked thread did not serve the hook"
        state.flag = True
        log.append("hook")

    coord, _ = coordinator(state, Engine(state, Outcome(True, None)), hook, log)
    coord.checkpoint("/tmp/img")
    assert log == ["reseed", "served", "hook"]
    # The marked thread was held until torpor's resources were back, the other to the end.
    assert (True, False) not in early_seen
    assert (True, False) not in held_seen
    wait_until(lambda: held_seen[-1] == (True, True), "the held thread to go on")


def test_watchdog_releases_threads_a_hook_waits_for(
    threads: Callable[..., threading.Thread], caplog: pytest.LogCaptureFixture
) -> None:
    state, log = State(), []
    jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def worker() -> None:  # not marked: held to the end
        while not state.stop:
            try:
                job = jobs.get(timeout=0.001)
            except queue.Empty:
                continue
            job()

    threads(worker, state)
    configure_hold(timeout=0.3)
    waited: list[float] = []

    def hook() -> None:
        done = threading.Event()
        t0 = time.monotonic()
        jobs.put(done.set)
        assert done.wait(3), "the watchdog did not release the held thread"
        waited.append(time.monotonic() - t0)

    coord, _ = coordinator(state, Engine(state, Outcome(True, None), during=0.01), hook, log)
    with caplog.at_level(logging.WARNING, logger="torpor.coord"):
        coord.checkpoint("/tmp/img")
    assert 0.25 <= waited[0] < 2, waited
    assert [r.getMessage() for r in caplog.records] == [
        "torpor: after-restore hooks still running after 0.3 s; released the held threads "
        "(a hook waiting for another thread needs it marked with torpor.release_before_hooks())"
    ]


class Recorder(socketserver.BaseRequestHandler):
    """Application code run in the handler thread a server loop starts per connection."""

    state: State
    saw: list[tuple[bool, bool]]

    def handle(self) -> None:
        self.saw.append((self.state.started, self.state.flag))


@pytest.fixture
def server() -> Iterator[socketserver.ThreadingTCPServer]:
    """A threading TCP server whose loop runs in a thread of its own: only library code."""
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Recorder)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


def test_a_handler_thread_a_held_server_loop_starts_is_held_too(
    server: socketserver.ThreadingTCPServer,
) -> None:
    state, log = State(), []
    saw: list[tuple[bool, bool]] = []
    Recorder.state, Recorder.saw = state, saw

    def connect() -> None:  # a client arrives during the dump
        socket.create_connection(server.server_address[:2], timeout=5).close()

    def hook() -> None:
        time.sleep(0.02)
        state.flag = True

    engine = Engine(state, Outcome(True, None))
    engine.on_start = connect
    coord, _ = coordinator(state, engine, hook, log)
    coord.checkpoint("/tmp/img")
    wait_until(lambda: saw, "the handler to run")
    assert saw == [(True, True)]


def test_a_server_loop_in_the_standard_library_is_not_parked(
    server: socketserver.ThreadingTCPServer,
) -> None:
    # A hook re-creating a server stops the old one: shutdown() waits for serve_forever's loop,
    # which must not be parked (it would be, and wait for the watchdog, if library code were).
    state, log = State(), []
    configure_hold(timeout=2)
    took: list[float] = []

    def hook() -> None:
        t0 = time.monotonic()
        server.shutdown()
        took.append(time.monotonic() - t0)

    coord, _ = coordinator(state, Engine(state, Outcome(True, None)), hook, log)
    coord.checkpoint("/tmp/img")
    assert took[0] < 1, took


def test_a_threads_own_tracer_is_put_back(threads: Callable[..., threading.Thread]) -> None:
    # A debugger's or a coverage tool's trace function, set in a thread the hold takes over.
    state, log = State(), []
    calls: list[int] = []
    traced: list[bool] = []

    def tick() -> None:
        pass

    def tracer(frame: object, event: str, arg: object) -> None:
        if event == "call":
            calls.append(1)

    def worker() -> None:
        sys.settrace(tracer)
        while not state.stop:
            tick()
            traced.append(sys.gettrace() is tracer)
            time.sleep(0.001)
        sys.settrace(None)

    threads(worker, state)
    wait_until(lambda: len(calls) > 3, "the traced thread to run")
    coord, _ = coordinator(state, Engine(state, Outcome(True, None)), lambda: None, log)
    coord.checkpoint("/tmp/img")
    after = len(calls)
    wait_until(lambda: len(calls) > after + 3, "the tracer to see calls again")
    assert traced[-1] is True


class Interrupted(Exception):
    pass


def test_a_signal_handlers_exception_reaches_a_held_main_thread() -> None:
    # Ctrl-C or a SystemExit raised by a SIGTERM handler must not be lost while held.
    state, log = State(), []
    main = threading.get_ident()

    def raise_interrupted(signum: int, frame: object) -> None:
        raise Interrupted

    def signal_the_parked_main_thread() -> None:
        hold = _hold._active
        assert hold is not None
        wait_until(lambda: main in hold.parked(), "the main thread to be parked")
        os.kill(os.getpid(), signal.SIGUSR1)

    engine = Engine(state, Outcome(True, None), during=0.3)
    engine.on_start = signal_the_parked_main_thread
    coord, _ = coordinator(state, engine, lambda: None, log)
    coordinating = threading.Thread(target=coord.checkpoint, args=("/tmp/img",), daemon=True)
    old = signal.signal(signal.SIGUSR1, raise_interrupted)
    caught_during_dump = None
    try:
        coordinating.start()
        while coordinating.is_alive():
            time.sleep(0.001)
    except Interrupted:
        caught_during_dump = coordinating.is_alive()
    finally:
        signal.signal(signal.SIGUSR1, old)
        coordinating.join(5)
    assert caught_during_dump is True
    assert sys.gettrace() is None


def test_torpors_root_context_releases_marked_threads_between_its_own_and_the_apps() -> None:
    # (The module's contexts, not global_context(): that would start the channel here.)
    order = _contexts.root_context()._snapshot()
    assert len(order) == 3
    assert order[0] is _contexts.system_context()
    assert isinstance(order[1], HoldStage)
    assert order[2] is _contexts.application_context()


def test_app_code_is_told_apart_from_library_code() -> None:
    assert is_app_code(__file__)
    assert is_app_code("<string>")
    assert is_app_code(pytest.__file__)  # third-party packages are the application's
    assert not is_app_code(threading.__file__)
    assert not is_app_code(logging.__file__)
    assert not is_app_code("<frozen importlib._bootstrap>")
    assert not is_app_code(checkpoint_module.__file__)
