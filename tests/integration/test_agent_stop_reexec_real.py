"""`torpor agent stop` while the real agent re-executes (review finding 7): caught with its
listener closed (and held there with SIGSTOP), it is waited for and stopped, not called
stale or planted."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from torpor._agent import _control
from torpor._agent_status import AgentStatus
from torpor._process._proc import ProcRef, holds_unix_socket

from .test_agent_real import agent  # noqa: F401  (the fixture)

pytestmark = pytest.mark.criu


def test_stop_while_the_agent_re_executes_stops_it(
    torpor_home: Path,
    agent: ProcRef,  # noqa: F811
) -> None:
    sock = str(torpor_home / "agent.sock")
    assert holds_unix_socket(agent.pid, sock)
    os.kill(agent.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while holds_unix_socket(agent.pid, sock):
        assert time.monotonic() < deadline, "the agent never closed its listener"
    os.kill(agent.pid, signal.SIGSTOP)  # held mid-re-execution, its listener closed
    results: list[AgentStatus | BaseException | None] = []

    def stop() -> None:
        try:
            results.append(_control.stop())
        except BaseException as exc:  # reported below
            results.append(exc)

    stopper = threading.Thread(target=stop)
    try:
        stopper.start()
        time.sleep(0.3)
        assert not holds_unix_socket(agent.pid, sock)
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    stopper.join(timeout=30)
    assert len(results) == 1
    result = results[0]
    assert isinstance(result, AgentStatus), result
    assert result.pid == agent.pid
    assert not agent.alive()
    # It served again (the new image), and only then stopped.
    lines = [
        line.split(" ", 1)[1]
        for line in (torpor_home / "logs" / "agent.log").read_text().splitlines()
    ]
    events = [line for line in lines if not line.startswith("idle worker ")]
    assert events[-3:] == [
        f"agent {agent.pid} re-executing (new code)",
        f"agent {agent.pid} serving {sock}",
        f"agent {agent.pid} stopped",
    ]
