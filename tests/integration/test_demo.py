"""The warm-start demo, end to end against real CRIU: the restored app carries on with the state
it had, restoring beats a cold start, and the demo leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from torpor._demo import _runner
from torpor._process._proc import running

from .helpers import torpor

pytestmark = pytest.mark.criu

# Enough rows for a warm-up that is clearly longer than a restore, few enough to keep tests quick.
SMALL = 200_000


def _assert_nothing_left(home: Path, result: _runner.DemoResult) -> None:
    pids = [result.before.pid, *(c.pid for c in result.copies)]
    assert not [p for p in pids if running(p)], "the demo left processes running"
    assert list((home / "images").iterdir()) == [], "the demo left its image"
    assert list((home / "procs").glob("*.json")) == [], "the demo left process records"


def test_restored_app_carries_on_and_is_ready_sooner(torpor_home: Path) -> None:
    result = _runner.run_demo()  # the real thing: a 1M-row index

    before = result.before
    assert before.served == len(_runner.KEYS)
    assert before.rows == _runner.DEFAULT_ROWS
    [copy] = result.copies
    assert copy.pid != before.pid
    # Same warm-up (token, index digest, its timing), counter where the original left it ...
    assert copy.restored.token == before.token
    assert copy.restored.digest == before.digest
    assert copy.restored.served == before.served
    # ... and counting on from there, answering the same LOOKUPs the same way.
    assert copy.after.served == before.served + copy.queries
    assert copy.answers_match
    assert result.state_continued

    # A behaviour, not a timing target: a restore is ready before a cold start would be.
    assert result.restore_seconds < result.cold_seconds, result
    assert result.image_bytes > 10 * 2**20
    _assert_nothing_left(torpor_home, result)


def test_copies_share_the_past_not_the_present(torpor_home: Path) -> None:
    result = _runner.run_demo(count=3, rows=SMALL)

    assert len({c.pid for c in result.copies}) == 3
    assert {c.restored.token for c in result.copies} == {result.before.token}
    assert {c.restored.served for c in result.copies} == {result.before.served}
    # Copy i got i more LOOKUPs: each counter moved by itself.
    assert [c.after.served - result.before.served for c in result.copies] == [1, 2, 3]
    assert result.state_continued
    assert result.restore_seconds < result.cold_seconds, result
    _assert_nothing_left(torpor_home, result)


def test_keep_leaves_the_copies_running(torpor_home: Path) -> None:
    result = _runner.run_demo(count=2, rows=SMALL, keep=True)
    pids = [c.pid for c in result.copies]
    try:
        assert all(running(p) for p in pids)
        assert result.kept == tuple(c.name for c in result.copies)
        assert result.image_path is not None and Path(result.image_path, "torpor.json").exists()
        client = _runner.connect(result.port)
        try:
            assert client.stats().token == result.before.token
        finally:
            client.close()
    finally:
        for pid in pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_cli_demo_json(torpor_home: Path) -> None:
    proc = torpor("demo", "--json", "--rows", str(SMALL), "--count", "2")
    data = json.loads(proc.stdout)

    assert data["state_continued"] is True
    assert data["restore_seconds"] < data["cold_seconds"]
    assert data["speedup"] > 1
    assert len(data["copies"]) == 2
    for copy in data["copies"]:
        assert copy["continues"] is True
        assert copy["restored"]["token"] == data["before"]["token"]
        assert not running(copy["pid"])
    assert list((torpor_home / "procs").glob("*.json")) == []


def test_cli_demo_table(torpor_home: Path) -> None:
    out = torpor("demo", "--rows", str(SMALL)).stdout
    assert "cold start -> ready" in out
    assert "restore -> ready" in out
    assert "faster than a cold start" in out
    assert "continued, not restarted" in out
