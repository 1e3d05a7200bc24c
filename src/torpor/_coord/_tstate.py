"""Setting a trace function in *other* threads, for the restore hold (:mod:`._hold`).

``sys.settrace`` and ``threading.settrace`` reach only the calling thread and threads started
later; ``threading.settrace_all_threads`` is 3.12+. CPython 3.11 exports what 3.12 builds that
on: ``_PyEval_SetTrace(tstate, func, obj)``, and the public ``PyInterpreterState_ThreadHead`` /
``PyThreadState_Next`` walk the interpreter's thread states. What is not public is where a
thread state keeps its trace function, trace object and thread id, and the address of the
trampoline through which CPython calls a Python trace function; they are not guessed but probed
once, in a scratch thread: it calls ``sys.settrace`` with a known object and looks for it (and
for its own thread id) in its thread state. The walk is then checked against
``sys._current_frames()``. Any mismatch means no hold.

The trace function is set as ``sys.settrace`` would set it (trampoline and Python callable), so
an exception it raises (a signal handler's, run while the thread waits in it) propagates into
the traced frame as usual. The trampoline sends line events only to frames whose ``f_trace`` is
set: the hold sets it on every frame of the threads' stacks, so a thread that was blocked in a
system call stops at the next line after the call returns.

A thread state is freed when its thread ends, which needs the GIL; the walk must therefore not
lose the GIL. A waiting thread asks the holder to drop it after the switch interval, which it
reads when it starts to wait. :class:`GilWindow` raises the interval, lets the waits begun under
the old one expire, and turns the cyclic collector off during the walk (a finaliser could
release the GIL); the interval is put back right after. Audit hooks run inside
``_PyEval_SetTrace`` (event ``sys.settrace``): one that blocks would break this, as would a
signal handler of the main thread that does I/O mid-walk.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger("torpor.coord")

# The switch interval during the walk: ten times what a walk was measured to take (6-15 us a
# thread), at least 10 ms. It is also how long the checkpointing thread may wait for the GIL
# behind a CPU-bound thread before the walk.
_WINDOW_MIN = 0.01
_WINDOW_PER_THREAD = 100e-6
_SCAN_WORDS = 32  # how far into a PyThreadState the probe looks


@dataclass(frozen=True)
class _Layout:
    """Word indices of c_tracefunc, c_traceobj and thread_id in a PyThreadState, and the
    address of CPython's trampoline to Python trace functions."""

    func: int
    obj: int
    tid: int
    trampoline: int


@dataclass(frozen=True)
class Tracer:
    """A thread's trace function as CPython holds it: the C function's address (0: none) and
    its object (``sys.settrace``'s callable for Python-level tracers)."""

    func: int
    obj: object


NO_TRACER = Tracer(0, None)


@dataclass(frozen=True)
class ThreadState:
    """One thread state of the walk."""

    address: int
    ident: int
    tracer: Tracer


class _Api:
    """The running interpreter's C functions, through a private ``PyDLL`` handle: its calls keep
    the GIL, and ``ctypes.pythonapi``'s prototypes are shared with other code."""

    def __init__(self) -> None:
        dll = ctypes.PyDLL(None)
        vp = ctypes.c_void_p
        self.current = dll.PyThreadState_Get
        self.current.restype, self.current.argtypes = vp, []
        self.interp = dll.PyInterpreterState_Get
        self.interp.restype, self.interp.argtypes = vp, []
        self.head = dll.PyInterpreterState_ThreadHead
        self.head.restype, self.head.argtypes = vp, [vp]
        self.next = dll.PyThreadState_Next
        self.next.restype, self.next.argtypes = vp, [vp]
        self.set_trace = dll._PyEval_SetTrace
        self.set_trace.restype, self.set_trace.argtypes = ctypes.c_int, [vp, vp, vp]

    @staticmethod
    def word(address: int, index: int) -> int:
        return ctypes.c_size_t.from_address(address + index * ctypes.sizeof(ctypes.c_size_t)).value


