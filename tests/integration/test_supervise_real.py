"""Supervision on real CRIU through the CLI (issue 8): periodic checkpoints pruned to --keep,
SIGKILL restored under the same name within 1 s from the newest checkpoint, SIGABRT restored
and exit 0 not, stop --checkpoint then run --resume, resume --all after torpor's processes
and the app were all SIGKILLed."""

from __future__ import annotations

import itertools
import os
import random
import signal
import time
from pathlib import Path

import pytest

from torpor._process import _registry
from torpor._process._proc import ProcRef
from torpor._supervise import _state

from .helpers import APPS, PYTHON, counts, torpor, wait_for
from .supervision import daemon as _daemon
from .supervision import kill as _kill
from .supervision import kinds as _kinds
from .supervision import members as _pool_members
from .supervision import running as _running
from .supervision import supervised_home

pytestmark = pytest.mark.criu
home = supervised_home

COUNTER = [PYTHON, str(APPS / "counter.py")]
KILLS = int(os.environ.get("TORPOR_SUPERVISE_KILLS", "20"))  # issue 8's acceptance: 20


def test_periodic_checkpoints_are_pruned_to_keep(home: Path) -> None:
    torpor("run", "--name", "p", "--checkpoint-every", "500ms", "--keep", "2", "--", *COUNTER)
    wait_for(lambda: len(_kinds("p", "checkpoint")) >= 5, timeout=20, what="5 checkpoints")
    images = [e.fields["image"] for e in _kinds("p", "checkpoint")]
    assert images[:5] == [f"p.s{i:06d}" for i in range(1, 6)]

    def pruned() -> bool:
        # Between a checkpoint and its prune there are 3; once pruned, the 2 newest.
        newest = [e.fields["image"] for e in _kinds("p", "checkpoint")][-2:][::-1]
        return _pool_members("p") == newest

    wait_for(pruned, timeout=10, what="the pool pruned to the 2 newest")
    assert _state.read("p").kept == 2  # type: ignore[union-attr]


def test_sigkill_restored_fast_from_the_newest_checkpoint(home: Path) -> None:
    # The agent, as deployed: the supervisor's restores then skip Python's start-up.
    torpor("agent", "start")
    # The default policy: a copy killed from outside after --min-uptime (1 s) comes back from
    # the newest checkpoint every time, however often.
    torpor("run", "--name", "k", "--checkpoint-every", "1s", "--", *COUNTER)
    rec = _running("k")
    assert rec is not None
    wait_for(lambda: _kinds("k", "checkpoint"), timeout=10, what="a first checkpoint")
    took, firsts = [], []
    log = home / "logs" / "k.log"
    for _ in range(KILLS):
        time.sleep(random.uniform(1.05, 2.0))  # a random moment, past --min-uptime
        # Read now: a copy restored through the agent may start a new log file.
        firsts.append(wait_for(lambda pid=rec.pid: counts(log).get(pid), what="output")[0])  # type: ignore[index]
        state = _state.read("k")
        assert state is not None and state.last_checkpoint is not None
        newest = state.last_checkpoint.image
        restores = len(_kinds("k", "restore"))
        killed_at = time.monotonic()
        os.kill(rec.pid, signal.SIGKILL)  # the app this test started (a torpor-run copy)
        back = wait_for(
            lambda pid=rec.pid: _running("k", other_than=pid), timeout=5, what="a restore"
        )
        took.append(time.monotonic() - killed_at)
        rec = back  # type: ignore[assignment]
        restore = wait_for(lambda n=restores: _kinds("k", "restore")[n:], what="the restore event")
        # Never from before the last checkpoint taken before the kill.
        assert restore[0].fields["image"] >= newest  # type: ignore[index]
    print(f"crash-to-running: max {max(took):.3f}s, all {[round(t, 3) for t in took]}")
    assert max(took) < 1.0
    assert len(firsts) == KILLS
    assert firsts[0] == 1
    # Each copy continues from its predecessor's newest checkpoint: never from zero, never
    # backwards (two copies killed before a new checkpoint start at the same count).
    assert all(b >= a > 0 for a, b in itertools.pairwise(firsts)), firsts
    assert firsts[-1] > 1
    wait_for(lambda: _state.read("k").restores == KILLS, what="the count")  # type: ignore[union-attr]


