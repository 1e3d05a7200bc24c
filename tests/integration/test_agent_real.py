"""The agent for real: ``torpor agent start``, then the installed ``torpor`` command (the native
launcher) runs commands in the agent's workers, against real CRIU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._process._proc import ProcRef, ref, running, stat_fields

from .helpers import (
    APPS,
    POOL_IMAGES_COLUMNS,
    PYTHON,
    copy_log,
    counts,
    parse_ps,
    parse_table,
    torpor,
    wait_for,
)

pytestmark = pytest.mark.criu

TORPOR = Path(sys.executable).parent / "torpor"


def cli(*args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed ``torpor`` command, as a user runs it (captured: a worker that kept the
    client's stdout open would make this hang, and time out)."""
    return torpor(*args, check=check, command=(str(TORPOR),), **env)


def _agent_ref(home: Path) -> ProcRef:
    data = json.loads((home / "agent.pid").read_text())
    return ProcRef(data["pid"], data["start_time"])


@pytest.fixture
def agent(torpor_home: Path) -> Iterator[ProcRef]:
    """An agent serving the test's home; stopped (by its pid) at the end."""
    if not os.access(TORPOR, os.X_OK):
        pytest.fail(f"{TORPOR} is not installed: run scripts/setup.sh")
    out = cli("agent", "start").stdout
    assert out.startswith("agent started (pid ")
    ref = _agent_ref(torpor_home)
    yield ref
    if ref.alive():
        cli("agent", "stop", check=False)
    if ref.alive():
        os.kill(ref.pid, signal.SIGKILL)


def _served_by_agent(pid: int, agent: ProcRef) -> bool:
    """Whether the managed process ``pid`` was started by one of the agent's workers: its
    keeper (its parent) is the agent's child."""
    keeper = _ppid(pid)
    return keeper is not None and _ppid(keeper) == agent.pid


def _ppid(pid: int) -> int | None:
    st = stat_fields(pid)
    return int(st[1]) if st is not None else None


def test_start_is_idempotent_and_status_reports(agent: ProcRef) -> None:
    assert "already running" in cli("agent", "start").stdout
    status = json.loads(cli("agent", "status", "--json").stdout)
    assert status["running"] is True and status["pid"] == agent.pid


def test_checkpoint_and_restore_through_the_agent(torpor_home: Path, agent: ProcRef) -> None:
    out = cli("run", "--name", "cnt", "--", PYTHON, str(APPS / "counter.py")).stdout.split()
    pid = int(out[1])
    assert _served_by_agent(pid, agent)
    log = torpor_home / "logs" / "cnt.log"
    wait_for(lambda: len(counts(log).get(pid, [])) >= 5, what="counting")

    image = cli("checkpoint", "cnt", "--name", "cnt-img").stdout.strip()
    assert Path(image, "torpor.json").exists()
    wait_for(lambda: not running(pid), what="the original to stop")
    last = counts(log)[pid][-1]
    kept = log.read_bytes()

    restored = cli("restore", "cnt-img")
    name, new_pid = restored.stdout.split()
    assert _served_by_agent(int(new_pid), agent)
    assert "restored 1 copy" in restored.stderr
    own = copy_log(torpor_home, name)  # each copy writes to a log of its own
    wait_for(lambda: len(counts(own).get(int(new_pid), [])) >= 3, what="the copy counting")
    assert counts(own)[int(new_pid)][0] in (last + 1, last + 2)
    assert list(counts(own)) == [int(new_pid)]

    copies = json.loads(cli("restore", "cnt-img", "--count", "2", "--json").stdout)
    assert len({c["pid"] for c in copies}) == 2
    for c in copies:
        own = copy_log(torpor_home, c["name"])
        wait_for(
            lambda c=c, own=own: len(counts(own).get(c["pid"], [])) >= 2, what="copies counting"
        )
        assert list(counts(own)) == [c["pid"]]
    assert log.read_bytes() == kept  # none of them wrote to the original's log
    running_now = {name: (new_pid, "running")} | {
        c["name"]: (str(c["pid"]), "running") for c in copies
    }
    assert parse_ps(cli("ps").stdout, "PID", "STATE") == running_now


def test_errors_are_one_line_with_a_code(agent: ProcRef) -> None:
    missing = cli("restore", "no-such-image", check=False)
    assert missing.returncode == 1
    assert missing.stderr.startswith("torpor: error: ")
    assert missing.stderr.count("\n") == 1
    usage = cli("restore", check=False)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    gone = cli("checkpoint", "999999999", check=False)
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1


