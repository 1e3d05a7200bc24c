"""Self-fencing in the supervisor's loop (:mod:`._daemon`): the lease on each supervised name,
its renewals and its deadline.

The lease lasts :data:`LEASE_DURATION` from its last renewal; it is renewed every third of
that. Its **deadline** is :data:`FENCE_AT` of the duration after the start of the last call
that renewed it (a renewal made during the call counts from its start, the latest it can
have been): the loop wakes at that deadline whatever else it waits for, and stops the copy
here the moment it has passed without a renewal. Renewals and the deadline are handled at
the start of every loop iteration, before anything else (an app's end, a due checkpoint):
a supervisor that was paused or starved wakes to fence its copy, not to checkpoint it into
a series another host may be writing by then. Every lease call is bounded by its driver
(ceph op timeouts and an s3 client of their own, see :mod:`torpor._pools._rados` and
:mod:`torpor._pools._s3`), well under the time left between the deadline and the expiry.

The copy's keeper is told that deadline after each renewal (:func:`tell_keeper`) and kills
the copy itself when it passes without a newer word: a supervisor that died, was paused or
hangs in a call cannot leave the copy running past the point another host may take the
lease. A supervisor that stops (SIGTERM) clears it: the apps run on, unfenced.

A restore starts only with a lease renewed within :data:`FRESH` (renewed first, at once,
when it is older): a restore is a copy started, and must not start on a lease about to lapse.
A fence stops the name's commands in flight too, and kills the copy a restore finishing
anyway made.
"""

from __future__ import annotations

import contextlib
import signal
from typing import TYPE_CHECKING, Any

from .._errors import ProcessNotFoundError, TorporError
from ._env import LEASE_DURATION, log

if TYPE_CHECKING:
    from ._daemon import Supervisor, Watch
    from ._spec import Spec

FENCE_AT = 0.8  # of LEASE_DURATION after the last renewal: the copy here is stopped
FRESH = LEASE_DURATION / 3  # a restore starts only with a lease renewed this recently


def deadline(w: Watch) -> float:
    """When the copy of ``w`` is stopped unless its lease is renewed first."""
    return w.lease_ok + FENCE_AT * LEASE_DURATION


def held(sup: Supervisor, w: Watch, lease: Any) -> None:
    """``w`` now holds ``lease`` (just taken)."""
    w.lease = lease
    w.lease_ok = sup.env.now()
    w.lease_renew = w.lease_ok + LEASE_DURATION / 3


def leases_due(sup: Supervisor) -> None:
    """Fence every watch whose deadline has passed; renew the leases that are due."""
    for w in list(sup.watches.values()):
        if w.lease is None or sup.watches.get(w.name) is not w:
            continue
        now = sup.env.now()
        if now >= deadline(w):
            fence(sup, w, f"its lease was not renewed for {now - w.lease_ok:.0f}s")
        elif now >= w.lease_renew:
            renew(sup, w)


def renew(sup: Supervisor, w: Watch) -> None:
    """Renew ``w``'s lease; fence it if it was lost, or if it failed past the deadline."""
    from ._lease import LeaseLostError

    start = sup.env.now()
    w.lease_renew = start + LEASE_DURATION / 3
    try:
        w.lease.renew()
    except LeaseLostError as exc:
        # Lapsed or taken over (another home resumes it): only one copy may run.
        fence(sup, w, f"its lease was lost ({exc})")
    except TorporError as exc:
        # The pool unreachable: retried at the next renewal, unless the deadline passed
        # meanwhile (the call itself may have taken that long).
        now = sup.env.now()
        if now >= deadline(w):
            fence(sup, w, f"its lease could not be renewed for {now - w.lease_ok:.0f}s ({exc})")
        else:
            log(f"{w.name}: lease not renewed (retrying): {exc}")
            sup.env.event(w.name, "lease", held=True, error=str(exc))
    else:
        w.lease_ok = start
        tell_keeper(sup, w)
        if w.restore_waiting:
            w.restore_waiting = False
            log(f"{w.name}: lease renewed; restoring it")
            sup._restore_next(w)


