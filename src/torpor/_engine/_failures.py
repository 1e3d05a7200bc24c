"""How CRIU's failures read: the real error lines of its log, a hint for each known failure,
and the one-line errors of a failed response or of a CRIU that ended without answering (how
it ended, what became of the process, where the log is)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .._errors import CriuError
from .._proto import criu_rpc_pb2 as pb
from ._rpc import Connection, TransportError

# Known failure signatures in CRIU's log → what the user should do. First match wins.
_HINTS: Sequence[tuple[re.Pattern[str], str]] = [
    (re.compile(r"within dumped tree"), "CRIU cannot run inside the tree it dumps"),
    (
        # The root of a PID namespace that is not root: CRIU's parasite must mount a /proc
        # of that namespace from inside the process (pie/parasite.c, get_proc_fd).
        # -17 (EEXIST): proc.crtools is there already (see _cwdlock).
        re.compile(r"parasite\.c:\d+: Can't create a directory \(-17\)"),
        "CRIU's parasite found proc.crtools in the process's working directory: another dump "
        "of a process there ran at the same moment (retry), or a killed one left it (remove "
        "proc.crtools from the working directory, `ls -l /proc/PID/cwd/`, if no dump runs)",
    ),
    (
        re.compile(r"parasite\.c:\d+: Can't create a directory|whose /proc doesn't belong"),
        "CRIU cannot dump a process that dropped root while it is pid 1 of its PID namespace "
        "(`torpor run`): keep the app's first process root and drop privileges in its children",
    ),
    (
        re.compile(r"torpor keeper: process \d+ of the tree runs with other credentials"),
        "a dump for an unprivileged process covers only processes with its credentials: end "
        "the others (root children, set-uid programs) first",
    ),
    (
        re.compile(r"tty|TTY|pty"),
        "the process holds a terminal: start it with `torpor run` (stdio to a log file), "
        "or checkpoint with --shell-job",
    ),
    (
        re.compile(r"Connected TCP socket in image"),
        "the image holds an established TCP connection: restore with --tcp-established (it "
        "resumes) or --tcp-close (it comes back closed)",
    ),
    (
        re.compile(r"Can't connect inet socket back"),
        "the image's TCP connection still exists (a restored copy holds it, or it lingers): "
        "restore with --tcp-close to bring it back closed",
    ),
    (
        re.compile(r"Can't bind inet socket.*in use"),
        "a port the image binds is taken (is the original still running?): stop it; restored "
        "copies share a listening port only with each other",
    ),
    (
        re.compile(r"Connected TCP socket|tcp-established"),
        "the process has an established TCP connection: pass --tcp-established",
    ),
    (
        re.compile(r"[Uu]nix.*(external|[Ee]xt)|half of stream unix|unix.*peer"),
        "the process holds a unix socket connected to a process outside its tree: close it "
        "before the checkpoint (or use an fd policy)",
    ),
    (
        re.compile(r"has bad size|Size mismatch"),
        "a file the process has open changed size since the dump: open such files with "
        "O_APPEND, or restore a fresh image",
    ),
    (
        re.compile(r"ghost regfile|Couldn't unlink remap|ghost.*File exists"),
        "the ghost file CRIU recreates for a deleted-but-open file (<path>.cr.<id>.ghost) "
        "was there already: a restore outside torpor was making it, or a killed restore left "
        "it; retry, or delete the leftover",
    ),
    (
        re.compile(r"File exists|Can't fork for \d+|set_tid"),
        "a pid the image needs is in use (is the original still running?): stop it, or run "
        "apps with `torpor run` so they live in their own PID namespace",
    ),
    (
        re.compile(r"Can't open file.*No such file|Can't lookup"),
        "a file the process had open is gone",
    ),
    (
        re.compile(r"Operation not permitted|EPERM"),
        "CRIU needs root (CAP_SYS_ADMIN and friends): run torpor as root",
    ),
]

_RLIMIT = "RLIMIT_NOFILE"


def log_errors(log_path: Path, limit: int = 8) -> list[str]:
    """The real error lines of a CRIU log (harmless rlimit noise dropped), prefixes trimmed."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []
    lines: list[str] = []
    for line in text.splitlines():
        if "Error (" not in line or _RLIMIT in line:
            continue
        # "(00.012345) Error (criu/tty.c:123): message" -> "tty.c:123: message"
        m = re.search(r"Error \((?:criu/)?([^)]*)\):\s*(.*)", line)
        lines.append(f"{m.group(1)}: {m.group(2)}" if m else line.strip())
        if len(lines) >= limit:
            break
    return lines


def _hint_for(lines: Sequence[str]) -> str | None:
    text = "\n".join(lines)
    for pattern, hint in _HINTS:
        if pattern.search(text):
            return hint
    return None


