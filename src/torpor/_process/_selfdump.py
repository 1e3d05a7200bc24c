"""A process checkpointing itself (the engine half of ``torpor.checkpoint()``).

CRIU must run outside the tree it dumps. We create the RPC socketpair ourselves (CRIU resolves
the directory fds we pass through /proc/<creator>/fd) and have CRIU started on the other end by:

- our keeper, when we are a managed process (found through our parent's host pid); this is the
  only way out of a PID namespace whose init we are;
- otherwise a detached finaliser (double fork + setsid), which also finalises the image if
  CRIU kills us (no ``leave_running``).
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .._engine import Connection, CriuEngine, DumpOptions, criu_version
from .._errors import CoordinationError, DumpError
from .._images._image import Staging, check_free
from ._finalize import Pending, finalize, finish_after_criu
from ._keeper import address
from ._proc import detached, facts, host_pid, host_ppid, is_namespace_init


@dataclass(frozen=True)
class SelfDumpOutcome:
    """``restored`` is True in the copy a restore brought back; ``image`` is the image path."""

    restored: bool
    image: Path | None


def self_checkpoint(
    dest: Path,
    *,
    leave_running: bool,
    tcp_established: bool = False,
    name: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> SelfDumpOutcome:
    """Dump the calling process (and its children) into the image directory ``dest``.

    Returns in the original only with ``leave_running`` (``restored=False``, image complete);
    without it CRIU kills us once the image is written. Returns in every restored copy with
    ``restored=True``. On failure raises :class:`DumpError` and we keep running.
    """
    dest = Path(dest).absolute()
    check_free(dest)
    engine = CriuEngine()
    me = host_pid()
    st = Staging(dest)
    st.create()
    try:
        cmdline, rss = facts(me)
        Pending(
            dest=str(dest),
            name=name or dest.name,
            pid=me,
            cmdline=cmdline,
            rss_bytes=rss,
            criu_version=criu_version(),
            leave_running=leave_running,
            tcp_established=tcp_established,
            labels=dict(labels or {}),
        ).write(st.path)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            _start_criu_outside(theirs, st.path, leave_running, engine.binary)
        finally:
            theirs.close()
        conn = Connection(ours)
        try:
            result = engine.dump(
                me,
                st.path,
                DumpOptions(leave_running=leave_running, tcp_established=tcp_established),
                connection=conn,
            )
        finally:
            conn.sock.close()
    except BaseException:
        st.discard()
        raise
    if result.restored:
        return SelfDumpOutcome(restored=True, image=dest)
    image = finalize(st.path)
    return SelfDumpOutcome(restored=False, image=image.path if image else dest)


def _start_criu_outside(
    theirs: socket.socket, staging: Path, leave_running: bool, criu: str
) -> None:
    keeper = host_ppid()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(address(keeper))
    except OSError:
        sock.close()
        if is_namespace_init():
            raise CoordinationError(
                "cannot checkpoint from inside: this process is a PID namespace's init and its "
                "keeper is gone",
                hint="start the app with `torpor run`, or checkpoint it from outside",
            ) from None
        _spawn_detached_finaliser(theirs, staging, criu)
        return
    with sock:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        peer_pid = int.from_bytes(creds[:4], sys.byteorder)
        peer_uid = int.from_bytes(creds[4:8], sys.byteorder)
        # The keeper lives outside our PID namespace, where its pid reads as 0.
        if peer_pid not in (0, keeper) or peer_uid not in (0, os.geteuid()):
            raise CoordinationError("the keeper's socket is held by another process")
        payload = json.dumps({"staging": str(staging), "leave_running": leave_running}).encode()
        sock.sendmsg(
            [payload],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))],
        )
        reply = json.loads(sock.recv(4096) or b'{"ok": false, "error": "no reply"}')
    if not reply.get("ok"):
        raise DumpError(f"the keeper could not start CRIU: {reply.get('error')}")


def _spawn_detached_finaliser(theirs: socket.socket, staging: Path, criu: str) -> None:
    fd = theirs.fileno()

    def finaliser() -> None:  # pragma: no cover - runs in the detached process
        os.set_inheritable(fd, True)
        devnull = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(devnull, target)
        module = "torpor._process._selfdump"
        os.execv(sys.executable, [sys.executable, "-m", module, criu, str(fd), str(staging)])

    detached(finaliser)


def _finaliser_main(criu: str, fd: int, staging: Path) -> int:
    """Detached helper: run CRIU on ``fd`` outside the dumped tree, then finalise if CRIU
    killed the process."""
    os.closerange(3, fd)
    os.closerange(fd + 1, 1 << 16)
    proc = subprocess.Popen([criu, "swrk", str(fd)], pass_fds=(fd,))
    os.close(fd)
    proc.wait()
    finish_after_criu(staging)
    return 0


if __name__ == "__main__":
    raise SystemExit(_finaliser_main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