def tell_keeper(sup: Supervisor, w: Watch, *, clear: bool = False) -> None:
    """Tell the keeper of ``w``'s copy the deadline (:mod:`torpor._process._keeper_fence`):
    it kills the copy itself if this supervisor has not renewed the lease by then (died,
    paused, hung). ``clear``: the copy is let go of and runs on, unfenced."""
    if w.rec is None or w.pidfd is None or (w.lease is None and not clear):
        return
    seconds = None if clear else max(0.0, deadline(w) - sup.env.now())
    try:
        sup.env.keeper_fence(w.rec, seconds)
    except (OSError, TorporError) as exc:
        if not w.keeper_unfenced:  # said once (a keeper of an older torpor refuses it)
            log(f"{w.name}: its keeper does not enforce the lease's deadline: {exc}")
        w.keeper_unfenced = True
    else:
        w.keeper_unfenced = False


def fresh(sup: Supervisor, w: Watch) -> bool:
    """Whether ``w``'s lease was renewed within :data:`FRESH` (renewing it now if not): a
    restore may start. False also when the renewal fenced ``w``."""
    if w.lease is None:
        return True  # no lease module (see Env.lease): nothing to fence with
    if sup.env.now() - w.lease_ok <= FRESH:
        return True
    renew(sup, w)
    return (
        sup.watches.get(w.name) is w and w.lease is not None and sup.env.now() - w.lease_ok <= FRESH
    )


def fence(sup: Supervisor, w: Watch, why: str) -> None:
    """Stop the copy here (self-fencing), and the name's commands in flight: another home may
    resume the process once its lease lapsed, and two live copies must never run."""
    reason = f"{why}: stopped here so that only one copy runs"
    log(f"{w.name}: {reason}")
    if w.pidfd is not None:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(w.pidfd, signal.SIGKILL)  # the checked process
    sup.env.event(w.name, "lease", held=False, error=why)
    sup.env.update(w.name, lambda s: s.evolve(status="given-up", given_up=reason))
    w.lease = None  # not released: it lapses (or was lost); never handed over early
    sup._forget(w)


def kill_copy(sup: Supervisor, name: str, why: str) -> int | None:
    """SIGKILL the running copy of ``name`` (through a pidfd of the checked process); its
    pid, or None if none runs."""
    try:
        rec = sup.env.record(name)
        pidfd = sup.env.open_checked(rec)
    except (ProcessNotFoundError, TorporError, OSError):
        return None
    import os

    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        return None
    finally:
        os.close(pidfd)
    log(f"{name}: killed pid {rec.pid}: {why}")
    return int(rec.pid)


def refused(sup: Supervisor, spec: Spec, exc: Any) -> None:
    """The lease on ``spec.name`` could not be taken at adoption (``exc``). Held by a former
    supervisor of this home (a restart): taken again once it expires. Held by another home:
    that home runs the process, so a copy still running here is killed."""
    from ._lease import LeaseHeldError

    name = spec.name
    if isinstance(exc, LeaseHeldError):
        if exc.expires_in is not None and sup.env.holder_is_ours(exc.holder):
            when = sup.env.now() + exc.expires_in + 1.0
            sup.next_reload = when if sup.next_reload is None else min(sup.next_reload, when)
            log(f"{name}: its lease is still held by this home's former supervisor; taken "
                f"again once it expires (in {exc.expires_in:.0f}s)")  # fmt: skip
            sup.env.event(name, "lease", held=False, error=str(exc))
            return
        why = f"its lease is held by {exc.holder}, which runs it: only one copy may run"
        pid = kill_copy(sup, name, why)
        if pid is not None:
            sup.env.event(name, "lease", held=False, error=str(exc), killed=pid)
            return
    log(f"{name}: not supervised here: {exc}")
    sup.env.event(name, "lease", held=False, error=str(exc))


def switch_pool(sup: Supervisor, w: Watch, spec: Spec) -> bool:
    """Move ``w`` to ``spec``'s pool: its lease there is taken first, the old one released
    after. False (``w`` stays in its pool, said in one line) if it cannot be taken."""
    try:
        lease = sup.env.lease(spec)
    except TorporError as exc:
        error = f"stays in pool {w.spec.pool}: cannot take its lease in pool {spec.pool}: {exc}"
        log(f"{w.name}: {error}")
        sup.env.event(w.name, "lease", held=True, error=error)
        return False
    old = w.lease
    held(sup, w, lease)
    if old is not None:
        with contextlib.suppress(TorporError, OSError):
            old.release()
    log(f"{w.name}: now leased in pool {spec.pool}")
    return True
