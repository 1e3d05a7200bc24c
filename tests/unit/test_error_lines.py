"""Issue 12: every error is one line (``torpor: error: ...``, exit 1), never an ``internal
error`` or a traceback, and nothing the user had is lost. Table-driven, through the installed
CLI (``.venv/bin/torpor``) with a temporary TORPOR_HOME, for what needs no real CRIU:

- bad ``-o`` destinations of ``torpor checkpoint`` (a kernel filesystem, under a file or a
  dangling symlink, over a file, a symlink or a directory): refused before anything is made;
- targets CRIU must not be asked to dump (pid 1, torpor's own processes, the command itself
  and its ancestors): refused before CRIU ("Unable to detach" before);
- a CRIU that dies without answering (a stand-in ``criu swrk``): how it ended, the log's first
  error, the process's state (running, stopped, gone) and where the log is.

The cases needing real CRIU, mounts or a full disk are in
``tests/integration/test_error_lines_real.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from torpor._process._proc import ProcRef, _runs_torpor, ref, stat_fields

PYTHON = sys.executable
TORPOR = str(Path(sys.executable).parent / "torpor")
CHOOSE_APP = "checkpoint an application's process (`torpor ps` lists the ones torpor started)"


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed launcher, as a user runs it (with the test's TORPOR_HOME and ``env``)."""
    return subprocess.run(
        [TORPOR, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, **env),
        stdin=subprocess.DEVNULL,
    )


def assert_one_line(proc: subprocess.CompletedProcess[str], expected: str) -> None:
    """Exactly ``torpor: error: EXPECTED`` on one line of stderr, exit 1, nothing on stdout."""
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == f"torpor: error: {expected}\n"
    assert (proc.returncode, proc.stdout) == (1, "")


def contents(home: Path) -> list[str]:
    """Every path in ``home``, relative to it."""
    return sorted(str(p.relative_to(home)) for p in home.rglob("*"))


def runs_free(target: ProcRef) -> None:
    """``target`` is the very process it was, alive, neither stopped nor traced."""
    assert target.alive()
    st = stat_fields(target.pid)
    assert st is not None and st[0] in ("S", "R"), st
    status = Path(f"/proc/{target.pid}/status").read_text()
    assert "\nTracerPid:\t0\n" in status


@pytest.fixture
def sleeper() -> Iterator[ProcRef]:
    """A process torpor did not start, in a session of its own."""
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        yield ref(proc.pid)
    finally:
        proc.kill()
        proc.wait()


# -- -o destinations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """What the user has beside the destinations: a file, a directory, a dangling symlink."""

    root: Path
    afile: Path
    adir: Path
    dangling: Path

    def snapshot(self) -> dict[str, object]:
        """Everything in ``root``, to compare after a command."""
        return {
            "entries": sorted(os.listdir(self.root)),
            "afile": self.afile.read_bytes(),
            "adir": sorted(os.listdir(self.adir)),
            "dangling": os.readlink(self.dangling),
        }


@pytest.fixture
def world(tmp_path: Path) -> World:
    root = tmp_path / "world"
    root.mkdir()
    afile = root / "afile"
    afile.write_bytes(b"the user's data\n")
    adir = root / "adir"
    adir.mkdir()
    (adir / "kept").write_text("kept\n")
    dangling = root / "dangling"
    dangling.symlink_to(root / "nowhere")
    return World(root, afile, adir, dangling)


def _kernel(path: str, real: str, fs: str) -> tuple[str, str]:
    return path, (
        f"cannot create image directory {path}: {real} is on {fs}, a kernel filesystem, which "
        "cannot hold an image (nothing was done) — choose -o on a disk"
    )


def _not_a_dir(dest: Path, parent: Path) -> tuple[str, str]:
    return str(dest), (
        f"cannot create image directory {dest}: {parent} is not a directory (nothing was done) "
        "— choose -o under a directory"
    )


def _there(dest: Path, kind: str) -> tuple[str, str]:
    return str(dest), (
        f"cannot create image directory {dest}: {kind} is there already — choose another "
        "-o/--name (torpor never overwrites a file)"
    )


DESTINATIONS: dict[str, Callable[[World], tuple[str, str]]] = {
    "proc": lambda w: _kernel("/proc/x", "/proc", "proc"),
    "proc-pid": lambda w: _kernel("/proc/1/x", "/proc/1", "proc"),
    "sys": lambda w: _kernel("/sys/x", "/sys", "sysfs"),
    "under-a-file": lambda w: _not_a_dir(w.afile / "x", w.afile),
    "deep-under-a-file": lambda w: _not_a_dir(w.afile / "a" / "b", w.afile),
    "under-a-dangling-symlink": lambda w: _not_a_dir(w.dangling / "x", w.dangling),
    "a-file": lambda w: _there(w.afile, "a regular file"),
    "a-symlink": lambda w: _there(w.dangling, "a symlink"),
    "a-directory": lambda w: (
        str(w.adir),
        f"image directory {w.adir} exists already — choose another -o/--name, or delete the "
        "old image first",
    ),
}


