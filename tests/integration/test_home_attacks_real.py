"""Issue 11 item 2 for real: what root's ``torpor kill`` / ``checkpoint`` do with records of
real managed processes, doctored ones and planted ones, and how ``kill`` says it ended them
(issue 12 item 5). Through the CLI as a user runs it, with real keepers and CRIU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._process._proc import ProcRef, ref, running, stat_fields

from .helpers import APPS, PYTHON, torpor, wait_for

pytestmark = pytest.mark.criu

TORPOR = Path(sys.executable).parent / "torpor"

# Apps that say they are up once their SIGTERM disposition is in place.
_HANDLER = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
    "print('up', flush=True)\n"
    "while True: time.sleep(1)\n"
)
_IGNORER = _HANDLER.replace("lambda *_: sys.exit(0)", "signal.SIG_IGN")


def _run(home: Path, name: str, *cmd: str) -> int:
    pid = int(torpor("run", "--name", name, "--", *cmd).stdout.split()[1])
    log = home / "logs" / f"{name}.log"
    if cmd[-1] in (_HANDLER, _IGNORER):
        wait_for(lambda: log.read_text() == "up\n", what=f"{name} to set up its handler")
    return pid


def _record(home: Path, name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((home / "procs" / f"{name}.json").read_text())
    return data


def _write(home: Path, name: str, data: dict[str, object]) -> Path:
    path = home / "procs" / f"{name}.json"
    tmp = path.with_name(".planted")
    tmp.write_text(json.dumps(data))
    tmp.chmod(0o600)
    tmp.rename(path)
    return path


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process torpor did not start."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_kill_says_sigterm_when_the_app_handles_it(torpor_home: Path) -> None:
    pid = _run(torpor_home, "polite", PYTHON, "-c", _HANDLER)
    proc = ref(pid)
    out = torpor("kill", "polite")
    assert out.stderr == f"stopped polite (pid {pid}) with SIGTERM\n"
    assert not proc.alive()
    wait_for(lambda: _record(torpor_home, "polite")["exit_status"] == 0, what="exit recorded")


def test_kill_sigkills_at_once_an_init_without_a_sigterm_handler(torpor_home: Path) -> None:
    pid = _run(torpor_home, "plain", PYTHON, str(APPS / "counter.py"))
    started = time.monotonic()
    out = torpor("kill", "plain", "--timeout", "30")
    assert time.monotonic() - started < 10  # not the 30 s timeout
    assert out.stderr == (
        f"stopped plain (pid {pid}) with SIGKILL: it has no SIGTERM handler, and pid 1 of a "
        "PID namespace ignores SIGTERM without one\n"
    )
    wait_for(lambda: _record(torpor_home, "plain")["exit_status"] == -9, what="exit recorded")


def test_kill_says_it_had_to_sigkill_an_app_ignoring_sigterm(torpor_home: Path) -> None:
    pid = _run(torpor_home, "deaf", PYTHON, "-c", _IGNORER)
    proc = ref(pid)
    out = torpor("kill", "deaf", "--timeout", "0.5")
    assert out.stderr == (
        f"stopped deaf (pid {pid}) with SIGKILL: it was still running 0.5s after SIGTERM\n"
    )
    assert not proc.alive()


def test_records_name_their_keeper_and_its_start_time(torpor_home: Path) -> None:
    pid = _run(torpor_home, "rec", PYTHON, str(APPS / "counter.py"))
    rec = _record(torpor_home, "rec")
    keeper = int(stat_fields(pid)[1])  # type: ignore[index]
    assert (rec["pid"], rec["keeper_pid"]) == (pid, keeper)
    assert rec["keeper_start_time"] == ref(keeper).start_time
    assert os.stat(torpor_home / "procs" / "rec.json").st_mode & 0o777 == 0o600


def test_a_record_doctored_to_name_another_process_kills_nothing(
    torpor_home: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    app = _run(torpor_home, "app", PYTHON, str(APPS / "counter.py"))
    rec = _record(torpor_home, "app")
    # The real keeper, alive and torpor's, but the pid is of a process it did not start.
    doctored = {**rec, "pid": sleeper.pid, "start_time": ref(sleeper.pid).start_time}
    path = _write(torpor_home, "app", doctored)
    try:
        for argv in (("kill", "app"), ("kill", str(sleeper.pid)), ("checkpoint", "app")):
            out = torpor(*argv, check=False)
            assert (out.returncode, out.stdout, out.stderr) == (
                1,
                "",
                f"torpor: error: record 'app' names pid {sleeper.pid}, which torpor did not "
                f"start (its parent is pid {os.getpid()}, not the recorded keeper "
                f"{rec['keeper_pid']}); nothing signalled — the record is stale or planted: "
                f"remove {path}\n",
            )
        assert sleeper.poll() is None and running(sleeper.pid)
        assert running(app)
        assert list(torpor_home.glob("images/*")) == []  # nothing was dumped
    finally:
        _write(torpor_home, "app", rec)  # the true record: the home's teardown stops the app


def test_a_record_planted_in_the_home_for_an_unrelated_process_kills_nothing(
    torpor_home: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    me = ref(os.getpid())
    (torpor_home / "procs").mkdir(mode=0o700, exist_ok=True)
    planted = {
        "name": "victim",
        "pid": sleeper.pid,
        "start_time": ref(sleeper.pid).start_time,
        "keeper_pid": me.pid,
        "keeper_start_time": me.start_time,
        "command": ["sleep", "60"],
        "started": "2026-01-01T00:00:00+00:00",
    }
    path = _write(torpor_home, "victim", planted)
    out = torpor("kill", "victim", check=False)
    assert (out.returncode, out.stderr) == (
        1,
        f"torpor: error: record 'victim' names pid {sleeper.pid}, which torpor did not start "
        f"(its parent {me.pid} is not a torpor keeper); nothing signalled — the record is "
        f"stale or planted: remove {path}\n",
    )
    time.sleep(0.2)
    assert sleeper.poll() is None


def test_an_old_record_of_a_real_app_is_not_signalled(torpor_home: Path) -> None:
    pid = _run(torpor_home, "old", PYTHON, str(APPS / "counter.py"))
    rec = _record(torpor_home, "old")
    del rec["keeper_start_time"]
    _write(torpor_home, "old", rec)
    out = torpor("kill", "old", check=False)
    assert (out.returncode, out.stderr) == (
        1,
        f"torpor: error: record 'old' does not say which keeper started pid {pid} (written "
        "by an older torpor), so torpor cannot tell it is its own; nothing signalled — check "
        f"it (`ps -o pid,ppid,args -p {pid}`), then stop it with kill\n",
    )
    assert ProcRef(pid, int(rec["start_time"])).alive()  # type: ignore[call-overload]


def test_kill_through_the_agent_keeper(torpor_home: Path) -> None:
    """A worker that becomes the keeper records itself as one (its socket, its start time)."""
    if not os.access(TORPOR, os.X_OK):
        pytest.fail(f"{TORPOR} is not installed: run scripts/setup.sh")
    cli = (str(TORPOR),)
    assert torpor("agent", "start", command=cli).stdout.startswith("agent started (pid ")
    try:
        pid = int(
            torpor(
                "run", "--name", "hosted", "--", PYTHON, "-c", _HANDLER, command=cli
            ).stdout.split()[1]
        )
        agent = json.loads((torpor_home / "agent.pid").read_text())["pid"]
        keeper = int(stat_fields(pid)[1])  # type: ignore[index]
        assert int(stat_fields(keeper)[1]) == agent  # type: ignore[index]
        log = torpor_home / "logs" / "hosted.log"
        wait_for(lambda: log.read_text() == "up\n", what="the handler")
        out = torpor("kill", "hosted", command=cli)
        assert out.stderr == f"stopped hosted (pid {pid}) with SIGTERM\n"
    finally:
        torpor("agent", "stop", command=cli, check=False)


@pytest.fixture
def root_home() -> Iterator[Path]:
    """A root-owned 0700 home that uid 65534 can see (/tmp is traversable; pytest's are not)."""
    home = Path(tempfile.mkdtemp(prefix="torpor-root-home-", dir="/tmp"))
    yield home
    shutil.rmtree(home)


@pytest.mark.parametrize(
    ("sub", "expected"),
    [
        ("", "torpor home {home} belongs to root; uid 65534 cannot use it"),
        ("sub", "cannot use torpor home {home}: permission denied (uid 65534)"),
    ],
)
def test_a_non_root_user_at_a_root_home_gets_one_line(
    root_home: Path, sub: str, expected: str
) -> None:
    """Really as uid 65534 (torpor is loaded before the uid is dropped: the interpreter lives
    where that user cannot read)."""
    script = (
        "import os, sys\n"
        "import torpor._cli, torpor._cli._run, torpor._process._registry\n"
        "torpor._cli.prebuild()\n"
        "os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)\n"
        "sys.exit(torpor._cli.main(['ps']))\n"
    )
    home = root_home / sub if sub else root_home
    out = subprocess.run(
        [PYTHON, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "TORPOR_HOME": str(home)},
        timeout=60,
    )
    assert (out.returncode, out.stdout, out.stderr) == (
        1,
        "",
        f"torpor: error: {expected.format(home=home)} — run torpor as root, or set TORPOR_HOME "
        "to a directory of your own\n",
    )
    assert os.listdir(root_home) == []