class Access:
    """Reading and setting other threads' trace functions (see the module docstring)."""

    def __init__(self, api: _Api, layout: _Layout) -> None:
        self._api = api
        self._layout = layout

    def thread_states(self) -> list[ThreadState] | None:
        """Every thread state of this interpreter, or None when they do not match the running
        threads. Call inside a :class:`GilWindow`."""
        api, lay = self._api, self._layout
        states: list[ThreadState] = []
        frames = set(sys._current_frames())
        ts = api.head(api.interp())
        while ts:
            func, obj = api.word(ts, lay.func), api.word(ts, lay.obj)
            held = ctypes.cast(obj, ctypes.py_object).value if obj else None
            states.append(ThreadState(ts, api.word(ts, lay.tid), Tracer(func, held)))
            ts = api.next(ts)
        ids = {s.ident for s in states}
        if threading.get_ident() not in ids or not frames <= ids or len(ids) != len(states):
            return None
        return states

    def python_tracer(self, func: object) -> Tracer:
        """What ``sys.settrace(func)`` sets (``func`` None: no tracer)."""
        return Tracer(self._layout.trampoline, func) if func is not None else NO_TRACER

    def set_trace(self, state: ThreadState, func: object) -> None:
        """``sys.settrace(func)`` in thread ``state`` (inside the same :class:`GilWindow`)."""
        self._api.set_trace(state.address, self._layout.trampoline, id(func))

    def set_own_trace(self, tracer: Tracer) -> None:
        """Set the calling thread's trace function back to ``tracer``."""
        obj = tracer.obj
        self._api.set_trace(
            self._api.current(), tracer.func or None, id(obj) if obj is not None else None
        )


_access: Access | None = None
_probed = False
_probe_lock = threading.Lock()


def _probe(api: _Api) -> _Layout | None:
    """Find the fields in a scratch thread (so no tracer of anyone's is disturbed)."""
    found: list[_Layout | None] = [None]

    def marker(frame: FrameType, event: str, arg: object) -> None:
        """The trace object looked for; does nothing."""

    def probe() -> None:
        ts = api.current() or 0
        ident = threading.get_ident()
        sys.settrace(marker)
        try:
            words = [api.word(ts, i) for i in range(_SCAN_WORDS)]
        finally:
            sys.settrace(None)
        after = [api.word(ts, i) for i in range(_SCAN_WORDS)]
        objs = [i for i, w in enumerate(words) if w == id(marker)]
        tids = [i for i, w in enumerate(words) if w == ident]
        if len(objs) != 1 or len(tids) != 1 or objs[0] < 2:
            return
        obj = objs[0]
        func = obj - 2  # c_profilefunc, c_tracefunc, c_profileobj, c_traceobj (3.11, 3.12)
        if words[func] == 0 or after[func] != 0 or after[obj] != 0:
            return
        found[0] = _Layout(func=func, obj=obj, tid=tids[0], trampoline=words[func])

    t = threading.Thread(target=probe, name="torpor-hold-probe", daemon=True)
    t.start()
    t.join()
    return found[0]


def access() -> Access | None:
    """The thread-state access, or None where it cannot work (probed once per process)."""
    global _access, _probed
    if _probed:
        return _access
    with _probe_lock:
        if not _probed:
            try:
                api = _Api()
                layout = _probe(api)
            except (AttributeError, OSError) as exc:
                log.info("torpor: threads cannot be held across restores here: %s", exc)
            else:
                if layout is not None:
                    _access = Access(api, layout)
                else:
                    log.info(
                        "torpor: threads cannot be held across restores here: unknown "
                        "PyThreadState layout (Python %s)",
                        sys.version.split()[0],
                    )
            _probed = True
    return _access


class GilWindow:
    """Keeps the GIL through a walk of thread states (see the module docstring).

    ``open()`` raises the switch interval; ``enter()`` waits until every wait begun under the
    old interval has expired (time since ``open()`` counts: overlap it with other work) and
    stops the cyclic collector; ``close()`` puts both back. ``close()`` is idempotent.
    """

    def __init__(self) -> None:
        self._old: float | None = None
        self._opened = 0.0
        self._collecting = False

    def open(self) -> None:
        """Raise the switch interval (for as many threads as run now)."""
        self._old = sys.getswitchinterval()
        window = max(_WINDOW_MIN, _WINDOW_PER_THREAD * threading.active_count())
        sys.setswitchinterval(max(self._old, window))
        self._opened = time.monotonic()

    def enter(self) -> None:
        """Wait out the old interval's waits; stop the collector."""
        old = self._old if self._old is not None else 0.0
        left = old * 1.5 + 0.001 - (time.monotonic() - self._opened)
        if left > 0:
            time.sleep(left)
        self._collecting = gc.isenabled()
        gc.disable()

    def close(self) -> None:
        """Collector and switch interval back as they were."""
        if self._collecting:
            gc.enable()
            self._collecting = False
        if self._old is not None:
            sys.setswitchinterval(self._old)
            self._old = None
