"""Issue 12 item 4's acceptance with real CRIU: two concurrent checkpoints of one process and
two restores with one name, started at the same instant (both commands wait at a barrier once
imported): one wins, the other gets the exact one-line error, records stay true. A failed
multi-copy restore leaves no record; restored copies write to logs of their own (item 5); a
keeper refuses a self-dump while another command holds the process's dump lock."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

from torpor._process import _locks
from torpor._process._proc import ProcRef, descendants, ref, running

from .helpers import APPS, PYTHON, counts, parse_ps, torpor, wait_for

pytestmark = pytest.mark.criu

# The CLI, imported, waiting for the go file; then one command, as `torpor ARGS` runs it.
GATED = textwrap.dedent(
    """
    import os, sys, time
    import torpor._cli, torpor._cli._checkpoint, torpor._cli._restore, torpor._cli._run
    from torpor._process import _checkpointer, _copies, _dump, _keeper, _locks, _manage
    print("ready", flush=True)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.0002)
    raise SystemExit(torpor._cli.main(sys.argv[2:]))
    """
)

BUSY = (
    "torpor: error: pid {pid} is being checkpointed by another torpor command (pid {holder}) "
    "— wait for it to finish, then checkpoint again"
)


def _at_once(go: Path, *commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run the torpor ``commands`` together: each starts once all are imported and ready."""
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", GATED, str(go), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in commands
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    go.touch()
    done = []
    for p, argv in zip(procs, commands, strict=True):
        out, err = p.communicate(timeout=120)
        done.append(subprocess.CompletedProcess([str(p.pid), *argv], p.returncode, out, err))
    return done


def _pid_of(done: subprocess.CompletedProcess[str]) -> int:
    return int(done.args[0])