def test_the_worker_runs_in_the_clients_directory(tmp_path: Path, agent: ProcRef) -> None:
    # A relative -o lands where the user is, not where the agent was started.
    out = cli("run", "--name", "here", "--", PYTHON, str(APPS / "counter.py")).stdout.split()
    subprocess.run(
        [str(TORPOR), "checkpoint", "here", "-o", "rel-img"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert (tmp_path / "rel-img" / "torpor.json").exists()
    assert not running(int(out[1]))


def test_stopping_the_agent_leaves_processes_running(torpor_home: Path, agent: ProcRef) -> None:
    out = cli("run", "--name", "stays", "--", PYTHON, str(APPS / "counter.py")).stdout.split()
    pid = int(out[1])
    assert cli("agent", "stop").stdout.strip() == f"agent stopped (pid {agent.pid})"
    assert not agent.alive()
    assert not (torpor_home / "agent.sock").exists()
    log = torpor_home / "logs" / "stays.log"
    before = len(counts(log).get(pid, []))
    wait_for(lambda: len(counts(log).get(pid, [])) > before + 2, what="it to keep counting")
    # Without an agent the same command runs in-process.
    assert parse_ps(cli("ps").stdout, "PID", "STATE") == {"stays": (str(pid), "running")}
    assert cli("agent", "status", check=False).returncode == 3
    # Its keeper (a worker of the stopped agent) still records how it ends.
    os.kill(pid, signal.SIGKILL)
    record = torpor_home / "procs" / "stays.json"
    wait_for(
        lambda: json.loads(record.read_text()).get("exit_status") is not None,
        what="the keeper to record the exit",
    )


def test_the_python_launcher_uses_the_agent_too(agent: ProcRef) -> None:
    py_launcher = TORPOR.parent / "torpor-py"
    out = subprocess.run(
        [str(py_launcher), "run", "--name", "py", "--", PYTHON, str(APPS / "counter.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    assert _served_by_agent(int(out[1]), agent)


def test_the_clients_context_holds_in_the_worker(torpor_home: Path, agent: ProcRef) -> None:
    import resource

    def client_context() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1000, 1000))
        os.umask(0o027)
        os.sched_setaffinity(0, {0})
        os.nice(5)

    script = "ulimit -n; umask; nice; grep Cpus_allowed_list /proc/self/status; sleep 600"
    out = subprocess.run(
        [str(TORPOR), "run", "--name", "ctx", "--", "sh", "-c", script],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=client_context,
    ).stdout.split()
    assert _served_by_agent(int(out[1]), agent)
    log = torpor_home / "logs" / "ctx.log"
    expected = ["1000", "0027", "5", "Cpus_allowed_list:", "0"]
    wait_for(lambda: log.exists() and log.read_text().split() == expected, what="its output")


def test_a_confined_client_is_not_served_with_the_agents_powers(
    torpor_home: Path, agent: ProcRef
) -> None:
    # no_new_privs (as systemd's NoNewPrivileges= sets): the command runs in the client.
    out = subprocess.run(
        ["setpriv", "--no-new-privs", str(TORPOR), "run", "--name", "nnp", "--", "sleep", "600"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.split()
    assert not _served_by_agent(int(out[1]), agent)
    assert "the client's NoNewPrivs (1) differs" in (torpor_home / "logs" / "agent.log").read_text()


def test_idle_workers_end_with_a_killed_agent(torpor_home: Path, agent: ProcRef) -> None:
    def children() -> list[int]:
        path = f"/proc/{agent.pid}/task/{agent.pid}/children"
        with open(path, encoding="ascii") as fh:
            return [int(p) for p in fh.read().split()]

    workers = wait_for(lambda: len(children()) >= 2 and children(), what="spare workers")
    refs = [ref(p) for p in workers]  # type: ignore[union-attr]
    os.kill(agent.pid, signal.SIGKILL)  # ours: the fixture started it
    wait_for(lambda: not any(r.alive() for r in refs), what="the idle workers to end")


def test_binary_output_through_the_agent(torpor_home: Path, tmp_path: Path, agent: ProcRef) -> None:
    cli("run", "--name", "exp", "--", PYTHON, str(APPS / "counter.py"))
    cli("checkpoint", "exp", "--pool", "default", "--name", "exp-img")
    through_agent = subprocess.run(
        [str(TORPOR), "-q", "image", "export", "exp-img@default", "-"],
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    # The archive written to the worker's sys.stdout.buffer is whole: it imports.
    archive = tmp_path / "exp.tar"
    archive.write_bytes(through_agent)
    assert len(through_agent) > 100_000
    cli("image", "import", str(archive), "--name", "exp-copy", TORPOR_AGENT="off")
    listed = cli("images", "--pool", "default", TORPOR_AGENT="off").stdout
    assert set(parse_table(listed, POOL_IMAGES_COLUMNS)) == {"exp-img", "exp-copy"}


def test_sighup_reloads_the_agent_in_place(torpor_home: Path, agent: ProcRef) -> None:
    before = cli("run", "--name", "before", "--", PYTHON, str(APPS / "counter.py")).stdout.split()
    log = torpor_home / "logs" / "agent.log"
    os.kill(agent.pid, signal.SIGHUP)
    wait_for(lambda: log.read_text().count("serving") >= 2, what="the agent to re-execute")
    assert agent.alive()  # the same process, new code
    out = cli("run", "--name", "after", "--", PYTHON, str(APPS / "counter.py")).stdout.split()
    assert _served_by_agent(int(out[1]), agent)
    # The keeper from before the reload still does its job.
    os.kill(int(before[1]), signal.SIGKILL)
    record = torpor_home / "procs" / "before.json"
    wait_for(
        lambda: json.loads(record.read_text()).get("exit_status") is not None,
        what="the old keeper to record the exit",
    )


def test_a_code_change_reloads_the_agent(torpor_home: Path, agent: ProcRef) -> None:
    """A new source file in the installed package (created and removed again): every agent
    of this installation reloads, which is what a code change is meant to do, and harmless."""
    import torpor

    log = torpor_home / "logs" / "agent.log"
    probe = Path(torpor.__file__).parent / "_agent" / "_reload_probe_test.py"
    try:
        probe.write_text("# written by test_a_code_change_reloads_the_agent\n")
        wait_for(lambda: "code changed (_reload_probe_test.py" in log.read_text(), what="notice")
        wait_for(lambda: log.read_text().count("serving") >= 2, what="the agent to re-execute")
    finally:
        probe.unlink(missing_ok=True)
    assert agent.alive()


def test_a_second_agent_for_the_same_home_is_refused(agent: ProcRef) -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "torpor._agent"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert "an agent already serves" in proc.stderr
    assert agent.alive()
