"""Holding the application's other threads across a checkpoint, until the after-restore hooks ran.

CRIU restores every thread of a process at once. The thread that ran the checkpoint (the app's
own thread, or the channel thread for ``torpor checkpoint PID``) comes back in the dump call and
runs the after-restore resources; without a hold, the other threads go on at the same moment
and run application code first: they draw from the random generator before it is reseeded
(every copy of one image then draws the same numbers) and use connections the hooks have not
reopened yet. CRaC's promise is that the notifications complete before the application goes
on; this module keeps it.

How: just before the dump, the checkpointing thread sets a trace function (what
``sys.settrace`` sets) in every other Python thread and on every frame of their stacks
(:mod:`._tstate`). CPython calls it at each new line and each call and return; while a hold is
on it parks the thread on a condition variable when that code is the application's. A thread
running Python parks at its next line; one blocked in a system call parks at the line after the
call returns. An exception a signal handler raises in a parked main thread (Ctrl-C, a
``SystemExit`` on SIGTERM) goes on into the application's frame as it would have. Parked
threads are in the image like any blocked thread, so in a restored copy they stay parked until
the checkpointing thread releases them, in two stages:

1. threads marked with :func:`release_before_hooks` (an event loop your hooks hand work to)
   after torpor's own resources (reseed, log files, the channel);
2. every other thread after the application's hooks.

The same holds in the original after ``leave_running`` and through the rollback of a failed
dump. Each thread gets its own trace function (a debugger's, a coverage tool's) back at its
first event after the release.

Holding the GIL through the dump, the other way one might think of, holds nothing: the resumed
thread releases it at its first blocking call (the rest of the RPC read, opening a log file),
and a thread preempted mid-line resumes as soon as it gets the GIL.

Not held, on purpose: the checkpointing thread; code of the standard library and of torpor
itself (a thread parked inside ``queue``, ``logging``, ``threading`` or the import system would
hold locks the dump or a hook needs: the fork of the dump's helper takes the import and logging
locks), so such a thread runs on until it is back in application code; threads started while
the hold is on, except those a held thread started (a ``ThreadingHTTPServer`` handler thread is
held, a hook's own helper thread is not).

A hook that waits for a held thread would wait forever: after ``timeout`` seconds (10 by
default, ``TORPOR_HOLD_TIMEOUT``) the threads are released anyway, with a warning naming the
fix. ``TORPOR_HOLD_THREADS=0`` or :func:`configure_hold` switches the hold off. Where the
interpreter's thread states cannot be read (another CPython version's layout), there is no hold
(logged once at INFO) and checkpoints work as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import sysconfig
import threading
import time
import weakref
from dataclasses import dataclass
from types import FrameType
from typing import Any

from .._errors import UsageError
from ._context import Context
from ._tstate import NO_TRACER, GilWindow, ThreadState, Tracer, access

log = logging.getLogger("torpor.coord")


@dataclass
class _Settings:
    enabled: bool
    timeout: float


def _env_settings() -> _Settings:
    enabled = os.environ.get("TORPOR_HOLD_THREADS", "1").strip().lower() not in (
        "0",
        "off",
        "no",
        "false",
    )
    try:
        timeout = float(os.environ.get("TORPOR_HOLD_TIMEOUT", "10"))
    except ValueError:
        timeout = 10.0
    return _Settings(enabled, timeout if timeout > 0 else 10.0)


_settings = _env_settings()


def configure_hold(
    *, enabled: bool | None = None, timeout: float | None = None
) -> tuple[bool, float]:
    """Switch the restore hold on or off, set its watchdog ``timeout`` (seconds); return both.

    With the hold on (the default), the application's other threads do not run between a
    checkpoint and the end of the after-restore hooks. ``configure_hold()`` only reports.
    """
    if timeout is not None:
        if not timeout > 0:
            raise UsageError(
                f"hold timeout must be positive, not {timeout!r}",
                hint="switch the hold off with configure_hold(enabled=False) instead",
            )
        _settings.timeout = float(timeout)
    if enabled is not None:
        _settings.enabled = bool(enabled)
    return _settings.enabled, _settings.timeout


_early: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def release_before_hooks(thread: threading.Thread | None = None) -> None:
    """Release ``thread`` (default: the calling one) after torpor's built-in resources, before
    the application's after-restore hooks, instead of after them.

    For threads your hooks wait on, such as the event loop thread a hook hands work to with
    ``asyncio.run_coroutine_threadsafe(...).result()``: held to the end, it could not serve them.
    """
    _early.add(thread if thread is not None else threading.current_thread())


# ----------------------------------------------------------------------------- where to park


def _own_roots() -> tuple[str, ...]:
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]  # the torpor package
    with contextlib.suppress(ImportError):
        import snapshot_restore_py

        roots.append(os.path.dirname(os.path.abspath(snapshot_restore_py.__file__)))
    return tuple(r.rstrip(os.sep) + os.sep for r in roots)


def _stdlib_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {os.path.abspath(paths[k]) for k in ("stdlib", "platstdlib") if k in paths}
    return tuple(r.rstrip(os.sep) + os.sep for r in sorted(roots))


_OWN = _own_roots()
_STDLIB = _stdlib_roots()
_PACKAGE_DIRS = ("site-packages", "dist-packages")
_is_app_cache: dict[str, bool] = {}


def is_app_code(filename: str) -> bool:
    """Whether code from ``filename`` is the application's (where held threads may park): not
    torpor's, not the standard library's (frozen modules included); third-party packages are."""
    cached = _is_app_cache.get(filename)
    if cached is None:
        cached = _classify(filename)
        _is_app_cache[filename] = cached
    return cached


def _classify(filename: str) -> bool:
    if filename.startswith("<"):
        # "<frozen importlib._bootstrap>" is the import system; "<string>", "<stdin>" are the
        # application's exec'd code.
        return not filename.startswith("<frozen ")
    path = os.path.abspath(filename)
    if path.startswith(_OWN):
        return False
    for root in _STDLIB:
        if path.startswith(root):
            # A venv's or the base interpreter's site-packages sit under the stdlib's roots.
            return path[len(root) :].split(os.sep, 1)[0] in _PACKAGE_DIRS
    return True


# ----------------------------------------------------------------------------- the hold

_SLICE = 0.2  # parked threads re-check the watchdog this often
_THREAD_START = threading.Thread.start.__code__
_active: Hold | None = None


class Hold:
    """One hold: set before a dump, released in stages after the restore (or the rollback).

    ``begin()`` makes one and opens the GIL window before the pre-dump memory trim;
    ``start()`` right before the dump; ``arm()`` when the dump returned (starts the watchdog);
    ``release_stage(1)`` after torpor's own resources; ``release()`` at the end (safe at any
    point, idempotent).
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._window = GilWindow()
        self._cond = threading.Condition()
        self._stage = 0  # 1: early threads go; 2: everyone goes
        self._deadline: float | None = None
        self._expired = False
        self._prev: dict[int, Tracer] = {}  # each held thread's own tracer, to put back
        self._frames: dict[int, list[tuple[FrameType, Any]]] = {}  # and its frames' f_trace
        self._early_ids: set[int] = set()
        self._spawned: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        self._parked: set[int] = set()
        # The bound methods installed as trace functions, kept alive here: a thread taking its
        # own tracer back drops the reference its thread state held.
        self._trace_fn = self._trace
        self._spawn_fn = self._spawn
        self._spawn_saved: Any = None
        self.held: frozenset[int] = frozenset()

    # -- the checkpointing thread ------------------------------------------------------

    def start(self) -> bool:
        """Set the parking trace function in every other thread; False if it cannot be."""
        global _active
        acc = access()
        try:
            if acc is None or (_active is not None and _active._stage < 2):
                return False
            self._window.enter()
            states = acc.thread_states()
            if states is None:
                log.info("torpor: thread states do not match the running threads: no hold")
                return False
            me = threading.get_ident()
            for state in states:
                if state.ident != me:
                    self._prev[state.ident] = _own_tracer(state)
                    acc.set_trace(state, self._trace_fn)
            for ident, top in sys._current_frames().items():
                if ident in self._prev:
                    self._frames[ident] = self._trace_frames(top)
        finally:
            self._window.close()
        self.held = frozenset(self._prev)
        self._early_ids = {t.ident for t in list(_early) if t.ident in self.held}
        self._spawn_saved = threading.gettrace()
        threading.settrace(self._spawn_fn)
        _active = self
        return True

    def _trace_frames(self, top: FrameType | None) -> list[tuple[FrameType, Any]]:
        """Have line events in every frame of a stack; return the frames' own f_trace."""
        saved = []
        frame = top
        while frame is not None:
            old = frame.f_trace
            saved.append((frame, None if isinstance(getattr(old, "__self__", None), Hold) else old))
            frame.f_trace = self._trace_fn
            frame = frame.f_back
        return saved

    def arm(self) -> None:
        """The dump returned (in the original or a copy): the watchdog counts from now."""
        with self._cond:
            self._deadline = time.monotonic() + self._timeout
            self._cond.notify_all()

    def release_stage(self, stage: int) -> None:
        """Let the threads of ``stage`` go (1: those marked early, 2: all)."""
        global _active
        with self._cond:
            if stage <= self._stage:
                return
            self._stage = stage
            self._cond.notify_all()
        if stage >= 2:
            if threading.gettrace() is self._spawn_fn:
                threading.settrace(self._spawn_saved)
            if _active is self:
                _active = None

    def release(self) -> None:
        """Let every held thread go; the GIL window is closed if still open."""
        self._window.close()
        self.release_stage(2)

    def parked(self) -> frozenset[int]:
        """The idents of the threads parked right now."""
        with self._cond:
            return frozenset(self._parked)

    # -- the held threads --------------------------------------------------------------

    def _trace(self, frame: FrameType, event: str, arg: object) -> Any:
        """The trace function of held threads: park at the application's next line or call."""
        ident = threading.get_ident()
        if self._stage >= (1 if ident in self._early_ids else 2):
            return self._uninstall(ident, frame, event, arg)
        code = frame.f_code
        if code is _THREAD_START:
            # A held thread starting a thread (a server's handler thread): hold that one too.
            started = frame.f_locals.get("self") if event == "call" else None
            if isinstance(started, threading.Thread):
                self._spawned.add(started)
        elif is_app_code(code.co_filename):
            self._park(ident, frame)
            return self._uninstall(ident, frame, event, arg)
        return self._trace_fn

    def _park(self, ident: int, frame: FrameType) -> None:
        stage = 1 if ident in self._early_ids else 2
        expired = False
        with self._cond:
            self._parked.add(ident)
            try:
                while self._stage < stage:
                    if self._deadline is not None and time.monotonic() >= self._deadline:
                        expired = self._expire()
                        break
                    self._cond.wait(_SLICE)
            except BaseException:
                # A signal handler's exception (KeyboardInterrupt, SystemExit): it goes on
                # into the application's frame, and this thread is no longer held.
                self._uninstall(ident, frame, "exception", None)
                raise
            finally:
                self._parked.discard(ident)
        if expired:
            log.warning(
                "torpor: after-restore hooks still running after %.3g s; released the held "
                "threads (a hook waiting for another thread needs it marked with "
                "torpor.release_before_hooks())",
                self._timeout,
            )

    def _expire(self) -> bool:
        """The watchdog fired (caller holds the condition): all go. True the first time."""
        first = not self._expired
        self._expired = True
        self._stage = 2
        self._cond.notify_all()
        return first

    def _uninstall(self, ident: int, frame: FrameType, event: str, arg: object) -> Any:
        """Give the calling thread its own tracer and its frames their own f_trace back; the
        return value is what the trampoline keeps as ``frame``'s local trace function."""
        if getattr(frame.f_trace, "__self__", None) is self:
            frame.f_trace = None  # a frame entered while held
        for f, old in self._frames.pop(ident, ()):
            f.f_trace = old
        prev = self._prev.pop(ident, None)
        acc = access()
        if prev is None or acc is None:
            return None  # already put back (an outer frame entered while held)
        acc.set_own_trace(prev)
        if event == "call" and prev.func and callable(prev.obj):
            # The thread's own Python tracer would have seen this call: hand it over.
            return prev.obj(frame, event, arg)
        return None

    def _spawn(self, frame: FrameType, event: str, arg: object) -> Any:
        """First event of a thread started during the hold: held if a held thread started it."""
        ident = threading.get_ident()
        # threading._active, not current_thread(): no lock taken, no dummy thread made.
        thread = threading._active.get(ident)  # type: ignore[attr-defined]
        saved = self._spawn_saved
        acc = access()
        if self._stage < 2 and acc is not None and thread in self._spawned:
            self._prev[ident] = acc.python_tracer(saved)
            if thread in _early:
                self._early_ids.add(ident)
            sys.settrace(self._trace_fn)
            return self._trace(frame, event, arg)
        sys.settrace(saved)
        # The saved hook (a coverage tool's, say) would have seen this first call.
        return saved(frame, event, arg) if saved is not None else None


def _own_tracer(state: ThreadState) -> Tracer:
    """A thread's own tracer (a finished hold's function, left in a thread that had no event
    since, stands for what that hold saved)."""
    owner = getattr(state.tracer.obj, "__self__", None)
    if isinstance(owner, Hold):
        return owner._prev.get(state.ident, NO_TRACER)
    return state.tracer


def begin(enabled: bool | None = None) -> Hold | None:
    """A new hold when holding is on (``enabled`` None: the process setting), its GIL window
    opened: call :meth:`Hold.start` once other pre-dump work has let the old waits expire."""
    if not (_settings.enabled if enabled is None else enabled):
        return None
    hold = Hold(_settings.timeout)
    hold._window.open()
    return hold


def available() -> bool:
    """Whether this interpreter lets torpor hold threads (probed once)."""
    return access() is not None


class HoldStage:
    """Sits in the root context between torpor's resources and the application's: its
    ``after_restore`` releases the threads marked with :func:`release_before_hooks`."""

    def before_checkpoint(self, context: Context) -> None:
        """Nothing to do before the checkpoint."""

    def after_restore(self, context: Context) -> None:
        """torpor's own resources are back: release the early threads."""
        hold = _active
        if hold is not None:
            hold.release_stage(1)
