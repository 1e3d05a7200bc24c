"""Descriptor classification on real descriptors, policy matching and loading, close/reopen,
and where-opened tracking."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._coord import FdRule, load_fd_policy, track_fds
from torpor._coord._fds import FdInfo, SocketInfo, problem, scan, unix_peers
from torpor._coord._policy import Reopener, decide, effective_rules
from torpor._coord._track import opened_at
from torpor._errors import UsageError


def info_of(fd: int) -> FdInfo:
    (found,) = [i for i in scan() if i.fd == fd]
    return found


def why(fd: int, *, tcp_established: bool = False) -> str | None:
    return problem(info_of(fd), tcp_established=tcp_established)


def test_regular_files(tmp_path: Path) -> None:
    with (
        open(tmp_path / "r", "w") as w,
        open(tmp_path / "r") as r,
        open(tmp_path / "a", "a") as a,
        open(tmp_path / "rw", "w+") as rw,
    ):
        assert info_of(w.fileno()).kind == "file"
        assert "open for writing without O_APPEND" in (why(w.fileno()) or "")
        assert "open for writing" in (why(rw.fileno()) or "")
        assert why(r.fileno()) is None
        assert why(a.fileno()) is None
        assert info_of(a.fileno()).append
        assert info_of(w.fileno()).path == str(tmp_path / "r")


def test_deleted_file_and_memfd(tmp_path: Path) -> None:
    path = tmp_path / "gone"
    path.touch()
    with open(path) as f:
        path.unlink()
        info = info_of(f.fileno())
        assert info.deleted and info.path == str(path)
        assert "deleted" in (why(f.fileno()) or "")
    mfd = os.memfd_create("torpor-test")
    try:
        assert why(mfd) is None
    finally:
        os.close(mfd)


def test_pipes_inside_the_process_and_to_a_child() -> None:
    r, w = os.pipe()
    try:
        assert info_of(r).kind == "pipe"
        assert info_of(r).peer_in_tree is True and why(r) is None
    finally:
        os.close(w)
    try:
        # No writer left anywhere: nothing outside holds it, CRIU copes.
        assert info_of(r).peer_in_tree is None and why(r) is None
    finally:
        os.close(r)
    child = subprocess.Popen(["sleep", "30"], stdin=subprocess.PIPE)
    try:
        assert child.stdin is not None
        # The read end belongs to our child: inside the dumped tree.
        assert info_of(child.stdin.fileno()).peer_in_tree is True
    finally:
        child.kill()
        child.wait()
        assert child.stdin is not None
        child.stdin.close()


def test_pipe_to_a_process_outside_the_tree() -> None:
    # A grandchild that outlives its parent is reparented away: outside our tree.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        if os.fork() == 0:
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        os._exit(0)
    os.waitpid(pid, 0)
    os.close(r)
    try:
        assert info_of(w).peer_in_tree is False
        assert "outside this process tree" in (why(w) or "")
    finally:
        os.write(w, b"x")
        os.close(w)


def test_socketpair_and_unix_sockets(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    with a, b:
        ia = info_of(a.fileno())
        assert ia.kind == "socket" and ia.socket is not None and ia.socket.proto == "unix"
        assert ia.peer_in_tree is True and why(a.fileno()) is None
        peers = unix_peers()
        assert peers[ia.inode] == info_of(b.fileno()).inode
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp_path / "s.sock"))
    srv.listen()
    with srv:
        info = info_of(srv.fileno())
        assert info.socket is not None and info.socket.state == "listen"
        assert info.path == str(tmp_path / "s.sock") and why(srv.fileno()) is None


def test_unix_stream_to_an_outside_process(tmp_path: Path) -> None:
    path = str(tmp_path / "outside.sock")
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: a server outside our tree after the double fork
        if os.fork() == 0:
            s = socket.socket(socket.AF_UNIX)
            s.bind(path)
            s.listen()
            os.write(ready_w, b"1")
            conn, _ = s.accept()
            conn.recv(1)
            os._exit(0)
        os._exit(0)
    os.waitpid(pid, 0)
    os.close(ready_w)
    os.read(ready_r, 1)
    os.close(ready_r)
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    with c:
        assert info_of(c.fileno()).peer_in_tree is False
        assert "outside this process tree" in (why(c.fileno()) or "")
        c.send(b"x")


def test_tcp_listening_and_established() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    acc, _ = srv.accept()
    with srv, cli, acc:
        s = info_of(srv.fileno()).socket
        assert s == SocketInfo("tcp", "stream", "listen", f"127.0.0.1:{port}", "")
        assert why(srv.fileno()) is None
        c = info_of(cli.fileno())
        assert c.socket is not None and c.socket.remote == f"127.0.0.1:{port}"
        assert "established TCP connection" in (why(cli.fileno()) or "")
        assert why(cli.fileno(), tcp_established=True) is None
        assert f"-> 127.0.0.1:{port} (established)" in c.describe()


def test_ipv6_and_udp() -> None:
    try:
        u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        u.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with u:
        s = info_of(u.fileno()).socket
        assert s is not None and s.proto == "udp6" and s.local == f"[::1]:{u.getsockname()[1]}"
        assert why(u.fileno()) is None


def test_anonymous_inodes() -> None:
    efd = os.eventfd(0)
    try:
        info = info_of(efd)
        assert info.kind == "anon" and info.anon == "eventfd" and why(efd) is None
    finally:
        os.close(efd)
    fake = FdInfo(99, "anon", "anon_inode:[io_uring]", 2, 0, 1, anon="io_uring")
    assert "cannot dump a io_uring" in (problem(fake, tcp_established=False) or "")


def test_terminal() -> None:
    master, slave = os.openpty()
    try:
        assert info_of(slave).kind == "tty"
        assert "terminal" in (why(slave) or "")
    finally:
        os.close(master)
        os.close(slave)


def _file(path: str, flags: int = os.O_WRONLY) -> FdInfo:
    return FdInfo(5, "file", path, flags, 0, 1, path=path)


def _sock(proto: str, state: str, local: str, remote: str = "") -> FdInfo:
    return FdInfo(
        6, "socket", "socket:[1]", 2, 0, 1, socket=SocketInfo(proto, "stream", state, local, remote)
    )


def test_rule_matching() -> None:
    log = FdRule(type="file", path="/var/log/*.log", action="reopen")
    assert log.matches(_file("/var/log/app.log"))
    assert log.matches(_file("/var/log/deep/app.log"))  # '*' also matches '/'
    assert not log.matches(_file("/var/lib/app.log"))
    assert not log.matches(_sock("tcp", "listen", "0.0.0.0:80"))
    pg = FdRule(type="socket", proto="tcp", remote="*:5432", action="close")
    assert pg.matches(_sock("tcp6", "established", "[::1]:4000", "[::1]:5432"))
    assert pg.matches(_sock("tcp", "established", "10.0.0.1:4000", "10.0.0.2:5432"))
    assert not pg.matches(_sock("tcp", "established", "10.0.0.1:4000", "10.0.0.2:6379"))
    assert not pg.matches(_sock("udp", "connected", "10.0.0.1:4000", "10.0.0.2:5432"))
    listen = FdRule(type="socket", state="listen", local="127.0.0.1:*", action="reopen")
    assert listen.matches(_sock("tcp", "listen", "127.0.0.1:8080"))
    assert not listen.matches(_sock("tcp", "established", "127.0.0.1:8080", "127.0.0.1:1"))
    anything = FdRule(type="any", action="ignore")
    assert anything.matches(_file("/x")) and anything.matches(_sock("unix", "connected", ""))


def test_rule_validation() -> None:
    with pytest.raises(UsageError, match="unknown type"):
        FdRule(type="files")
    with pytest.raises(UsageError, match="unknown action"):
        FdRule(type="file", action="nuke")
    with pytest.raises(UsageError, match="reopen"):
        FdRule(type="pipe", action="reopen")
    with pytest.raises(UsageError, match="only apply to sockets"):
        FdRule(type="file", proto="tcp")


def test_decisions_first_match_wins_and_defaults() -> None:
    infos = [_file("/data/db"), _file("/var/log/a.log"), _sock("tcp", "listen", "0.0.0.0:80")]
    rules = [
        FdRule(type="file", path="/var/log/*", action="reopen"),
        FdRule(type="file", action="ignore"),
    ]

    def prob(i: FdInfo) -> str | None:
        return problem(i, tcp_established=False)

    got = {d.info.path or d.info.describe(): d.action for d in decide(infos, rules, prob)}
    assert got == {"/data/db": "ignore", "/var/log/a.log": "reopen"}
    assert [d.action for d in decide(infos, [], prob)] == ["error", "error"]
    forbid = decide(infos, [FdRule(type="socket", action="error")], prob)
    assert [d.info.kind for d in forbid if d.action == "error"] == ["file", "file", "socket"]
    bad = decide(
        [_sock("tcp", "established", "a:1", "b:2")], [FdRule(type="socket", action="reopen")], prob
    )
    assert bad[0].action == "error" and "listening" in (bad[0].reason or "")


def test_policy_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text(
        '[[rule]]\ntype = "file"\npath = "/var/log/*.log"\naction = "reopen"\nwarn = false\n\n'
        '[[rule]]\ntype = "socket"\nremote = "*:5432"\naction = "close"\n'
    )
    rules = load_fd_policy(toml)
    assert rules == (
        FdRule(type="file", path="/var/log/*.log", action="reopen", warn=False),
        FdRule(type="socket", remote="*:5432", action="close"),
    )
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"type": "pipe", "action": "ignore"}]))
    assert load_fd_policy(js) == (FdRule(type="pipe", action="ignore"),)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\ntype = "file"\nacton = "close"\n')
    with pytest.raises(UsageError, match="rule 1 has unknown key"):
        load_fd_policy(bad)
    monkeypatch.setenv("TORPOR_FD_POLICY", str(js))
    call = FdRule(type="tty", action="ignore")
    assert effective_rules([call]) == (call, FdRule(type="pipe", action="ignore"))


def test_close_keeps_the_number_taken(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as f:
        r = Reopener()
        with pytest.warns(UserWarning, match="close fd"):
            r.apply(
                decide([info_of(f.fileno())], [FdRule(type="file", action="close")], lambda i: None)
            )
        assert os.readlink(f"/proc/self/fd/{f.fileno()}") == os.devnull
        assert r.restore() == []


def test_reopen_file_restores_path_flags_and_position(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDWR)
    try:
        os.lseek(fd, 4, os.SEEK_SET)
        r = Reopener()
        rule = FdRule(type="file", action="reopen", warn=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            r.apply(decide([info_of(fd)], [rule], lambda i: None))
        assert os.readlink(f"/proc/self/fd/{fd}") == os.devnull
        assert r.restore() == []
        assert os.readlink(f"/proc/self/fd/{fd}") == str(path)
        assert os.read(fd, 3) == b"456"
        os.write(fd, b"X")
        assert path.read_bytes() == b"0123456X89"
    finally:
        os.close(fd)


def test_reopen_failure_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "vanishing"
    path.write_text("x")
    with open(path) as f:
        r = Reopener()
        r.apply(
            decide(
                [info_of(f.fileno())],
                [FdRule(type="file", action="reopen", warn=False)],
                lambda i: None,
            )
        )
        path.unlink()
        (failure,) = r.restore()
        assert isinstance(failure, FileNotFoundError)
        assert f"reopening fd {f.fileno()}" in failure.__notes__[0]


def test_reopen_listening_socket_on_the_same_fd() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    srv.setblocking(False)
    port = srv.getsockname()[1]
    with srv:
        r = Reopener()
        r.apply(
            decide(
                [info_of(srv.fileno())],
                [FdRule(type="socket", action="reopen", warn=False)],
                lambda i: None,
            )
        )
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        assert r.restore() == []
        # The application's own socket object accepts on the new listener.
        srv.setblocking(True)
        with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            conn, _ = srv.accept()
            with conn:
                c.sendall(b"hi")
                assert conn.recv(2) == b"hi"


def test_reopen_unix_listener(tmp_path: Path) -> None:
    path = str(tmp_path / "l.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()
    with srv:
        r = Reopener()
        r.apply(
            decide(
                [info_of(srv.fileno())],
                [FdRule(type="socket", action="reopen", warn=False)],
                lambda i: None,
            )
        )
        assert r.restore() == []
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
            srv.accept()[0].close()


@pytest.fixture
def tracking() -> Iterator[None]:
    track_fds()
    yield
    track_fds(False)


def test_tracking_names_the_line_that_opened_it(tmp_path: Path, tracking: None) -> None:
    with open(tmp_path / "tracked", "w") as f:
        line = sys._getframe().f_lineno - 1
        where = opened_at(info_of(f.fileno()))
    assert where is not None and where.startswith(f"{__file__}:{line} in test_tracking")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    line = sys._getframe().f_lineno - 1
    with s:
        where = opened_at(info_of(s.fileno()))
    assert where is not None and f"{__file__}:{line}" in where


def test_tracking_off_records_nothing(tmp_path: Path) -> None:
    track_fds(False)
    with open(tmp_path / "untracked", "w") as f:
        assert opened_at(info_of(f.fileno())) is None


def test_tracking_sees_sqlite_connections(tmp_path: Path, tracking: None) -> None:
    import sqlite3

    conn = sqlite3.connect(tmp_path / "t.db")
    line = sys._getframe().f_lineno - 1
    try:
        conn.execute("CREATE TABLE t (x)")
        (fd,) = [i.fd for i in scan() if i.path == str(tmp_path / "t.db")]
        assert f"{__file__}:{line}" in (opened_at(info_of(fd)) or "")
    finally:
        conn.close()
