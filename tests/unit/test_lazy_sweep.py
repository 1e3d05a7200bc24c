"""What a killed keeper leaves of lazy restores (work dirs, pool local parts) is swept at the
next restore, judged by the (pid, start time) of every process that claimed it: never one a
live process uses, never a failed copy's logs, never anything else in those directories."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from torpor._lazy import _sweep
from torpor._process._proc import start_time


def _dir(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir(parents=True)
    return path


def _dead_claim(path: Path) -> None:
    """A claim by a process that has ended since (its pid and start time, as it had them)."""
    proc = subprocess.Popen(["sleep", "30"])
    _sweep.claim(path, proc.pid)
    proc.kill()
    proc.wait()


def test_only_what_no_live_process_claimed_is_swept(tmp_path: Path) -> None:
    lazy, pool = tmp_path / "lazy", tmp_path / "lazy-pool"
    live = _dir(lazy, "web-0123abcd")
    _sweep.claim(live)  # this process
    dead = _dir(lazy, "web-89abcdef")
    _dead_claim(dead)
    daemon_left = _dir(pool, "4242-0123456789abcdef")  # its keeper died, its daemon lives
    _dead_claim(daemon_left)
    _sweep.claim(daemon_left)
    reused = _dir(pool, "4243-0123456789abcdef")  # a live pid, but not the process it was
    born = start_time(os.getpid())
    assert born is not None
    (reused / f"owner-{os.getpid()}-{born + 1}").touch()
    failed = _dir(lazy, "db-00000000")
    _dead_claim(failed)
    (failed / _sweep.FAILED_MARK).touch()
    young = _dir(lazy, "new-11111111")  # not claimed yet: made a moment ago
    old = _dir(lazy, "old-22222222")
    os.utime(old, (time.time() - 2 * _sweep.GRACE,) * 2)
    warm = _dir(lazy, "warm")
    os.utime(warm, (time.time() - 2 * _sweep.GRACE,) * 2)
    state = lazy / "web.json"
    state.write_text("{}")
    removed = _sweep.sweep([lazy, pool, tmp_path / "missing"])
    assert sorted(removed) == sorted([dead, reused, old])
    for kept in (live, daemon_left, failed, young, warm, state):
        assert kept.exists(), kept
    for gone in removed:
        assert not gone.exists()
