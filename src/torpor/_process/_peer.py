"""Who is on the other end of a keeper's socket, and acting with their credentials.

A keeper runs as root; the app it started may have dropped to another uid since. Whatever
the keeper does for such a child it does as the child could itself, or checks first:

- :func:`identify`: the peer of a connection, from ``SO_PEERCRED`` and its /proc status (read
  while the peer is held by a pidfd, and verified after: ``_pidfd_peer``). A process with uid
  0 in any of its uid slots can be root again at will, so it *is* root here; another must
  have one uid and one gid in all slots (a half-dropped process is refused).
- :func:`run_as`: run a few system calls in a forked child that took on the peer's groups,
  gid and uid (opening the directory a request names, renaming in it): the kernel then checks
  them as it would for the peer; fds opened there come back over ``SCM_RIGHTS``.
- :func:`tree_problem` and :class:`TreeGuard`: a dump gives the peer the memory of every
  process of its tree, so every thread of it must run with the peer's credentials (uids,
  gids, groups, permitted capabilities): a root child started before the app dropped its
  privileges, or a set-uid program, is not the peer's to read. Checked when the request
  arrives (a clear refusal) and again by CRIU itself at ``post-dump``, while the tree is
  frozen (:class:`TreeGuard`'s action script): a set-uid ``exec`` between the two cannot
  slip through.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from .._errors import PermissionDeniedError
from ._pidfd_peer import PeerProcess
from ._proc import descendants

_CRED = struct.Struct("3i")
_MAX_FDS = 4


@dataclass(frozen=True)
class Peer:
    """A connected process and the credentials the keeper acts with for it."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]
    cap_prm: int  # permitted capabilities (a bit mask)

    @property
    def privileged(self) -> bool:
        """Whether the peer is root (nothing done for it needs its credentials)."""
        return self.uid == 0


@dataclass(frozen=True)
class Creds:
    """The credentials in one /proc/PID/status (or task status) file."""

    uids: tuple[int, ...]  # real, effective, saved, filesystem
    gids: tuple[int, ...]
    groups: tuple[int, ...]
    cap_prm: int


def parse_status(text: str) -> Creds:
    """The credentials in the text of a /proc status file; ``ValueError`` if it lacks them."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields[key] = rest.split()
    try:
        uids = tuple(int(v) for v in fields["Uid"])
        gids = tuple(int(v) for v in fields["Gid"])
        groups = tuple(int(v) for v in fields["Groups"])
        caps = int(fields["CapPrm"][0], 16)
    except (KeyError, IndexError) as exc:
        raise ValueError(f"no {exc} in the status") from None
    if len(uids) != 4 or len(gids) != 4:
        raise ValueError("Uid/Gid lines without four values")
    return Creds(uids, gids, groups, caps)


def read_creds(path: str) -> Creds:
    """The credentials of the status file ``path`` (``OSError``/``ValueError``)."""
    with open(path, encoding="ascii", errors="replace") as fh:
        return parse_status(fh.read())


def peer_of(pid: int, uid: int, gid: int, creds: Creds) -> Peer:
    """The peer with ``SO_PEERCRED`` ``(pid, uid, gid)`` and current ``creds``; raises
    :class:`PermissionDeniedError` if those do not say one user."""
    if 0 in creds.uids:
        return Peer(pid, 0, 0, creds.groups, creds.cap_prm)
    if set(creds.uids) != {uid} or set(creds.gids) != {gid}:
        raise PermissionDeniedError(
            f"process {pid} has mixed credentials (uids {_ids(creds.uids)}, gids "
            f"{_ids(creds.gids)}; connected as {uid}:{gid}); refused",
            hint="drop privileges fully (setresgid, then setresuid) before asking its keeper",
        )
    return Peer(pid, uid, gid, creds.groups, creds.cap_prm)


def identify(conn: socket.socket) -> Peer:
    """The peer of the unix socket ``conn`` (see :func:`peer_of`), its status read from
    ``/proc/PID`` while it is held by a pidfd and believed only once it is seen not reaped
    after the read (``_pidfd_peer``): a peer that connected and exited, its pid now another
    process's (a root one), is refused, never judged by that process's status.

    :class:`PermissionDeniedError` if it cannot be held: it exited, or the kernel has no
    ``SO_PEERPIDFD`` (before Linux 6.5 the keeper serves no one: a pid alone is not sound).
    """
    pid, uid, gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    with PeerProcess(conn, what=f"process {pid}", error=_refused) as held:
        if held.pid != pid:  # our /proc is not of our pid namespace: its PID is not the peer
            raise PermissionDeniedError(
                f"process {pid} reads as pid {held.pid} in /proc; refused",
                hint="run the keeper with the /proc of its own pid namespace",
            )
        try:
            creds = held.verified(read_creds(f"/proc/{pid}/status"))
        except (OSError, ValueError) as exc:
            raise _refused(f"cannot read the credentials of process {pid}: {exc}") from exc
    return peer_of(pid, uid, gid, creds)


def still_there(conn: socket.socket) -> None:
    """:class:`PermissionDeniedError` unless the peer of ``conn`` is not reaped yet: then its
    pid is still its own, and whatever was looked up by that pid since it connected (the
    keeper's children, :func:`identify`'s status) was about it. A pid is held by a fresh
    pidfd of the same process (``SO_PEERPIDFD`` names it for as long as ``conn`` lives)."""
    pid, _, _ = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    with PeerProcess(conn, what=f"process {pid}", error=_refused) as held:
        if held.pid != pid:
            raise _refused(f"process {pid} reads as pid {held.pid} in /proc")


def _refused(msg: str) -> PermissionDeniedError:
    return PermissionDeniedError(f"{msg}; refused")


def _ids(values: Sequence[int]) -> str:
    return "/".join(str(v) for v in values)


# -- acting as the peer ---------------------------------------------------------------------


def run_as(peer: Peer, work: Callable[[], Sequence[int]]) -> list[int]:
    """Run ``work`` with ``peer``'s credentials and return the fds it returned (now ours);
    an ``OSError`` it raised is raised here with the same errno. A privileged peer's ``work``
    runs here.

    The child is forked from a keeper that has threads: it makes only system calls (no lock
    another thread could hold) and ends with ``_exit``.
    """
    if peer.privileged:
        return list(work())
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; exercised by the integration tests
        try:
            ours.close()
            _become(peer)
            made = array.array("i", work())
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, made.tobytes())] if made else []
            theirs.sendmsg([b"ok"], anc)
        except OSError as exc:
            with contextlib.suppress(OSError):
                theirs.send(b"errno %d" % (exc.errno or errno.EIO))
        finally:
            os._exit(0)
    theirs.close()
    try:
        msg, anc, _, _ = ours.recvmsg(4096, socket.CMSG_SPACE(_MAX_FDS * 4))
    finally:
        ours.close()
        os.waitpid(pid, 0)
    fds = array.array("i")
    for level, kind, blob in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(blob[: len(blob) - len(blob) % fds.itemsize])
    if msg == b"ok":
        return list(fds)
    for fd in fds:
        os.close(fd)
    if msg.startswith(b"errno "):
        err = int(msg[6:])
        raise OSError(err, os.strerror(err))
    raise OSError(errno.EIO, "the helper acting as the peer failed")


def _become(peer: Peer) -> None:  # pragma: no cover - in run_as's child
    os.setgroups(list(peer.groups))
    os.setresgid(peer.gid, peer.gid, peer.gid)
    os.setresuid(peer.uid, peer.uid, peer.uid)


# -- the peer's tree ------------------------------------------------------------------------


def _tasks(root: int) -> Iterator[tuple[int, str]]:
    """(pid, task status path) of every thread of the tree rooted at ``root``."""
    for pid in (root, *descendants(root)):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # ended meanwhile
        for tid in tids:
            yield pid, f"/proc/{pid}/task/{tid}/status"


def foreign(creds: Creds, peer: Peer) -> bool:
    """Whether a task with ``creds`` runs with other credentials than ``peer``'s."""
    return (
        set(creds.uids) != {peer.uid}
        or set(creds.gids) != {peer.gid}
        or set(creds.groups) != set(peer.groups)
        or creds.cap_prm != peer.cap_prm
    )


def tree_problem(root: int, peer: Peer) -> str | None:
    """Why the tree rooted at ``root`` may not be dumped for ``peer`` (None: it may): a
    thread in it runs with other credentials (see the module docstring)."""
    if peer.privileged:
        return None
    for pid, path in _tasks(root):
        try:
            creds = read_creds(path)
        except FileNotFoundError:
            continue  # ended meanwhile
        except (OSError, ValueError) as exc:
            return f"cannot read the credentials of process {pid}: {exc}"
        if foreign(creds, peer):
            return (
                f"process {pid} of its tree runs with other credentials (uids "
                f"{_ids(creds.uids)}, gids {_ids(creds.gids)}) than uid {peer.uid}, gid "
                f"{peer.gid}: its memory is not the requester's to have"
            )
    return None


# CRIU runs the action script at every step of the dump (``CRTOOLS_SCRIPT_ACTION``); at
# post-dump the tree is frozen and written, and a failing script fails the dump (the tree is
# thawed and carries on). The reason goes into CRIU's log (the dump's directory is the
# keeper's while CRIU runs), where the dump's error is read from.
_TREE_SCRIPT = """#!/bin/sh
[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0
[ -n "$CRTOOLS_INIT_PID" ] || exit 1
u=$TORPOR_TREE_UID
g=$TORPOR_TREE_GID
same() {
    file=$1
    seen=0
    while read -r key rest; do
        set -- $rest
        case $key in
        Uid:) [ "$*" = "$u $u $u $u" ] || return 1 ;;
        Gid:) [ "$*" = "$g $g $g $g" ] || return 1 ;;
        Groups:) [ "$*" = "$TORPOR_TREE_GROUPS" ] || return 1 ;;
        CapPrm:) [ "$*" = "$TORPOR_TREE_CAPS" ] || return 1 ;;
        *) continue ;;
        esac
        seen=$((seen + 1))
    done <"$file"
    [ "$seen" = 4 ]
}
todo=$CRTOOLS_INIT_PID
while :; do
    set -- $todo
    [ $# -gt 0 ] || break
    pid=$1
    shift
    todo=$*
    for task in /proc/"$pid"/task/*; do
        if ! same "$task/status"; then
            echo "(00.000000) Error (torpor keeper): process $pid of the tree runs with" \\
                "other credentials than uid $u, gid $g: its memory is not the requester's" \\
                "to have; dump refused" >>"$CRTOOLS_IMAGE_DIR/criu-dump.log"
            exit 1
        fi
        kids=
        read -r kids <"$task/children" || :
        todo="$todo $kids"
    done
done
"""


class TreeGuard:
    """The post-dump check of :func:`tree_problem`, run by CRIU while the tree is frozen: an
    action script held in a read-only memfd of the keeper (nothing on disk another user could
    change), run as ``/proc/<keeper>/fd/N``."""

    def __init__(self) -> None:
        rw = os.memfd_create("torpor-tree-check", os.MFD_CLOEXEC)
        try:
            os.write(rw, _TREE_SCRIPT.encode())
            os.fchmod(rw, 0o500)
            # Executing a file open for writing fails (ETXTBSY): keep a read-only fd only.
            self._fd = os.open(f"/proc/self/fd/{rw}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(rw)

    def options(self) -> list[str]:
        """CRIU's command-line options that install the script."""
        return ["--action-script", f"/proc/{os.getpid()}/fd/{self._fd}"]

    def env(self, peer: Peer) -> Mapping[str, str]:
        """CRIU's environment (ours plus what the script compares with) for ``peer``."""
        return dict(
            os.environ,
            TORPOR_TREE_UID=str(peer.uid),
            TORPOR_TREE_GID=str(peer.gid),
            TORPOR_TREE_GROUPS=" ".join(str(g) for g in peer.groups),
            TORPOR_TREE_CAPS=f"{peer.cap_prm:016x}",
        )
