"""Self-fencing in the supervisor's loop, on the fakes of test_supervise_daemon (a real app
process, a fake clock stepped by the loop's own wake-ups): the copy is stopped by the
deadline (80 % of the lease), before anything else on a wake-up, and with the commands in
flight; a restore waits for a fresh lease; a lease held elsewhere at adoption kills the copy
here; shutdown, stop and a pool change keep the fence."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import replace
from typing import Any

from torpor._errors import PoolError
from torpor._pools._leases import LeaseInfo, MemoryLeases
from torpor._supervise._daemon import Supervisor
from torpor._supervise._lease import Lease, LeaseHeldError, LeaseLostError
from torpor._supervise._spec import Spec

from .test_supervise_daemon import FakeJob, FakeLease, LeasedEnv, Rec

DOWN = PoolError("pool default: connection refused")
LOST = LeaseLostError("lease on app lapsed", pool="default", name="app")


class SlowJob(FakeJob):
    """A command that runs until :meth:`end` (its pidfd stand-in readable then)."""

    def __init__(self, args: list[str]) -> None:
        self.args, self.code, self.started = args, 0, 0.0
        self.fd, self._w = os.pipe()
        self.stdout, self.stderr = "", ""
        self.terminated = False

    def terminate(self) -> None:
        self.terminated = True

    def end(self) -> None:
        os.close(self._w)


class RestoringEnv(LeasedEnv):
    """Restores run until the test ends them; the copy a restore makes is a real process."""

    def __init__(self, fail: Exception | None) -> None:
        super().__init__(fail)
        self.slow: list[SlowJob] = []
        self.copies: list[subprocess.Popen[bytes]] = []

    def job(self, args: list[str], what: str) -> SlowJob:
        self.jobs.append(args)
        job = SlowJob(args)
        self.slow.append(job)
        return job

    def open_checked(self, rec: Rec) -> int:
        return os.pidfd_open(rec.pid)

    def restored(self) -> subprocess.Popen[bytes]:
        """The restore in flight made its copy and ends."""
        copy = subprocess.Popen(["sleep", "60"])
        self.copies.append(copy)
        self.rec = Rec("app", copy.pid)
        self.slow[-1].end()
        return copy

    def cleanup(self) -> None:
        for p in [self.app, *self.copies]:
            p.kill()
            p.wait()


def tick(env: LeasedEnv, sup: Supervisor) -> float:
    """One iteration of the loop at its own next wake-up; the time since the start (10)."""
    timeout = sup._timeout()
    assert timeout is not None
    env.clock += timeout
    sup.step(0)
    return env.clock - 10.0


def crash(env: LeasedEnv) -> None:
    env.app.kill()
    env.app.wait()
    env.rec = Rec("app", env.app.pid, exit_status=-9, ended="now")


def test_a_paused_supervisor_fences_before_it_checkpoints() -> None:
    env = LeasedEnv(None)
    env.spec = replace(env.spec, interval=10.0)
    env.st = env.st.evolve(spec=env.spec)
    sup = Supervisor(env)  # type: ignore[arg-type]
    sup.reload()
    try:
        env.clock += 60.0  # SIGSTOP-ed for a minute: the lease lapsed, a checkpoint is due
        sup.step(0)
        assert env.app.wait(timeout=5) == -signal.SIGKILL
        assert env.jobs == []  # no stale checkpoint pushed into the series
        assert env.held.renewals == 0 and env.st.status == "given-up"
        assert env.events == [("lease", {"held": False, "error": "its lease was not renewed "
                                         "for 60s"})]  # fmt: skip
    finally:
        env.app.kill()
        env.app.wait()


def test_a_crash_seen_after_the_lease_was_lost_is_not_restored() -> None:
    env = LeasedEnv(None)
    sup = Supervisor(env)  # type: ignore[arg-type]
    sup.reload()
    crash(env)  # while the supervisor was paused; its lease lost meanwhile
    env.held.fail = LOST
    env.clock += 6.0
    sup.step(0.05)
    sup.step(0.05)
    assert env.jobs == [] and sup.fds == {} and "app" not in sup.watches
    assert [k for k, _ in env.events] == ["lease"] and env.st.status == "given-up"


def test_a_fence_stops_the_restore_in_flight_and_kills_its_copy() -> None:
    env = RestoringEnv(DOWN)
    sup = Supervisor(env)  # type: ignore[arg-type]
    sup.reload()
    try:
        crash(env)
        sup.step(0.05)  # the lease is 0 s old: the restore starts
        assert [a[0] for a in env.jobs] == ["restore"]
        assert [tick(env, sup) for _ in range(3)] == [5.0, 10.0, 12.0]  # renewals fail
        assert "app" not in sup.watches and env.st.status == "given-up"
        assert env.slow[0].terminated  # told to stop, still reaped when it ends
        copy = env.restored()  # it finished all the same
        sup.step(0.05)
        assert copy.wait(timeout=5) == -signal.SIGKILL
        assert sup.fds == {}
    finally:
        env.cleanup()


def test_a_restore_waits_for_a_fresh_lease() -> None:
    env = RestoringEnv(DOWN)
    sup = Supervisor(env)  # type: ignore[arg-type]
    sup.reload()
    try:
        assert tick(env, sup) == 5.0  # a renewal failed: the lease is 5 s old
        env.clock += 1.0
        crash(env)
        sup.step(0.05)  # 6 s old: renewed first, which fails: no restore yet
        assert env.jobs == [] and env.held.renewals == 2 and "app" in sup.watches
        env.held.fail = None  # the pool is back
        assert tick(env, sup) == 11.0
        assert [a[0] for a in env.jobs] == ["restore"] and sup.watches["app"].restore
        copy = env.restored()
        sup.step(0.05)
        assert sup.watches["app"].rec.pid == copy.pid and copy.poll() is None
    finally:
        env.cleanup()


def _held_by(holder: str, expires_in: float | None) -> Any:
    def lease(spec: Spec) -> None:
        raise LeaseHeldError(
            f"process app is leased by {holder}",
            holder=holder,
            expires_in=expires_in,
            pool="default",
            name="app",
        )

    return lease


def test_a_lease_held_by_another_home_kills_the_copy_here() -> None:
    env = LeasedEnv(None)
    env.lease = _held_by("hostB /var/lib/torpor pid 7", 14.0)  # type: ignore[method-assign]
    sup = Supervisor(env)  # type: ignore[arg-type]
    try:
        sup.reload()
        assert env.app.wait(timeout=5) == -signal.SIGKILL
        assert sup.watches == {} and env.jobs == []
        error = "process app is leased by hostB /var/lib/torpor pid 7"
        assert env.events == [("lease", {"held": False, "error": error, "killed": env.app.pid})]
    finally:
        env.app.kill()
        env.app.wait()


def test_a_lease_held_by_this_homes_former_supervisor_is_taken_again() -> None:
    env = LeasedEnv(None)
    env.lease = _held_by("this home's former supervisor", 14.0)  # type: ignore[method-assign]
    sup = Supervisor(env)  # type: ignore[arg-type]
    try:
        sup.reload()
        assert sup.watches == {} and env.app.poll() is None
        env.lease = lambda spec: env.held  # type: ignore[method-assign]
        assert tick(env, sup) == 15.0  # once it expired
        assert sup.watches["app"].rec.pid == env.app.pid and env.app.poll() is None
    finally:
        env.app.kill()
        env.app.wait()


class StoreEnv(LeasedEnv):
    """Leases in a MemoryLeases store on the test's clock, keyed by name and pool."""

    def __init__(self) -> None:
        super().__init__(None)
        self.store = MemoryLeases()
        self.store.clock = self.now

    def lease(self, spec: Spec) -> Lease:  # type: ignore[override]
        key = f"leases/{spec.name}@{spec.pool}"
        got = self.store.acquire(key, "hostA", 15.0, force=False)
        if isinstance(got, LeaseInfo):
            raise LeaseHeldError(
                f"held by {got.holder}", holder=got.holder, expires_in=1.0, pool="p", name="app"
            )
        return Lease(got, pool=spec.pool, name=spec.name, holder="hostA", duration=15.0)

    def next_image(self, spec: Spec) -> str:
        return "app.s000003"

    def holder(self, pool: str) -> str | None:
        info = self.store.holder(f"leases/app@{pool}")
        return None if info is None else info.holder


