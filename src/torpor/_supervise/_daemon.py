"""The supervisor: one daemon per torpor home watching every supervised process.

For each name whose supervision record says it should run (status ``supervised``, or
``shutdown`` from a supervisor stopped by SIGTERM), the loop in :class:`Supervisor`:

- watches the app through a pidfd (taken with :func:`_registry.open_checked`: the very process
  torpor started); a process that is gone when the daemon starts is restored at once;
- checkpoints it every ``interval``: ``torpor checkpoint N --leave-running --pool P --name
  N.sXXXXXX --json`` as a subprocess, never two at once for a name; a failed one is recorded
  (event ``checkpoint-failed``, ``failed_checkpoints``) and retried the next period; then keeps
  the newest ``keep`` (``python -m torpor._supervise._tasks prune``, a subprocess too);
- when the app ends, reads its exit status from its registry record (the keeper writes it on
  reap: waited for through inotify, at most :data:`EXIT_WAIT` seconds; its keeper gone too is
  an unknown end), asks :func:`._policy.decide`, and restores with ``torpor restore
  N.sXXXXXX@P --name N --json`` (a subprocess, so the new keeper, not the daemon, parents the
  copy), trying older checkpoints when one fails to restore;
- holds the lease on N in P (:mod:`._lease`) while it supervises N, renewed every third of
  its duration, and stops the copy here when it could not be renewed in time (:mod:`._fence`,
  checked first in every iteration of the loop).

Nothing heavy runs in the daemon itself: it forks nothing but ``exec``-ed CLI commands, each
the tested command. The crash path is a pidfd wake-up, one record read, one pool listing and
the restore command: no sleep, no polling. It signals nothing itself but its own children
(a command it aborts at shutdown or when it lets go of a name) and, through a checked pidfd,
a copy it must not leave running (self-fencing, :mod:`._fence`): when its lease on it is
lost or could not be renewed for most of its duration, when another home holds that lease,
when a restore it abandoned made it. Another home may resume it then, and two live copies
must never run. The copy's keeper is told the lease's deadline too, and enforces it.

SIGTERM: checkpoint every supervised process that runs (in parallel, within the shutdown
timeout), mark them ``shutdown`` and exit, the apps left running, unfenced: their leases are
not released but lapse, their keepers told to let them run. SIGHUP: re-read the records. A
name no longer to run (``torpor stop``, ``torpor unsupervise``) keeps its lease while its
copy runs here; a changed pool's lease is taken before the old one is released.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._errors import ProcessNotFoundError, TorporError
from . import _fence, _policy
from ._env import Env, log
from ._linger import Lingering
from ._policy import Exit, History
from ._spec import Spec
from ._state import Crash, LastCheckpoint, State
from ._watch import Job

__all__ = ["Env", "Supervisor", "Watch", "log"]  # Env and log: for _control, which runs it

EXIT_WAIT = 0.5  # seconds the keeper is given to record an exit status
GC_EVERY = 30.0  # seconds between the pool collections after prunes
RUN_STATUSES = ("supervised", "shutdown")


@dataclass
class Watch:
    """One supervised name, as the loop sees it."""

    spec: Spec
    rec: Any = None  # the registry record of the copy that runs
    pidfd: int | None = None
    history: History = field(default_factory=History)
    next_checkpoint: float = 0.0
    checkpoint: Job | None = None
    checkpoint_image: str | None = None
    prune: Job | None = None
    restore: Job | None = None
    restore_image: str | None = None
    restore_counts: bool = True  # the pending restore counts towards --max-restarts
    candidates: list[str] = field(default_factory=list)
    ended_at: float | None = None  # the app ended; its exit status not read yet
    lease: Any = None
    lease_renew: float = 0.0
    lease_ok: float = 0.0  # when the lease was last known held (taken or renewed)
    next_gc: float = 0.0
    restore_waiting: bool = False  # a restore waits for a fresh lease (see _fence.fresh)
    leaving: bool = False  # no longer to run: its lease kept until its copy here ends
    keeper_unfenced: bool = False  # its keeper was not told the lease's deadline

    @property
    def name(self) -> str:
        return self.spec.name


class Supervisor:
    """The loop (see the module docstring). :meth:`run` returns after a SIGTERM's shutdown."""

    def __init__(self, env: Env, *, shutdown_timeout: float = 30.0) -> None:
        self.env = env
        self.shutdown_timeout = shutdown_timeout
        self.watches: dict[str, Watch] = {}
        self.fds: dict[int, Callable[[], None]] = {}
        self.poller = select.poll()
        self.stopping = False
        self.reload_wanted = True
        self.dirwatch: Any = None
        self.next_reload: float | None = None  # a lease to take again once it expired
        self.linger = Lingering(self)  # prunes let finish after their watch ended

    # -- fds --------------------------------------------------------------------------------

    def _add(self, fd: int, fn: Callable[[], None]) -> None:
        self.fds[fd] = fn
        self.poller.register(fd, select.POLLIN)

    def _drop(self, fd: int) -> None:
        if self.fds.pop(fd, None) is not None:
            self.poller.unregister(fd)

    # -- the loop ---------------------------------------------------------------------------

    def run(self, wake_fd: int | None = None) -> None:
        """Serve until :attr:`stopping`; ``wake_fd`` is readable on a signal (set by the
        signal handlers, see :func:`serve`)."""
        if wake_fd is not None:
            self._add(wake_fd, lambda: _drain(wake_fd))
        self.dirwatch = self.env.watch_dir()
        self._add(self.dirwatch.fd, self._records_changed)
        while not self.stopping:
            if self.reload_wanted:
                self.reload_wanted = False
                self.reload()
            self.step(self._timeout())
        self.shutdown()

    def step(self, timeout: float | None) -> None:
        """Wait (at most ``timeout`` seconds) and handle what is ready, then what is due."""
        ms = None if timeout is None else max(0, int(timeout * 1000) + 1)
        ready = [(fd, self.fds.get(fd)) for fd, _ in self.poller.poll(ms)]
        # Leases first: a supervisor that was paused fences before it acts on anything.
        self._guarded(lambda: _fence.leases_due(self))
        for fd, fn in ready:
            if fn is not None and self.fds.get(fd) is fn:  # not dropped by a fence meanwhile
                self._guarded(fn)
        self._guarded(self._due)

    def _guarded(self, fn: Callable[[], None]) -> None:
        """Run one handler: a failure in one (a record that went, a pool that failed) is
        logged and the loop goes on, supervising the others."""
        try:
            fn()
        except (TorporError, OSError) as exc:
            log(f"error (going on): {exc}")
        except Exception:  # a bug: every other supervised process still needs the loop
            log(f"internal error (going on):\n{traceback.format_exc()}")

    def _timeout(self) -> float | None:
        now = self.env.now()
        when: list[float] = []
        for w in self.watches.values():
            if w.ended_at is not None:
                when.append(w.ended_at + EXIT_WAIT)
            if self._checkpoint_wanted(w):
                when.append(w.next_checkpoint)
            if w.lease is not None:
                when += [w.lease_renew, _fence.deadline(w)]
        if self.next_reload is not None:
            when.append(self.next_reload)
        if (lingering := self.linger.next()) is not None:
            when.append(lingering)
        return None if not when else max(0.0, min(when) - now)

    def _due(self) -> None:
        _fence.leases_due(self)
        now = self.env.now()
        self.linger.due(now)
        if self.next_reload is not None and now >= self.next_reload:
            self.next_reload = None
            self.reload()
        for w in list(self.watches.values()):
            if self.watches.get(w.name) is not w:
                continue  # fenced or forgotten by an earlier one's handling
            if w.ended_at is not None:
                self._read_exit(w, timed_out=now >= w.ended_at + EXIT_WAIT)
            if self._checkpoint_wanted(w) and now >= w.next_checkpoint:
                self._start_checkpoint(w)

    # -- records ----------------------------------------------------------------------------

    def reload(self) -> None:
        """Watch every name whose record says it should run; forget the others."""
        wanted = {s.name: s for s in self.env.states() if s.status in RUN_STATUSES}
        for name, w in list(self.watches.items()):
            if name in wanted:
                continue
            if w.pidfd is None:
                log(f"{name}: no longer supervised")
                self._forget(w)
            elif not w.leaving:
                # Its copy runs on (`torpor stop` ends it next): fenced until it ends.
                log(f"{name}: no longer supervised; its lease is kept while pid {w.rec.pid} runs")
                w.leaving = True
        for name, state in wanted.items():
            known = self.watches.get(name)
            if known is None:
                self._adopt(state)
                continue
            known.leaving = False
            if state.spec.pool == known.spec.pool or _fence.switch_pool(self, known, state.spec):
                known.spec = state.spec  # a changed interval or policy applies from now on

    def _adopt(self, state: State) -> None:
        spec = state.spec
        w = self.watches[spec.name] = Watch(spec=spec)
        try:
            lease = self.env.lease(spec)
        except TorporError as exc:
            del self.watches[spec.name]
            _fence.refused(self, spec, exc)
            return
        _fence.held(self, w, lease)
        if state.status != "supervised":
            self.env.update(spec.name, lambda s: s.evolve(status="supervised"))
        w.next_checkpoint = self.env.now() + spec.interval
        try:
            rec = self.env.record(spec.name)
        except TorporError:
            rec = None
        if rec is not None and self._watch_copy(w, rec):
            log(f"{spec.name}: supervising pid {rec.pid}")
            return
        # Gone (its host or its keeper died, or it ended while nobody watched): as a crash.
        log(f"{spec.name}: not running; restoring it")
        end = Exit.from_status(rec.exit_status) if rec is not None else Exit()
        self._on_end(w, end)

    def _watch_copy(self, w: Watch, rec: Any) -> bool:
        """Watch the running copy ``rec``; False if it is not running (or not torpor's)."""
        try:
            pidfd = self.env.open_checked(rec)
        except ProcessNotFoundError:
            return False
        except TorporError as exc:
            log(f"{w.name}: not watching pid {rec.pid}: {exc}")
            return False
        w.rec, w.pidfd = rec, pidfd
        self._add(pidfd, lambda: self._app_ended(w))
        _fence.tell_keeper(self, w)
        return True

    def _forget(self, w: Watch, *, release: bool = True) -> None:
        """Let go of ``w``: its commands in flight are stopped (see :meth:`_abandon`), its
        lease released unless ``release`` is False (then it lapses)."""
        if w.prune is not None and w.lease is not None and release:
            # Let finish, holding the lease (not fenced): see ._linger.
            self.linger.add(w.name, w.prune, w.lease, _fence.deadline(w))
            w.prune = w.lease = None
        for job, restore in ((w.checkpoint, False), (w.prune, False), (w.restore, True)):
            if job is not None:
                self._abandon(job, w.name if restore else None)
        w.checkpoint = w.prune = w.restore = None
        w.restore_waiting = False
        if w.pidfd is not None:
            self._drop(w.pidfd)
            os.close(w.pidfd)
            w.pidfd = None
        if w.lease is not None and release:
            with contextlib.suppress(TorporError, OSError):
                w.lease.release()
        w.lease = None
        if self.watches.get(w.name) is w:
            del self.watches[w.name]

    def _abandon(self, job: Job, restoring: str | None) -> None:
        """Stop a command of a watch let go of (SIGTERM to our child); reaped when it ends.
        A restore of ``restoring`` that finishes all the same: the copy it made is killed
        (nothing supervises it, no lease fences it)."""
        self._drop(job.fd)
        job.terminate()

        def ended() -> None:
            self._drop(job.fd)
            if job.finish() == 0 and restoring is not None and restoring not in self.watches:
                _fence.kill_copy(self, restoring, "restored after its supervision ended")

        self._add(job.fd, ended)

    def _records_changed(self) -> None:
        self.dirwatch.drain()
        for w in list(self.watches.values()):
            if w.ended_at is not None:
                self._read_exit(w, timed_out=False)

    # -- the app ends -----------------------------------------------------------------------

    def _app_ended(self, w: Watch) -> None:
        assert w.pidfd is not None
        self._drop(w.pidfd)
        os.close(w.pidfd)
        w.pidfd = None
        w.ended_at = self.env.now()
        self._read_exit(w, timed_out=False)

    def _read_exit(self, w: Watch, *, timed_out: bool) -> None:
        # Read twice if need be: a keeper that wrote the exit status just after the first
        # read, then ended, is seen gone; its record then says how the copy ended.
        for again in (False, True):
            try:
                rec = self.env.record(w.name)
            except TorporError:
                rec = None
            if rec is None or w.rec is None or rec.ref != w.rec.ref:
                break
            if rec.ended is not None or rec.exit_status is not None:
                self._on_end(w, Exit.from_status(rec.exit_status))
                return
            if not again and self.env.keeper_alive(rec) and not timed_out:
                return  # its keeper is about to write it
        self._on_end(w, Exit())

    def _on_end(self, w: Watch, end: Exit) -> None:
        now = self.env.now()
        uptime = None if w.history.running_since is None else now - w.history.running_since
        w.ended_at = None
        state = self.env.state(w.name)
        if state is None or state.status not in RUN_STATUSES:
            log(f"{w.name}: {end.describe()}; no longer supervised (not restored)")
            self._forget(w)
            return
        if _policy.is_failure(w.spec, end):
            crash = Crash(_now_iso(), end.signal, end.code, uptime)
            self.env.event(w.name, "crash", signal=end.signal, exit_code=end.code, uptime_s=uptime)
            self.env.update(w.name, lambda s: s.evolve(last_crash=crash))
        try:
            checkpoints = self.env.checkpoints(w.spec)
        except TorporError as exc:
            self._give_up(w, f"{end.describe()}; cannot list its checkpoints: {exc}")
            return
        decision = _policy.decide(w.spec, end, checkpoints, w.history, now)
        if isinstance(decision, _policy.Leave):
            log(f"{w.name}: {decision.reason}; not restored")
            self.env.event(w.name, "stop", reason=decision.reason)
            self.env.update(w.name, lambda s: s.evolve(status="stopped"))
            self._forget(w)
        elif isinstance(decision, _policy.GiveUp):
            self._give_up(w, decision.reason)
        else:
            log(f"{w.name}: {decision.reason}")
            w.candidates = list(decision.candidates)
            w.restore_counts = decision.counts
            self._restore_next(w)

    def _give_up(self, w: Watch, reason: str) -> None:
        log(f"{w.name}: giving up: {reason}")
        self.env.event(w.name, "give-up", reason=reason)
        self.env.update(w.name, lambda s: s.evolve(status="given-up", given_up=reason))
        self._forget(w)

    # -- restoring --------------------------------------------------------------------------

    def _restore_next(self, w: Watch) -> None:
        if not _fence.fresh(self, w):
            if self.watches.get(w.name) is w:  # not fenced: retried once it is renewed
                log(f"{w.name}: not restored until its lease is renewed")
                w.restore_waiting = True
            return
        image = w.candidates.pop(0)
        # The newest checkpoint's local copy when this home made it (_process._topool): no
        # pull of what was just pushed. It is the same image, verified by its stamp.
        local = self.env.local_copy(image)
        source = str(local) if local is not None else f"{image}@{w.spec.pool}"
        args = ["restore", source, "--name", w.name, "--json"]
        try:
            job = self.env.job(args, f"restore {w.name}")
        except OSError as exc:
            self._give_up(w, f"cannot run `torpor restore`: {exc}")
            return
        w.restore, w.restore_image = job, image
        self._add(job.fd, lambda: self._restored(w))

    def _restored(self, w: Watch) -> None:
        job, image = w.restore, w.restore_image
        assert job is not None and image is not None
        self._drop(job.fd)
        code = job.finish()
        w.restore = w.restore_image = None
        took = round(self.env.now() - job.started, 3)
        rec = None
        with contextlib.suppress(TorporError):
            rec = self.env.record(w.name)
        if code == 0:
            w.history = _policy.after_restore(
                w.history, image, self.env.now(), counts=w.restore_counts
            )
            pid = rec.pid if rec is not None else None
            log(f"{w.name}: restored from {image} in {took}s (pid {pid})")
            self.env.event(w.name, "restore", image=image, pid=pid, duration_s=took)
            self.env.update(w.name, lambda s: s.evolve(restores=s.restores + 1, given_up=None))
            if rec is None:
                self._on_end(w, Exit())  # no record of it: nobody will say how it ended
            elif not self._watch_copy(w, rec):
                # Restored, but ended already (or not torpor's): the record read above may
                # predate its end, so its keeper is waited for as for any end (EXIT_WAIT).
                w.rec, w.ended_at = rec, self.env.now()
                self._read_exit(w, timed_out=False)
            return
        error = job.error_line()
        log(f"{w.name}: {image} did not restore: {error}")
        self.env.event(w.name, "skipped", image=image, error=error)
        w.history = _policy.after_failed_restore(w.history, image)
        if w.candidates:
            self._restore_next(w)
        else:
            self.env.event(w.name, "restore-failed", image=image, error=error)
            self._give_up(w, f"no checkpoint of {w.name} restored (the last: {error})")

    # -- checkpoints ------------------------------------------------------------------------

    def _checkpoint_wanted(self, w: Watch) -> bool:
        return (
            w.spec.interval > 0
            and w.pidfd is not None
            and w.checkpoint is None
            and w.prune is None
            and not w.leaving
        )

    def _start_checkpoint(self, w: Watch, *, final: bool = False) -> None:
        spec = w.spec
        try:
            image = self.env.next_image(spec)
            args = ["checkpoint", w.name, "--leave-running", "--pool", spec.pool]
            args += ["--name", image, "--json"]
            if spec.tcp_established:
                args.append("--tcp-established")
            job = self.env.job(args, f"checkpoint {w.name}")
        except (TorporError, OSError) as exc:
            self._checkpoint_failed(w, str(exc))
            w.next_checkpoint = self.env.now() + spec.interval
            return
        w.checkpoint, w.checkpoint_image = job, image
        self._add(job.fd, lambda: self._checkpointed(w))

    def _checkpointed(self, w: Watch) -> None:
        job, image = w.checkpoint, w.checkpoint_image
        assert job is not None and image is not None
        self._drop(job.fd)
        code = job.finish()
        w.checkpoint = w.checkpoint_image = None
        # The next period counts from this one's start: a slow checkpoint is followed at once.
        w.next_checkpoint = job.started + w.spec.interval
        if code != 0 and not self._published(w, image):
            if w.pidfd is not None:  # not the app's own end, which the crash path handles
                self._checkpoint_failed(w, job.error_line())
            return
        info = _parse_checkpoint(job.stdout, image, self.env.now() - job.started)
        last = LastCheckpoint(
            info["image"], _now_iso(), info["duration_s"], info["frozen_ms"], info["new_bytes"]
        )
        # Made: recorded so, whatever fails after (an event write, a step of the command
        # after it published the image): that is recorded as what it is (``step-failed``).
        self._record(
            w,
            "checkpoint",
            image=last.image,
            duration_s=last.duration_s,
            frozen_ms=last.frozen_ms,
            new_bytes=last.new_bytes,
        )
        self.env.update(w.name, lambda s: s.evolve(last_checkpoint=last))
        if code != 0:
            error = job.error_line()
            log(f"{w.name}: {image} was checkpointed, then its command failed: {error}")
            self._record(w, "step-failed", step="checkpoint", image=image, error=error)
        if self.stopping or w.restore is not None:
            # Not while a restore runs: the prune drops the local copy it may be reading
            # (the next checkpoint prunes).
            return
        args = ["prune", w.spec.pool, w.name, str(w.spec.keep)]
        if self.env.now() >= w.next_gc:
            w.next_gc = self.env.now() + GC_EVERY
            args.append("gc")
        try:
            w.prune = self.env.task(args, f"prune {w.name}")
        except OSError as exc:
            log(f"{w.name}: cannot prune: {exc}")
            return
        self._add(w.prune.fd, lambda: self._pruned(w))

    def _pruned(self, w: Watch) -> None:
        job = w.prune
        assert job is not None
        self._drop(job.fd)
        code = job.finish()
        w.prune = None
        if code != 0:
            log(f"{w.name}: prune failed: {job.error_line()}")
            self._record(w, "step-failed", step="prune", error=job.error_line())
            return
        with contextlib.suppress(ValueError, KeyError, TypeError):
            kept = int(json.loads(job.stdout)["kept"])
            self.env.update(w.name, lambda s: s.evolve(kept=kept))

    def _published(self, w: Watch, image: str) -> bool:
        """Whether ``image`` is a member of ``w``'s series in its pool (a command that failed
        may have failed after publishing it); not known is not."""
        try:
            return image in self.env.checkpoints(w.spec)
        except (TorporError, OSError):
            return False

    def _record(self, w: Watch, kind: str, **fields: Any) -> None:
        """An event that fails to be written is logged: it fails nothing else."""
        try:
            self.env.event(w.name, kind, **fields)
        except (TorporError, OSError) as exc:
            log(f"{w.name}: event {kind} not recorded: {exc}")

    def _checkpoint_failed(self, w: Watch, error: str) -> None:
        log(f"{w.name}: checkpoint failed: {error}")
        self.env.event(w.name, "checkpoint-failed", error=error)
        self.env.update(w.name, lambda s: s.evolve(failed_checkpoints=s.failed_checkpoints + 1))

    # -- shutdown ---------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Checkpoint every running supervised app (within :attr:`shutdown_timeout`), mark
        them ``shutdown`` and let go of them (they keep running). Their leases are not
        released: they lapse, and another home may resume them only after that."""
        deadline = self.env.now() + self.shutdown_timeout
        for w in self.watches.values():
            if w.pidfd is not None and w.checkpoint is None and not w.leaving:
                self._start_checkpoint(w)
        while True:
            pending = {w.checkpoint.fd: w for w in self.watches.values() if w.checkpoint}
            left = deadline - self.env.now()
            if not pending or left <= 0:
                break
            poller = select.poll()
            for fd in pending:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(int(left * 1000) + 1):
                self._checkpointed(pending[fd])
        for w in list(self.watches.values()):
            for job in (w.checkpoint, w.prune, w.restore):
                if job is not None:
                    job.terminate()  # a checkpoint aborts; the app runs on
                    self._drop(job.fd)
                    job.finish()
            w.checkpoint = w.prune = w.restore = None
            _fence.tell_keeper(self, w, clear=True)  # it runs on, its lease left to lapse
            if not w.leaving:
                self.env.event(w.name, "shutdown")
                with contextlib.suppress(TorporError):
                    self.env.update(w.name, lambda s: s.evolve(status="shutdown"))
            self._forget(w, release=False)
        self.linger.stop_all()


def _parse_checkpoint(stdout: str, image: str, took: float) -> dict[str, Any]:
    """What ``torpor checkpoint --json`` said (its last line); what we know otherwise."""
    info: dict[str, Any] = {
        "image": image,
        "duration_s": round(took, 3),
        "frozen_ms": None,
        "new_bytes": None,
    }
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    with contextlib.suppress(ValueError, IndexError):
        data = json.loads(lines[-1])
        if isinstance(data, dict):
            for key, kinds in (
                ("image", (str,)),
                ("duration_s", (int, float)),
                ("frozen_ms", (int, float, type(None))),
                ("new_bytes", (int, type(None))),
            ):
                value = data.get(key, info[key])
                if isinstance(value, kinds) and not isinstance(value, bool):
                    info[key] = value
    return info


def _now_iso() -> str:
    from .._images._manifest import now_iso

    return now_iso()


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass
