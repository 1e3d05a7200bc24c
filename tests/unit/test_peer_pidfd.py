"""A unix socket's peer held by a pidfd (``_process._pidfd_peer``), read then verified, as the
keeper's peer (``_peer.identify``, ``_keeper_dump.receive``) and the trigger channel's client
(``_channel._speaker_problem``) use it; without ``SO_PEERPIDFD`` they refuse in one line.
(The pid-reuse attacks themselves: tests/integration/test_peer_reuse_real.py.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._coord import _channel
from torpor._errors import CoordinationError, PermissionDeniedError
from torpor._process import _keeper_dump, _peer, _pidfd_peer
from torpor._process._pidfd_peer import PeerGone, PeerProcess, pidfd_pid
from torpor._process._proc import start_time


class Refused(Exception):
    pass


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(path)
    sock.listen(4)
    with sock:
        yield sock, path


def _connect_then(path: str, *, wait: bool) -> tuple[int, int]:
    """A child that connects to ``path``; it exits at once (``wait=False``, reaped here) or
    when the returned fd is written to. -> (its pid, that fd)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the peer
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(path)
        if wait:
            os.read(r, 1)
        os._exit(0)
    os.close(r)
    if not wait:
        os.waitpid(pid, 0)  # reaped: its pid is free for anyone
    return pid, w


def _gone(what: str, pid: int) -> tuple[str, str]:
    """What a peer reaped before it was held is told (Linux 6.16 hands out a pidfd of a reaped
    peer, whose pid reads as -1; before, SO_PEERPIDFD fails with ESRCH)."""
    return (
        f"cannot identify {what}: it has exited",
        f"cannot hold {what} (SO_PEERPIDFD, Linux 6.5): [Errno 3] No such process",
    )


