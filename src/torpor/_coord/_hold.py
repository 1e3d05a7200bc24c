"""Holding the application's other threads across a checkpoint, until the after-restore hooks ran.

CRIU restores every thread of a process at once. The thread that ran the checkpoint (the app's
own thread, or the channel thread for ``torpor checkpoint PID``) comes back in the dump call and
runs the after-restore resources; without a hold, the other threads go on at the same moment
and run application code first: they draw from the random generator before it is reseeded
(every copy of one image then draws the same numbers) and use connections the hooks have not
reopened yet. CRaC's promise is that the notifications complete before the application goes
on; this module keeps it.

How: just before the dump, the checkpointing thread sets a C-level trace function in every
other Python thread (:mod:`._tstate`). CPython calls it at each new line and each call and
return; while a hold is on it parks the thread on a condition variable when that code is the
application's. A thread running Python parks at its next line; one blocked in a system call
parks at the line after the call returns. Parked threads are in the image like any blocked
thread, so in a restored copy they stay parked until the checkpointing thread releases them,
in two stages:

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

import _thread
import contextlib
import logging
import os
import sys
import sysconfig
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Any

from .._errors import UsageError
from ._context import Context
from ._tstate import (
    NO_TRACER,
    TRACEFUNC,
    Access,
    GilWindow,
    ThreadState,
    Tracer,
    access,
    callback_address,
)

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
Restore = Callable[[], None]


def _on_event(hold: Hold, frame: FrameType, what: int, arg: int | None) -> int:
    # Exceptions raised here would be printed and dropped by ctypes: _event raises none.
    hold._event(frame, what)
    return 0


_CALLBACK = TRACEFUNC(_on_event)


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
        self._interrupted = False
        self._restore: dict[int, Restore] = {}
        self._early_ids: set[int] = set()
        self._spawned: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        self._parked: set[int] = set()
        # Installed as threading's trace hook; kept here so it stays alive while installed.
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
            callback = callback_address(_CALLBACK)
            for state in states:
                if state.ident != me:
                    self._restore[state.ident] = _restorer(acc, state)
                    acc.set_trace(state, callback, self)
        finally:
            self._window.close()
        self.held = frozenset(self._restore)
        self._early_ids = {t.ident for t in list(_early) if t.ident in self.held}
        self._spawn_saved = threading.gettrace()
        threading.settrace(self._spawn_fn)
        _active = self
        return True

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
            if self._interrupted:
                _thread.interrupt_main()  # a Ctrl-C that came while the main thread was held

    def release(self) -> None:
        """Let every held thread go; the GIL window is closed if still open."""
        self._window.close()
        self.release_stage(2)

    def parked(self) -> frozenset[int]:
        """The idents of the threads parked right now."""
        with self._cond:
            return frozenset(self._parked)

    # -- the held threads --------------------------------------------------------------

    def _event(self, frame: FrameType, what: int) -> None:
        """Every trace event of a held thread: park at the application's next line or call."""
        ident = threading.get_ident()
        if self._stage >= (1 if ident in self._early_ids else 2):
            self._uninstall(ident)
            return
        code = frame.f_code
        if code is _THREAD_START:
            # A held thread starting a thread (a server's handler thread): hold that one too.
            started = frame.f_locals.get("self") if what == 0 else None
            if isinstance(started, threading.Thread):
                self._spawned.add(started)
            return
        if is_app_code(code.co_filename):
            self._park(ident)

    def _park(self, ident: int) -> None:
        stage = 1 if ident in self._early_ids else 2
        expired = False
        with self._cond:
            self._parked.add(ident)
            try:
                while self._stage < stage:
                    if self._deadline is not None and time.monotonic() >= self._deadline:
                        expired = self._expire()
                        break
                    try:
                        self._cond.wait(_SLICE)
                    except KeyboardInterrupt:
                        # ctypes would print and drop it: delivered again on release.
                        self._interrupted = True
            finally:
                self._parked.discard(ident)
        if expired:
            log.warning(
                "torpor: after-restore hooks still running after %.3g s; released the held "
                "threads (a hook waiting for another thread needs it marked with "
                "torpor.release_before_hooks())",
                self._timeout,
            )
            if self._interrupted:
                _thread.interrupt_main()
        self._uninstall(ident)

    def _expire(self) -> bool:
        """The watchdog fired (caller holds the condition): all go. True the first time."""
        first = not self._expired
        self._expired = True
        self._stage = 2
        self._cond.notify_all()
        return first

    def _uninstall(self, ident: int) -> None:
        """Give the calling thread its own trace function back."""
        restore = self._restore.pop(ident, None)
        if restore is not None:
            restore()
            return
        acc = access()
        if acc is not None:
            acc.set_own_trace(NO_TRACER)

    def _spawn(self, frame: FrameType, event: str, arg: object) -> Any:
        """First event of a thread started during the hold: held if a held thread started it."""
        ident = threading.get_ident()
        # threading._active, not current_thread(): no lock taken, no dummy thread made.
        thread = threading._active.get(ident)  # type: ignore[attr-defined]
        saved = self._spawn_saved
        acc = access()
        if self._stage < 2 and acc is not None and thread in self._spawned:
            self._restore[ident] = partial(sys.settrace, saved)
            if thread in _early:
                self._early_ids.add(ident)
            acc.set_own_trace(Tracer(callback_address(_CALLBACK), self))
            self._event(frame, 0)
            return None
        sys.settrace(saved)
        # The saved hook (a coverage tool's, say) would have seen this first call.
        return saved(frame, event, arg) if saved is not None else None


def _restorer(acc: Access, state: ThreadState) -> Restore:
    """What puts back thread ``state``'s trace function (a finished hold's function, left in a
    thread that had no event since, stands for what that hold saved)."""
    owner = state.tracer.obj
    if isinstance(owner, Hold):
        return owner._restore.get(state.ident) or partial(acc.set_own_trace, NO_TRACER)
    return partial(acc.set_own_trace, state.tracer)


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
