"""A prune in flight when a name's supervision ends (``torpor stop``) is let finish with the
lease held, then the lease is released (``_supervise/_linger.py``): stopped, it left one
checkpoint more than ``--keep`` in the series for good (the CI run on ad157a0 found 4 members
of a --keep 3 series after a stop). One not done by the lease's deadline is stopped and the
lease left to lapse; a fence stops it at once. On the fakes of test_supervise_fence."""

from __future__ import annotations

from dataclasses import replace

from torpor._supervise._daemon import Supervisor

from .test_supervise_fence import LOST, SlowJob, StoreEnv, crash, tick


def _pruning() -> tuple[StoreEnv, Supervisor, SlowJob]:
    """A supervised app whose prune (after a checkpoint) is in flight."""
    env = StoreEnv()
    env.spec = replace(env.spec, interval=10.0)
    env.st = env.st.evolve(spec=env.spec)
    sup = Supervisor(env)  # type: ignore[arg-type]
    sup.reload()
    w = sup.watches["app"]
    job = SlowJob(["prune", "default", "app", "3"])
    w.prune = job  # type: ignore[assignment]
    sup._add(job.fd, lambda: sup._pruned(w))
    return env, sup, job


def _stop(env: StoreEnv, sup: Supervisor) -> None:
    """`torpor stop`: the record marked stopped, then the copy ended."""
    env.st = env.st.evolve(status="stopped")
    sup.reload()
    crash(env)
    sup.step(0.05)
    assert "app" not in sup.watches


def test_a_prune_in_flight_at_stop_finishes_then_the_lease_goes() -> None:
    env, sup, job = _pruning()
    try:
        _stop(env, sup)
        assert not job.terminated and env.holder("default") == "hostA"
        job.stdout = '{"kept": 3, "deleted": ["app.s000001"]}'
        job.end()
        sup.step(0.05)
        assert env.holder("default") is None and sup.fds == {}
        assert env.st.kept == 3
    finally:
        env.app.kill()
        env.app.wait()


def test_a_prune_not_done_by_the_deadline_is_stopped_and_the_lease_lapses() -> None:
    env, sup, job = _pruning()
    try:
        _stop(env, sup)
        assert sup._timeout() is not None  # the loop wakes for the deadline
        assert tick(env, sup) == 12.0  # 80 % of the 15 s lease after its last renewal
        assert job.terminated and env.holder("default") == "hostA"  # not released: lapses
        job.end()
        sup.step(0.05)  # reaped
        assert sup.fds == {} and env.holder("default") == "hostA"
    finally:
        env.app.kill()
        env.app.wait()


def test_a_fence_stops_the_prune_at_once() -> None:
    env, sup, job = _pruning()
    try:
        env.held = None  # type: ignore[assignment]
        w = sup.watches["app"]

        class Lost:
            def renew(self) -> None:
                raise LOST

            def release(self) -> None:
                raise AssertionError("a lost lease is not released")

        w.lease = Lost()
        env.clock += 5.0  # the renewal is due, and fails: lost
        sup.step(0)
        assert "app" not in sup.watches and job.terminated
        assert sup.linger.next() is None
    finally:
        env.app.kill()
        env.app.wait()
