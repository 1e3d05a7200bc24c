"""Retention next to the crash-loop fallback (review finding 5): while a restored copy is on
probation (restored less than ``min_uptime`` ago) a prune keeps the checkpoint it came from and
the ``keep - 1`` before it besides the newest ``keep``, so that its quick crash still has
something to fall back to. The policy's pure rule (``_policy.to_prune``, ``probation_floor``),
and the prune the supervisor's task and the app's own checkpoints run (``_series.prune``, whose
floor comes from the supervision record and the supervisor's ``restore`` event)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from torpor._pools import MemoryBackend, Pool
from torpor._supervise import _events, _policy, _series, _state
from torpor._supervise._policy import Exit, GiveUp, History, Restore
from torpor._supervise._spec import Spec

from .test_pool_support import FAST

SPEC = Spec(name="app", command=("app",), interval=10.0, min_uptime=60.0, keep=3)


def _name(seq: int) -> str:
    return _series.series_name("app", seq)


def _run_on_probation(
    floor_of: Callable[[History, float], str | None],
) -> tuple[list[str], _policy.Decision]:
    """The reviewer's repro: restored from s5 (s5, s4, s3 kept) at t=0, the copy checkpoints
    every 10 s (s6..s9), each followed by a prune; it crashes (SIGSEGV) at 45 s, within
    --min-uptime 60s. ``floor_of(history, now)`` is the floor each prune gets."""
    series = [_name(n) for n in (5, 4, 3)]
    history = _policy.after_restore(History(), _name(5), 0.0)
    for n, now in zip(range(6, 10), (10.0, 20.0, 30.0, 40.0), strict=True):
        series = [_name(n), *series]
        doomed = _policy.to_prune(series, SPEC.keep, floor_of(history, now))
        series = [c for c in series if c not in doomed]
    return series, _policy.decide(SPEC, Exit(signal=11), series, history, 45.0)


def test_a_copy_on_probation_keeps_what_it_would_fall_back_to() -> None:
    series, decision = _run_on_probation(lambda h, now: _policy.probation_floor(SPEC, h, now))
    assert series == [_name(n) for n in (9, 8, 7, 5, 4, 3)]
    assert isinstance(decision, Restore)
    assert decision.candidates == (_name(4), _name(3))


def test_without_the_floor_the_fallback_gives_up() -> None:
    # What the reviewer saw (the prune by sequence number alone): only suspect images left.
    series, decision = _run_on_probation(lambda h, now: None)
    assert series == [_name(n) for n in (9, 8, 7)]
    assert isinstance(decision, GiveUp)
    assert "no older checkpoint is left to fall back to" in decision.reason


def test_probation_ends_after_min_uptime_and_its_slack() -> None:
    history = _policy.after_restore(History(), _name(5), 100.0)
    end = 100.0 + SPEC.min_uptime + _policy.PROBATION_SLACK
    assert _policy.probation_floor(SPEC, history, end - 0.01) == _name(5)
    assert _policy.probation_floor(SPEC, history, end) is None
    assert _policy.probation_floor(SPEC, history, 50.0) == _name(5)  # the clock went back
    assert _policy.probation_floor(SPEC, History(), 100.0) is None  # not restored by us


def test_to_prune_keeps_the_newest_and_the_floor_with_the_ones_before_it() -> None:
    series = [_name(n) for n in range(12, 0, -1)]
    assert _policy.to_prune(series, 3) == [_name(n) for n in range(9, 0, -1)]
    assert _policy.to_prune(series, 3, _name(5)) == [_name(n) for n in (9, 8, 7, 6, 2, 1)]
    # The floor among the newest: nothing more than its elders is kept.
    assert _policy.to_prune(series, 3, _name(11)) == [_name(n) for n in range(8, 0, -1)]
    # The floor gone already (pruned by an older torpor): the ones before it by name.
    gone = [c for c in series if c != _name(5)]
    assert _policy.to_prune(gone, 3, _name(5)) == [_name(n) for n in (9, 8, 7, 6, 2, 1)]
    # keep 1: the floor alone (a fallback has nothing older, as with keep 1 before the crash).
    assert _policy.to_prune(series, 1, _name(5)) == [
        c for c in series if c not in (_name(12), _name(5))
    ]


# -- the prune the supervisor's task runs (`_tasks prune POOL NAME KEEP`: the default floor) --


@pytest.fixture
def pool(torpor_home: Path) -> Pool:
    pool = Pool("mem", MemoryBackend(), timing=FAST)
    for seq in range(1, 10):
        # Members by key alone (a damaged manifest is still a member, and pruned).
        pool.backend.put(f"images/{_name(seq)}", b"x")
    return pool


def _left(pool: Pool) -> list[str]:
    return [image for _, image in _series._member_names(pool, "app")]


def _supervised(spec: Spec = SPEC) -> None:
    _state.save(_state.State(spec=spec, status="supervised"))


def test_the_supervisors_prune_keeps_the_floor_of_its_last_restore(pool: Pool) -> None:
    _supervised()
    _events.append("app", "restore", image=_name(5), pid=123, duration_s=0.2)
    _events.append("app", "checkpoint", image=_name(9), duration_s=0.1)
    deleted = _series.prune(pool, "app", 3, collect=False)
    assert deleted == [_name(n) for n in (1, 2, 6)]
    assert _left(pool) == [_name(n) for n in (9, 8, 7, 5, 4, 3)]


def test_once_the_copy_ran_min_uptime_the_prune_keeps_the_newest_only(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    _supervised()
    _events.append("app", "restore", image=_name(5), pid=123, duration_s=0.2)
    now = _series._wall_clock()
    later = now + SPEC.min_uptime + _policy.PROBATION_SLACK + 1
    monkeypatch.setattr(_series, "_wall_clock", lambda: later)
    assert _series.prune(pool, "app", 3, collect=False) == [_name(n) for n in range(1, 7)]
    assert _left(pool) == [_name(n) for n in (9, 8, 7)]


@pytest.mark.parametrize(
    "setup",
    [
        "unsupervised",  # no record: nobody falls back
        "given-up",
        "migrated",  # the last restore was a migration's: the copy is not a member's
        "other-series",
    ],
)
def test_no_floor_without_a_supervised_restore_from_the_series(pool: Pool, setup: str) -> None:
    if setup == "given-up":
        _state.save(_state.State(spec=SPEC, status="given-up", given_up="x"))
    elif setup != "unsupervised":
        _supervised()
    _events.append("app", "restore", image=_name(5), pid=1, duration_s=0.1)
    if setup == "migrated":
        _events.append("app", "restore", migrated_from="hostb", mode="copy")
    if setup == "other-series":
        _events.append("app", "restore", image="appx.s000005", pid=2, duration_s=0.1)
    assert _series.probation_floor("app") is None
    _series.prune(pool, "app", 3, collect=False)
    assert _left(pool) == [_name(n) for n in (9, 8, 7)]


def test_an_explicit_floor_overrides_the_records(pool: Pool) -> None:
    _supervised()
    _events.append("app", "restore", image=_name(5), pid=123, duration_s=0.2)
    assert _series.prune(pool, "app", 3, collect=False, floor=None) == [
        _name(n) for n in range(1, 7)
    ]
    assert _left(pool) == [_name(n) for n in (9, 8, 7)]
