"""Whether a client may have its command run by an agent worker, and the cgroups it runs in.

The client is the process that connected (``SO_PEERPIDFD``): it is held by a pidfd, and
whatever is read about it from ``/proc/PID`` is trusted only once the pidfd is seen to name a
live process after the read (read, then verify). A pid alone would not do: the client may exit
and its pid be reused by another process (an unconfined root one) before the reads.

A command run by the agent must not get more than its client has: the same capabilities,
``no_new_privs``, seccomp filters, LSM label, namespaces and root directory, or it is declined
(and the launcher runs it itself). It runs in the client's cgroups (the worker moves itself,
and its warm CRIU, into each of them before it runs the command).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable

from .._process._pidfd_peer import PeerProcess

# What a command run here would have differently from its client, and cannot take on: its
# privileges and namespaces (a confined root shell must not get the agent's full powers).
_STATUS_KEYS = ("CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp", "Seccomp_filters")
_NAMESPACES = ("mnt", "net", "pid", "ipc", "uts", "user", "cgroup")


class Declined(Exception):
    """Why a request cannot run here as it would in its client."""


class Client(PeerProcess):
    """The process at the other end of ``conn``, held by a pidfd (the shared read-then-verify
    of :mod:`torpor._process._pidfd_peer`); :class:`Declined` if it cannot be held, or exited
    before what was read of it was verified."""

    def __init__(self, conn: socket.socket) -> None:
        super().__init__(conn, what="the client process", error=Declined)


def confinement(pid: int | str) -> dict[str, str]:
    """What a command run for process ``pid`` (or ``"self"``) must have the same as it."""
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in _STATUS_KEYS:
                out[key] = value.strip()
    for ns in _NAMESPACES:
        try:
            out[f"{ns} namespace"] = os.readlink(f"/proc/{pid}/ns/{ns}")
        except OSError:
            out[f"{ns} namespace"] = "?"
    try:  # the LSM label (AppArmor, SELinux, Smack); none without an LSM that has one
        with open(f"/proc/{pid}/attr/current", "rb") as fh:
            out["LSM label"] = fh.read().rstrip(b"\0\n").decode(errors="replace")
    except OSError:
        out["LSM label"] = "none"
    try:
        root = os.stat(f"/proc/{pid}/root")
        out["root directory"] = f"{root.st_dev}:{root.st_ino}"
    except OSError:
        out["root directory"] = "?"
    return out


def check(client: Client, uid: int, ours: dict[str, str]) -> None:
    """:class:`Declined` unless the client runs as our uid and confined as we are."""
    if uid != os.geteuid():
        raise Declined(f"uid {uid} is not this agent's")
    try:
        theirs = client.verified(confinement(client.pid))
    except OSError as exc:
        raise Declined(f"cannot read the client's process status: {exc}") from exc
    for key, value in ours.items():
        if theirs.get(key) != value:
            raise Declined(
                f"the client's {key} ({theirs.get(key)}) differs from the agent's ({value})"
            )


# -- cgroups ---------------------------------------------------------------------------------


def cgroups(pid: int | str) -> dict[tuple[str, str], str]:
    """``/proc/PID/cgroup``: (hierarchy id, controllers) -> path; ("0", "") is cgroup v2."""
    out: dict[tuple[str, str], str] = {}
    with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            hier, controllers, path = line.rstrip("\n").split(":", 2)
            out[hier, controllers] = path
    return out


def _unescape(field: str) -> str:
    """A mountinfo path field (space, tab, newline and backslash are octal escapes)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """The cgroup file systems mounted here: (fstype, root, mount point, super options)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            left, sep, right = line.rstrip("\n").partition(" - ")
            fields, tail = left.split(" "), right.split(" ")
            if sep and len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
                root, point = _unescape(fields[3]), _unescape(fields[4])
                out.append((tail[0], root, point, set(tail[2].split(","))))
    return out


def _directory(
    key: tuple[str, str], path: str, mounts: Iterable[tuple[str, str, str, set[str]]]
) -> str | None:
    """Where cgroup ``path`` of hierarchy ``key`` is in our mount namespace, or None."""
    hier, controllers = key
    for fstype, root, point, options in mounts:
        if hier == "0" and not controllers:
            if fstype != "cgroup2":
                continue
        elif fstype != "cgroup" or not set(controllers.split(",")) <= options:
            continue
        if root == "/":
            rel = path
        elif path == root or path.startswith(root + "/"):
            rel = path[len(root) :]
        else:
            continue
        return point.rstrip("/") + "/" + rel.lstrip("/")
    return None


def join_cgroups(client: Client, pids: Iterable[int]) -> None:
    """Move ``pids`` (this worker and its warm CRIU) into each of the client's cgroups, v2 and
    v1; :class:`Declined` if one cannot be joined (the command would escape a limit)."""
    try:
        theirs = client.verified(cgroups(client.pid))
        ours = cgroups("self")
        if theirs == ours:
            return
        mounts = _mounts()
        for key, path in theirs.items():
            if ours.get(key) == path:
                continue
            directory = _directory(key, path, mounts)
            if directory is None:
                raise Declined(f"the client's cgroup {key[1] or 'v2'}:{path} is not mounted here")
            for pid in pids:
                fd = os.open(f"{directory}/cgroup.procs", os.O_WRONLY | os.O_NOFOLLOW)
                try:
                    os.write(fd, b"%d" % pid)
                finally:
                    os.close(fd)
        now = cgroups("self")
        if client.verified(cgroups(client.pid)) != now:
            raise Declined("the client's cgroups changed while the worker joined them")
    except (OSError, ValueError) as exc:
        raise Declined(f"cannot join the client's cgroups: {exc}") from exc
