"""Fencing: the lease a supervisor holds on a process name in a shared pool.

While host A's supervisor runs process N from pool P, it holds the lease on N in P (object
``leases/N``) and renews it every ``duration / 3``. Host B's ``torpor resume N@P`` acquires the
same lease first: refused while A holds it, granted once it expires (A died, or lost the
network), or at once with ``force`` (which can leave two live copies if A still runs N).

Each driver uses its store's own primitive, never a home-made consensus (details and who
judges expiry in :mod:`torpor._pools._leases`): ``dir`` pools an ``flock`` that lasts as long
as its holder's fd (so the lease ends when the holder dies, never by time, and ``force``
cannot break it: the kernel gives no way to take a flock from a live process); ``ceph`` pools
an exclusive RADOS object lock with a duration, expired by the OSD, broken with
``break_lock``; ``s3`` pools conditional PUTs (``If-None-Match: *`` / ``If-Match: ETAG``),
expired by the server's clock.

Renewal fails with :class:`LeaseLostError` once the lease is no longer ours: taken by someone
else (after it expired, or by force), or lapsed — someone may have judged it free meanwhile, so
a lapsed lease is never silently taken back. The holder must then stop running N.

The lease's handle is the holder's: a ``dir`` lease's fd is close-on-exec, so a subprocess
(the restored app, a CLI step) never keeps the lease alive after its holder dies.

Errors::

    TorporError
    ├── LeaseHeldError     someone else holds the lease (``holder``, ``expires_in``, ``pool``)
    └── LeaseLostError     a lease we held was taken or lapsed (``pool``, ``name``)
"""

from __future__ import annotations

import math
import os
import socket
import threading
from types import TracebackType
from typing import TYPE_CHECKING, cast

from .. import _paths
from .._errors import PoolError, TorporError, UsageError
from .._images._store import check_name
from .._pools._leases import LEASES_PREFIX, MAX_HOLDER, LeaseHandle, LeaseStore, clean_holder
from .._pools._leases import LeaseInfo as LeaseInfo

if TYPE_CHECKING:
    from .._pools._pool import Pool

DEFAULT_DURATION = 15.0
MAX_DURATION = 86400.0

__all__ = [
    "DEFAULT_DURATION",
    "Lease",
    "LeaseHeldError",
    "LeaseInfo",
    "LeaseLostError",
    "acquire",
    "holder",
    "local_holder",
]


class LeaseHeldError(TorporError):
    """The lease on a process name is held by someone else.

    ``holder`` names them (``"<hostname> <home> pid <pid>"``); ``expires_in`` is how many
    seconds are left as the store judges it, or None when the lease lasts until its holder dies
    (``dir`` pools); ``pool`` and ``name`` say which lease.
    """

    def __init__(
        self,
        msg: str,
        *,
        holder: str,
        expires_in: float | None,
        pool: str,
        name: str,
        hint: str | None = None,
    ) -> None:
        super().__init__(msg, hint=hint)
        self.holder = holder
        self.expires_in = expires_in
        self.pool = pool
        self.name = name


class LeaseLostError(TorporError):
    """A lease this process held was taken by someone else, or lapsed."""

    def __init__(self, msg: str, *, pool: str, name: str, hint: str | None = None) -> None:
        super().__init__(msg, hint=hint)
        self.pool = pool
        self.name = name