def test_shutdown_keeps_the_lease_of_a_copy_left_running() -> None:
    env = StoreEnv()
    sup = Supervisor(env, shutdown_timeout=0.1)  # type: ignore[arg-type]
    sup.reload()
    try:
        sup.stopping = True  # SIGTERM
        sup.shutdown()
        assert env.jobs[0][:2] == ["checkpoint", "app"]  # its final checkpoint
        assert env.app.poll() is None and env.st.status == "shutdown"
        assert env.holder("default") == "hostA"  # lapses; never handed over early
    finally:
        env.app.kill()
        env.app.wait()


def test_stop_keeps_the_lease_until_the_copy_has_ended() -> None:
    env = StoreEnv()
    env.spec = replace(env.spec, interval=10.0)
    env.st = env.st.evolve(spec=env.spec)
    sup = Supervisor(env)  # type: ignore[arg-type]
    sup.reload()
    try:
        env.st = env.st.evolve(status="stopped")  # `torpor stop`, before it ends the copy
        sup.reload()
        assert tick(env, sup) == 5.0  # a renewal: no checkpoint of a name being stopped
        assert env.holder("default") == "hostA" and env.jobs == []
        crash(env)  # `torpor stop` ended it
        sup.step(0.05)
        assert "app" not in sup.watches and env.holder("default") is None
    finally:
        env.app.kill()
        env.app.wait()


