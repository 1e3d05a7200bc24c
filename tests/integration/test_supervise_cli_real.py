"""The supervision commands on real CRIU (issue 8), each end to end: the supervisor stopped
(``supervisor stop`` or a plain SIGTERM) checkpoints every supervised app first and leaves
them running, ``resume --all`` brings them back from those checkpoints; ``supervise`` of a
running and of a restored process, ``unsupervise``; ``run --resume`` with a corrupted only
checkpoint (exit 3, one line) and ``--no-restore``; ``stop`` of a supervised process."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path

import pytest

from torpor._cli._run import SUPERVISION_COLUMNS
from torpor._pools import open_pool
from torpor._process import _registry
from torpor._supervise import _state

from .helpers import APPS, PS_COLUMNS, PYTHON, counts, parse_table, torpor, wait_for
from .supervision import daemon as _daemon
from .supervision import kill as _kill
from .supervision import kinds as _kinds
from .supervision import members as _members
from .supervision import running as _running
from .supervision import supervised_home

pytestmark = pytest.mark.criu
home = supervised_home

COUNTER = [PYTHON, str(APPS / "counter.py")]
NO_HANDLER = "SIGKILL: it has no SIGTERM handler, and pid 1 of a PID namespace ignores SIGTERM "
NO_HANDLER += "without one"


def _jobs_of(home: Path, name: str) -> list[list[str]]:
    """The supervisor's children (the torpor commands it runs) for ``name``."""
    ref = _daemon(home)
    assert ref is not None and ref.alive(), "the supervisor died (its log is printed below)"
    jobs = []
    for pid in Path(f"/proc/{ref.pid}/task/{ref.pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            if name in argv:
                jobs.append(argv)
    return jobs


def _first(home: Path, name: str, pid: int) -> int:
    """The first count the copy ``pid`` of ``name`` printed."""
    return wait_for(lambda: counts(home / "logs" / f"{name}.log").get(pid), what="output")[0]  # type: ignore[index,no-any-return]


# -- 1. the supervisor stopped: final checkpoints, then resume --all ----------------------------


@pytest.mark.parametrize("how", ["supervisor stop", "SIGTERM"])
def test_supervisor_stopped_checkpoints_first_and_resume_all_continues(
    home: Path, how: str
) -> None:
    # "a": app-driven only (interval 0): its one checkpoint can only be the shutdown's.
    torpor("run", "--name", "a", "--checkpoint-every", "0", "--", *COUNTER)
    torpor("run", "--name", "b", "--checkpoint-every", "500ms", "--", *COUNTER)
    apps = {n: _running(n) for n in ("a", "b")}
    wait_for(lambda: _kinds("b", "checkpoint"), timeout=15, what="a checkpoint of b")
    assert _members("a") == []
    before = {n: counts(home / "logs" / f"{n}.log")[r.pid][-1] for n, r in apps.items()}  # type: ignore[union-attr]
    newest_b = _members("b")[0]
    daemon = _daemon(home)
    assert daemon is not None and daemon.alive()
    if how == "SIGTERM":
        os.kill(daemon.pid, signal.SIGTERM)  # the supervisor this test started, checked above
        wait_for(lambda: not daemon.alive(), timeout=40, what="the supervisor to exit")
    else:
        out = torpor("supervisor", "stop").stdout
        assert out == f"supervisor stopped (pid {daemon.pid})\n"
        assert not daemon.alive()
    assert torpor("supervisor", "status", check=False).stdout == "supervisor not running\n"
    # Each got a final checkpoint before the supervisor let go, and is marked shutdown.
    assert _members("a") == ["a.s000001"]
    assert _members("b")[0] > newest_b
    for name in ("a", "b"):
        last = [e.kind for e in _kinds(name)][-2:]
        assert last == ["checkpoint", "shutdown"], last
        assert _kinds(name, "checkpoint")[-1].fields["image"] == _members(name)[0]
        assert _state.read(name).status == "shutdown"  # type: ignore[union-attr]
        # ... and runs on, the same process.
        assert _running(name) == apps[name]
    # The host goes down: the apps die too.
    for rec in apps.values():
        _kill(rec.ref)  # type: ignore[union-attr]
    at_kill = {n: counts(home / "logs" / f"{n}.log")[r.pid][-1] for n, r in apps.items()}  # type: ignore[union-attr]
    lines = torpor("resume", "--all").stdout.splitlines()
    pids = dict(line.split() for line in lines)
    assert sorted(pids) == ["a", "b"]
    for name in ("a", "b"):
        back = _running(name)
        assert back is not None and back.pid == int(pids[name])
        wait_for(lambda: _kinds(name, "restore"), what="the restore event")  # noqa: B023
        assert _kinds(name, "restore")[0].fields["image"] == _members(name)[0]
        # From the final checkpoint: past every count printed before the stop.
        assert before[name] < _first(home, name, back.pid) <= at_kill[name] + 1


# -- 2. supervise a running and a restored process; unsupervise --------------------------------


def test_supervise_running_and_restored_processes_then_unsupervise(home: Path) -> None:
    torpor("run", "--name", "c", "--", *COUNTER)
    c = _running("c")
    assert c is not None
    out = torpor("supervise", "c", "--checkpoint-every", "500ms").stdout
    assert out == (
        f"supervising c (pid {c.pid}): a checkpoint every 500ms into pool default, keeping 3; "
        "restart on-failure\n"
    )
    wait_for(lambda: _kinds("c", "checkpoint"), timeout=15, what="a checkpoint of c")
    os.kill(c.pid, signal.SIGKILL)  # the app this test started
    c2 = wait_for(lambda: _running("c", other_than=c.pid), timeout=10, what="c restored")
    assert _first(home, "c", c2.pid) > 1  # type: ignore[attr-defined]
    # A process restored by hand from an image, under another name.
    # c is supervised: its periodic checkpoint may hold it at this moment (refused, one line).
    wait_for(
        lambda: (
            torpor("checkpoint", "c", "--name", "c-img", "--leave-running", check=False).returncode
            == 0
        ),
        timeout=20,
        what="a checkpoint of c between its periodic ones",
    )
    torpor("restore", "c-img", "--name", "x")
    x = _running("x")
    assert x is not None
    torpor("supervise", "x", "--checkpoint-every", "500ms")
    wait_for(lambda: _kinds("x", "checkpoint"), timeout=15, what="a checkpoint of x")
    os.kill(x.pid, signal.SIGKILL)  # restored by this test
    x2 = wait_for(lambda: _running("x", other_than=x.pid), timeout=10, what="x restored")
    restore = wait_for(lambda: _kinds("x", "restore"), what="the restore event of x")
    assert restore[0].fields["image"] == _kinds("x", "checkpoint")[0].fields["image"]  # type: ignore[index]
    # Unsupervised: no more checkpoints, not restored, and the supervisor serves on.
    out = torpor("unsupervise", "x").stdout
    assert out == "no longer supervising x (it keeps running; its checkpoints stay)\n"
    assert _state.read("x") is None
    wait_for(lambda: not _jobs_of(home, "x"), timeout=20, what="the supervisor's jobs on x")
    # A checkpoint in flight at the unsupervise may still land (and be recorded, as it is in
    # the pool): the daemon handles its end a moment after the job is gone (a zombie's
    # cmdline is empty). None may start after it.
    time.sleep(0.5)
    taken = len(_kinds("x", "checkpoint"))
    time.sleep(1.5)  # three periods
    assert len(_kinds("x", "checkpoint")) == taken
    assert torpor("supervisor", "status", check=False).returncode == 0
    os.kill(x2.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    wait_for(lambda: _running("x") is None, what="x to end")
    time.sleep(1.0)  # a restore would be running by now (c's came back within that)
    assert _running("x") is None
    assert _registry.load("x").exit_status == -signal.SIGKILL
    rows = parse_table(
        torpor("ps", "-a").stdout,
        (*PS_COLUMNS, *SUPERVISION_COLUMNS),
    )
    assert (rows["x"]["STATE"], rows["x"]["SUPERVISED"]) == ("killed (signal 9)", "-")
    assert rows["c"]["SUPERVISED"] == "supervised"
    kinds = [e.kind for e in _kinds("x")]
    assert kinds[kinds.index("unsupervise") + 1 :] in ([], ["checkpoint"])


# -- 3. run --resume with a corrupted only checkpoint ------------------------------------------


def test_run_resume_with_a_corrupted_only_checkpoint_exits_3_then_no_restore(home: Path) -> None:
    from torpor._pools._pack import pack_key

    torpor("run", "--name", "z", "--checkpoint-every", "0", "--", *COUNTER)
    torpor("stop", "z", "--checkpoint")
    assert _members("z") == ["z.s000001"]
    # Every pack is this checkpoint's: flip a byte in each. It lands in a frame stored raw
    # (the chunk fails its SHA-256) or compressed (the frame does not decode): both refuse.
    with open_pool("default") as pool:
        packs = [k.rsplit("/", 1)[-1] for k in pool.backend.list("index/")]
        assert packs
        for pack in packs:
            data = bytearray(pool.backend.get(pack_key(pack)))
            data[len(data) // 2] ^= 0x5A
            pool.backend.put(pack_key(pack), bytes(data))
    res = torpor("run", "--resume", "--name", "z", "--", *COUNTER, check=False)
    assert (res.returncode, res.stdout) == (3, "")
    assert re.fullmatch(
        r"torpor: error: no checkpoint of z restored \(1 tried; the newest, z\.s000001@default: "
        r"image 'z\.s000001' in pool 'default' is corrupted: file pages-\d+\.img, chunk \d+ "
        r"\(sha256 [0-9a-f]{16}…\) (?:in pack [0-9a-f]{32} does not match its SHA-256|frame \d+ "
        r"of pack [0-9a-f]{32} does not decode \(decompression error: [^()]+\))\) — run it "
        r"again with --no-restore to start the command afresh\n",
        res.stderr,
    ), res.stderr
    assert _running("z") is None
    out = torpor("run", "--resume", "--no-restore", "--name", "z", "--", *COUNTER).stdout
    name, pid = out.split()
    assert name == "z" and _running("z").pid == int(pid)  # type: ignore[union-attr]
    assert _first(home, "z", int(pid)) == 1  # afresh


# -- 4. stop ----------------------------------------------------------------------------------


def test_stop_of_a_supervised_process_is_not_restored(home: Path) -> None:
    torpor("run", "--name", "s", "--checkpoint-every", "500ms", "--", *COUNTER)
    s = _running("s")
    assert s is not None
    wait_for(lambda: _kinds("s", "checkpoint"), timeout=15, what="a checkpoint")
    res = torpor("stop", "s")
    assert res.stdout == f"stopped s (pid {s.pid}) with {NO_HANDLER}\n"
    time.sleep(1.0)  # a restore would have run by now
    assert _running("s") is None
    assert _state.read("s").status == "stopped"  # type: ignore[union-attr]
    assert _registry.load("s").exit_status == -signal.SIGKILL
    assert _kinds("s", "restore") == []
    assert _kinds("s", "stop")[-1].fields["how"] == NO_HANDLER
    res = torpor("stop", "nosuch", check=False)
    assert (res.returncode, res.stdout, res.stderr) == (
        1,
        "",
        "torpor: error: no managed process named 'nosuch' — `torpor ps` lists managed processes\n",
    )
