"""The keeper enforces its supervisor's lease deadline, on real processes (``torpor run``
under a real supervisor, the home's dir pool): while the supervisor renews, the app runs on
past the deadline of any one word; a supervisor paused (SIGSTOP) cannot renew, and the app's
keeper kills it before the 15 s lease could lapse; a supervisor stopped (SIGTERM) clears the
deadline, and its apps run on."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from torpor._process import _registry
from torpor._supervise import _state

from .helpers import torpor, wait_for
from .supervision import COUNTER, supervised_home
from .supervision import daemon as _daemon
from .supervision import running as _running

pytestmark = pytest.mark.criu
home = supervised_home


def _supervised(home: Path, name: str) -> _registry.ManagedProcess:
    """Run ``name`` supervised (no periodic checkpoints); its record once watched."""
    torpor("run", "--name", name, "--checkpoint-every", "0", "--", *COUNTER)
    rec = _running(name)
    assert rec is not None
    log = home / "supervised" / ".daemon.log"
    wait_for(
        lambda: any(
            line.endswith(f": {name}: supervising pid {rec.pid}")
            for line in log.read_text().splitlines()
        ),
        what=f"the supervisor to watch {name}",
    )
    return rec


def test_a_paused_supervisors_app_is_killed_by_its_keeper_before_the_lease_lapses(
    home: Path,
) -> None:
    rec = _supervised(home, "f")
    time.sleep(13.0)  # past any one word's deadline (12 s): renewed, so it runs on
    assert rec.ref.alive()
    daemon = _daemon(home)
    assert daemon is not None and daemon.alive()
    os.kill(daemon.pid, signal.SIGSTOP)  # the supervisor this test started, checked above
    paused = time.monotonic()
    try:
        wait_for(lambda: not rec.ref.alive(), timeout=20, what="the keeper to kill f")
        took = time.monotonic() - paused
        # The last word was at most 5 s old (a renewal every 5 s): 7 to 12 s, before the
        # lease (15 s from that renewal) lapses.
        assert 6.0 < took < 13.0, took
        wait_for(lambda: _registry.load("f").exit_status is not None, what="its exit status")
        assert _registry.load("f").exit_status == -signal.SIGKILL
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    # Woken past its deadline, the supervisor fences (given up), it does not restore.
    wait_for(lambda: _state.read("f").status == "given-up", timeout=10, what="f given up")  # type: ignore[union-attr]
    time.sleep(1.0)
    assert _running("f") is None


def test_a_stopped_supervisors_apps_run_on(home: Path) -> None:
    rec = _supervised(home, "g")
    assert torpor("supervisor", "stop").returncode == 0
    time.sleep(13.0)  # past the last word's deadline: it was cleared
    assert rec.ref.alive() and _running("g") == rec
