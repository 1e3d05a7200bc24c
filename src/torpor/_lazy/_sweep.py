"""What a killed keeper leaves of lazy restores, found and removed at the next restore.

A lazy copy's work dir (``<home>/lazy/<copy>-<8 hex>/``: the daemon's socket and log, the
restore's log, a warm image) and a pool image's local part (``<cache>/lazy-pool/<pid>-<16
hex>/``: small files and the non-lazy pages, secrets among them) are removed by the keeper
once its copies are resident, or kept (logs) when they failed. A keeper killed meanwhile
leaves them behind.

Each such directory holds one empty file ``owner-<pid>-<start time>`` per process using it
(:func:`claim`): the process that made it, the keeper, the copy's daemon. :func:`sweep`
removes a directory only when none of them is still that very process (pid *and* start time,
as ``/proc/<pid>/stat`` says: a reused pid is another process), and one without any owner
file only once it is older than :data:`GRACE` (it may be a moment from its first claim).
A failed copy's work dir (marked :data:`FAILED_MARK`) is never swept: its logs are what the
failure's message names.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import time
from pathlib import Path

from .._errors import TorporError

GRACE = 120.0  # seconds an unclaimed directory may be young enough to be about to be claimed
_OWNER = re.compile(r"owner-([1-9][0-9]{0,9})-([0-9]{1,20})")
_WORK_DIR = re.compile(r".+-[0-9a-f]{8}")
_LOCAL_PART = re.compile(r"[1-9][0-9]{0,9}-[0-9a-f]{16}")
FAILED_MARK = "failed"  # a failed copy's work dir: its logs are the evidence, kept


def _start_time(pid: int) -> int | None:
    """The start time of ``pid`` if it runs (a zombie has ended: this VM's init reaps
    orphans late, and a killed keeper's daemon is one)."""
    from .._process._proc import stat_fields  # (the process floor imports this one's)

    st = stat_fields(pid)
    return int(st[19]) if st is not None and st[0] not in ("Z", "X") else None


def claim(directory: Path, pid: int | None = None) -> None:
    """Mark ``directory`` as used by process ``pid`` (default: this one) for as long as that
    very process lives."""
    pid = os.getpid() if pid is None else pid
    born = _start_time(pid)
    if born is None:
        return  # gone already: nothing to keep the directory for
    fd = os.open(
        directory / f"owner-{pid}-{born}",
        os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
    )
    os.close(fd)


def in_use(directory: Path, *, now: float | None = None) -> bool:
    """Whether a process that claimed ``directory`` still lives (or it is too young to say)."""
    try:
        names = os.listdir(directory)
        st = os.lstat(directory)
    except OSError:
        return True  # gone, or not ours to judge
    if FAILED_MARK in names:
        return True
    owners = [m for n in names if (m := _OWNER.fullmatch(n))]
    if not owners:
        return (time.time() if now is None else now) - st.st_mtime < GRACE
    return any(_start_time(int(m.group(1))) == int(m.group(2)) for m in owners)


def sweep(parents: list[Path]) -> list[Path]:
    """Remove the lazy work dirs and local parts under ``parents`` nobody uses (see the module
    docstring); what was removed."""
    removed = []
    for parent in parents:
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for entry in entries:
            if not (_WORK_DIR.fullmatch(entry.name) or _LOCAL_PART.fullmatch(entry.name)):
                continue  # not one of ours (``warm/``, state files)
            with contextlib.suppress(OSError):
                if not stat.S_ISDIR(entry.stat(follow_symlinks=False).st_mode):
                    continue
                path = Path(entry.path)
                if not in_use(path):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
    return removed


def sweep_home() -> list[Path]:
    """:func:`sweep` this home's lazy work dirs and pool local parts (best effort)."""
    from ._state import lazy_dir, lazy_pool_dir

    try:
        parents = [lazy_dir(), lazy_pool_dir()]
    except (OSError, TorporError):  # an unusable home is reported by what needs it
        return []
    return sweep(parents)
