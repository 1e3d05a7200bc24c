"""Holding a lazy copy's background push (``bench/pause.py``): the daemon stopped for a
bounded window, continued while it serves a fault, stopped again once no fault is pending.

The daemon is a real child process that reads "faults" (bytes) from a pipe, as
``criu lazy-pages`` reads its userfaultfds: a byte written is a pending fault (the pipe reads
as readable, as a userfaultfd with an unread fault does), and it is served once the child has
read it. A stopped child cannot read it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import pause as _pause

READER = "import os\nwhile True:\n    if not os.read(0, 1):\n        break\n"


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def wait_state(pid: int, want: str, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (state(pid) == "T") == (want == "T"):
            return True
        time.sleep(0.001)
    return False


@pytest.fixture
def daemon() -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """(the reader child, the pipe's write end, a duplicate of its read end)."""
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", READER], stdin=r)
    watch = os.dup(r)
    os.close(r)
    try:
        yield proc, w, watch
    finally:
        proc.kill()
        proc.wait()
        os.close(w)
        os.close(watch)


def test_the_daemon_is_stopped_and_continued_at_the_end_of_the_window(daemon) -> None:
    proc, _, watch = daemon
    pause = _pause.PushPause(proc.pid, [watch], 0, most=0.3)
    try:
        assert wait_state(proc.pid, "T")
        time.sleep(0.1)
        assert state(proc.pid) == "T"  # still within the window
        assert pause.wait(1.0)
        assert wait_state(proc.pid, "S", timeout=1.0)  # the window ended by itself
        assert pause.ended_at is not None and pause.faults == 0
        assert pause.ended_at - pause.started_at == pytest.approx(0.3, abs=0.1)
    finally:
        pause.close()


def test_a_fault_is_served_at_once_and_the_daemon_stopped_again(daemon) -> None:
    proc, w, watch = daemon
    pause = _pause.PushPause(proc.pid, [watch], 0, most=5.0)
    try:
        assert wait_state(proc.pid, "T")
        t0 = time.monotonic()
        os.write(w, b"f")  # a fault
        deadline = t0 + 1.0
        while _pause.pending([watch]) and time.monotonic() < deadline:
            time.sleep(0.0005)
        served = time.monotonic() - t0
        assert not _pause.pending([watch]), "the fault was never served"
        assert served < 0.2, served  # not held until the window's end
        assert wait_state(proc.pid, "T")  # stopped again: the push stays held
        assert pause.faults == 1 and pause.ended_at is None
    finally:
        pause.close()
    assert wait_state(proc.pid, "S")  # close() continues it for good


def test_end_continues_the_daemon_and_is_idempotent(daemon) -> None:
    proc, _, watch = daemon
    pause = _pause.PushPause(proc.pid, [watch], 0, most=10.0)
    assert wait_state(proc.pid, "T")
    pause.end()
    assert wait_state(proc.pid, "S")
    first = pause.ended_at
    pause.end()
    pause.close()
    assert pause.ended_at == first


def test_a_daemon_gone_is_no_error(daemon) -> None:
    proc, w, watch = daemon
    pause = _pause.PushPause(proc.pid, [watch], 0, most=0.2)
    proc.kill()
    proc.wait()
    os.write(w, b"f")
    pause.close()
    assert pause.ended_at is not None


def test_a_thread_waiting_in_handle_userfault_is_seen(monkeypatch) -> None:
    """``waiting_on_fault`` reads each thread's wchan: here a child sleeping in nanosleep
    stands in for one waiting in handle_userfault."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            with open(f"/proc/{proc.pid}/wchan", encoding="ascii") as fh:
                wchan = fh.read().strip()
            if wchan not in ("", "0"):
                break
            time.sleep(0.01)
        assert not _pause.waiting_on_fault([proc.pid])
        monkeypatch.setattr(_pause, "USERFAULT_WCHAN", wchan)
        assert _pause.waiting_on_fault([proc.pid])
        assert not _pause.waiting_on_fault([2**22 + 12345])  # no such process
        assert proc.pid in _pause.tree(os.getpid())  # a child is in our tree
    finally:
        proc.kill()
        proc.wait()
