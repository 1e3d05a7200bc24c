"""`torpor agent stop` while the agent re-executes (review finding 7).

A re-executing agent closes its listener for a moment but keeps ``agent.lock`` (its ``flock``
stays held across the exec). ``stop`` then waits (bounded) for it to listen again rather than
call it stale or planted, advice that, followed, would orphan a live agent. A process that
only has the recorded pid (or has the lock file open without the lock) is refused as before.

The agent is played by a child of the test (its pid and start time in ``agent.pid``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from torpor import PermissionDeniedError
from torpor._agent import _control
from torpor._process import _proc

# Opens agent.lock (flock-ed unless told not to), then listens at agent.sock after a delay
# (never, if negative), then sleeps; SIGTERM ends it.
_FAKE_AGENT = textwrap.dedent(
    """
    import fcntl, os, socket, sys, time
    home, delay, lock = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "lock"
    fd = os.open(os.path.join(home, "agent.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    if lock:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("up", flush=True)
    if delay >= 0:
        time.sleep(delay)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(os.path.join(home, "agent.sock"))
        s.listen()
    time.sleep(60)
    """
)

Spawn = Callable[[float, bool], subprocess.Popen[bytes]]


@pytest.fixture
def fake_agent(torpor_home: Path) -> Iterator[Spawn]:
    started: list[subprocess.Popen[bytes]] = []

    def spawn(delay: float, lock: bool) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _FAKE_AGENT,
                str(torpor_home),
                str(delay),
                "lock" if lock else "",
            ],
            stdout=subprocess.PIPE,
        )
        started.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        me = _proc.ref(proc.pid)
        pid_file = torpor_home / "agent.pid"
        pid_file.write_text(
            json.dumps({"pid": me.pid, "start_time": me.start_time, "started": "x"})
        )
        pid_file.chmod(0o600)
        return proc

    yield spawn
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _refusal(home: Path, pid: int) -> str:
    pid_file = home / "agent.pid"
    return (
        f"{pid_file} names pid {pid}, which is not this home's agent (it does not serve "
        f"{home / 'agent.sock'}); nothing signalled — the record is stale or planted: "
        f"remove {pid_file}"
    )


def test_an_agent_listening_again_soon_is_stopped(torpor_home: Path, fake_agent: Spawn) -> None:
    agent = fake_agent(0.5, True)  # holds the lock, listens again 0.5 s later
    stopped = _control.stop()
    assert stopped is not None
    assert stopped.pid == agent.pid
    assert agent.wait(timeout=5) == -signal.SIGTERM


def test_a_lock_holder_that_never_listens_is_refused_after_the_wait(
    torpor_home: Path, fake_agent: Spawn
) -> None:
    agent = fake_agent(-1, True)
    t0 = time.monotonic()
    with pytest.raises(PermissionDeniedError) as info:
        _control.stop()
    waited = time.monotonic() - t0
    assert str(info.value) == _refusal(torpor_home, agent.pid)
    assert _control.RELISTEN_TIMEOUT <= waited < _control.RELISTEN_TIMEOUT + 3
    assert agent.poll() is None  # not signalled


def test_a_process_with_the_lock_file_open_but_not_locked_is_refused_at_once(
    torpor_home: Path, fake_agent: Spawn
) -> None:
    agent = fake_agent(-1, False)
    t0 = time.monotonic()
    with pytest.raises(PermissionDeniedError) as info:
        _control.stop()
    assert time.monotonic() - t0 < 1.0
    assert str(info.value) == _refusal(torpor_home, agent.pid)
    assert agent.poll() is None
