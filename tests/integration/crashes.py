"""Helpers of the crash-safety tests: counters to checkpoint, the invariants a checkpoint must
keep however it ends, subreaping a checkpoint's detached processes, small disks."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from torpor._images._image import Image
from torpor._process._proc import ProcRef, ref

from .helpers import APPS, PYTHON, counts, parse_ps, torpor, wait_for

PR_SET_CHILD_SUBREAPER = 36


def run_counter(home: Path, name: str, ballast_mib: int = 0) -> tuple[ProcRef, Path]:
    """A counter run by torpor under ``name`` (with ``ballast_mib`` MiB of memory), counting."""
    app = [PYTHON, str(APPS / "ballast_counter.py"), str(ballast_mib)]
    out = torpor("run", "--name", name, "--", *app).stdout.split()
    pid = int(out[1])
    log = home / "logs" / f"{name}.log"
    wait_for(lambda: log.exists() and len(counts(log).get(pid, [])) >= 2, what="counting")
    return ref(pid), log


def frozen(pid: int) -> str | None:
    """Why ``pid`` is not free to run (stopped, traced, in a frozen cgroup), or None."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    state = fields["State"].split()[0]
    if state in ("T", "t"):
        return f"state {fields['State'].strip()}"
    if fields["TracerPid"].strip() != "0":
        return f"traced by {fields['TracerPid'].strip()}"
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            freeze = Path("/sys/fs/cgroup") / path.lstrip("/") / "cgroup.freeze"
            if freeze.exists() and freeze.read_text().strip() != "0":
                return f"cgroup {path} frozen"
    return None


def still_counting(log: Path, pid: int) -> None:
    """``pid`` goes on counting (two more lines)."""
    before = len(counts(log).get(pid, []))
    wait_for(lambda: len(counts(log).get(pid, [])) >= before + 2, what=f"pid {pid} counting")


def restores_and_continues(image: Path, name: str, app: ProcRef, log: Path) -> None:
    """The image at ``image`` is complete, restores (as ``name``, writing to its own log
    beside ``log``), and the copy goes on from the last count of ``app``; the copy is then
    killed."""
    Image.open(image).verify(full=True)
    last = counts(log)[app.pid][-1]
    new = int(torpor("restore", str(image), "--name", name).stdout.split()[1])
    copy_log = log.parent / f"{name}.log"
    wait_for(
        lambda: copy_log.exists() and len(counts(copy_log).get(new, [])) >= 2,
        what="the restored copy counting",
    )
    first = counts(copy_log)[new][0]
    assert first in (last + 1, last + 2), (last, counts(copy_log)[new][:3])
    assert parse_ps(torpor("ps").stdout, "PID", "STATE")[name] == (str(new), "running")
    torpor("kill", name)


def leftovers(parent: Path) -> list[str]:
    """Staging directories in ``parent``."""
    return sorted(n for n in os.listdir(parent) if ".partial-" in n)


def _prctl_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def children() -> set[int]:
    """Our children's pids."""
    out: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            out |= {int(p) for p in Path(f"/proc/self/task/{tid}/children").read_text().split()}
    return out


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Within: processes that a command we start detaches (its checkpointer, the checkpointer's
    CRIU once it is orphaned) become our children, so we can wait for them all to end. Only
    around commands that do not start daemons meant to outlive us (keepers)."""
    before = children()
    _prctl_subreaper(True)
    try:
        yield
    finally:
        _prctl_subreaper(False)
        reap_new(before, timeout=0)


def reap_new(before: set[int], *, timeout: float) -> None:
    """Wait (up to ``timeout`` s) for every child not in ``before`` to end, and reap it."""
    deadline = time.monotonic() + timeout
    while True:
        new = children() - before
        for pid in new:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        new = children() - before
        if not new:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {sorted(new)} still running after {timeout}s")
        time.sleep(0.005)


def checkpointer_of(cli: subprocess.Popen[str] | subprocess.Popen[bytes], before: set[int]) -> int:
    """The pid of the checkpointer ``cli`` detached (a child of ours under :func:`subreaper`)."""

    def found() -> int | None:
        new = children() - before - {cli.pid}
        return next(iter(new)) if len(new) == 1 else None

    return int(wait_for(found, timeout=20, what="the checkpointer"))  # type: ignore[arg-type]


def mount_tmpfs(path: Path, size_kib: int) -> None:
    """A tmpfs of ``size_kib`` KiB on ``path`` (mounted, or resized if it is one already)."""
    opts = f"size={size_kib}k,mode=0700"
    if os.path.ismount(path):
        subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], check=True)
    else:
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)


def used_bytes(path: Path) -> int:
    """Bytes in use on the filesystem of ``path``."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def fill(path: Path, name: str = "filler") -> Path:
    """Take every free byte of the filesystem at ``path`` into the file ``name``."""
    st = os.statvfs(path)
    filler = path / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        free = st.f_bavail * st.f_frsize
        if free:
            os.posix_fallocate(fd, 0, free)
    finally:
        os.close(fd)
    return filler
