"""Spare logs (``_logs.SpareLog``): made ahead of a restore, renamed as a copy's log, removed
when unused; and the engine restoring through a warm CRIU only with fds that CRIU was given at
its start. No root, no CRIU (a fake swrk peer answers)."""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from torpor._engine import Connection, CriuEngine, RestoreOptions, _criu
from torpor._process._logs import SpareLog
from torpor._process._proc import start_time
from torpor._proto import criu_rpc_pb2 as pb


@pytest.fixture
def logs(torpor_home: Path) -> Path:
    from torpor import _paths

    return _paths.logs_dir()


def _spare(logs: Path) -> SpareLog:
    spare = SpareLog.make()
    assert spare is not None
    return spare


def _own_name() -> str:
    return f".spare-{os.getpid()}-{start_time(os.getpid())}.log"


def test_a_spare_is_a_private_appending_file_of_its_own_name(logs: Path) -> None:
    spare = _spare(logs)
    try:
        st = os.lstat(logs / _own_name())
        assert (stat.S_ISREG(st.st_mode), stat.S_IMODE(st.st_mode)) == (True, 0o600)
        assert os.fstat(spare.fd).st_ino == st.st_ino
        flags = fcntl.fcntl(spare.fd, fcntl.F_GETFL)
        assert (flags & os.O_ACCMODE, bool(flags & os.O_APPEND)) == (os.O_WRONLY, True)
        assert os.get_inheritable(spare.fd) is False  # handed on by pass_fds only
    finally:
        spare.close()
    assert os.listdir(logs) == []


def test_claim_renames_it_into_place_once(logs: Path) -> None:
    spare = _spare(logs)
    ino = os.fstat(spare.fd).st_ino
    assert spare.claim(logs / "web.log") is True
    os.write(spare.fd, b"hello\n")
    assert (os.lstat(logs / "web.log").st_ino, (logs / "web.log").read_bytes()) == (ino, b"hello\n")
    # The open file has the log's name (a restored process's /proc/PID/fd shows it).
    assert os.readlink(f"/proc/self/fd/{spare.fd}") == str(logs / "web.log")
    assert spare.claim(logs / "other.log") is False
    spare.close()
    spare.close()
    assert sorted(os.listdir(logs)) == ["web.log"]


def test_a_taken_name_is_left_alone_and_the_spare_removed(logs: Path) -> None:
    (logs / "web.log").write_bytes(b"an earlier copy's lines\n")
    spare = _spare(logs)
    assert spare.claim(logs / "web.log") is False
    assert (logs / "web.log").read_bytes() == b"an earlier copy's lines\n"
    spare.close()
    assert os.listdir(logs) == ["web.log"]


