"""Issue 12: every error is one line (``torpor: error: ...``, exit 1), never an ``internal
error`` or a traceback, and nothing the user had is lost — the cases that need real CRIU,
mounts, a full disk or another user. Table-driven, through the installed CLI
(``.venv/bin/torpor``) as a user runs it:

- a full home (a tmpfs, filled by a ballast file to a set number of free bytes or inodes):
  restore, run, checkpoint, push, pull, import and restore NAME@POOL each say which disk is
  full (they said ``internal error: OSError(28...)`` and ``keeper failed: OSError(28...)``),
  and export onto a full disk; the app runs on, counting, and its image still verifies;
- ``-o`` on a read-only filesystem;
- a non-root user on a root home;
- targets CRIU must not be asked to dump: a kernel thread, a torpor keeper;
- CRIU killed while it dumps: the line says so, where its log is and that the process keeps
  running (it said "CRIU dump died: CRIU closed the connection");
- ``torpor run -- true``: it starts, and its record says ``exited 0`` (it said "no process with
  pid N").

The cases a fake suffices for are in ``tests/unit/test_error_lines.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from torpor._images._image import Image
from torpor._images._incomplete import size_text
from torpor._process._locks import name_file
from torpor._process._proc import ProcRef, parent_pid, ref

from .crashes import (
    checkpointer_of,
    children,
    frozen,
    mount_tmpfs,
    run_counter,
    still_counting,
    subreaper,
)
from .helpers import APPS, PYTHON, counts, parse_ps, torpor, wait_for

pytestmark = pytest.mark.criu

TORPOR = str(Path(sys.executable).parent / "torpor")
CHOOSE_APP = "checkpoint an application's process (`torpor ps` lists the ones torpor started)"


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed launcher, as a user runs it."""
    return torpor(*args, check=False, command=(TORPOR,), **env)


def assert_one_line(
    proc: subprocess.CompletedProcess[str], expected: str | re.Pattern[str]
) -> None:
    """Exactly one line ``torpor: error: EXPECTED`` on stderr (a pattern: the whole line
    matches it), exit 1, nothing on stdout."""
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("torpor: error: ")
    line = proc.stderr.removeprefix("torpor: error: ").removesuffix("\n")
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(line), line
    else:
        assert line == expected
    assert (proc.returncode, proc.stdout) == (1, "")


def counting(app: ProcRef, log: Path) -> None:
    """``app`` is the very process it was, free (not stopped, traced or frozen), counting."""
    assert app.alive()
    assert frozen(app.pid) is None
    still_counting(log, app.pid)


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