@pytest.fixture
def no_peerpidfd(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel without SO_PEERPIDFD (before 6.5): an option number it does not know."""
    monkeypatch.setattr(_pidfd_peer, "SO_PEERPIDFD", 0x7FFF)


def test_a_live_peer_is_held_verified_and_let_go(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    pid, w = _connect_then(path, wait=True)
    try:
        conn, _ = sock.accept()
        with conn, PeerProcess(conn) as peer:
            assert peer.pid == pid
            assert peer.verified("read") == "read"
            fd = peer.pidfd
            assert os.get_inheritable(fd) is False
        assert peer.pidfd == -1
        with pytest.raises(OSError):
            os.fstat(fd)  # closed
        peer.close()  # twice is fine
    finally:
        os.write(w, b"x")
        os.waitpid(pid, 0)


def test_a_peer_reaped_before_it_is_held_is_refused_with_the_callers_error(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    pid, _ = _connect_then(path, wait=False)
    conn, _ = sock.accept()
    with conn, pytest.raises(Refused) as info:
        PeerProcess(conn, what="the test's peer", error=Refused)
    assert str(info.value) in _gone("the test's peer", pid)


def test_what_was_read_of_a_peer_reaped_since_is_not_believed(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    pid, w = _connect_then(path, wait=True)
    conn, _ = sock.accept()
    with conn, PeerProcess(conn) as peer:
        status = Path(f"/proc/{peer.pid}/status").read_text()  # read: still the peer's
        os.write(w, b"x")
        os.waitpid(pid, 0)  # ...but it is gone before it is verified
        with pytest.raises(PeerGone) as info:
            peer.verified(status)
    assert str(info.value) == (
        "the peer process exited before it could be checked: [Errno 3] No such process"
    )


def test_a_pidfd_of_a_reaped_process_has_no_pid() -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        os._exit(0)
    pidfd = os.pidfd_open(pid)
    try:
        assert pidfd_pid(pidfd) == pid  # a zombie: not reaped, its pid still its own
        os.waitpid(pid, 0)
        with pytest.raises(ValueError, match=r"^it has exited$"):
            pidfd_pid(pidfd)
    finally:
        os.close(pidfd)


def test_without_peerpidfd_nothing_is_held(no_peerpidfd: None) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b, pytest.raises(Refused) as info:
        PeerProcess(a, what="it", error=Refused)
    assert str(info.value) == (
        "cannot hold it (SO_PEERPIDFD, Linux 6.5): [Errno 92] Protocol not available"
    )


# -- the keeper's peer ------------------------------------------------------------------------


def test_the_keeper_identifies_a_live_peer() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        peer = _peer.identify(b)
        assert (peer.pid, peer.uid) == (os.getpid(), 0 if os.geteuid() == 0 else os.getuid())
        _peer.still_there(b)


def test_the_keeper_refuses_a_peer_reaped_before_it_is_identified(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    pid, _ = _connect_then(path, wait=False)
    conn, _ = sock.accept()
    with conn, pytest.raises(PermissionDeniedError) as info:
        _peer.identify(conn)
    assert str(info.value) in {f"{m}; refused" for m in _gone(f"process {pid}", pid)}


def test_a_request_sent_after_the_connecting_process_is_gone_is_refused(
    listener: tuple[socket.socket, str],
) -> None:
    """The keeper looked the peer up among its children before it reads the request: a peer
    reaped by then may have left its pid to a new child, so the request is refused."""
    sock, path = listener
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - connects, leaves the connection to its child, exits
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(path)
        if os.fork() == 0:
            os.read(go_r, 1)
            s.send(json.dumps({"v": 1, "op": "collect"}).encode())
            os._exit(0)
        os._exit(0)
    os.waitpid(pid, 0)
    conn, _ = sock.accept()
    with conn:
        os.write(go_w, b"x")
        with pytest.raises(PermissionDeniedError) as info:
            _keeper_dump.receive(conn)
    assert str(info.value) in {f"{m}; refused" for m in _gone(f"process {pid}", pid)}


def test_without_peerpidfd_the_keeper_serves_no_one(no_peerpidfd: None) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        a.send(b'{"v": 1, "op": "collect"}')
        for call in (_peer.identify, _keeper_dump.receive):
            with pytest.raises(PermissionDeniedError) as info:
                call(b)
            assert str(info.value) == (
                f"cannot hold process {os.getpid()} (SO_PEERPIDFD, Linux 6.5): [Errno 92]"
                " Protocol not available; refused"
            )


# -- the trigger channel's client -------------------------------------------------------------


def test_the_channel_believes_the_very_process_only(monkeypatch: pytest.MonkeyPatch) -> None:
    me, born = os.getpid(), start_time(os.getpid())
    assert born is not None
    monkeypatch.setattr(_channel, "_peercred", lambda s: (me, 4242, 4242))
    monkeypatch.setattr(_channel, "_may_be", lambda pid, uid: (pid, uid) == (me, 4242))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        assert _channel._speaker_problem(b, me, born) is None
        assert _channel._speaker_problem(b, me, born + 1) == (
            f"belongs to a newer process {me} (uid 4242): the one asked has exited"
        )
        assert _channel._speaker_problem(b, me + 1, born) == f"belongs to process {me} (uid 4242)"


def test_without_peerpidfd_the_channel_believes_root_only(
    no_peerpidfd: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    me, born = os.getpid(), start_time(os.getpid())
    assert born is not None
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        monkeypatch.setattr(_channel, "_peercred", lambda s: (me, 0, 0))
        assert _channel._speaker_problem(b, me, born) is None  # nothing is read for root
        monkeypatch.setattr(_channel, "_peercred", lambda s: (me, 4242, 4242))
        assert _channel._speaker_problem(b, me, born) == _channel._NO_PIDFD
    # Squatting the address of a process started here (a sleep, no torpor in it): this
    # (pytest's) process may have a listener of its own from another test.
    target = subprocess.Popen(["sleep", "60"])
    try:
        pid = target.pid
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as squat:
            squat.bind(_channel.listener_address(pid))
            squat.listen(1)
            monkeypatch.setattr(_channel, "_peercred", lambda s: (pid, 4242, 4242))
            with pytest.raises(CoordinationError) as info:
                _channel.request_checkpoint(
                    pid,
                    tmp_path / "img",
                    leave_running=True,
                    tcp_established=False,
                    name=None,
                    timeout=5,
                )
    finally:
        target.kill()
        target.wait()
    assert str(info.value) == (
        f"the socket named for process {pid} cannot be traced to its process: this kernel has"
        " no SO_PEERPIDFD (Linux 6.5) — checkpoint it with --no-coordinate (its hooks do not run)"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the app as nobody")
def test_an_app_of_another_uid_is_still_checkpointed_through_the_channel() -> None:
    """Root's ``torpor checkpoint PID`` of a live app running as nobody: its listener and its
    reply are held by pidfd and believed (the root peer of the other channel tests is believed
    without one)."""
    from .test_coord_channel import HELPER

    with tempfile.TemporaryDirectory(prefix="torpor-peer-") as work_dir:
        work = Path(work_dir)
        os.chmod(work, 0o777)  # the app (nobody) writes its ready file and the image here
        script = work / "helper.py"
        script.write_text(HELPER)
        ready, err = work / "ready", work / "err"
        with open(err, "a") as err_fh:  # appended: what the checkpoint checks allow
            app = subprocess.Popen(
                [
                    *("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"),
                    *(sys.executable, str(script), "ok", str(ready)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err_fh,
                cwd=work,
            )
        try:
            deadline = time.monotonic() + 20
            while not ready.exists():
                assert app.poll() is None, err.read_text()
                assert time.monotonic() < deadline, "the app did not start"
                time.sleep(0.02)
            out = _channel.request_checkpoint(
                app.pid,
                work / "img",
                leave_running=True,
                tcp_established=False,
                name="n",
                timeout=20,
            )
        finally:
            app.kill()
            app.wait()
        assert (out.pid, out.image, out.exited) == (app.pid, work / "img", False)
        assert (work / "img" / "args").read_text() == "('n', False)"