def test_a_planted_symlink_is_neither_followed_nor_replaced(logs: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    (logs / "evil.log").symlink_to(victim)
    spare = _spare(logs)
    assert spare.claim(logs / "evil.log") is False
    spare.close()
    assert os.readlink(logs / "evil.log") == str(victim)
    assert victim.read_bytes() == b"precious\n"
    assert os.listdir(logs) == ["evil.log"]


def test_only_a_log_in_its_own_directory(logs: Path, tmp_path: Path) -> None:
    spare = _spare(logs)
    assert spare.claim(tmp_path / "web.log") is False
    assert spare.claim(logs / "sub" / "web.log") is False
    assert not (tmp_path / "web.log").exists()
    spare.close()
    assert os.listdir(logs) == []


def test_a_spare_moved_away_is_not_claimed_nor_removed(logs: Path) -> None:
    spare = _spare(logs)
    os.rename(logs / _own_name(), logs / "moved")
    (logs / _own_name()).write_bytes(b"someone else's\n")
    assert spare.claim(logs / "web.log") is False
    spare.close()
    assert sorted(os.listdir(logs)) == sorted(["moved", _own_name()])


def test_spares_of_gone_workers_are_swept_live_ones_kept(logs: Path) -> None:
    me = os.getpid()
    born = start_time(me)
    assert born is not None
    gone = [f".spare-{me}-{born + 1}.log", ".spare-999999999-1.log"]  # not this process
    live = f".spare-{os.getppid()}-{start_time(os.getppid())}.log"
    unrelated = [".spare-x.log", "spare-1-2.log", ".spare-1-2.log.old"]
    for name in [*gone, live, *unrelated]:
        (logs / name).write_bytes(b"")
    spare = _spare(logs)
    assert sorted(os.listdir(logs)) == sorted([live, *unrelated, _own_name()])
    spare.close()


def test_no_spare_in_a_logs_directory_others_can_write(logs: Path) -> None:
    logs.chmod(0o770)
    assert SpareLog.make() is None
    assert os.listdir(logs) == []


# -- the engine: a warm CRIU only with the fds it was started with ---------------------------


class _FakeCriu:
    """The far end of an swrk socketpair: answers one RESTORE with success (pid 4242)."""

    def __init__(self) -> None:
        ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.conn = Connection(ours)
        self.requests: list[pb.Req] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        data = self._theirs.recv(1 << 20)
        if not data:
            return
        req = pb.Req()
        req.ParseFromString(data)
        self.requests.append(req)
        resp = pb.Resp(type=pb.RESTORE, success=True, restore=pb.RestoreResp(pid=4242))
        self._theirs.send(resp.SerializeToString())

    def close(self) -> None:
        self.conn.close()
        self._thread.join(5)
        self._theirs.close()


@pytest.fixture
def criu(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[_FakeCriu, _FakeCriu, list[Sequence[int]]]]:
    """A warm fake CRIU, and the one a fresh spawn would start (with the fds it was given)."""
    warm, fresh = _FakeCriu(), _FakeCriu()
    spawned: list[Sequence[int]] = []

    def spawn(binary: str, pass_fds: Sequence[int] = (), *, restoring: bool = False) -> Connection:
        assert restoring  # a CRIU for a restore: started with THP off (_engine._thp)
        spawned.append(tuple(pass_fds))
        return fresh.conn

    monkeypatch.setattr(_criu.Connection, "spawn", staticmethod(spawn))
    yield warm, fresh, spawned
    warm.close()
    fresh.close()


def _restore(
    tmp_path: Path, warm: _FakeCriu, inherit: dict[str, int], passed: Sequence[int]
) -> int:
    images = tmp_path / "image"
    images.mkdir(mode=0o700, exist_ok=True)
    engine = CriuEngine(binary="/nonexistent/criu", log_dir=tmp_path)
    options = RestoreOptions(inherit_fds=inherit)
    return engine.restore(images, options, connection=warm.conn, connection_fds=passed).pid


def _inherited(req: pb.Req) -> list[tuple[str, int]]:
    return [(i.key, i.fd) for i in req.opts.inherit_fd]


def test_the_warm_criu_restores_with_an_fd_it_was_started_with(
    tmp_path: Path, criu: tuple[_FakeCriu, _FakeCriu, list[Sequence[int]]]
) -> None:
    warm, fresh, spawned = criu
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        assert _restore(tmp_path, warm, {"var/log/app.log": fd}, passed=(fd,)) == 4242
    finally:
        os.close(fd)
    assert [_inherited(r) for r in warm.requests] == [[("var/log/app.log", fd)]]
    assert (spawned, fresh.requests) == ([], [])


def test_a_fresh_criu_restores_with_an_fd_the_warm_one_lacks(
    tmp_path: Path, criu: tuple[_FakeCriu, _FakeCriu, list[Sequence[int]]]
) -> None:
    warm, fresh, spawned = criu
    fd, other = os.open(os.devnull, os.O_WRONLY), os.open(os.devnull, os.O_WRONLY)
    try:
        assert _restore(tmp_path, warm, {"var/log/app.log": fd}, passed=(other,)) == 4242
    finally:
        os.close(fd)
        os.close(other)
    assert [_inherited(r) for r in fresh.requests] == [[("var/log/app.log", fd)]]
    assert warm.requests == []
    [pass_fds] = spawned
    assert fd in pass_fds and other not in pass_fds


def test_the_warm_criu_restores_without_inherited_fds(
    tmp_path: Path, criu: tuple[_FakeCriu, _FakeCriu, list[Sequence[int]]]
) -> None:
    warm, fresh, spawned = criu
    assert _restore(tmp_path, warm, {}, passed=()) == 4242
    assert ([_inherited(r) for r in warm.requests], spawned, fresh.requests) == ([[]], [], [])
