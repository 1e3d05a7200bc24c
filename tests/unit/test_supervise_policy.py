"""The supervisor's decisions (issue 8 point 2), on a fake clock: restart policies, success
exit codes, crash loops falling back to older checkpoints, skipped bad checkpoints, giving up."""

from __future__ import annotations

import signal

import pytest

from torpor._supervise._policy import (
    Exit,
    GiveUp,
    History,
    Leave,
    Restore,
    after_failed_restore,
    after_restore,
    decide,
    is_failure,
    prune_restores,
)
from torpor._supervise._spec import Spec

CKPTS = ("app.s000005", "app.s000004", "app.s000003")
# A failure of the process's own (its state may be at fault): the crash-loop rules apply in
# full. Kills from outside are treated apart (test_a_late_kill_*).
KILLED = Exit(signal=signal.SIGABRT)
SIGKILLED = Exit(signal=signal.SIGKILL)


def spec(**kw: object) -> Spec:
    return Spec(name="app", command=("app",), **{"min_uptime": 5.0, **kw})  # type: ignore[arg-type]


def test_exit_from_status() -> None:
    assert Exit.from_status(None) == Exit()
    assert Exit.from_status(-9) == Exit(signal=9)
    assert Exit.from_status(0) == Exit(code=0)
    assert Exit.from_status(3) == Exit(code=3)
    assert not Exit().known and Exit(code=0).known and Exit(signal=6).known


def test_describe() -> None:
    assert Exit(signal=9).describe() == "killed by SIGKILL"
    assert Exit(signal=6).describe() == "killed by SIGABRT"
    assert Exit(signal=200).describe() == "killed by signal 200"
    assert Exit(code=3).describe() == "exited 3"
    assert Exit().describe() == "ended (exit status unknown: its keeper is gone too)"


def test_failures() -> None:
    s = spec(success_exit_codes=(0, 3))
    assert not is_failure(s, Exit(code=0))
    assert not is_failure(s, Exit(code=3))
    assert is_failure(s, Exit(code=1))
    assert is_failure(s, Exit(signal=signal.SIGTERM))
    assert is_failure(s, Exit())  # unknown: treated as a crash


def test_crash_restores_newest() -> None:
    d = decide(spec(), KILLED, CKPTS, History(), now=100.0)
    assert d == Restore(CKPTS, "killed by SIGABRT; restoring the newest checkpoint")


@pytest.mark.parametrize(
    "end", [Exit(signal=signal.SIGABRT), Exit(signal=11), Exit(code=1), Exit()]
)
def test_on_failure_restores_failures(end: Exit) -> None:
    d = decide(spec(), end, CKPTS, History(), now=100.0)
    assert isinstance(d, Restore) and d.candidates == CKPTS


def test_on_failure_leaves_success() -> None:
    d = decide(spec(), Exit(code=0), CKPTS, History(), now=100.0)
    assert d == Leave("exited 0 (a success exit code; restart policy is 'on-failure')")


def test_success_exit_codes_widen() -> None:
    s = spec(success_exit_codes=(0, 42))
    assert isinstance(decide(s, Exit(code=42), CKPTS, History(), 1.0), Leave)
    assert isinstance(decide(s, Exit(code=41), CKPTS, History(), 1.0), Restore)


def test_always_restores_success() -> None:
    d = decide(spec(restart="always"), Exit(code=0), CKPTS, History(), now=1.0)
    assert isinstance(d, Restore) and d.candidates == CKPTS


def test_no_never_restores() -> None:
    s = spec(restart="no")
    assert decide(s, KILLED, CKPTS, History(), 1.0) == GiveUp(
        "killed by SIGABRT; restart policy is 'no'"
    )
    assert decide(s, Exit(code=0), CKPTS, History(), 1.0) == Leave("exited 0 (a success exit code)")


def test_crash_within_min_uptime_falls_back() -> None:
    h = after_restore(History(), "app.s000005", now=100.0)
    d = decide(spec(min_uptime=5.0), KILLED, CKPTS, h, now=102.0)
    assert d == Restore(
        ("app.s000004", "app.s000003"),
        "killed by SIGABRT 2.0s after its restore from app.s000005 (within --min-uptime 5s); "
        "falling back to an older checkpoint",
    )


def test_fallback_passes_over_checkpoints_of_the_short_lived_copy() -> None:
    # The copy restored from s000004 lived 1 s and was checkpointed into s000006: suspect too.
    ckpts = ("app.s000006", *CKPTS)
    h = after_restore(History(), "app.s000004", now=100.0)
    d = decide(spec(), KILLED, ckpts, h, now=101.0)
    assert isinstance(d, Restore) and d.candidates == ("app.s000003",)


def test_fallback_when_last_used_was_pruned() -> None:
    h = after_restore(History(), "app.s000004", now=100.0)
    d = decide(spec(), KILLED, ("app.s000006", "app.s000003", "app.s000002"), h, now=101.0)
    assert isinstance(d, Restore) and d.candidates == ("app.s000003", "app.s000002")


def test_crash_after_min_uptime_uses_newest() -> None:
    h = after_restore(History(), "app.s000005", now=100.0)
    d = decide(spec(min_uptime=5.0), KILLED, CKPTS, h, now=105.0)
    assert isinstance(d, Restore) and d.candidates == CKPTS


