"""Checkpointing a process from outside (``torpor checkpoint PID`` without coordination),
and what is refused before CRIU is asked: processes CRIU cannot or must not dump (pid 1,
kernel threads, torpor's own processes, the caller's own tree) and image directories that
cannot be made where asked (a kernel filesystem, a read-only one, under a file, over
something that exists)."""

from __future__ import annotations

import ctypes
import os
import stat
from pathlib import Path

from .._engine import CriuEngine, DumpOptions
from .._errors import AlreadyExistsError, DumpError, PermissionDeniedError, UsageError
from .._images._image import Image
from ._checkpointer import Job, Outcome, run
from ._proc import ProcRef, ancestors, command_name, host_pid, is_kernel_thread, ref, torpor_role

# statfs(2) magic numbers of kernel filesystems, which cannot hold an image's files.
_KERNEL_FILESYSTEMS = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x1CD1: "devpts",
    0xCAFE4A11: "bpf",
    0x6165676C: "pstore",
    0xDE5E81E4: "efivarfs",
    0x62656570: "configfs",
    0x19800202: "mqueue",
    0x42494E4D: "binfmt_misc",
    0x65735543: "fusectl",
    0xF97CFF8C: "selinuxfs",
    0x6E736673: "nsfs",
}
_KERNEL_TREES = (Path("/proc"), Path("/sys"))


def terminal_fds(pid: int) -> list[str]:
    """``fd N -> /dev/pts/M`` for each terminal the process has open."""
    out: list[str] = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in sorted(fds, key=int):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("/dev/pts/", "/dev/tty", "/dev/console", "/dev/ptmx")):
            out.append(f"fd {fd} -> {target}")
    return out


def checkpoint_pid(
    pid: int,
    dest: Path,
    options: DumpOptions,
    *,
    name: str,
    engine: CriuEngine | None = None,
) -> Image:
    """Dump the tree rooted at ``pid`` into a new image directory ``dest``.

    The dump and the commit run in a detached checkpointer (``_checkpointer``): the image is
    committed however the caller ends, once CRIU may have killed the process. A failed or
    aborted dump (a ``KeyboardInterrupt`` while CRIU writes) leaves the process running and no
    image behind; an image that could not be finished after the process was stopped is kept
    (:class:`~torpor._images._incomplete.IncompleteImageError` names it).
    """
    return checkpoint(pid, dest, options, name=name, engine=engine).image


def checkpoint(
    pid: int,
    dest: Path,
    options: DumpOptions,
    *,
    name: str,
    engine: CriuEngine | None = None,
) -> Outcome:
    """:func:`checkpoint_pid`, saying also whether an interruption came too late to abort."""
    if os.geteuid() != 0:
        raise PermissionDeniedError("checkpointing needs root (CRIU)", hint="run as root")
    target = ref(pid)
    check_dumpable(target)
    check_destination(Path(dest).absolute())
    ttys = terminal_fds(pid)
    if ttys and not options.shell_job:
        raise DumpError(
            f"pid {pid} holds a terminal ({ttys[0]}); a terminal cannot be restored elsewhere "
            "(nothing was done)",
            pid=pid,
            hint="start it with `torpor run` (stdio to a log file), or pass --shell-job to "
            "dump and restore it as a shell job",
        )
    return run(Job(target, Path(dest).absolute(), options, name), engine=engine)


def check_dumpable(target: ProcRef) -> None:
    """Refuse, before CRIU is asked (it would fail with "Unable to detach", or dump what must
    not be dumped), the host's init, a kernel thread, one of torpor's own processes, and the
    caller or a process whose tree holds the caller (:class:`DumpError`; nothing is done)."""
    pid = target.pid
    me = host_pid()
    name = command_name(pid)
    hint = "checkpoint an application's process (`torpor ps` lists the ones torpor started)"
    if pid == 1:
        why = f"is the system's init ({name})"
    elif pid == me or pid in ancestors(me):
        why = (
            "is this torpor command itself"
            if pid == me
            else "is an ancestor of this torpor command: a checkpoint would dump the command too"
        )
        hint = (
            "run `torpor checkpoint` from outside the process's tree, or checkpoint from inside "
            "with the torpor library's checkpoint()"
        )
    elif is_kernel_thread(pid):
        why = f"is a kernel thread ({name}), not a user process"
    else:
        role = torpor_role(pid)
        if role is None:
            return
        why = f"is {role}, not an application"
    raise DumpError(
        f"pid {pid} {why}; torpor does not checkpoint it (nothing was done)", pid=pid, hint=hint
    )


def check_destination(dest: Path) -> None:
    """Refuse an image directory ``dest`` (absolute) that cannot be made: something is there
    already, the nearest existing parent is not a directory, or it is on a kernel
    filesystem (/proc, /sys) or a read-only one. Nothing is created."""
    if dest.exists() or dest.is_symlink():
        st = dest.lstat()
        if stat.S_ISDIR(st.st_mode):
            raise AlreadyExistsError(
                f"image directory {dest} exists already",
                path=str(dest),
                hint="choose another -o/--name, or delete the old image first",
            )
        raise AlreadyExistsError(
            f"cannot create image directory {dest}: {_kind(st.st_mode)} is there already",
            path=str(dest),
            hint="choose another -o/--name (torpor never overwrites a file)",
        )
    parent = dest.parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # dangling: mkdir would fail on it
            break
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(
            f"cannot create image directory {dest}: {parent} is not a directory (nothing was done)",
            hint="choose -o under a directory",
        )
    real = Path(os.path.realpath(parent))
    kind = _KERNEL_FILESYSTEMS.get(_fs_magic(real))
    where = f"on {kind}, a kernel filesystem" if kind is not None else None
    for tree in _KERNEL_TREES:  # what is mounted there (a tmpfs for cgroups) is the kernel's
        if where is None and real.is_relative_to(tree):
            where = f"under {tree}, the kernel's own tree"
    if where is not None:
        raise UsageError(
            f"cannot create image directory {dest}: {real} is {where}, which cannot hold "
            "an image (nothing was done)",
            hint="choose -o on a disk",
        )
    if os.statvfs(real).f_flag & os.ST_RDONLY:
        raise UsageError(
            f"cannot create image directory {dest}: {real} is on a read-only filesystem "
            "(nothing was done)",
            hint="choose -o on a writable disk",
        )


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file"


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux: f_type first, then the sizes (120 bytes in all).
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def _fs_magic(path: Path) -> int:
    """The ``f_type`` of ``statfs(2)`` on ``path`` (0 if it cannot be read)."""
    buf = _Statfs()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return 0
    return int(buf.f_type) & 0xFFFFFFFF