class Lease:
    """The lease on process ``name`` in pool ``pool``, held by ``holder``: renew it at least
    every ``duration`` seconds (every third of it is safe), release it when done. Usable as a
    context manager (released on exit). Thread-safe."""

    def __init__(
        self, handle: LeaseHandle, *, pool: str, name: str, holder: str, duration: float
    ) -> None:
        self._handle = handle
        self._lock = threading.Lock()
        self._released = False
        self.pool = pool
        self.name = name
        self.holder = holder
        self.duration = duration

    def __repr__(self) -> str:
        return f"<Lease {self.name!r} in pool {self.pool!r} by {self.holder!r}>"

    def renew(self) -> None:
        """Extend the lease by its duration; :class:`LeaseLostError` if it is no longer ours
        (taken by someone else, or lapsed)."""
        with self._lock:
            if self._released:
                raise LeaseLostError(
                    f"lease on process {self.name} in pool {self.pool} was released here",
                    pool=self.pool,
                    name=self.name,
                    hint="acquire it again",
                )
            if self._handle.renew():
                return
        raise LeaseLostError(
            f"lease on process {self.name} in pool {self.pool} is lost: it lapsed or was"
            " taken by another holder",
            pool=self.pool,
            name=self.name,
            hint=f"stop running {self.name} here: another host may run it now",
        )

    def release(self) -> None:
        """Give the lease up; a no-op once released (or if it was taken meanwhile)."""
        with self._lock:
            if self._released:
                return
            self._released = True
            self._handle.release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def local_holder(pid: int | None = None) -> str:
    """This host's holder string: ``"<hostname> <torpor home> pid <pid>"`` (default: this
    process)."""
    return f"{socket.gethostname()} {_paths.home_path()} pid {os.getpid() if pid is None else pid}"


def acquire(
    pool: Pool, name: str, *, holder: str, duration: float = DEFAULT_DURATION, force: bool = False
) -> Lease:
    """Take the lease on process ``name`` in ``pool`` for ``duration`` seconds.

    Raises :class:`LeaseHeldError` while someone else holds it (naming them and when it
    expires). ``force`` breaks their lease first (ceph, s3): if they still run ``name``, two
    live copies will. A ``dir`` lease cannot be broken while its holder lives; ``force`` is
    refused there with the holder's name. :class:`~torpor.PoolError` if the pool's driver has
    no leases or the store fails.
    """
    check_name(name, what="process name")
    if not isinstance(duration, int | float) or not 0 < duration <= MAX_DURATION:
        raise UsageError(
            f"lease duration must be more than 0 and at most {MAX_DURATION:g} s, not {duration!r}"
        )
    if not holder or len(holder.encode()) > MAX_HOLDER or clean_holder(holder) != holder:
        raise UsageError(
            f"lease holder must be 1-{MAX_HOLDER} bytes of printable text, not {holder!r}"
        )
    store = _store(pool)
    got = store.acquire(LEASES_PREFIX + name, holder, float(duration), force=force)
    if isinstance(got, LeaseInfo):
        raise _held(pool.name, name, got, forced=force)
    return Lease(got, pool=pool.name, name=name, holder=holder, duration=float(duration))


def holder(pool: Pool, name: str) -> LeaseInfo | None:
    """Who holds the lease on process ``name`` in ``pool``, or None if nobody does."""
    check_name(name, what="process name")
    return _store(pool).holder(LEASES_PREFIX + name)


def _store(pool: Pool) -> LeaseStore:
    leases = getattr(pool.backend, "leases", None)
    if not callable(leases):
        raise PoolError(
            f"pool {pool.name!r} cannot hold leases: its driver has none",
            pool=pool.name,
            hint="use a dir, ceph or s3 pool to fence failover",
        )
    return cast(LeaseStore, leases())


def _held(pool: str, name: str, info: LeaseInfo, *, forced: bool) -> LeaseHeldError:
    where = f"process {name} is leased in pool {pool} by {info.holder}"
    if info.expires_in is None:
        msg = f"{where} until its holder dies"
        if forced:
            msg += "; --force cannot break a dir pool's lease while its holder lives"
        hint = f"stop the holder ({info.holder}) first, then retry"
    else:
        msg = f"{where}, expiring in {math.ceil(info.expires_in)} s"
        hint = (
            "retry once it expires, or pass --force to take it now: if that holder still runs"
            f" {name}, two live copies will run"
        )
    return LeaseHeldError(
        msg, holder=info.holder, expires_in=info.expires_in, pool=pool, name=name, hint=hint
    )