def _one_winner(
    done: list[subprocess.CompletedProcess[str]],
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    winners = [d for d in done if d.returncode == 0]
    losers = [d for d in done if d.returncode != 0]
    assert len(winners) == 1 and len(losers) == 1, [(d.returncode, d.stderr) for d in done]
    assert losers[0].returncode == 1 and losers[0].stdout == ""
    return winners[0], losers[0]


# -- two checkpoints of one process ---------------------------------------------------------------


def test_two_checkpoints_at_once_one_wins(torpor_home: Path, tmp_path: Path) -> None:
    # 48 MiB: CRIU takes a while, so the two commands overlap.
    out = torpor("run", "--name", "ck", "--", PYTHON, str(APPS / "ballast_counter.py"), "48")
    pid = int(out.stdout.split()[1])
    log = torpor_home / "logs" / "ck.log"
    wait_for(lambda: log.exists() and len(counts(log).get(pid, [])) >= 2, what="counting")
    images = torpor_home / "images"
    for round_ in range(5):
        names = [f"ck-{round_}-a", f"ck-{round_}-b"]
        done = _at_once(
            tmp_path / f"go-{round_}",
            *(["checkpoint", "ck", "--leave-running", "--name", n] for n in names),
        )
        winner, loser = _one_winner(done)
        won = names[done.index(winner)]
        # The holder is the other command, or the checkpointer it started (its pid is its own).
        pattern = re.escape(BUSY.format(pid=pid, holder="HOLDER")).replace("HOLDER", r"(\d+)")
        holder = re.fullmatch(pattern, loser.stderr.strip())
        assert holder is not None, loser.stderr
        assert loser.stderr.count("\n") == 1 and int(holder.group(1)) != _pid_of(loser)
        assert winner.stdout == f"{images / won}\n"
        # One image, complete; nothing of the loser's; the process runs on, counting.
        assert sorted(os.listdir(images)) == [won]
        assert (images / won / "torpor.json").is_file()
        before = len(counts(log)[pid])
        wait_for(
            lambda before=before: len(counts(log)[pid]) > before + 2, what="the process to count on"
        )
        shutil.rmtree(images / won)
    assert parse_ps(torpor("ps").stdout, "PID", "STATE") == {"ck": (str(pid), "running")}


COORDINATED = textwrap.dedent(
    """
    import os, time
    from torpor._coord import before_checkpoint, global_context

    @before_checkpoint
    def slow():  # a coordinated checkpoint that takes a while: the commands overlap
        time.sleep(0.3)

    global_context()
    count = 0
    while True:
        count += 1
        os.write(1, f"{os.readlink('/proc/self')} {count}\\n".encode())
        time.sleep(0.05)
    """
)


def test_two_coordinated_checkpoints_at_once_one_wins(torpor_home: Path, tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(COORDINATED)
    pid = int(torpor("run", "--name", "co", "--", PYTHON, str(app)).stdout.split()[1])
    log = torpor_home / "logs" / "co.log"
    wait_for(lambda: log.exists() and len(counts(log).get(pid, [])) >= 2, what="counting")
    images = torpor_home / "images"
    for round_ in range(3):
        names = [f"co-{round_}-a", f"co-{round_}-b"]
        done = _at_once(
            tmp_path / f"go-{round_}",
            *(["checkpoint", "co", "--leave-running", "--name", n] for n in names),
        )
        winner, loser = _one_winner(done)
        # The winner held its request lock for the whole coordinated checkpoint.
        assert loser.stderr == BUSY.format(pid=pid, holder=_pid_of(winner)) + "\n"
        won = names[done.index(winner)]
        assert sorted(os.listdir(images)) == [won]
        shutil.rmtree(images / won)
    assert running(pid)


# -- two restores with one name -------------------------------------------------------------------


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _processes_with(marker: bytes) -> set[int]:
    pids = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    return {p for p in pids if marker in _cmdline(p) and running(p)}


def _own_counter(tmp_path: Path) -> str:
    """A copy of the counter app at a path of this test's: its processes are told apart from
    those of tests running beside it by their command line."""
    path = tmp_path / "own_counter.py"
    shutil.copyfile(APPS / "counter.py", path)
    return str(path)


def test_two_restores_with_one_name_one_wins(torpor_home: Path, tmp_path: Path) -> None:
    counter = _own_counter(tmp_path)
    out = torpor("run", "--name", "orig", "--", PYTHON, counter)
    pid = int(out.stdout.split()[1])
    log = torpor_home / "logs" / "orig.log"
    wait_for(lambda: log.exists() and len(counts(log).get(pid, [])) >= 2, what="counting")
    torpor("checkpoint", "orig", "--name", "img")
    wait_for(lambda: not running(pid), what="the original to stop")
    for round_ in range(4):
        go = tmp_path / f"go-{round_}"
        done = _at_once(
            go, ["restore", "img", "--name", "same"], ["restore", "img", "--name", "same"]
        )
        winner, loser = _one_winner(done)
        name, new_pid = winner.stdout.split()
        assert name == "same"
        rows = json.loads(torpor("ps", "--json").stdout)
        assert [(r["name"], r["pid"], r["state"]) for r in rows] == [
            ("same", int(new_pid), "running")
        ]
        keeper = rows[0]["keeper_pid"]
        started = (
            "torpor: error: a managed process named 'same' is being started by another torpor "
            f"command (pid {keeper}) — choose another --name\n"
        )
        runs = (
            f"torpor: error: a managed process named 'same' is running (pid {new_pid}) — choose "
            "another --name\n"
        )
        # Which of the two exact lines depends on how far the winner got.
        assert loser.stderr in (started, runs)
        # Nothing else left running: one restored counter, the winner's keeper's only child;
        # the loser's keeper (a fork of its command) has gone.
        assert _processes_with(counter.encode()) == {int(new_pid)}
        assert list(descendants(keeper)) == [int(new_pid)]
        wait_for(
            lambda go=go, keeper=keeper: _processes_with(str(go).encode()) == {keeper},
            what="only the winner's keeper left",
        )
        torpor("kill", "same")
    assert parse_ps(torpor("ps", "-a").stdout, "STATE") == {
        "orig": ("checkpointed",),
        "same": ("killed (signal 9)",),
    }


# -- a failed restore of many copies --------------------------------------------------------------


def test_a_refused_count_three_restore_leaves_no_record(torpor_home: Path, tmp_path: Path) -> None:
    counter = _own_counter(tmp_path)
    pid = int(torpor("run", "--name", "c3", "--", PYTHON, counter).stdout.split()[1])
    log = torpor_home / "logs" / "c3.log"
    wait_for(lambda: log.exists() and len(counts(log).get(pid, [])) >= 2, what="counting")
    image = Path(torpor("checkpoint", "c3", "--name", "c3-img").stdout.strip())
    pages = max(image.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0x01
    pages.write_bytes(bytes(data))
    res = torpor("restore", "c3-img", "--count", "3", check=False)
    assert res.returncode == 1
    assert res.stderr == (
        f"torpor: error: image 'c3-img' ({image}) is corrupted: file {pages.name} does not "
        "match its SHA-256 — restore refused; use another image or checkpoint again\n"
    )
    assert parse_ps(torpor("ps", "-a").stdout, "PID", "STATE") == {"c3": (str(pid), "checkpointed")}
    assert list((torpor_home / "procs").iterdir()) == [torpor_home / "procs" / "c3.json"]
    wait_for(lambda: not _processes_with(counter.encode()), what="the killed copies to go")


# -- logs of restored copies ----------------------------------------------------------------------


def test_restored_copies_write_to_logs_of_their_own(torpor_home: Path) -> None:
    counter = str(APPS / "counter.py")
    pid = int(torpor("run", "--name", "lg", "--", PYTHON, counter).stdout.split()[1])
    logs = torpor_home / "logs"
    original = logs / "lg.log"
    wait_for(lambda: len(counts(original).get(pid, [])) >= 2, what="counting")
    torpor("checkpoint", "lg", "--name", "lg-img")
    wait_for(lambda: not running(pid), what="the original to stop")
    kept = original.read_bytes()
    rows = json.loads(torpor("restore", "lg-img", "--count", "2", "--json").stdout)
    copies = {r["name"]: int(r["pid"]) for r in rows}
    assert sorted(copies) == ["lg-img-1", "lg-img-2"]
    for name, copy in copies.items():
        own = logs / f"{name}.log"
        wait_for(
            lambda own=own, copy=copy: own.exists() and len(counts(own).get(copy, [])) >= 3,
            what=f"{name} counting in its own log",
        )
        assert list(counts(own)) == [copy]  # only its own lines
        assert stat.S_IMODE(own.stat().st_mode) == 0o600
    assert original.read_bytes() == kept  # the original's log untouched by the copies
    records = {r["name"]: r["log_path"] for r in json.loads(torpor("ps", "--json").stdout)}
    assert records == {name: str(logs / f"{name}.log") for name in copies}


# -- the keeper's self-dump ------------------------------------------------------------------------

SELF = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from torpor._coord import checkpoint

    out = Path(sys.argv[1])
    n = 0
    while True:
        if (out / f"go-{n}").exists():
            try:
                result = checkpoint(out / f"img-{n}", leave_running=True)
                text = f"ok restored={result.restored}"
            except Exception as exc:
                text = f"{type(exc).__name__}: {exc}"
            if not (out / f"result-{n}").exists():
                (out / f"result-{n}").write_text(text)
            n += 1
        time.sleep(0.02)
    """
)


def test_a_self_dump_is_refused_while_another_holds_the_dump_lock(
    torpor_home: Path, tmp_path: Path
) -> None:
    app = tmp_path / "self.py"
    app.write_text(SELF)
    out = tmp_path / "out"
    out.mkdir()
    pid = int(torpor("run", "--name", "sd", "--", PYTHON, str(app), str(out)).stdout.split()[1])
    target = ref(pid)
    with _locks.dumping(target):  # as another command's checkpointer would hold it
        (out / "go-0").touch()
        wait_for(lambda: (out / "result-0").exists(), timeout=30, what="the refused checkpoint")
    assert (out / "result-0").read_text() == (
        "DumpError: the keeper refused the checkpoint: "
        + BUSY.format(pid=pid, holder=os.getpid()).removeprefix("torpor: error: ")
    )
    assert not (out / "img-0").exists()
    (out / "go-1").touch()
    wait_for(lambda: (out / "result-1").exists(), timeout=30, what="the checkpoint")
    assert (out / "result-1").read_text() == "ok restored=False"
    assert (out / "img-1" / "torpor.json").is_file()
    assert ProcRef(pid, target.start_time).alive()
    assert os.listdir(torpor_home / "locks") == []