class _CriuDied(Exception):
    """CRIU ended without answering a request (internal: the engine turns it into a
    :class:`CriuError` that says how, where the log is and what became of the process)."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


def _how_it_ended(conn: Connection, exc: TransportError) -> str:
    """``was killed by SIGKILL``, ``exited with status 1``, or what broke the connection."""
    code = None
    if conn.proc is not None:  # our own swrk child: its exit status says how it ended
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = conn.proc.wait(timeout=5)
    if code is None:
        return f"ended without answering ({exc})"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} before it answered"
    return f"exited with status {code} before it answered"


def process_state(pid: int) -> str:
    """What became of ``pid`` after a failed dump, looked at now: ``the process keeps
    running``, ``... is stopped`` (with how to resume it) or ``... is gone``."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return "the process is gone"
    if state in ("Z", "X"):
        return "the process is gone"
    if state in ("T", "t"):
        return f"the process is stopped (`kill -CONT {pid}` resumes it)"
    return "the process keeps running"


def _died(
    cls: type[CriuError],
    died: _CriuDied,
    *,
    pid: int | None,
    image: Path,
    log_path: Path,
) -> CriuError:
    """The error for a CRIU that ended without answering: how it ended, the log's first
    error line, what became of the dumped process, where the log is."""
    lines = log_errors(log_path)
    if pid is not None:
        what = f"checkpoint of pid {pid}"
        kept = process_state(pid)
    else:
        what = f"restore of image {image}"
        kept = None
    said = f"; its log says: {lines[0]}" if lines else ""
    # Killed early, CRIU may have written no log (a path that does not exist helps no one).
    logged = log_path.exists()
    log = f"log: {log_path}" if logged else "CRIU wrote no log"
    where = f"{kept}; {log}" if kept else log
    hint = _hint_for(lines)
    if hint is None and "SIGKILL" in died.how:
        hint = "something killed CRIU (`dmesg` shows whether it was the OOM killer): retry"
    return cls(
        f"{what} failed: CRIU {died.how}{said} ({where})",
        pid=pid,
        image=image,
        log_path=log_path if logged else None,
        log_lines=lines,
        hint=hint,
    )


def _failure(
    cls: type[CriuError],
    what: str,
    resp: pb.Resp,
    pid: int | None,
    image: Path,
    log_path: Path,
    notify_error: BaseException | None,
    *,
    kept: str,
    lines: Sequence[str] | None = None,
    ourselves: bool = False,
) -> CriuError:
    """The error for a failed response; ``lines`` are the log's error lines when the log was
    read elsewhere than ``log_path`` (the path the message names). ``ourselves``: the dumped
    process is the caller (alive, and its host pid may not even exist in its PID namespace)."""
    # Read elsewhere: the log at ``log_path`` is where someone else kept it (a keeper).
    logged = lines is not None or log_path.exists()
    lines = list(lines) if lines is not None else log_errors(log_path)
    full = None if lines else disk_full(log_path.parent)
    if notify_error is not None:
        reason = f"a {what} callback failed: {notify_error}"
    elif lines:
        reason = lines[0]
    elif full is not None:  # CRIU could not log why: its log's disk is full
        reason = full[0]
    else:
        reason = resp.cr_errmsg or f"CRIU error {resp.cr_errno}"
    subject = f"pid {pid}" if pid is not None else f"image {image}"
    if pid is not None and not ourselves and not _pid_alive(pid) and what == "checkpoint":
        kept = "the process is gone"
    hint = _hint_for(lines) if notify_error is None else None
    if hint is None and full is not None:
        hint = f"free space on {full[1]}"
    if hint is None and resp.cr_errno == 1 and os.geteuid() != 0:
        hint = "CRIU needs root: run torpor as root"
    log = f"log: {log_path}" if logged else "CRIU wrote no log"
    msg = f"{what} of {subject} failed: {reason} ({kept}; {log})"
    err = cls(
        msg,
        pid=pid,
        image=image,
        log_path=log_path if logged else None,
        log_lines=lines,
        hint=hint,
    )
    if notify_error is not None:
        err.__cause__ = notify_error
    return err


# Less than this free where CRIU logs, and no error in its log: it ran out of space.
_LOW_SPACE = 64 << 10


def disk_full(where: Path) -> tuple[str, Path] | None:
    """``(no space left on MOUNT (...), MOUNT)`` if the filesystem holding ``where`` (or its
    nearest existing parent) is out of inodes or all but out of space, else None."""
    p = where
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
        dev = os.stat(p).st_dev
        while p != p.parent and os.stat(p.parent).st_dev == dev:
            p = p.parent
    except OSError:
        return None
    if st.f_files and st.f_favail == 0:
        return f"no space left on {p} (no free inodes)", p
    free = st.f_bavail * st.f_frsize
    if free < _LOW_SPACE:
        amount = f"{free} B" if free < 1024 else f"{free / 1024:.1f} KiB"
        return f"no space left on {p} ({amount} free)", p
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