# -- a full home ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lab:
    """A torpor home on its own tmpfs (``disk``): a counter ``c`` logging outside it, its image
    ``img`` (local, and in the default pool), and that image exported outside the disk."""

    disk: Path
    home: Path
    app: ProcRef
    log: Path
    export: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The CLI in this home."""
        return cli(*args, TORPOR_HOME=str(self.home))

    def free_bytes(self) -> int:
        st = os.statvfs(self.disk)
        return st.f_bavail * st.f_frsize


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("full")
    disk = root / "disk"
    disk.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96m,nr_inodes=4096,mode=0700", "tmpfs", str(disk)],
        check=True,
    )
    home = disk / "home"
    env = {"TORPOR_HOME": str(home)}
    log = root / "c.log"  # on another disk: the app's output never takes the full one's space
    app: ProcRef | None = None
    try:
        out = torpor(
            "run", "--name", "c", "--log", str(log), "--", PYTHON, str(APPS / "counter.py"), **env
        )
        app = ref(int(out.stdout.split()[1]))
        wait_for(lambda: len(counts(log).get(app.pid, [])) >= 2, what="counting")
        torpor("checkpoint", "c", "--leave-running", "--name", "img", **env)
        torpor("image", "push", "img", "img@default", **env)
        export = root / "img.tar"
        torpor("image", "export", "img@default", str(export), **env)
        yield Lab(disk, home, app, log, export)
    finally:
        torpor("kill", "c", check=False, **env)
        if app is not None and app.alive():
            os.kill(app.pid, signal.SIGKILL)
        umount(disk)


@contextlib.contextmanager
def filled(lab: Lab, *, free: int | None = None, inodes: int | None = None) -> Iterator[None]:
    """Within: the disk has ``free`` bytes left (a ballast file takes the rest), or ``inodes``
    free inodes (empty files take the rest); taken back after, whatever happened."""
    ballast = lab.disk / "ballast"
    ballast.mkdir()
    try:
        if free is not None:
            fd = os.open(ballast / "bytes", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, lab.free_bytes() - free)
            finally:
                os.close(fd)
            assert lab.free_bytes() == free
        if inodes is not None:
            for i in range(os.statvfs(lab.disk).f_favail - inodes):
                os.close(os.open(ballast / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            assert os.statvfs(lab.disk).f_favail == inodes
        yield
    finally:
        shutil.rmtree(ballast)


@dataclass(frozen=True)
class Full:
    """A command on a disk left with ``free`` bytes or ``inodes`` inodes, and its line."""

    argv: Callable[[Lab], list[str]]
    line: Callable[[Lab], str | re.Pattern[str]]
    free: int | None = None
    inodes: int | None = None


def _lock(lab: Lab, file: str) -> str:
    d = lab.disk
    return (
        f"cannot take lock {lab.home}/locks/{file}: no space left on {d} (0 B free) (nothing "
        f"was done) — free space on {d}"
    )


def _request_lock(lab: Lab) -> str:
    return _lock(lab, f"checkpoint.{lab.app.pid}-{lab.app.start_time}.lock")


def _record(lab: Lab, name: str) -> str:
    d = lab.disk
    return (
        f"cannot write the record of {name!r} in {lab.home}/procs: no space left on {d} (0 B "
        f"free) — free space on {d}"
    )


def _log(lab: Lab, name: str) -> str:
    # Out of inodes, not of bytes: the free bytes are what the disk has (nothing writes now).
    d = lab.disk
    return (
        f"cannot open log {lab.home}/logs/{name}.log: no space left on {d} "
        f"({size_text(lab.free_bytes())} free) — free space on {d}"
    )


def _criu_unlogged(lab: Lab) -> str:
    d = lab.disk
    return (
        f"restore of image {lab.home}/images/img failed: no space left on {d} (no free inodes) "
        f"(nothing was left running; CRIU wrote no log) — free space on {d}"
    )


def _session(lab: Lab) -> re.Pattern[str]:
    d = lab.disk
    return re.compile(
        re.escape("cannot write key 'sessions/")
        + "[0-9a-f]{32}"  # a fresh session id
        + re.escape(
            f"' in dir pool {lab.home}/pools/default: no space left on {d} (0 B free) — free "
            f"space on {d}"
        )
    )


TRUE = ["--", "true"]
# Each case its own names: a lock file a full disk left empty must not change another case.
FULL: dict[str, Full] = {
    "restore": Full(
        lambda lab: ["restore", "img", "--name", "r0"],
        lambda lab: _lock(lab, name_file("r0")),
        free=0,
    ),
    "run": Full(
        lambda lab: ["run", "--name", "x0", *TRUE], lambda lab: _lock(lab, name_file("x0")), free=0
    ),
    "checkpoint": Full(
        lambda lab: ["checkpoint", "c", "--leave-running", "--name", "k"], _request_lock, free=0
    ),
    "checkpoint-o": Full(
        lambda lab: ["checkpoint", "c", "-o", str(lab.disk / "out" / "k")], _request_lock, free=0
    ),
    "push": Full(lambda lab: ["image", "push", "img", "p@default"], _session, free=0),
    "pull": Full(lambda lab: ["image", "pull", "img@default"], _session, free=0),
    "import": Full(
        lambda lab: ["image", "import", str(lab.export), "--name", "i"], _session, free=0
    ),
    "restore-from-pool": Full(
        lambda lab: ["restore", "img@default", "--name", "rp"], _session, free=0
    ),
    # A page: the lock fits, the record does not (what was started is ended again).
    "run-record": Full(
        lambda lab: ["run", "--name", "x1", *TRUE], lambda lab: _record(lab, "x1"), free=4096
    ),
    "restore-record": Full(
        lambda lab: ["restore", "img", "--name", "r1"], lambda lab: _record(lab, "r1"), free=4096
    ),
    # An inode: the lock file fits, the log does not.
    "run-log": Full(
        lambda lab: ["run", "--name", "x2", *TRUE], lambda lab: _log(lab, "x2"), inodes=1
    ),
    "restore-log": Full(
        lambda lab: ["restore", "img", "--name", "r2"], lambda lab: _log(lab, "r2"), inodes=1
    ),
    # Inodes for the lock and the copy's log: CRIU cannot create its own, nor say why it fails.
    "restore-criu-log": Full(
        lambda lab: ["restore", "img", "--name", "r3"], _criu_unlogged, inodes=2
    ),
}


@pytest.mark.parametrize("case", sorted(FULL))
def test_a_full_home_is_one_line_naming_the_disk_and_nothing_is_lost(lab: Lab, case: str) -> None:
    full = FULL[case]
    with filled(lab, free=full.free, inodes=full.inodes):
        out = lab.cli(*full.argv(lab))
        assert_one_line(out, full.line(lab))
    counting(lab.app, lab.log)
    Image.open(lab.home / "images" / "img").verify(full=True)
    assert sorted(os.listdir(lab.home / "images")) == ["img"]
    # Only the app is listed: what a failed command started is not, nor left running.
    assert parse_ps(lab.cli("ps", "-a").stdout, "PID", "STATE") == {
        "c": (str(lab.app.pid), "running")
    }
    assert os.listdir(lab.disk) == ["home"]  # nothing left beside the home (no -o dir)


def test_export_onto_a_full_disk_names_it_and_leaves_nothing(lab: Lab, tmp_path: Path) -> None:
    out_disk = tmp_path / "out"
    out_disk.mkdir()
    mount_tmpfs(out_disk, 1024)
    try:
        fd = os.open(out_disk / "ballast", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        st = os.statvfs(out_disk)
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize)
        os.close(fd)
        dest = out_disk / "img.tar"
        assert_one_line(
            lab.cli("image", "export", "img@default", str(dest)),
            f"cannot write the archive {dest}: no space left on {out_disk} (0 B free) — free "
            f"space on {out_disk}, or export to another disk",
        )
        assert os.listdir(out_disk) == ["ballast"]  # the partial archive is gone
    finally:
        umount(out_disk)
    counting(lab.app, lab.log)


# -- -o on a read-only filesystem --------------------------------------------------------------


@pytest.mark.parametrize("below", ["x", "a/b"])
def test_a_read_only_destination_is_refused(torpor_home: Path, tmp_path: Path, below: str) -> None:
    app, log = run_counter(torpor_home, "ro")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        dest = ro / below
        assert_one_line(
            cli("checkpoint", "ro", "-o", str(dest)),
            f"cannot create image directory {dest}: {ro} is on a read-only filesystem (nothing "
            "was done) — choose -o on a writable disk",
        )
        assert os.listdir(ro) == []
    finally:
        umount(ro)
    counting(app, log)
    assert not (torpor_home / "images").exists() or os.listdir(torpor_home / "images") == []


# -- a non-root user on a root home ------------------------------------------------------------

NOBODY = 65534


def _as_nobody(home: Path, argvs: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Each command line run by uid/gid 65534 with ``home`` as TORPOR_HOME. If the Python
    torpor runs on lives under a directory others cannot enter (root's home), the commands run
    in a mount namespace of their own where that directory is a world-readable tmpfs holding
    only the interpreter's tree (so the user can start torpor at all; the home is untouched)."""
    prefix = Path(os.path.realpath(sys.base_prefix))
    blocked = next(
        (p for p in reversed(prefix.parents) if p != Path("/") and not os.stat(p).st_mode & 0o001),
        None,
    )
    results = []
    for argv in argvs:
        drop = [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            TORPOR,
            *argv,
        ]
        if blocked is None:
            cmd = drop
        else:
            keep = tempfile.mkdtemp()
            script = (
                'mount --bind "$1" "$2" && mount -t tmpfs -o mode=0755,size=1m tmpfs "$3" && '
                'mkdir -p "$1" && mount --bind "$2" "$1" && shift 3 && exec "$@"'
            )
            cmd = [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
                str(prefix),
                keep,
                str(blocked),
                *drop,
            ]
        try:
            results.append(
                subprocess.run(
                    cmd,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    env=dict(os.environ, TORPOR_HOME=str(home)),
                    stdin=subprocess.DEVNULL,
                )
            )
        finally:
            if blocked is not None:
                os.rmdir(keep)
    return results


