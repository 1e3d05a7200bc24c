"""Holding the application's other threads across a checkpoint, until the after-restore hooks ran.

CRIU restores every thread of a process at once. The thread that ran the checkpoint (the app's
own thread, or the channel thread for ``torpor checkpoint PID``) comes back in the dump call and
runs the after-restore resources; without a hold, the other threads go on at the same moment
and run application code first: they draw from the random generator before it is reseeded
(every copy of one image then draws the same numbers) and use connections the hooks have not
reopened yet. CRaC's promise is that the notifications complete before the application goes
on; this module keeps it.

How: just before the dump the checkpointing thread installs a *profile function* (the hook
``sys.setprofile`` sets) in every other Python thread. A profiled thread calls it at each
function call, return and C call; while a hold is on, the function parks the thread on a
condition variable when the event is in the application's own code. A thread running Python
parks within a few bytecodes; one blocked in a system call parks when the call returns and its
code makes its next call. Parked threads are part of the image like any blocked thread, so in a
restored copy they stay parked until the checkpointing thread releases them, in two stages:

1. threads marked with :func:`release_before_hooks` (an event loop your hooks hand work to)
   after torpor's own resources (reseed, log files, the channel);
2. every other thread after the application's hooks.

Why not by other means (measured or read in CPython 3.11's source):

- Holding the GIL through the dump does not hold anything: the resumed thread releases it at
  its first blocking call (the rest of the RPC read, opening a log file), and a thread that was
  preempted mid-line resumes as soon as it gets the GIL.
- ``threading.setprofile``/``settrace`` reach only threads started later, and
  ``threading.setprofile_all_threads`` is 3.12+. CPython's own ``_PyEval_SetProfile(tstate,
  ...)`` (what 3.12 uses) is exported in 3.11: we walk the interpreter's thread states with the
  public ``PyInterpreterState_ThreadHead``/``PyThreadState_Next``. The offsets of the profile
  and thread-id fields are not guessed: they are found once by setting a known profile object in
  a scratch thread and looking for it, and the walk is checked against ``sys._current_frames()``.
  If anything does not match, there is no hold (logged once) and the checkpoint goes on as before.
- A thread state may be freed by its thread's exit, which needs the GIL: the walk must not lose
  the GIL. A waiting thread asks the holder to drop it after the switch interval, which it reads
  when it starts waiting; so the interval is raised to ``_WALK_WINDOW`` first, old waits are let
  expire (one old interval, overlapped with the pre-dump ``gc.collect``), the cyclic collector is
  off during the walk (finalisers could release the GIL), and the interval is put back.

What is not held, on purpose: the checkpointing thread; code of the standard library and of
torpor itself (a thread parked inside ``queue``, ``logging``, ``threading`` or the import system
would hold locks the dump or a hook needs: the fork of the dump's helper takes the import and
logging locks); threads started while the hold is on, except those a held thread started (a
``ThreadingHTTPServer`` handler thread is held, a hook's own helper thread is not). A thread
spinning in pure bytecode with no calls is not parked.

A hook that waits for a held thread would wait forever: after ``timeout`` seconds (10 by
default, ``TORPOR_HOLD_TIMEOUT``) the threads are released anyway with a warning naming the fix.
``TORPOR_HOLD_THREADS=0`` or :func:`configure_hold` switches the hold off.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
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

log = logging.getLogger("torpor.coord")

_WALK_WINDOW = 0.05  # seconds of switch interval: the walk of thread states takes microseconds
_SLICE = 0.2  # parked threads re-check the watchdog this often
_SCAN_WORDS = 32  # how far into a PyThreadState the probe looks for the fields


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


# ----------------------------------------------------------------------------- CPython's side


@dataclass(frozen=True)
class _Layout:
    """Where a PyThreadState keeps its profile function, its profile object and its thread id
    (word indices), and the address of CPython's trampoline to Python profile functions."""

    func: int
    obj: int
    tid: int
    trampoline: int


class _Api:
    """The few C functions of the running interpreter the hold uses.

    A private ``PyDLL`` handle: its functions keep the GIL (``ctypes.pythonapi`` is shared, and
    its prototypes are other code's to set).
    """

    def __init__(self) -> None:
        dll = ctypes.PyDLL(None)
        vp = ctypes.c_void_p
        self.get = dll.PyThreadState_Get
        self.get.restype, self.get.argtypes = vp, []
        self.interp = dll.PyInterpreterState_Get
        self.interp.restype, self.interp.argtypes = vp, []
        self.head = dll.PyInterpreterState_ThreadHead
        self.head.restype, self.head.argtypes = vp, [vp]
        self.next = dll.PyThreadState_Next
        self.next.restype, self.next.argtypes = vp, [vp]
        self.set_profile = dll._PyEval_SetProfile
        self.set_profile.restype, self.set_profile.argtypes = ctypes.c_int, [vp, vp, vp]

    @staticmethod
    def word(tstate: int, index: int) -> int:
        return ctypes.c_size_t.from_address(tstate + index * ctypes.sizeof(ctypes.c_size_t)).value


