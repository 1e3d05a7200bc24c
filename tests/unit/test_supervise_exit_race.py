"""A keeper that writes its copy's exit status just after the supervisor read the record,
then ends, is seen gone: the supervisor reads the record again before it calls the status
lost (the CI run on 4696c63: a copy exiting 1 ~20 ms after its restore was recorded as
"ended (exit status unknown: its keeper is gone too)", 1 run in ~4 of the crash-loop test)."""

from __future__ import annotations

from torpor._supervise._daemon import Supervisor

from .test_supervise_daemon import FakeEnv, Rec


class RacingEnv(FakeEnv):
    """The record read first has no exit status; the keeper then writes exit 1 and ends."""

    def __init__(self) -> None:
        super().__init__(["app.s000002"], bad=set(), status=1)
        self.reads = 0
        self.ended = False

    def record(self, name: str) -> Rec:
        self.reads += 1
        if self.ended and self.reads > self.first_read:
            return Rec("app", self.rec.pid, exit_status=1, ended="now")
        return Rec("app", self.rec.pid)

    def keeper_alive(self, rec: Rec) -> bool:
        if self.ended and not hasattr(self, "seen"):
            self.seen = True
            return False  # it wrote the status after our read, and ended
        return not self.ended


def test_a_status_written_as_the_keeper_ends_is_not_lost() -> None:
    env = RacingEnv()
    sup = Supervisor(env)  # type: ignore[arg-type]
    sup.reload()
    w = sup.watches["app"]
    env.ended = True
    env.first_read = env.reads + 1  # the next read predates the keeper's write
    sup._read_exit(w, timed_out=False)
    crashes = [f for k, f in env.events if k == "crash"]
    assert crashes == [{"signal": None, "exit_code": 1, "uptime_s": None}]
