"""The supervisor's loop on fakes (no CRIU, no processes): a crash restores the newest
checkpoint, one that fails to restore is skipped to the one before, a success exit is left,
and a record marked stopped is not restored."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from typing import Any

from torpor._errors import PoolError, ProcessNotFoundError
from torpor._process._proc import ProcRef
from torpor._supervise._daemon import Supervisor
from torpor._supervise._lease import LeaseLostError
from torpor._supervise._spec import Spec
from torpor._supervise._state import State


@dataclass
class Rec:
    name: str
    pid: int
    exit_status: int | None = None
    ended: str | None = None

    @property
    def ref(self) -> ProcRef:
        return ProcRef(self.pid, 1)


class FakeJob:
    def __init__(self, args: list[str], code: int) -> None:
        self.args, self.code, self.started = args, code, 0.0
        self.fd, self._w = os.pipe()
        os.close(self._w)  # readable at once: the command has ended
        self.stdout, self.stderr = "", "torpor: error: corrupted"

    def finish(self) -> int:
        os.close(self.fd)
        return self.code

    def error_line(self) -> str:
        return "corrupted"

    def terminate(self) -> None:
        pass


class FakeEnv:
    def __init__(self, checkpoints: list[str], bad: set[str], status: int | None = -9) -> None:
        self.spec = Spec(name="app", command=("app",), interval=0.0, min_uptime=0.0)
        self.st = State(spec=self.spec, status="supervised")
        self.checkpoints_ = checkpoints
        self.bad = bad
        self.exit_status = status
        self.rec = Rec("app", 100)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.jobs: list[list[str]] = []
        self.told: list[float | None] = []  # what the keeper was told (keeper_fence)
        self.app_r, self.app_w = os.pipe()

    def now(self) -> float:
        return 10.0

    def states(self) -> list[State]:
        return [self.st]

    def state(self, name: str) -> State:
        return self.st

    def update(self, name: str, fn: Any) -> None:
        self.st = fn(self.st)

    def event(self, name: str, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))

    def record(self, name: str) -> Rec:
        return self.rec

    def open_checked(self, rec: Rec) -> int:
        return os.dup(self.app_r)

    def keeper_alive(self, rec: Rec) -> bool:
        return True

    def checkpoints(self, spec: Spec) -> list[str]:
        return self.checkpoints_

    def local_copy(self, image: str) -> None:
        return None  # the restores go to the pool (a local copy is a path, tested for real)

    def job(self, args: list[str], what: str) -> FakeJob:
        self.jobs.append(args)
        image = args[1].split("@")[0]
        ok = image not in self.bad
        if ok:
            self.rec = Rec("app", 200 + len(self.jobs))
        return FakeJob(args, 0 if ok else 1)

    def lease(self, spec: Spec) -> None:
        return None

    def keeper_fence(self, rec: Rec, seconds: float | None) -> None:
        self.told.append(seconds)

    def holder_is_ours(self, holder: str) -> bool:
        return holder == "this home's former supervisor"

    def crash(self) -> None:
        """The app ends: its keeper recorded the status; the pidfd becomes readable."""
        self.rec = Rec("app", self.rec.pid, exit_status=self.exit_status, ended="now")
        os.close(self.app_w)


def run(env: FakeEnv, steps: int = 6) -> Supervisor:
    sup = Supervisor(env)  # type: ignore[arg-type]
    sup.reload()
    env.crash()
    for _ in range(steps):
        sup.step(0.05)
    return sup


def test_crash_restores_the_newest() -> None:
    env = FakeEnv(["app.s000003", "app.s000002"], bad=set())
    sup = run(env)
    assert env.jobs == [["restore", "app.s000003@default", "--name", "app", "--json"]]
    assert [k for k, _ in env.events] == ["crash", "restore"]
    assert env.st.restores == 1 and env.st.last_crash is not None
    assert env.st.last_crash.signal == 9
    assert sup.watches["app"].rec.pid == 201


def test_bad_checkpoint_skipped_to_the_one_before() -> None:
    env = FakeEnv(["app.s000003", "app.s000002"], bad={"app.s000003"})
    run(env)
    assert [a[1] for a in env.jobs] == ["app.s000003@default", "app.s000002@default"]
    assert [k for k, _ in env.events] == ["crash", "skipped", "restore"]
    assert env.events[1][1] == {"image": "app.s000003", "error": "corrupted"}


def test_every_checkpoint_bad_gives_up() -> None:
    env = FakeEnv(["app.s000002"], bad={"app.s000002"})
    sup = run(env)
    assert [k for k, _ in env.events] == ["crash", "skipped", "restore-failed", "give-up"]
    assert env.st.status == "given-up" and "app" not in sup.watches


def test_success_exit_not_restored() -> None:
    env = FakeEnv(["app.s000002"], bad=set(), status=0)
    run(env)
    assert env.jobs == []
    assert env.st.status == "stopped"


def test_stopped_record_not_restored() -> None:
    env = FakeEnv(["app.s000002"], bad=set())
    sup = Supervisor(env)  # type: ignore[arg-type]
    sup.reload()
    env.st = env.st.evolve(status="stopped")  # `torpor stop` marked it first
    env.crash()
    for _ in range(3):
        sup.step(0.05)
    assert env.jobs == [] and "app" not in sup.watches


class FakeLease:
    def __init__(self, fail: Exception | None) -> None:
        self.fail = fail
        self.renewals = 0

    def renew(self) -> None:
        self.renewals += 1
        if self.fail is not None:
            raise self.fail

    def release(self) -> None:
        pass


class LeasedEnv(FakeEnv):
    """The app is a real process (a sleep this test started), watched through a real pidfd;
    the lease's renewals fail as told; the clock is the test's."""

    def __init__(self, fail: Exception | None) -> None:
        super().__init__(["app.s000002"], bad=set())
        self.app = subprocess.Popen(["sleep", "60"])
        self.rec = Rec("app", self.app.pid)
        self.clock = 10.0
        self.held = FakeLease(fail)

    def now(self) -> float:
        return self.clock

    def open_checked(self, rec: Rec) -> int:
        return os.pidfd_open(self.app.pid)

    def lease(self, spec: Spec) -> FakeLease:
        return self.held


def _leased(fail: Exception | None, after: float) -> tuple[LeasedEnv, Supervisor]:
    env = LeasedEnv(fail)
    sup = Supervisor(env)  # type: ignore[arg-type]
    sup.reload()
    assert "app" in sup.watches
    env.clock += after
    sup.step(0.01)
    return env, sup


def test_a_lost_lease_stops_the_copy_here() -> None:
    lost = LeaseLostError("lease on app lapsed", pool="default", name="app")
    env, sup = _leased(lost, after=6.0)
    try:
        assert env.app.wait(timeout=5) == -signal.SIGKILL  # fenced: one copy only
        assert "app" not in sup.watches and env.jobs == []
        assert env.st.status == "given-up"
        assert env.st.given_up == (
            "its lease was lost (lease on app lapsed): stopped here so that only one copy runs"
        )
        assert env.events == [("lease", {"held": False, "error": "its lease was lost "
                                         "(lease on app lapsed)"})]  # fmt: skip
    finally:
        env.app.kill()
        env.app.wait()


def test_an_unreachable_pool_is_retried_then_fenced_before_the_lease_lapses() -> None:
    down = PoolError("pool default: connection refused")
    env = LeasedEnv(down)
    sup = Supervisor(env)  # type: ignore[arg-type]
    sup.reload()
    start = env.clock
    try:
        ticks = []
        while "app" in sup.watches and len(ticks) < 10:  # the loop's own wake-ups
            timeout = sup._timeout()
            assert timeout is not None
            env.clock += timeout
            ticks.append(env.clock - start)
            sup.step(0)
        # Retried at 5 and 10 s; stopped at 12 s (80 % of the 15 s lease), not at 15.
        assert ticks == [5.0, 10.0, 12.0]
        assert [k for k, _ in env.events] == ["lease", "lease", "lease"]
        assert env.events[0] == ("lease", {"held": True, "error": str(down)})
        assert env.app.wait(timeout=5) == -signal.SIGKILL
        assert env.st.status == "given-up" and "app" not in sup.watches
    finally:
        env.app.kill()
        env.app.wait()


def test_a_renewed_lease_keeps_the_copy() -> None:
    env, sup = _leased(None, after=6.0)
    try:
        env.clock += 6.0
        sup.step(0.01)
        env.clock += 6.0
        sup.step(0.01)
        assert env.held.renewals == 3 and env.app.poll() is None and "app" in sup.watches
    finally:
        env.app.kill()
        env.app.wait()


class QuickEndEnv(FakeEnv):
    """The restored copy exits 0 before the supervisor watches it; its keeper writes the exit
    status a moment later."""

    def __init__(self) -> None:
        super().__init__(["app.s000002"], bad=set())
        self.restored = False

    def job(self, args: list[str], what: str) -> FakeJob:
        job = super().job(args, what)
        self.restored = True
        return job

    def open_checked(self, rec: Rec) -> int:
        if self.restored:
            raise ProcessNotFoundError("gone", pid=rec.pid)
        return super().open_checked(rec)


def test_a_copy_ending_before_it_is_watched_waits_for_its_exit_status() -> None:
    env = QuickEndEnv()
    sup = Supervisor(env)  # type: ignore[arg-type]
    sup.reload()
    env.crash()
    for _ in range(3):
        sup.step(0.05)
    assert env.restored and env.st.restores == 1
    assert [k for k, _ in env.events] == ["crash", "restore"]  # not yet judged: no status
    env.rec = Rec("app", env.rec.pid, exit_status=0, ended="now")  # the keeper wrote it
    sup.step(0.01)
    assert [k for k, _ in env.events] == ["crash", "restore", "stop"]
    assert env.st.status == "stopped" and "app" not in sup.watches