_api: _Api | None = None
_layout: _Layout | None = None
_probed = False
_probe_lock = threading.Lock()


def _probe_layout(api: _Api) -> _Layout | None:
    """Find the fields in a scratch thread (no profiler of anyone's to disturb)."""
    found: list[_Layout | None] = [None]

    def marker(frame: FrameType, event: str, arg: object) -> None:
        """The profile object looked for; does nothing."""

    def probe() -> None:
        ts = api.get() or 0
        ident = threading.get_ident()
        sys.setprofile(marker)
        try:
            words = [api.word(ts, i) for i in range(_SCAN_WORDS)]
        finally:
            sys.setprofile(None)
        after = [api.word(ts, i) for i in range(_SCAN_WORDS)]
        objs = [i for i, w in enumerate(words) if w == id(marker)]
        tids = [i for i, w in enumerate(words) if w == ident]
        if len(objs) != 1 or len(tids) != 1 or objs[0] < 2:
            return
        obj = objs[0]
        func = obj - 2  # c_profilefunc, c_tracefunc, c_profileobj: so in 3.11 and 3.12
        if words[func] == 0 or after[func] != 0 or after[obj] != 0:
            return
        found[0] = _Layout(func=func, obj=obj, tid=tids[0], trampoline=words[func])

    t = threading.Thread(target=probe, name="torpor-hold-probe", daemon=True)
    t.start()
    t.join()
    return found[0]


def _ensure_api() -> tuple[_Api, _Layout] | None:
    global _api, _layout, _probed
    if _probed:
        return (_api, _layout) if _api is not None and _layout is not None else None
    with _probe_lock:
        if not _probed:
            try:
                api = _Api()
                layout = _probe_layout(api)
            except (AttributeError, OSError) as exc:
                api, layout = None, None
                log.info("torpor: threads cannot be held across restores here: %s", exc)
            else:
                if layout is None:
                    log.info(
                        "torpor: threads cannot be held across restores here: unknown "
                        "PyThreadState layout (Python %s)",
                        sys.version.split()[0],
                    )
            _api, _layout, _probed = api, layout, True
    return (_api, _layout) if _api is not None and _layout is not None else None


def available() -> bool:
    """Whether this interpreter lets torpor hold threads (probed once)."""
    return _ensure_api() is not None


# ----------------------------------------------------------------------------- the hold


@dataclass(frozen=True)
class _Prev:
    """The profile function a thread had before the hold (``func`` 0: none), to put back."""

    func: int
    obj: object


_NONE = _Prev(0, None)
_THREAD_START = threading.Thread.start.__code__
_active: Hold | None = None


