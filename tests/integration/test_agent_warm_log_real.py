"""The first copy a restore through the agent brings back is restored by the worker's warm CRIU
(started before the request came) and still writes to a log of its own: the worker's spare log,
an unnamed file that CRIU was given at its start, named ``<home>/logs/NAME.log`` by the restore.

Which CRIU restored is seen through ``TORPOR_CRIU``: a wrapper that notes every start (its pid
and its parent's) before it executes the real CRIU.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from torpor._engine import find_criu
from torpor._process._proc import ProcRef, running, stat_fields

from .helpers import APPS, PYTHON, counts, torpor, wait_for

pytestmark = pytest.mark.criu

TORPOR = Path(sys.executable).parent / "torpor"


@dataclass(frozen=True)
class Agent:
    ref: ProcRef
    starts: Path  # one line per CRIU started: "<criu pid> <parent pid> <arguments>"

    def swrk_starts(self, parent: int) -> list[int]:
        """The pids of the ``criu swrk`` processes ``parent`` started."""
        out = []
        for line in self.starts.read_text().splitlines():
            pid, ppid, *args = line.split()
            if int(ppid) == parent and "swrk" in args:
                out.append(int(pid))
        return out


# What the logs directory holds in the end: the copies' logs, the original's, the agent's and
# the forked keepers', and CRIU's restore statistics (its work directory is the logs directory).
LOGS = ["agent.log", "cp.log", "keeper.log", "orig.log", "stats-restore"]


def cli(*args: str, check: bool = True, **env: str) -> tuple[str, str, int]:
    proc = torpor(*args, check=check, command=(str(TORPOR),), **env)
    return proc.stdout, proc.stderr, proc.returncode


@pytest.fixture
def agent(torpor_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Agent]:
    """An agent whose CRIU (and every command's: TORPOR_CRIU must match) is the wrapper."""
    if not os.access(TORPOR, os.X_OK):
        pytest.fail(f"{TORPOR} is not installed: run scripts/setup.sh")
    real = find_criu()
    (tmp_path / "bin").mkdir()
    starts = tmp_path / "criu-starts"
    starts.touch()
    wrapper = tmp_path / "bin" / "criu"
    wrapper.write_text(f'#!/bin/sh\necho "$$ $PPID $*" >> {starts}\nexec {real} "$@"\n')
    wrapper.chmod(0o700)
    monkeypatch.setenv("TORPOR_CRIU", str(wrapper))
    out, _, _ = cli("agent", "start")
    assert out.startswith("agent started (pid ")
    data = json.loads((torpor_home / "agent.pid").read_text())
    ref = ProcRef(data["pid"], data["start_time"])
    yield Agent(ref, starts)
    if ref.alive():
        cli("agent", "stop", check=False)
    if ref.alive():
        os.kill(ref.pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _spares(agent: Agent, logs: Path) -> dict[int, tuple[int, int]]:
    """The idle workers: worker pid -> (its warm CRIU's pid, the inode of its spare log,
    ``logs/.spare-PID-START.log``), once both spare workers have both."""
    found: dict[int, tuple[int, int]] = {}
    for worker in _children(agent.ref.pid):
        criu = agent.swrk_starts(worker)
        st = stat_fields(worker)
        if st is None or len(criu) != 1 or not running(criu[0]):
            continue
        spare = logs / f".spare-{worker}-{st[19]}.log"
        for fd in Path(f"/proc/{worker}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == str(spare):
                    found[worker] = (criu[0], fd.stat().st_ino)
    return found if len(found) == 2 else {}


def _stop(agent: Agent, logs: Path) -> None:
    """Stop the agent once both its spare workers are warm; wait for them to end."""
    idle = wait_for(lambda: _spares(agent, logs), what="two warm workers")
    assert isinstance(idle, dict)
    cli("agent", "stop")
    wait_for(lambda: not any(running(w) for w in idle), what="the idle workers to end")


def _ppid(pid: int) -> int:
    st = stat_fields(pid)
    assert st is not None, f"process {pid} is gone"
    return int(st[1])


def _image(torpor_home: Path) -> Path:
    """A counter's image; its log is logs/orig.log (made without the agent)."""
    off = {"TORPOR_AGENT": "off"}
    out, _, _ = cli("run", "--name", "orig", "--", PYTHON, str(APPS / "counter.py"), **off)
    pid = int(out.split()[1])
    log = torpor_home / "logs" / "orig.log"
    wait_for(lambda: len(counts(log).get(pid, [])) >= 2, what="the original counting")
    cli("checkpoint", "orig", "--name", "img", **off)
    wait_for(lambda: not running(pid), what="the original to stop")
    return log


def test_the_first_copy_is_restored_by_the_warm_criu_into_its_own_log(
    torpor_home: Path, agent: Agent
) -> None:
    logs = torpor_home / "logs"
    original = _image(torpor_home)
    kept = original.read_bytes()
    spares = wait_for(lambda: _spares(agent, logs), what="two warm workers")
    assert isinstance(spares, dict)

    out, _, _ = cli("-q", "restore", "img", "--name", "cp")
    name, pid_text = out.split()
    pid = int(pid_text)
    keeper = _ppid(pid)
    warm_criu, spare_inode = spares[keeper]  # a spare worker restored it, as its keeper
    # No CRIU started for the restore: the one the worker started while idle restored it.
    assert agent.swrk_starts(keeper) == [warm_criu]
    own = logs / "cp.log"
    st = own.lstat()
    assert (name, st.st_ino, stat.S_IMODE(st.st_mode), st.st_uid) == ("cp", spare_inode, 0o600, 0)
    assert os.readlink(f"/proc/{pid}/fd/1") == os.readlink(f"/proc/{pid}/fd/2") == str(own)
    wait_for(lambda: len(counts(own).get(pid, [])) >= 3, what="the copy counting in its log")
    assert list(counts(own)) == [pid]
    assert original.read_bytes() == kept

    # The copy can be checkpointed: CRIU finds its log under its name.
    cli("checkpoint", "cp", "--name", "cp-img")
    wait_for(lambda: not running(keeper), what="the first copy's keeper to end")

    # The name again, now that copy has ended: its log is there, so the new copy appends to
    # it, restored by a CRIU started with it (the spare cannot become that file).
    before = own.read_bytes()
    spares = wait_for(lambda: _spares(agent, logs), what="two warm workers again")
    assert isinstance(spares, dict)
    out, _, _ = cli("-q", "restore", "img", "--name", "cp")
    again = int(out.split()[1])
    keeper = _ppid(again)
    warm_criu, _ = spares[keeper]
    starts = agent.swrk_starts(keeper)
    assert len(starts) == 2 and starts[0] == warm_criu
    wait_for(lambda: len(counts(own).get(again, [])) >= 2, what="the second copy counting")
    assert own.lstat().st_ino == st.st_ino
    assert own.read_bytes().startswith(before)
    assert list(counts(own)) == [pid, again]
    # Spares that were not used (that one, the idle workers') are gone with the agent.
    _stop(agent, logs)
    assert sorted(os.listdir(logs)) == LOGS


def test_a_planted_log_is_refused_through_the_agent_and_left_alone(
    torpor_home: Path, tmp_path: Path, agent: Agent
) -> None:
    logs = torpor_home / "logs"
    _image(torpor_home)
    target = tmp_path / "victim"
    target.write_bytes(b"precious\n")
    planted = logs / "evil.log"
    planted.symlink_to(target)
    wait_for(lambda: _spares(agent, logs), what="two warm workers")

    _, err, code = cli("restore", "img", "--name", "evil", check=False)
    assert (code, err) == (
        1,
        f"torpor: error: log {planted} is a symlink; refused"
        f" — torpor did not make it: remove {planted}\n",
    )
    assert target.read_bytes() == b"precious\n"
    assert planted.is_symlink() and os.readlink(planted) == str(target)
    out, _, _ = cli("ps", "--json")
    assert json.loads(out) == []  # nothing running, no record of "evil"
    _stop(agent, logs)
    assert sorted(os.listdir(logs)) == ["agent.log", "evil.log", "keeper.log", "orig.log"]


def test_a_killed_workers_spare_is_removed_by_the_next_worker(
    torpor_home: Path, agent: Agent
) -> None:
    logs = torpor_home / "logs"
    spares = wait_for(lambda: _spares(agent, logs), what="two warm workers")
    assert isinstance(spares, dict)
    victim = min(spares)
    left = logs / f".spare-{victim}-{stat_fields(victim)[19]}.log"  # type: ignore[index]
    assert left.lstat().st_ino == spares[victim][1]
    # A spare named for a live process (this one) is that process's: it stays.
    me = ProcRef(os.getpid(), int(stat_fields(os.getpid())[19]))  # type: ignore[index]
    kept = logs / f".spare-{me.pid}-{me.start_time}.log"
    kept.touch(mode=0o600)
    os.kill(victim, signal.SIGKILL)  # the agent's, which the fixture started
    wait_for(lambda: not left.exists(), what="the killed worker's spare to be removed")
    assert kept.exists()
    kept.unlink()
    _stop(agent, logs)
    assert sorted(os.listdir(logs)) == ["agent.log"]
