"""Built-in resources: standard-library state that is wrong in a restored copy.

They live in torpor's system context, which is told ``before_checkpoint`` after the
application's resources and ``after_restore`` before them, so the application's own hooks
already see fresh random streams and open log files. Each one can be switched off with
:func:`configure_builtins` or ``TORPOR_DISABLE_BUILTINS=name,name``.

The key fact behind most of them: CRIU restores every process with its *original pid* (inside
its PID namespace). Every fork-safety check in the standard library and in OpenSSL compares
``getpid()`` with a remembered pid, so none of them fires in a restored copy, and every copy
restored from one image starts from the same in-memory state.

``random``
    reseeds the ``random`` module's global generator from ``os.urandom`` after every restore,
    NumPy's legacy global generator (``numpy.random.seed()``) if NumPy is imported, and mixes
    fresh kernel entropy into OpenSSL's generator (``ssl.RAND_add``) if ``ssl`` is imported,
    so copies never share random streams, TLS randoms or session ids. Generators the
    application created itself (``random.Random()``, ``numpy.random.default_rng()``) are its
    own to reseed in a hook. String hashing (``PYTHONHASHSEED``) cannot be changed in a
    running interpreter: copies share the hash seed.
``uuid``
    ``uuid1()`` uses libuuid's in-process clock sequence (the same in every copy) and caches
    the host's MAC address: after a restore, the MAC cache and the last timestamp are cleared
    and uuid1 switches to Python's implementation, whose clock sequence comes from the
    reseeded ``random``. ``uuid4()`` uses ``os.urandom`` and needs nothing.
``tempfile``
    the cached random name sequence (``tempfile._name_sequence``) is keyed by pid, so copies
    would draw the same "random" names: it is dropped after a restore. ``tempfile.tempdir`` is
    kept (the application may have set it).
``platform``
    ``platform.uname()`` caches the host name and kernel release: cleared after a restore,
    since the copy may run on another host.
``logging``
    every ``logging.FileHandler`` (rotating and watched ones too) is flushed and closed
    before the checkpoint, with its lock held so no thread reopens it meanwhile, and reopened
    (appending, even if it was opened with ``mode='w'``) after restore. The image then holds no
    log file, so it restores on a host whose log file differs or was rotated. Other stream
    handlers are flushed.
``stdio``
    ``sys.stdout``/``sys.stderr`` are flushed before the checkpoint, so buffered output is not
    printed again by every restored copy.

Chosen not to touch: ``os.getpid()``-keyed caches beyond the above (the pid does not change);
``time.monotonic`` (it may jump by the time between dump and restore, or backwards on another
host unless the engine restores into a time namespace: ``restore_info()`` reports the jump);
``multiprocessing`` (its children are in the dumped tree and restored with it; its authkey is
shared by copies of one image, which is what their own children expect).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator

from .._errors import UsageError
from ._context import Context


class _Builtin:
    """A switchable built-in resource (subclasses override the two hooks)."""

    name = ""

    def __init__(self) -> None:
        self.enabled = True

    def before_checkpoint(self, context: Context) -> None:
        """Nothing to do before the checkpoint by default."""

    def after_restore(self, context: Context) -> None:
        """Nothing to do after restore by default."""


class _Random(_Builtin):
    name = "random"

    def after_restore(self, context: Context) -> None:
        if not self.enabled:
            return
        import random

        random.seed()
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()
        ssl = sys.modules.get("ssl")
        if ssl is not None:
            ssl.RAND_add(os.urandom(48), 48.0)


class _Uuid(_Builtin):
    name = "uuid"

    def after_restore(self, context: Context) -> None:
        mod = sys.modules.get("uuid")
        if not self.enabled or mod is None:
            return
        for attr in ("_node", "_last_timestamp", "_generate_time_safe"):
            if hasattr(mod, attr):
                setattr(mod, attr, None)


class _Tempfile(_Builtin):
    name = "tempfile"

    def after_restore(self, context: Context) -> None:
        mod = sys.modules.get("tempfile")
        if self.enabled and mod is not None and hasattr(mod, "_name_sequence"):
            setattr(mod, "_name_sequence", None)  # noqa: B010 - private, guarded above


class _Platform(_Builtin):
    name = "platform"

    def after_restore(self, context: Context) -> None:
        mod = sys.modules.get("platform")
        if self.enabled and mod is not None and hasattr(mod, "_uname_cache"):
            setattr(mod, "_uname_cache", None)  # noqa: B010 - private, guarded above


def _handlers() -> Iterator[logging.Handler]:
    seen: set[int] = set()
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [
        lg
        for lg in list(logging.Logger.manager.loggerDict.values())
        if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for h in list(lg.handlers):
            if id(h) not in seen:
                seen.add(id(h))
                yield h


class _Logging(_Builtin):
    name = "logging"

    def __init__(self) -> None:
        super().__init__()
        self._closed: list[logging.FileHandler] = []

    def before_checkpoint(self, context: Context) -> None:
        if not self.enabled:
            return
        self._closed = []
        for h in _handlers():
            if isinstance(h, logging.FileHandler):
                h.acquire()
                self._closed.append(h)
                if h.stream is not None:
                    h.flush()
                    h.stream.close()
                    # FileHandler.emit reopens a None stream lazily; the held lock keeps other
                    # threads from doing so before the dump.
                    h.stream = None
                if h.mode == "w":
                    h.mode = "a"
            elif isinstance(h, logging.StreamHandler):
                h.flush()

    def after_restore(self, context: Context) -> None:
        closed, self._closed = self._closed, []
        failures = []
        for h in closed:
            try:
                if h.stream is None:
                    h.stream = h._open()
            except OSError as exc:
                exc.add_note(f"reopening log file {h.baseFilename}")
                failures.append(exc)
            finally:
                h.release()
        if failures:
            raise failures[0] if len(failures) == 1 else ExceptionGroup("log files", failures)


class _Stdio(_Builtin):
    name = "stdio"

    def before_checkpoint(self, context: Context) -> None:
        if not self.enabled:
            return
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                try:
                    stream.flush()
                except (OSError, ValueError):
                    continue


# Registration order = after-restore order: random first, since the others may draw from it.
_BUILTINS: dict[str, _Builtin] = {
    b.name: b for b in (_Random(), _Uuid(), _Tempfile(), _Platform(), _Logging(), _Stdio())
}


def install(context: Context) -> None:
    """Register the built-in resources (strongly) in torpor's system context."""
    off = os.environ.get("TORPOR_DISABLE_BUILTINS", "")
    for name in filter(None, (n.strip() for n in off.split(","))):
        if name in _BUILTINS:
            _BUILTINS[name].enabled = False
    for builtin in _BUILTINS.values():
        context._register_strong(builtin)


def configure_builtins(**enabled: bool) -> dict[str, bool]:
    """Switch built-in resources on or off by name; return the state of all of them.

    Names: ``random``, ``uuid``, ``tempfile``, ``platform``, ``logging``, ``stdio``.
    ``configure_builtins()`` with no arguments only reports.
    """
    unknown = set(enabled) - set(_BUILTINS)
    if unknown:
        raise UsageError(
            f"unknown built-in resource(s): {', '.join(sorted(unknown))}",
            hint=f"known: {', '.join(_BUILTINS)}",
        )
    for name, on in enabled.items():
        _BUILTINS[name].enabled = bool(on)
    return {name: b.enabled for name, b in _BUILTINS.items()}
