"""The RPC transport and the engine's error boundary, against a fake swrk peer."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import pytest

from torpor._engine import Connection, NotifyEvent, log_errors
from torpor._engine._criu import _hint_for
from torpor._errors import DumpError, ImageCorruptedError
from torpor._process._keeper import decode_error, encode_error
from torpor._proto import criu_rpc_pb2 as pb


def _fake_criu(sock: socket.socket, script: list[str], answers: list[bool]) -> None:
    req = pb.Req()
    req.ParseFromString(sock.recv(65536))
    assert req.type == pb.DUMP
    for name in script:
        sock.send(
            pb.Resp(type=pb.NOTIFY, success=True, notify=pb.Notify(script=name)).SerializeToString()
        )
        ans = pb.Req()
        ans.ParseFromString(sock.recv(65536))
        answers.append(ans.notify_success)
        if not ans.notify_success:
            sock.send(pb.Resp(type=pb.DUMP, success=False, cr_errno=1).SerializeToString())
            return
    sock.send(
        pb.Resp(type=pb.DUMP, success=True, dump=pb.DumpResp(restored=False)).SerializeToString()
    )


def _pair(script: list[str]) -> tuple[Connection, threading.Thread, list[bool]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    answers: list[bool] = []
    t = threading.Thread(target=_fake_criu, args=(theirs, script, answers))
    t.start()
    return Connection(ours), t, answers


def test_notify_loop_answers_each_notification_in_order() -> None:
    conn, t, answers = _pair(["pre-dump", "query-ext-files", "post-dump"])
    seen: list[NotifyEvent] = []
    resp = conn.call(pb.Req(type=pb.DUMP, opts=pb.Opts(images_dir_fd=3)), seen.append)
    t.join()
    assert resp.success and [e.name for e in seen] == ["pre-dump", "query-ext-files", "post-dump"]
    assert answers == [True, True, True]


def test_failing_callback_aborts_and_is_kept() -> None:
    conn, t, answers = _pair(["pre-dump", "post-dump"])

    def boom(ev: NotifyEvent) -> None:
        raise ValueError("hook failed")

    resp = conn.call(pb.Req(type=pb.DUMP, opts=pb.Opts(images_dir_fd=3)), boom)
    t.join()
    assert not resp.success and answers == [False]
    assert isinstance(conn.notify_error, ValueError)


def test_large_replies_are_read_whole() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    big = pb.Resp(type=pb.VERSION, success=True, cr_errmsg="x" * 100_000)
    theirs.send(big.SerializeToString())
    assert Connection(ours).recv().cr_errmsg == "x" * 100_000


def test_log_errors_drop_the_rlimit_noise(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text(
        "(00.000010) Error (criu/util.c:1):  rlimit: Can't setup RLIMIT_NOFILE for self\n"
        "(00.000100) Info stuff\n"
        "(00.001000) Error (criu/sk-inet.c:188): inet: Connected TCP socket, consider using "
        "--tcp-established option.\n"
    )
    lines = log_errors(log)
    assert lines == [
        "sk-inet.c:188: inet: Connected TCP socket, consider using --tcp-established option."
    ]
    assert "--tcp-established" in (_hint_for(lines) or "")


def test_errors_cross_the_keeper_fork_with_their_fields() -> None:
    err = ImageCorruptedError("bad", image="/x", file="pages-1.img", hint="h")
    again = decode_error(encode_error(err))
    assert isinstance(again, ImageCorruptedError)
    assert (again.file, again.image, str(again)) == ("pages-1.img", "/x", "bad — h")
    dump = DumpError("failed", pid=3, log_lines=["a", "b"])
    back = decode_error(encode_error(dump))
    assert isinstance(back, DumpError) and back.log_lines == ("a", "b") and back.pid == 3


def test_unknown_errors_become_torpor_errors() -> None:
    back = decode_error(encode_error(RuntimeError("x")))
    assert "keeper failed" in str(back)


def test_table_and_sizes() -> None:
    from torpor._cli._app import format_table, human_bytes, human_duration

    assert human_bytes(1536) == "1.5 KiB" and human_bytes(10) == "10 B"
    assert human_duration(3725) == "1h02m"
    assert format_table(["A", "BB"], [[1, None]]).splitlines() == ["A  BB", "1"]


@pytest.mark.parametrize("argv", [["--help"], ["ps", "--help"]])
def test_cli_help_works(argv: list[str]) -> None:
    from torpor._cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0


def test_a_connection_knows_when_its_criu_is_gone() -> None:
    import socket as _socket
    import subprocess as _subprocess

    from torpor._engine._rpc import Connection

    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    proc = _subprocess.Popen(["sleep", "30"])
    conn = Connection(ours, proc)
    try:
        assert conn.alive() is True
        proc.kill()
        proc.wait()
        assert conn.alive() is False  # the child has exited
    finally:
        theirs.close()
        ours.close()
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    conn = Connection(ours)  # CRIU spawned elsewhere: only the socket tells
    assert conn.alive() is True
    theirs.close()
    assert conn.alive() is False  # hung up
    ours.close()


def test_a_killed_criu_whose_fork_holds_the_socket_ends_the_wait() -> None:
    """CRIU killed while a task it forked (a restored one not yet itself) holds the socket's
    other end: the socket never hangs up, so the wait for CRIU's answer ends on CRIU's exit
    (a keeper waited for ever: the fault suite's SIGKILL of criu mid-restore). What CRIU
    sent before it died is still read first."""
    import os as _os
    import subprocess as _subprocess
    import sys as _sys
    import time as _time

    from torpor._engine._rpc import Connection, TransportError

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # "CRIU": forks a child that keeps the socket (and sleeps), says one thing, then waits
    # to be killed.
    script = (
        "import os, socket, sys, time\n"
        "s = socket.socket(fileno=int(sys.argv[1]))\n"
        "if os.fork() == 0:\n"
        "    time.sleep(60); os._exit(0)\n"
        "s.send(b'\\x08\\x01')\n"  # a Resp: type 1
        "time.sleep(60)\n"
    )
    proc = _subprocess.Popen(
        [_sys.executable, "-c", script, str(theirs.fileno())], pass_fds=(theirs.fileno(),)
    )
    theirs.close()
    conn = Connection(ours, proc)
    fork_pid = None
    try:
        assert conn.recv().type == 1  # its words before it died
        deadline = _time.monotonic() + 10
        while fork_pid is None and _time.monotonic() < deadline:
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            fork_pid = int(kids[0]) if kids else None
        assert fork_pid is not None
        proc.kill()
        started = _time.monotonic()
        with pytest.raises(TransportError) as info:
            conn.recv()
        assert _time.monotonic() - started < 5
        assert str(info.value) == "CRIU exited, its socket held open by a process it forked"
    finally:
        if fork_pid is not None:  # ours: the child of the process we started
            with contextlib.suppress(ProcessLookupError):
                _os.kill(fork_pid, 9)
        proc.kill()
        proc.wait()
        conn.close()