@pytest.mark.parametrize("case", sorted(DESTINATIONS))
def test_a_bad_destination_is_one_line_and_nothing_is_made(
    case: str, torpor_home: Path, sleeper: ProcRef, world: World
) -> None:
    dest, expected = DESTINATIONS[case](world)
    before = world.snapshot()
    out = cli("checkpoint", str(sleeper.pid), "--leave-running", "-o", dest)
    assert_one_line(out, expected)
    assert world.snapshot() == before
    runs_free(sleeper)
    assert contents(torpor_home) == ["procs"]  # looked for a record of the pid; made nothing


# -- targets refused before CRIU -----------------------------------------------------------------


def test_pid_1_is_refused_before_criu(torpor_home: Path) -> None:
    init = ref(1)
    comm = Path("/proc/1/comm").read_text().strip()
    assert_one_line(
        cli("checkpoint", "1", "--leave-running"),
        f"pid 1 is the system's init ({comm}); torpor does not checkpoint it (nothing was done) "
        f"— {CHOOSE_APP}",
    )
    assert init.alive()
    assert contents(torpor_home) == []  # CRIU never ran: no dump log


def test_a_torpor_process_is_refused(torpor_home: Path, tmp_path: Path) -> None:
    # What a keeper, an agent or a checkpointer looks like from outside: torpor's program.
    program = tmp_path / "torpor-py"
    program.write_text("import time\nprint('up', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([PYTHON, str(program)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        target = ref(proc.pid)
        assert_one_line(
            cli("checkpoint", str(proc.pid), "--leave-running"),
            f"pid {proc.pid} is a torpor process, not an application; torpor does not "
            f"checkpoint it (nothing was done) — {CHOOSE_APP}",
        )
        runs_free(target)
    finally:
        proc.kill()
        proc.wait()


FROM_OUTSIDE = (
    "run `torpor checkpoint` from outside the process's tree, or checkpoint from inside with "
    "the torpor library's checkpoint()"
)


def test_the_command_itself_is_refused(torpor_home: Path) -> None:
    # exec: the shell's pid becomes the command's (the launcher execs torpor-py in place).
    proc = subprocess.run(
        ["sh", "-c", 'echo $$ >&2; exec "$0" checkpoint "$$" --leave-running', TORPOR],
        capture_output=True,
        text=True,
        timeout=60,
    )
    pid, _, rest = proc.stderr.partition("\n")
    assert_one_line(
        subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, rest),
        f"pid {pid} is this torpor command itself; torpor does not checkpoint it (nothing was "
        f"done) — {FROM_OUTSIDE}",
    )


def test_an_ancestor_of_the_command_is_refused_and_goes_on(torpor_home: Path) -> None:
    # The shell forks the command and goes on after it: it prints its pid, then what it saw.
    script = 'echo $$; "$0" checkpoint "$$" --leave-running; echo "after $?"'
    proc = subprocess.run(["sh", "-c", script, TORPOR], capture_output=True, text=True, timeout=60)
    pid, after = proc.stdout.splitlines()
    assert (after, proc.returncode) == ("after 1", 0)  # the shell ran on, and saw exit 1
    assert_one_line(
        subprocess.CompletedProcess(proc.args, 1, "", proc.stderr),
        f"pid {pid} is an ancestor of this torpor command: a checkpoint would dump the command "
        f"too; torpor does not checkpoint it (nothing was done) — {FROM_OUTSIDE}",
    )


@pytest.mark.parametrize(
    ("argv", "torpor_s"),
    [
        (["/usr/local/bin/torpor", "ps"], True),
        (["/venv/bin/python3", "/venv/bin/torpor-py", "checkpoint", "7"], True),
        (["python3", "-P", "-m", "torpor._agent", "--install", "x"], True),
        (["python3", "-m", "torpor", "run", "--", "app"], True),
        (["python3", "-X", "dev", "-m", "torpor._process._selfdump", "criu"], True),
        (["python3", "-m", "torpor._demo.app"], False),  # the demo app is an application
        (["python3", "-c", "import torpor"], False),
        (["python3", "app.py", "torpor"], False),
        (["python3", "-m", "http.server"], False),
        (["torpor-app"], False),
    ],
)
def test_which_command_lines_are_torpor_s_own(argv: list[str], torpor_s: bool) -> None:
    assert _runs_torpor(argv) is torpor_s


