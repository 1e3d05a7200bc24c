"""``torpor logs`` on a real app started by ``torpor run``: its output, followed live with
``-f``, and the output of the copy restored under the same name in the same log (the original's
lines then the copy's); ``torpor events`` on a real home."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from pathlib import Path

import pytest

from torpor._supervise import _events

from .helpers import APPS, PYTHON, counts, torpor, wait_for

pytestmark = pytest.mark.criu


def _lines(text: str) -> list[tuple[int, int]]:
    return [(int(p), int(c)) for p, c in (line.split() for line in text.splitlines())]


def test_logs_shows_follows_and_spans_a_restore(torpor_home: Path) -> None:
    pid = int(
        torpor("run", "--name", "cnt", "--", PYTHON, str(APPS / "counter.py")).stdout.split()[1]
    )
    log = torpor_home / "logs" / "cnt.log"
    wait_for(lambda: log.exists() and len(counts(log).get(pid, [])) >= 5, what="counting")

    shown = _lines(torpor("logs", "cnt", "-n", "3").stdout)
    assert [p for p, _ in shown] == [pid] * 3
    assert [c for _, c in shown] == list(range(shown[0][1], shown[0][1] + 3))

    # -f: prints the last line, then lines the app writes afterwards, as they come.
    follower = subprocess.Popen(
        [PYTHON, "-m", "torpor", "logs", "cnt", "-f", "-n", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    try:
        assert follower.stdout is not None
        os.set_blocking(follower.stdout.fileno(), False)
        sel = selectors.DefaultSelector()
        sel.register(follower.stdout, selectors.EVENT_READ)
        got = b""
        deadline = time.monotonic() + 15
        while got.count(b"\n") < 6 and time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                got += follower.stdout.read() or b""
        followed = _lines(got.decode())
        assert len(followed) >= 6, got
        nums = [c for _, c in followed]
        assert nums == list(range(nums[0], nums[0] + len(nums)))  # nothing lost, nothing twice

        # The copy restored under the same name appends to the same log: -f goes on with it.
        torpor("checkpoint", "cnt", "--name", "cnt-img")
        last = counts(log)[pid][-1]
        new_pid = int(torpor("restore", "cnt-img", "--name", "cnt").stdout.split()[1])
        wait_for(lambda: len(counts(log).get(new_pid, [])) >= 3, what="the copy counting")
        deadline = time.monotonic() + 15
        while f"{new_pid} ".encode() not in got and time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                got += follower.stdout.read() or b""
        assert (
            f"\n{new_pid} {last + 1}\n".encode() in got
            or f"\n{new_pid} {last + 2}\n".encode() in got
        )
    finally:
        follower.send_signal(signal.SIGINT)  # as Ctrl-C: it ends quietly
        try:
            rc = follower.wait(10)
        except subprocess.TimeoutExpired:
            follower.kill()
            follower.wait()
            raise
    assert rc == 0
    assert follower.stderr is not None and follower.stderr.read() == b""

    whole = _lines(torpor("logs", "cnt", "-n", "all").stdout)
    pids = [p for p, _ in whole]
    # The original's lines, then the copy's: one log for the name, original and restored alike.
    assert pids.count(pid) >= 5 and pids.count(new_pid) >= 3
    assert pids == [pid] * pids.count(pid) + [new_pid] * pids.count(new_pid)


def test_events_of_a_real_managed_process(torpor_home: Path) -> None:
    torpor("run", "--name", "ev", "--", "sleep", "60")
    out = torpor("events", "ev")
    assert (out.stdout, out.stderr) == ("", "no events of ev yet\n")
    _events.append("ev", "crash", signal=9, uptime_s=1.0)
    _events.append("ev", "restore", image="ev.s000002", fallback=True)
    rows = [line.split(None, 3)[2:] for line in torpor("events", "ev").stdout.splitlines()[1:]]
    assert rows == [
        ["crash", "killed by SIGKILL, after 1.00s"],
        ["restore", "from ev.s000002 (fallback: newer ones failed)"],
    ]
    missing = torpor("events", "nothing-here", check=False)
    assert (missing.returncode, missing.stderr) == (
        1,
        "torpor: error: no events of 'nothing-here': it is not a managed process — "
        "`torpor ps -a` lists managed processes\n",
    )