class Hold:
    """One hold: installed before a dump, released in stages after the restore (or rollback).

    ``prepare()`` before the pre-dump memory trim, ``start()`` right before the dump, ``arm()``
    when the dump returned (starts the watchdog), ``release_stage(1)`` after torpor's own
    resources, ``release()`` at the end. ``release()`` is safe at any point and idempotent.
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._cond = threading.Condition()
        self._stage = 0  # 1: early threads go; 2: everyone goes
        self._deadline: float | None = None
        self._expired = False
        self._prev: dict[int, _Prev] = {}
        self._early_ids: set[int] = set()
        self._spawned: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        self._parked: set[int] = set()
        # The bound methods installed as profile objects, kept alive here: a thread putting
        # its old profiler back drops the reference its thread state held.
        self._profile_fn = self._profile
        self._spawn_fn = self._spawn
        self._spawn_saved: Any = None
        self._old_interval: float | None = None
        self._window_start = 0.0
        self.held: frozenset[int] = frozenset()

    # -- the checkpointing thread ------------------------------------------------------

    def prepare(self) -> None:
        """Raise the switch interval, so the walk in :meth:`start` keeps the GIL."""
        self._old_interval = sys.getswitchinterval()
        sys.setswitchinterval(max(self._old_interval, _WALK_WINDOW))
        self._window_start = time.monotonic()

    def start(self) -> bool:
        """Install the parking profile function in every other thread; False if it cannot."""
        global _active
        try:
            got = _ensure_api()
            if got is None or (_active is not None and _active._stage < 2):
                return False
            api, layout = got
            old = self._old_interval if self._old_interval is not None else _WALK_WINDOW
            # Waits that began under the old interval must have expired before the walk.
            left = old * 1.5 + 0.001 - (time.monotonic() - self._window_start)
            if left > 0:
                time.sleep(left)
            if not self._install(api, layout):
                return False
        finally:
            self._restore_interval()
        self._spawn_saved = threading.getprofile()
        threading.setprofile(self._spawn_fn)
        _active = self
        return True

    def _install(self, api: _Api, layout: _Layout) -> bool:
        me = threading.get_ident()
        frames = set(sys._current_frames())
        early = {t.ident for t in list(_early) if t.ident is not None}
        collecting = gc.isenabled()
        gc.disable()  # a finaliser could release the GIL mid-walk
        try:
            states: list[tuple[int, int, int, int]] = []
            ts = api.head(api.interp())
            while ts:
                states.append(
                    (
                        ts,
                        api.word(ts, layout.tid),
                        api.word(ts, layout.func),
                        api.word(ts, layout.obj),
                    )
                )
                ts = api.next(ts)
            ids = {tid for _, tid, _, _ in states}
            if me not in ids or not frames <= ids or len(ids) != len(states):
                log.info("torpor: thread states do not match the running threads: no hold")
                return False
            for ts, tid, func, obj in states:
                if tid == me:
                    continue
                self._prev[tid] = _previous(tid, func, obj)
                api.set_profile(ts, layout.trampoline, id(self._profile_fn))
        finally:
            if collecting:
                gc.enable()
        self.held = frozenset(self._prev)
        self._early_ids = early & self.held
        return True

    def _restore_interval(self) -> None:
        if self._old_interval is not None:
            sys.setswitchinterval(self._old_interval)
            self._old_interval = None

    def arm(self) -> None:
        """The dump returned (in the original or a copy): start the watchdog from now."""
        with self._cond:
            self._deadline = time.monotonic() + self._timeout
            self._cond.notify_all()

    def release_stage(self, stage: int) -> None:
        """Let the threads of ``stage`` go (1: marked early, 2: all)."""
        global _active
        with self._cond:
            if stage <= self._stage:
                return
            self._stage = stage
            self._cond.notify_all()
        if stage >= 2:
            if threading.getprofile() is self._spawn_fn:
                threading.setprofile(self._spawn_saved)
            if _active is self:
                _active = None

    def release(self) -> None:
        """Let every held thread go and put the switch interval back."""
        self._restore_interval()
        self.release_stage(2)

    def parked(self) -> frozenset[int]:
        """The idents of the threads parked right now."""
        with self._cond:
            return frozenset(self._parked)

    # -- the held threads --------------------------------------------------------------

    def _stage_of(self, ident: int) -> int:
        return 1 if ident in self._early_ids else 2

    def _profile(self, frame: FrameType, event: str, arg: object) -> None:
        """The profile function of held threads: park at the application's next call."""
        ident = threading.get_ident()
        if self._stage >= self._stage_of(ident):
            self._uninstall(ident)
            return
        code = frame.f_code
        if code is _THREAD_START:
            # A held thread starting a thread (a server's handler thread): hold that one too.
            if event == "call" and isinstance(
                started := frame.f_locals.get("self"), threading.Thread
            ):
                self._spawned.add(started)
            return
        if is_app_code(code.co_filename):
            self._park(ident)

    def _park(self, ident: int) -> None:
        expired = False
        with self._cond:
            self._parked.add(ident)
            try:
                while self._stage < self._stage_of(ident):
                    if self._deadline is not None and time.monotonic() >= self._deadline:
                        expired = self._expire()
                        break
                    self._cond.wait(_SLICE)
            finally:
                self._parked.discard(ident)
        if expired:
            log.warning(
                "torpor: after-restore hooks still running after %.3g s; released the held "
                "threads (a hook waiting for another thread needs it marked with "
                "torpor.release_before_hooks())",
                self._timeout,
            )
        self._uninstall(ident)

    def _expire(self) -> bool:
        """The watchdog fired (caller holds the condition): everyone goes; True the first time."""
        first = not self._expired
        self._expired = True
        self._stage = 2
        self._cond.notify_all()
        return first

    def _uninstall(self, ident: int) -> None:
        """Put back the calling thread's own profile function."""
        prev = self._prev.pop(ident, _NONE)
        got = _ensure_api()
        if got is None:  # pragma: no cover - installed means the API was there
            sys.setprofile(None)
            return
        api, _ = got
        api.set_profile(
            api.get(), prev.func or None, id(prev.obj) if prev.obj is not None else None
        )

    def _spawn(self, frame: FrameType, event: str, arg: object) -> None:
        """First event of a thread started during the hold: held if a held thread started it."""
        ident = threading.get_ident()
        # threading._active, not current_thread(): no lock, no dummy thread made here.
        thread = threading._active.get(ident)  # type: ignore[attr-defined]
        saved = self._spawn_saved
        if self._stage < 2 and thread is not None and thread in self._spawned:
            got = _ensure_api()
            trampoline = got[1].trampoline if got is not None else 0
            self._prev[ident] = _Prev(trampoline, saved) if saved is not None else _NONE
            if thread in _early:
                self._early_ids.add(ident)
            sys.setprofile(self._profile_fn)
            self._profile(frame, event, arg)
            return
        sys.setprofile(saved)


def _previous(tid: int, func: int, obj: int) -> _Prev:
    """What thread ``tid`` had as its profile function (a finished hold's left-over function
    stands for what that hold saved)."""
    prev_obj = ctypes.cast(obj, ctypes.py_object).value if obj else None
    owner = getattr(prev_obj, "__self__", None)
    if isinstance(owner, Hold):
        return owner._prev.get(tid, _NONE)
    return _Prev(func, prev_obj)


def begin(enabled: bool | None = None) -> Hold | None:
    """A new hold, prepared, when holding is on (``enabled`` None: the process setting)."""
    if not (_settings.enabled if enabled is None else enabled):
        return None
    hold = Hold(_settings.timeout)
    hold.prepare()
    return hold


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