def test_a_pool_change_takes_the_new_lease_before_releasing_the_old() -> None:
    env = StoreEnv()
    sup = Supervisor(env)  # type: ignore[arg-type]
    sup.reload()
    try:
        env.store.acquire("leases/app@busy", "hostB", 15.0, force=False)
        env.st = env.st.evolve(spec=replace(env.spec, pool="busy"))
        sup.reload()  # refused: the new pool's lease is held by hostB
        assert sup.watches["app"].spec.pool == "default" and env.holder("default") == "hostA"
        assert env.events[-1][0] == "lease" and env.events[-1][1]["held"] is True
        env.st = env.st.evolve(spec=replace(env.spec, pool="shared"))
        sup.reload()
        assert sup.watches["app"].spec.pool == "shared"
        assert env.holder("shared") == "hostA" and env.holder("default") is None
        assert tick(env, sup) == 5.0 and env.app.poll() is None  # renewed in the new pool
        assert env.holder("shared") == "hostA"
    finally:
        env.app.kill()
        env.app.wait()


def test_renewals_slow_to_fail_are_fenced_before_the_lease_lapses() -> None:
    env = LeasedEnv(None)

    class Slow(FakeLease):
        def renew(self) -> None:
            env.clock += 3.0  # the store's call took its drivers' bound (D/5), then failed
            raise DOWN

    env.held = Slow(None)
    sup = Supervisor(env)  # type: ignore[arg-type]
    sup.reload()
    try:
        assert tick(env, sup) == 8.0  # from 5 s to 8 s in the call: retried
        assert env.app.poll() is None and "app" in sup.watches
        # Retried at 10 s, failing at 13 s, past the deadline (12 s): stopped then, before
        # the lease lapses at 15 s (the time of the call counted, not the time it began).
        assert tick(env, sup) == 13.0
        assert env.app.wait(timeout=5) == -signal.SIGKILL
    finally:
        env.app.kill()
        env.app.wait()


def test_the_keeper_is_told_the_deadline_after_each_renewal_and_cleared_at_shutdown() -> None:
    env = LeasedEnv(None)
    env.next_image = lambda spec: "app.s000003"  # type: ignore[attr-defined]
    sup = Supervisor(env, shutdown_timeout=0.1)  # type: ignore[arg-type]
    sup.reload()
    try:
        assert env.told == [12.0]  # watched: 80 % of the lease from its taking
        assert tick(env, sup) == 5.0
        assert env.told == [12.0, 12.0]  # renewed at 5 s: until 17 s
        env.held.fail = DOWN
        assert tick(env, sup) == 10.0
        assert env.told == [12.0, 12.0]  # not renewed: the word of 5 s stands (17 s)
        sup.stopping = True
        sup.shutdown()
        assert env.told == [12.0, 12.0, None]  # let go of: it runs on
    finally:
        env.app.kill()
        env.app.wait()
