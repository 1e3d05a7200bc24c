"""Sessions and the condemned set: what every transfer shares with garbage collection.

Every push, pull and copy registers a session (``sessions/<id>``, a :class:`Heartbeat`)
before it reads the pool's indexes, and loads the :class:`Condemned` set right after, treating
the chunks of condemned packs as absent. :mod:`._gc` holds the protocol that makes these two
enough for a collection to run safely next to live transfers.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .._errors import PoolError
from ._backend import Backend, PoolObjectTooLargeError

SESSIONS_PREFIX = "sessions/"
CONDEMNED_KEY = "gc/condemned"
# Bounds on what these objects from outside may make us read: a beat is ~200 bytes of JSON; a
# condemned set names each pack and list id (~36 bytes) a collection deletes, a million of
# them in a 4 TiB pool.
MAX_BEAT = 64 << 10
MAX_CONDEMNED = 256 << 20


@dataclass(frozen=True)
class Timing:
    """Heartbeat period, the age after which a silent session is dead, and the polling step."""

    heartbeat: float = 30.0
    stale: float = 600.0
    poll: float = 0.5


class Heartbeat:
    """An object in the pool that says "I am alive", refreshed in the background.

    ``alive()`` is false once a collector has declared it dead (deleted its object) or once
    this process could not refresh it for half the staleness period.
    """

    def __init__(self, backend: Backend, key: str, kind: str, timing: Timing) -> None:
        self.key = key
        self._backend = backend
        self._timing = timing
        self._info = {
            "kind": kind,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_beat = time.monotonic()

    def _beat(self) -> None:
        self._backend.put(self.key, json.dumps({**self._info, "beat": time.time()}).encode())
        self._last_beat = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self._timing.heartbeat):
            try:
                if not self._backend.exists(self.key):
                    return  # declared dead by a collector: never bring it back
                self._beat()
            except PoolError:
                continue  # a missed beat; alive() notices if they keep failing

    def start(self) -> Heartbeat:
        """Store the object and start refreshing it."""
        self._beat()
        self._thread = threading.Thread(target=self._run, name="torpor-heartbeat", daemon=True)
        self._thread.start()
        return self

    def alive(self) -> bool:
        """Whether the object still stands for this process (checked against the pool)."""
        if time.monotonic() - self._last_beat > self._timing.stale / 2:
            return False
        return self._backend.exists(self.key)

    def stop(self) -> None:
        """Stop refreshing and delete the object."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        # If this fails, the object goes stale and a collector removes it.
        with contextlib.suppress(PoolError):
            self._backend.delete(self.key)

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class NoHeartbeat:
    """The session of a pool that needs none (an export or import archive)."""

    def alive(self) -> bool:
        """Always true."""
        return True

    def __enter__(self) -> NoHeartbeat:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def session(backend: Backend, kind: str, timing: Timing) -> Heartbeat:
    """A new (not yet started) session of ``kind`` (push, pull, copy, ...)."""
    return Heartbeat(backend, f"{SESSIONS_PREFIX}{uuid.uuid4().hex}", kind, timing)


@dataclass(frozen=True)
class Condemned:
    """The packs and list objects a running collection is about to delete."""

    packs: frozenset[str] = frozenset()
    lists: frozenset[str] = frozenset()

    @classmethod
    def load(cls, backend: Backend) -> Condemned:
        """The current condemned set (empty when no collection is sweeping)."""
        try:
            blob = backend.get(CONDEMNED_KEY, limit=MAX_CONDEMNED)
        except KeyError:
            return cls()
        try:
            data = json.loads(blob)
            return cls(frozenset(data["packs"]), frozenset(data["lists"]))
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            raise PoolError(
                f"{CONDEMNED_KEY} is malformed ({exc})",
                hint="run `torpor pool gc` again: it rewrites it",
            ) from exc

    def store(self, backend: Backend) -> None:
        """Publish this set; :class:`PoolError` (nothing stored) if it is over the
        :data:`MAX_CONDEMNED` bytes every transfer reads of it (:meth:`load`): stored, it
        would stop every push, pull and copy while the collection ran."""
        data = {"packs": sorted(self.packs), "lists": sorted(self.lists), "time": time.time()}
        blob = json.dumps(data).encode()
        if len(blob) > MAX_CONDEMNED:
            raise PoolError(
                f"{CONDEMNED_KEY}: this collection would condemn {len(self.packs)} packs and "
                f"{len(self.lists)} lists ({len(blob)} bytes), over the {MAX_CONDEMNED} bytes "
                "a transfer reads of it; nothing was deleted",
                hint="delete fewer images between collections; this torpor cannot collect "
                "that much at once",
            )
        backend.put(CONDEMNED_KEY, blob)


def read_beat(backend: Backend, key: str) -> dict[str, Any] | None:
    """The object of a session or lock ``key``: None once it is gone, and one that cannot be
    read as a long dead one."""
    try:
        blob = backend.get(key, limit=MAX_BEAT)
    except KeyError:
        return None
    except PoolObjectTooLargeError:
        return {"beat": 0.0}  # larger than a beat torpor writes: not one, long dead
    try:
        info: dict[str, Any] = json.loads(blob)
        float(info["beat"])
        return info
    except (ValueError, TypeError, KeyError, RecursionError):
        return {"beat": 0.0}  # unreadable: treat as long dead