def test_a_non_root_user_on_a_root_home_gets_one_line(tmp_path: Path) -> None:
    # A root home others can see but not enter (its parent is /tmp: a home under a directory
    # they cannot enter is not even seen).
    home = Path(tempfile.mkdtemp(prefix="torpor-root-home-", dir="/tmp"))
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        torpor("ps", TORPOR_HOME=str(home))  # made by root: 0700, root's
        before = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
        refused = (
            f"torpor home {home} belongs to root; uid {NOBODY} cannot use it — run torpor as "
            "root, or set TORPOR_HOME to a directory of your own"
        )
        table = {
            ("ps",): refused,
            ("images",): refused,
            ("checkpoint", str(sleeper.pid)): refused,
            ("restore", "img"): refused,
            ("image", "push", "img", "a@default"): refused,
            ("pool", "list"): refused,
            ("kill", "c"): refused,
            ("inspect", "img"): refused,
            ("run", "--name", "x", "--", "true"): (
                "torpor run needs root (CRIU and PID namespaces) — run as root"
            ),
        }
        argvs = [list(argv) for argv in table]
        for argv, out in zip(argvs, _as_nobody(home, argvs), strict=True):
            assert_one_line(out, table[tuple(argv)])
        assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == before
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
        shutil.rmtree(home)