# -- a CRIU that dies without answering (a stand-in) --------------------------------------------

# ``criu swrk FD`` that reads the request and ends as FAKE_DIE says, without answering.
FAKE_CRIU = textwrap.dedent(
    """\
    import os, signal, socket, struct, sys
    from torpor._proto import criu_rpc_pb2 as pb

    if sys.argv[1:] == ["--version"]:
        print("Version: 4.2.1")
        raise SystemExit(0)
    sock = socket.socket(fileno=int(sys.argv[2]))
    req = pb.Req()
    req.ParseFromString(sock.recv(1 << 16))
    creator = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    images = os.open(f"/proc/{creator}/fd/{req.opts.images_dir_fd}", os.O_RDONLY)
    how = os.environ["FAKE_DIE"]
    if how != "exit-3":
        fd = os.open(req.opts.log_file, os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=images)
        os.write(fd, b"(00.01) Error (criu/cr-dump.c:1): fake failure\\n")
        os.close(fd)
    if how == "stop":
        os.kill(req.opts.pid, signal.SIGSTOP)
    if how == "gone":
        os.kill(req.opts.pid, signal.SIGKILL)
        raise SystemExit(1)
    if how == "exit-3":
        raise SystemExit(3)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)

SAYS = "; its log says: cr-dump.c:1: fake failure"
RETRY = " — something killed CRIU (`dmesg` shows whether it was the OOM killer): retry"


@dataclass(frozen=True)
class Death:
    """How the stand-in ends, what the error says (``{pid}``, ``{log}`` filled in), and the
    state the process is left in."""

    how: str
    message: str
    left: str  # running, stopped, gone


DEATHS = {
    "killed": Death(
        "kill",
        "checkpoint of pid {pid} failed: CRIU was killed by SIGKILL before it answered"
        f"{SAYS} (the process keeps running; log: {{log}}){RETRY}",
        "running",
    ),
    "exit-without-log": Death(
        "exit-3",
        "checkpoint of pid {pid} failed: CRIU exited with status 3 before it answered (the "
        "process keeps running; CRIU wrote no log)",
        "running",
    ),
    "left-stopped": Death(
        "stop",
        "checkpoint of pid {pid} failed: CRIU was killed by SIGKILL before it answered"
        f"{SAYS} (the process is stopped (`kill -CONT {{pid}}` resumes it); log: {{log}})"
        f"{RETRY}",
        "stopped",
    ),
    "process-gone": Death(
        "gone",
        "checkpoint of pid {pid} failed: CRIU exited with status 1 before it answered"
        f"{SAYS} (the process is gone; log: {{log}})",
        "gone",
    ),
}


@pytest.mark.root
@pytest.mark.parametrize("case", sorted(DEATHS))
def test_criu_dying_says_how_where_the_log_is_and_the_process_state(
    case: str, torpor_home: Path, tmp_path: Path
) -> None:
    death = DEATHS[case]
    fake = tmp_path / "criu"
    fake.write_text(f"#!{PYTHON}\n{FAKE_CRIU}")
    fake.chmod(0o755)
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        target = ref(proc.pid)
        out = cli(
            "checkpoint",
            str(proc.pid),
            "--no-coordinate",
            "--leave-running",
            TORPOR_CRIU=str(fake),
            FAKE_DIE=death.how,
        )
        logs = sorted((torpor_home / "logs").glob(f"dump-{proc.pid}-*.log"))
        assert len(logs) == (0 if death.how == "exit-3" else 1), logs
        log = logs[0] if logs else None
        if log is not None:  # kept out of the staging directory, which is gone
            assert log.read_text() == "(00.01) Error (criu/cr-dump.c:1): fake failure\n"
        assert_one_line(out, death.message.format(pid=proc.pid, log=log))
        assert sorted(os.listdir(torpor_home / "images")) == []
        if death.left == "gone":
            assert proc.wait(timeout=10) == -signal.SIGKILL
            return
        if death.left == "stopped":
            st = stat_fields(proc.pid)
            assert st is not None and st[0] == "T"
            os.kill(proc.pid, signal.SIGCONT)  # as the message says: it runs on
            deadline = time.monotonic() + 5
            while (stat_fields(proc.pid) or ["?"])[0] == "T" and time.monotonic() < deadline:
                time.sleep(0.01)
        runs_free(target)
    finally:
        proc.kill()
        proc.wait()