def test_abort_restored_exit0_not(home: Path, tmp_path: Path) -> None:
    cmd = [PYTHON, str(APPS / "supervise_trigger.py"), str(tmp_path)]
    torpor("run", "--name", "t", "--checkpoint-every", "300ms", "--min-uptime", "0", "--", *cmd)
    first = _running("t")
    assert first is not None
    wait_for(lambda: _kinds("t", "checkpoint"), timeout=10, what="a first checkpoint")
    (tmp_path / "abort").write_text("")
    again = wait_for(lambda: _running("t", other_than=first.pid), timeout=5, what="a restore")
    crash = _kinds("t", "crash")
    # abort() in pid 1 of a PID namespace: SIGABRT is ignored there, and glibc's abort ends
    # with a fault instead; either way a crash.
    assert len(crash) == 1 and crash[0].fields["exit_code"] is None
    assert crash[0].fields["signal"] in (signal.SIGABRT, signal.SIGSEGV)
    (tmp_path / "exit0").write_text("")
    wait_for(lambda: _state.read("t").status == "stopped", what="the exit")  # type: ignore[union-attr]
    time.sleep(0.5)  # a restore would have been started by now
    assert _running("t") is None
    assert _registry.load("t").pid == again.pid  # type: ignore[attr-defined]
    assert _registry.load("t").exit_status == 0
    assert len(_kinds("t", "restore")) == 1


def test_stop_checkpoint_then_run_resume_continues(home: Path) -> None:
    torpor("run", "--name", "s", "--checkpoint-every", "10s", "--", *COUNTER)
    old = _running("s")
    assert old is not None
    time.sleep(1.0)
    out = torpor("stop", "s", "--checkpoint").stdout
    assert out.startswith(f"stopped s (pid {old.pid}) with SIGKILL")
    assert _state.read("s").status == "stopped"  # type: ignore[union-attr]
    assert _pool_members("s") == ["s.s000001"]
    before = counts(home / "logs" / "s.log")[old.pid]
    new = torpor("run", "--resume", "--name", "s", "--", *COUNTER).stdout.split()
    assert new[0] == "s"
    after = wait_for(lambda: counts(home / "logs" / "s.log").get(int(new[1])), what="output")
    # From the final checkpoint (taken within the stop, a few counts before its end).
    assert before[-1] - 40 <= after[0] <= before[-1] + 1  # type: ignore[index]


def test_run_resume_without_checkpoints_starts_the_command(home: Path) -> None:
    new = torpor("run", "--resume", "--name", "f", "--", *COUNTER).stdout.split()
    first = wait_for(lambda: counts(home / "logs" / "f.log").get(int(new[1])), what="output")
    assert first[0] == 1  # type: ignore[index]


def test_resume_all_after_everything_was_killed(home: Path) -> None:
    torpor("run", "--name", "r", "--checkpoint-every", "300ms", "--", *COUNTER)
    rec = _running("r")
    assert rec is not None
    wait_for(lambda: len(_kinds("r", "checkpoint")) >= 2, timeout=10, what="checkpoints")
    assert rec.keeper_start_time is not None
    daemon = _daemon(home)
    _kill(daemon)  # the supervisor, the keeper and the app: all started by this test
    _kill(ProcRef(rec.keeper_pid, rec.keeper_start_time))
    _kill(rec.ref)
    last = _state.read("r").last_checkpoint.image  # type: ignore[union-attr]
    before = counts(home / "logs" / "r.log")[rec.pid]
    out = torpor("resume", "--all").stdout.split()
    assert out[0] == "r"
    back = _running("r")
    assert back is not None and back.pid == int(out[1])
    restore = wait_for(lambda: _kinds("r", "restore"), what="the restore event")
    # The last recorded, or one a checkpoint in flight when the supervisor died pushed after.
    assert restore[0].fields["image"] >= last  # type: ignore[index, operator]
    after = wait_for(lambda: counts(home / "logs" / "r.log").get(back.pid), what="output")
    assert 1 < after[0] <= before[-1] + 1  # type: ignore[index]
    assert _daemon(home) != daemon