# -- targets refused before CRIU (real ones) ---------------------------------------------------


def _a_kernel_thread() -> tuple[int, str]:
    for name in sorted(os.listdir("/proc"), key=lambda n: (len(n), n)):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{name}/stat").read_text()
            if int(stat.rpartition(")")[2].split()[6]) & 0x00200000:  # PF_KTHREAD
                return int(name), Path(f"/proc/{name}/comm").read_text().strip()
    raise AssertionError("no kernel thread is visible in /proc")


def test_a_kernel_thread_is_refused_before_criu(torpor_home: Path) -> None:
    pid, comm = _a_kernel_thread()
    assert_one_line(
        cli("checkpoint", str(pid), "--leave-running"),
        f"pid {pid} is a kernel thread ({comm}), not a user process; torpor does not "
        f"checkpoint it (nothing was done) — {CHOOSE_APP}",
    )
    assert not (torpor_home / "logs").exists() or os.listdir(torpor_home / "logs") == []


def test_a_keeper_is_refused_and_its_app_counts_on(torpor_home: Path) -> None:
    app, log = run_counter(torpor_home, "kept")
    keeper_pid = parent_pid(app.pid)
    assert keeper_pid is not None
    keeper = ref(keeper_pid)
    for argv in (["--leave-running"], []):  # without: CRIU would have killed keeper and app
        assert_one_line(
            cli("checkpoint", str(keeper_pid), *argv),
            f"pid {keeper_pid} is a torpor keeper, not an application; torpor does not "
            f"checkpoint it (nothing was done) — {CHOOSE_APP}",
        )
        assert keeper.alive()
        counting(app, log)
    assert parse_ps(torpor("ps").stdout, "PID", "STATE") == {"kept": (str(app.pid), "running")}


# -- CRIU killed while it dumps ----------------------------------------------------------------


def _criu_dumping(app: ProcRef, checkpointer: int) -> int | None:
    """The CRIU that has seized ``app`` (its tracer), if it is the checkpointer's child."""
    for line in Path(f"/proc/{app.pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            tracer = int(line.split()[1])
            if tracer and parent_pid(tracer) == checkpointer:
                return tracer
    return None


def test_criu_killed_while_it_dumps_says_so_and_the_process_runs_on(torpor_home: Path) -> None:
    app, log = run_counter(torpor_home, "big", ballast_mib=384)
    images = torpor_home / "images"
    with subreaper():
        before = children()
        proc = subprocess.Popen(
            [TORPOR, "checkpoint", "big", "--name", "img"],  # the process would be stopped
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        checkpointer = checkpointer_of(proc, before)
        # Once CRIU has seized the process: the tree is frozen, its memory being dumped.
        found = wait_for(lambda: _criu_dumping(app, checkpointer), timeout=30, what="CRIU")
        criu = int(found)  # type: ignore[call-overload]
        assert os.path.basename(os.readlink(f"/proc/{criu}/exe")) == "criu"
        os.kill(criu, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
    kept = sorted((torpor_home / "logs").glob(f"dump-{app.pid}-*.log"))
    assert len(kept) == 1, kept
    assert_one_line(
        subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
        f"checkpoint of pid {app.pid} failed: CRIU was killed by SIGKILL before it answered (the "
        f"process keeps running; log: {kept[0]}) — something killed CRIU (`dmesg` shows whether "
        "it was the OOM killer): retry",
    )
    counting(app, log)
    assert os.listdir(images) == []  # no image, no leftover
    assert parse_ps(torpor("ps").stdout, "PID", "STATE") == {"big": (str(app.pid), "running")}
    # The retry works, and the process still runs (left running).
    assert (
        torpor("checkpoint", "big", "--leave-running", "--name", "img").stdout
        == f"{images / 'img'}\n"
    )
    counting(app, log)


# -- torpor run of a command that ends at once -------------------------------------------------


ROUNDS = 20  # the race it lost was lost about one time in five


def test_run_of_a_command_that_exits_at_once_starts_and_is_recorded_exited_0(
    torpor_home: Path,
) -> None:
    started = {}
    for i in range(ROUNDS):
        name = f"t{i}"
        out = cli("run", "--name", name, "--", "true")
        assert out.returncode == 0, out.stderr
        pid = out.stdout.split()[1]
        assert out.stdout == f"{name} {pid}\n"
        log = torpor_home / "logs" / f"{name}.log"
        assert out.stderr == f"started {name} (pid {pid}); log: {log}\n"
        started[name] = (pid, "exited 0")
    wait_for(
        lambda: parse_ps(torpor("ps", "-a").stdout, "PID", "STATE") == started,
        what="every exit recorded",
    )
