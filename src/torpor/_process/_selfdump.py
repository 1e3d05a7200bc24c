"""A process checkpointing itself (the engine half of ``torpor.checkpoint()``).

CRIU must run outside the tree it dumps, so someone else starts it:

- our keeper, when we are a managed process (found through our parent's host pid; the only
  way out of a PID namespace whose init we are). We send it a request only (no fd, nothing of
  CRIU's): it builds the CRIU request itself, for our own tree, into our staging directory, and
  hands us our end of CRIU's socket; we read the response, and the original collects the
  outcome (the image, made by the keeper) if it lives on. See ``_keeper_dump``;
- otherwise a detached finaliser (double fork + ``setsid``) running with our credentials,
  which also finalises the image if CRIU kills us (no ``leave_running``). We create the RPC
  socketpair and name the directory by path (an fd of ours would be dumped with us and
  restored pointing at a staging directory that is gone by then).
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
from typing import Any

from .._engine import (
    Connection,
    CriuEngine,
    DumpOptions,
    criu_version,
    receive_dump,
    start_swrk,
)
from .._errors import CoordinationError, DumpError
from .._images._image import Staging, check_free
from .._safe import opened_dir
from ._finalize import ImageFacts, Pending, finalize, finish_after_criu
from ._keeper import address
from ._keeper_dump import PROTOCOL
from ._proc import detached, facts, host_pid, host_ppid, is_namespace_init

_REPLY_LIMIT = 64 << 10


@dataclass(frozen=True)
class SelfDumpOutcome:
    """``restored`` is True in the copy a restore brought back; ``image`` is the image path."""

    restored: bool
    image: Path | None
    # The series member a supervised app's checkpoint became, ``NAME.sNNNNNN@POOL``, when the
    # keeper pushed it before answering (a checkpoint asked for without a place to keep it).
    series: str | None = None


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
    st = Staging(dest)
    st.create()
    try:
        keeper = _connect_keeper()
        if keeper is None:
            return _through_finaliser(st, dest, leave_running, tcp_established, name, labels)
        request = {
            "v": PROTOCOL,
            "op": "self-dump",
            "staging": str(st.path),
            "dest": dest.name,
            "name": name or dest.name,
            "labels": dict(labels or {}),
            "leave_running": leave_running,
            "tcp_established": tcp_established,
        }
        conn = Connection(_ask_keeper(keeper, request))
        collect = _Collect(host_ppid())
        try:
            result = receive_dump(conn, host_pid(), st.path, settle=collect)
        finally:
            conn.sock.close()
    except BaseException:
        st.discard()
        raise
    if result.restored:
        return SelfDumpOutcome(restored=True, image=dest)
    return SelfDumpOutcome(restored=False, image=collect.image or dest, series=collect.series)


# -- through the keeper ----------------------------------------------------------------------


def _connect_keeper() -> socket.socket | None:
    """A connection to our keeper; None if we have none (not a managed process)."""
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
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    peer_pid = int.from_bytes(creds[:4], sys.byteorder)
    peer_uid = int.from_bytes(creds[4:8], sys.byteorder)
    # The keeper lives outside our PID namespace, where its pid reads as 0.
    if peer_pid not in (0, keeper) or peer_uid not in (0, os.geteuid()):
        sock.close()
        raise CoordinationError("the keeper's socket is held by another process")
    return sock


def _ask_keeper(sock: socket.socket, request: dict[str, Any]) -> socket.socket:
    """Send the self-dump request; our end of CRIU's socket (the keeper has queued CRIU's
    request in it). We hang up before returning: the keeper starts CRIU only then."""
    with sock:
        sock.send(json.dumps(request).encode())
        fds = array.array("i")
        data, anc, _, _ = sock.recvmsg(_REPLY_LIMIT, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(blob[: len(blob) - len(blob) % fds.itemsize])
    try:
        reply = json.loads(data or b'{"ok": false, "error": "no reply"}')
        if not reply.get("ok"):
            raise DumpError(f"the keeper refused the checkpoint: {reply.get('error')}")
        if len(fds) != 1:
            raise DumpError("the keeper did not hand over CRIU's socket")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return socket.socket(fileno=fds[0])


class _Collect:
    """The original's ``settle`` (see ``receive_dump``): wait for the keeper to have made the
    image (or kept a failed dump's log), the staging directory being ours again."""

    def __init__(self, keeper: int) -> None:
        self.keeper = keeper
        self.image: Path | None = None
        self.series: str | None = None

    def __call__(self) -> Path | None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
            try:
                s.connect(address(self.keeper))
                s.send(json.dumps({"v": PROTOCOL, "op": "collect"}).encode())
                reply = json.loads(s.recv(_REPLY_LIMIT) or b"{}")
            except (OSError, ValueError) as exc:
                raise DumpError(f"the keeper did not say how the checkpoint ended: {exc}") from exc
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = reply.get("error") if isinstance(reply, dict) else reply
            raise DumpError(f"the keeper could not make the image: {error}")
        image, log = reply.get("image"), reply.get("log")
        self.image = Path(image) if isinstance(image, str) else None
        series = reply.get("series")
        self.series = series if isinstance(series, str) and len(series) < 512 else None
        return Path(log) if isinstance(log, str) else None


# -- through a detached finaliser --------------------------------------------------------------


def _through_finaliser(
    st: Staging,
    dest: Path,
    leave_running: bool,
    tcp_established: bool,
    name: str | None,
    labels: Mapping[str, str] | None,
) -> SelfDumpOutcome:
    engine = CriuEngine()
    me = host_pid()
    cmdline, rss = facts(me)
    image_facts = ImageFacts(
        name=name or dest.name,
        pid=me,
        cmdline=cmdline,
        rss_bytes=rss,
        criu_version=criu_version(),
        tcp_established=tcp_established,
        labels=dict(labels or {}),
    )
    with opened_dir(st.path) as dir_fd:
        Pending(dest=dest.name, facts=image_facts, leave_running=leave_running).write(dir_fd)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        _spawn_detached_finaliser(theirs, st.path, engine.binary)
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
    if result.restored:
        return SelfDumpOutcome(restored=True, image=dest)
    return SelfDumpOutcome(restored=False, image=finalize(st.path) or dest)


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
    proc: subprocess.Popen[bytes] = start_swrk(criu, fd)
    os.close(fd)
    proc.wait()
    finish_after_criu(staging)
    return 0


if __name__ == "__main__":
    raise SystemExit(_finaliser_main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