def test_min_uptime_zero_never_falls_back() -> None:
    h = after_restore(History(), "app.s000005", now=100.0)
    d = decide(spec(min_uptime=0.0), KILLED, CKPTS, h, now=100.0)
    assert isinstance(d, Restore) and d.candidates == CKPTS


def test_crash_loop_runs_out_of_older_checkpoints() -> None:
    h = after_restore(History(), "app.s000003", now=100.0)
    d = decide(spec(), KILLED, CKPTS, h, now=101.0)
    assert d == GiveUp(
        "killed by SIGABRT within --min-uptime of its restore from app.s000003, and no older "
        "checkpoint is left to fall back to"
    )


def test_crash_loop_walks_back_then_gives_up() -> None:
    s = spec(max_restarts=100)
    h, now, used = History(), 100.0, []
    d = decide(s, KILLED, CKPTS, h, now)
    while isinstance(d, Restore):
        used.append(d.candidates[0])
        h = after_restore(h, d.candidates[0], now)
        now += 1.0
        d = decide(s, KILLED, CKPTS, h, now)
    assert used == ["app.s000005", "app.s000004", "app.s000003"]
    assert isinstance(d, GiveUp)


def test_bad_checkpoint_skipped() -> None:
    h = after_failed_restore(History(), "app.s000005")
    d = decide(spec(), KILLED, CKPTS, h, now=1.0)
    assert isinstance(d, Restore) and d.candidates == ("app.s000004", "app.s000003")


def test_every_checkpoint_bad() -> None:
    h = History()
    for c in CKPTS:
        h = after_failed_restore(h, c)
    assert decide(spec(), KILLED, CKPTS, h, now=1.0) == GiveUp(
        "killed by SIGABRT; every checkpoint of app failed to restore"
    )


def test_no_checkpoint_gives_up_never_starts_fresh() -> None:
    assert decide(spec(), KILLED, (), History(), now=1.0) == GiveUp(
        "killed by SIGABRT before its first checkpoint: nothing to restore (start it again "
        "with `torpor run --resume --name app -- CMD`)"
    )


def test_max_restarts_within_window() -> None:
    s = spec(max_restarts=3, restart_window=60.0, min_uptime=0.0)
    h = History()
    for t in (10.0, 20.0, 30.0):
        h = after_restore(h, "app.s000005", t)
    assert decide(s, KILLED, CKPTS, h, now=40.0) == GiveUp(
        "killed by SIGABRT; already restored 3 times within 1m (--max-restarts 3)"
    )
    # The first restore leaves the window at 70 s: one more is allowed then.
    assert isinstance(decide(s, KILLED, CKPTS, h, now=70.0), Restore)
    assert isinstance(decide(s, KILLED, CKPTS, h, now=69.9), GiveUp)


def test_max_restarts_zero() -> None:
    assert isinstance(decide(spec(max_restarts=0), KILLED, CKPTS, History(), 1.0), GiveUp)


def test_max_restarts_checked_before_success() -> None:
    # A success exit is left alone even when the restart budget is spent.
    s = spec(max_restarts=0)
    assert isinstance(decide(s, Exit(code=0), CKPTS, History(), 1.0), Leave)


def test_after_restore_and_prune() -> None:
    h = after_restore(after_restore(History(), "a.s000001", 1.0), "a.s000002", 50.0)
    assert h == History(restores=(1.0, 50.0), last_image="a.s000002", running_since=50.0)
    assert prune_restores(h, 30.0, 60.0).restores == (50.0,)


def test_a_late_kill_from_outside_restores_the_newest_and_does_not_count() -> None:
    s = spec(min_uptime=1.0, max_restarts=2)
    h = History()
    now = 100.0
    for _ in range(20):  # killed 20 times, each copy after 1.5 s: back every time, newest
        d = decide(s, SIGKILLED, CKPTS, h, now=now)
        assert d == Restore(CKPTS, "killed by SIGKILL; restoring the newest checkpoint", False)
        h = after_restore(h, CKPTS[0], now=now, counts=d.counts)
        now += 1.5
    assert h.restores == ()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_quick_kill_counts_and_falls_back(sig: int) -> None:
    h = after_restore(History(), "app.s000005", now=100.0)
    d = decide(spec(min_uptime=1.0), Exit(signal=sig), CKPTS, h, now=100.5)
    assert isinstance(d, Restore)
    assert (d.candidates, d.counts) == (("app.s000004", "app.s000003"), True)


def test_quick_kills_give_up_at_max_restarts() -> None:
    s = spec(min_uptime=1.0, max_restarts=2, restart_window=60.0)
    h = History()
    for t in (100.0, 100.5):
        h = after_restore(h, "app.s000005", now=t)
    d = decide(s, SIGKILLED, CKPTS, h, now=100.6)
    assert d == GiveUp("killed by SIGKILL; already restored 2 times within 1m (--max-restarts 2)")


@pytest.mark.parametrize("end", [Exit(signal=signal.SIGSEGV), Exit(code=1), Exit()])
def test_a_late_failure_of_its_own_counts(end: Exit) -> None:
    h = after_restore(History(), "app.s000005", now=100.0)
    d = decide(spec(min_uptime=1.0), end, CKPTS, h, now=110.0)
    assert isinstance(d, Restore) and (d.candidates, d.counts) == (CKPTS, True)
