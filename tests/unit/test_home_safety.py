"""The torpor home as root trusts it (issue 11 item 2): StrictModes on the home and its
directories, records read without following links and checked before any pid is signalled.

No CRIU here: managed processes are played by ``sleep`` children of the test, and the keeper by
the test process itself (it is their parent; binding the keeper socket makes it "torpor's").
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from torpor import PermissionDeniedError, UnsafePathError
from torpor._agent import _control
from torpor._cli import main
from torpor._process import _keeper, _proc, _registry
from torpor._process._registry import ManagedProcess, RecordError

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process torpor did not start (our child: we may signal it, by pid)."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def _record(proc: subprocess.Popen[bytes], name: str, **changes: object) -> ManagedProcess:
    me = _proc.ref(os.getpid())
    rec = ManagedProcess(
        name=name,
        pid=proc.pid,
        start_time=_proc.ref(proc.pid).start_time,
        keeper_pid=me.pid,
        command=("sleep", "60"),
        started="2026-01-01T00:00:00+00:00",
        keeper_start_time=me.start_time,
    )
    return rec.evolve(**changes)


def _plant(home: Path, rec: ManagedProcess) -> Path:
    procs = home / "procs"
    procs.mkdir(mode=0o700, exist_ok=True)
    path = procs / f"{rec.name}.json"
    path.write_text(json.dumps(asdict(rec)))
    path.chmod(0o600)
    return path


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None and _proc.running(proc.pid)


# -- the home and its directories -------------------------------------------------------------


@pytest.mark.parametrize(("mode", "who"), [(0o777, "others"), (0o770, "its group")])
def test_home_writable_by_others_is_refused_with_the_fix(
    torpor_home: Path, capsys: pytest.CaptureFixture[str], mode: int, who: str
) -> None:
    torpor_home.chmod(mode)
    code, out, err = run(capsys, "ps")
    assert (code, out) == (1, "")
    assert err == (
        f"torpor: error: torpor home {torpor_home} is writable by {who} (mode {mode:04o}); "
        f"refused — chmod go-w {torpor_home}\n"
    )
    # Refused, not repaired: someone else may have prepared it.
    assert stat.S_IMODE(torpor_home.stat().st_mode) == mode
    assert not (torpor_home / "procs").exists()


@root_only
def test_home_owned_by_another_user_is_refused_with_the_fix(
    torpor_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.chown(torpor_home, 65534, 65534)
    code, out, err = run(capsys, "images")
    assert (code, out) == (1, "")
    assert err == (
        f"torpor: error: torpor home {torpor_home} is owned by uid 65534, not by root; "
        f"refused — chown 0 {torpor_home}\n"
    )


@pytest.mark.parametrize(
    ("sub", "what", "argv"),
    [
        ("procs", "records directory", ("ps",)),
        ("images", "images directory", ("images",)),
        ("logs", "logs directory", ("run", "--", "true")),
    ],
)
def test_a_subdirectory_writable_by_others_is_refused(
    torpor_home: Path,
    capsys: pytest.CaptureFixture[str],
    sub: str,
    what: str,
    argv: tuple[str, ...],
) -> None:
    if argv[0] == "run" and os.geteuid() != 0:
        pytest.skip("torpor run needs root before it looks at the home")
    (torpor_home / sub).mkdir(mode=0o700)
    (torpor_home / sub).chmod(0o777)
    (torpor_home / "procs").mkdir(mode=0o700, exist_ok=True)
    code, _, err = run(capsys, *argv)
    path = torpor_home / sub
    assert (code, err) == (
        1,
        f"torpor: error: {what} {path} is writable by others (mode 0777); refused — "
        f"chmod go-w {path}\n",
    )


def test_a_home_that_is_a_symlink_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    monkeypatch.setenv("TORPOR_HOME", str(tmp_path / "link"))
    code, _, err = run(capsys, "ps")
    link = tmp_path / "link"
    assert (code, err) == (
        1,
        f"torpor: error: torpor home {link} is not a directory (a symlink or a file); "
        f"refused — remove {link}, or point torpor at a real directory\n",
    )
    assert list(real.iterdir()) == []


def test_a_procs_symlink_to_elsewhere_is_refused(
    torpor_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (torpor_home / "procs").symlink_to(elsewhere)
    with pytest.raises(UnsafePathError) as info:
        _registry.list_all()
    assert info.value.path == str(torpor_home / "procs")
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o277])
def test_missing_directories_are_made_0700_whatever_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int
) -> None:
    from torpor import _paths

    home = tmp_path / "a" / "b" / "home"
    monkeypatch.setenv("TORPOR_HOME", str(home))
    old = os.umask(umask)
    try:
        made = [_paths.home(), _paths.procs_dir(), _paths.logs_dir(), _paths.images_dir()]
        made += [_paths.cache_dir(), _paths.pools_dir()]
    finally:
        os.umask(old)
    assert made == [home, *(home / d for d in ("procs", "logs", "images", "cache", "pools"))]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in made} == {p.name: 0o700 for p in made}


def test_non_root_at_a_root_home_gets_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs a root-owned directory (made as root)")
    home = tmp_path / "roothome"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("TORPOR_HOME", str(home))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # owned by root, used by uid 1000
    code, _, err = run(capsys, "ps")
    assert (code, err) == (
        1,
        f"torpor: error: torpor home {home} belongs to root; uid 1000 cannot use it — run "
        "torpor as root, or set TORPOR_HOME to a directory of your own\n",
    )


# -- record files -----------------------------------------------------------------------------


def test_a_record_symlinked_elsewhere_is_refused_and_not_read(
    torpor_home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    sleeper: subprocess.Popen[bytes],
) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(asdict(_record(sleeper, "web"))))
    (torpor_home / "procs").mkdir(mode=0o700)
    link = torpor_home / "procs" / "web.json"
    link.symlink_to(target)
    code, _, err = run(capsys, "kill", "web")
    assert (code, err) == (
        1,
        f"torpor: error: record {link} is a symlink; refused — torpor did not write it: "
        f"remove {link}\n",
    )
    assert _alive(sleeper)
    # Listings leave it out, and say so.
    code, out, err = run(capsys, "ps", "-a")
    assert (code, out.splitlines()) == (0, ["NAME  PID  STATE  UPTIME  COMMAND  RESTORED-FROM"])
    assert err == (
        f"torpor: warning: skipped: record {link} is a symlink; refused — torpor did not "
        f"write it: remove {link}\n"
    )


def test_a_record_writable_by_others_is_refused(
    torpor_home: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    path = _plant(torpor_home, _record(sleeper, "web"))
    path.chmod(0o622)
    with pytest.raises(UnsafePathError) as info:
        _registry.load("web")
    assert str(info.value) == (
        f"record {path} is writable by group or others (mode 0622); refused — torpor did "
        f"not write it: remove {path}"
    )
    assert _registry.list_all() == []


@root_only
def test_a_record_owned_by_another_user_is_refused(
    torpor_home: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    path = _plant(torpor_home, _record(sleeper, "web"))
    os.chown(path, 65534, 65534)
    with pytest.raises(UnsafePathError) as info:
        _registry.load("web")
    assert str(info.value).startswith(f"record {path} is owned by uid 65534, not by root;")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "is not JSON"),
        ("[1, 2]", "is not a JSON object"),
        ('{"name": "web"}', "lacks command, keeper_pid, pid, start_time, started"),
        ("PID_TRUE", "has a bad pid (bool)"),
        ("NAME_OTHER", "names another process ('api')"),
        ("CMD_INTS", "has a bad command (not a list of strings)"),
        ("PID_ZERO", "has a bad pid (0)"),
    ],
)
def test_malformed_records_are_skipped_and_refused_by_name(
    torpor_home: Path,
    capsys: pytest.CaptureFixture[str],
    sleeper: subprocess.Popen[bytes],
    content: str,
    problem: str,
) -> None:
    good = asdict(_record(sleeper, "web"))
    variants = {
        "PID_TRUE": {**good, "pid": True},
        "NAME_OTHER": {**good, "name": "api"},
        "CMD_INTS": {**good, "command": [1, 2]},
        "PID_ZERO": {**good, "pid": 0},
    }
    path = _plant(torpor_home, _record(sleeper, "web"))
    path.write_text(json.dumps(variants[content]) if content in variants else content)
    try:
        assert _registry.list_all() == []
        with pytest.raises(RecordError) as info:
            _registry.load("web")
        assert str(info.value) == (
            f"record {path} {problem}; refused — torpor did not write it: remove {path}"
        )
        code, _, err = run(capsys, "kill", "web")
        assert (code, err) == (1, f"torpor: error: {info.value}\n")
        assert _alive(sleeper)
    finally:
        path.unlink()  # the suite's clean-up reads records as they should be


def test_save_never_writes_through_a_planted_symlink(
    torpor_home: Path, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (torpor_home / "procs").mkdir(mode=0o700)
    (torpor_home / "procs" / "web.json").symlink_to(victim)
    old = os.umask(0)
    try:
        _registry.save(_record(sleeper, "web"))
    finally:
        os.umask(old)
    assert victim.read_text() == "precious"
    st = os.lstat(torpor_home / "procs" / "web.json")
    assert (stat.S_ISREG(st.st_mode), stat.S_IMODE(st.st_mode)) == (True, 0o600)
    assert sorted(os.listdir(torpor_home / "procs")) == ["web.json"]
    assert _registry.load("web") == _record(sleeper, "web")


def test_the_keeper_records_its_own_start_time(
    torpor_home: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    _registry.save(_record(sleeper, "mine", keeper_start_time=None))
    assert _registry.load("mine").keeper_start_time == _proc.ref(os.getpid()).start_time
    # Another process's record is written as it is (the keeper is not us).
    _registry.save(_record(sleeper, "theirs", keeper_pid=1, keeper_start_time=None))
    assert _registry.load("theirs").keeper_start_time is None


# -- before a record's pid is signalled -------------------------------------------------------


@pytest.fixture
def keeper_socket() -> Iterator[None]:
    """Make the test process look like a torpor keeper: it holds @torpor-keeper-<its pid>."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(_keeper.address(os.getpid()))
    sock.listen(1)
    yield
    sock.close()


def test_kill_stops_a_process_of_a_real_keeper(
    torpor_home: Path,
    capsys: pytest.CaptureFixture[str],
    sleeper: subprocess.Popen[bytes],
    keeper_socket: None,
) -> None:
    # The positive control for the refusals below: same record, a keeper that holds its socket.
    _plant(torpor_home, _record(sleeper, "web"))
    code, _, err = run(capsys, "kill", "web")
    assert (code, err) == (0, f"stopped web (pid {sleeper.pid}) with SIGTERM\n")
    assert sleeper.wait(5) == -15


def test_a_record_planted_for_a_process_torpor_did_not_start_kills_nothing(
    torpor_home: Path, capsys: pytest.CaptureFixture[str], sleeper: subprocess.Popen[bytes]
) -> None:
    # Every fact in it is true and public (pid, start times, parent): only the keeper socket
    # is missing, as for any process that is not a torpor keeper.
    path = _plant(torpor_home, _record(sleeper, "web"))
    code, _, err = run(capsys, "kill", "web")
    assert (code, err) == (
        1,
        f"torpor: error: record 'web' names pid {sleeper.pid}, which torpor did not start "
        f"(its parent {os.getpid()} is not a torpor keeper); nothing signalled — the record "
        f"is stale or planted: remove {path}\n",
    )
    code, _, err = run(capsys, "kill", str(sleeper.pid))
    assert code == 1 and err.startswith(f"torpor: error: record 'web' names pid {sleeper.pid},")
    code, _, err = run(capsys, "checkpoint", "web")
    assert code == 1 and err.startswith(f"torpor: error: record 'web' names pid {sleeper.pid},")
    assert _alive(sleeper)


def test_a_keeper_socket_bound_by_another_process_does_not_count(
    torpor_home: Path, capsys: pytest.CaptureFixture[str], sleeper: subprocess.Popen[bytes]
) -> None:
    # Anyone can bind a free abstract name; it must be among the keeper's own fds.
    squatter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys, time; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET);"
            f" s.bind(b'\\0torpor-keeper-{os.getpid()}'); s.listen(1); print('up', flush=True);"
            " time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == b"up\n"
        _plant(torpor_home, _record(sleeper, "web"))
        code, _, err = run(capsys, "kill", "web")
        assert code == 1 and err.endswith(
            f"(its parent {os.getpid()} is not a torpor keeper); nothing signalled — the "
            f"record is stale or planted: remove {torpor_home / 'procs' / 'web.json'}\n"
        )
        assert _alive(sleeper)
    finally:
        squatter.kill()
        squatter.wait()


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"keeper_pid": 1}, "its parent is pid {me}, not the recorded keeper 1"),
        (
            {"keeper_start_time": 1},
            "its parent {me} is not the recorded keeper (another start time)",
        ),
    ],
)
def test_a_record_whose_keeper_is_not_the_parent_kills_nothing(
    torpor_home: Path,
    capsys: pytest.CaptureFixture[str],
    sleeper: subprocess.Popen[bytes],
    keeper_socket: None,
    changes: dict[str, int],
    problem: str,
) -> None:
    path = _plant(torpor_home, _record(sleeper, "web", **changes))
    code, _, err = run(capsys, "kill", "web")
    assert (code, err) == (
        1,
        f"torpor: error: record 'web' names pid {sleeper.pid}, which torpor did not start "
        f"({problem.format(me=os.getpid())}); nothing signalled — the record is stale or "
        f"planted: remove {path}\n",
    )
    assert _alive(sleeper)


def test_a_record_with_another_start_time_is_not_running(
    torpor_home: Path,
    capsys: pytest.CaptureFixture[str],
    sleeper: subprocess.Popen[bytes],
    keeper_socket: None,
) -> None:
    rec = _record(sleeper, "web")
    _plant(torpor_home, rec.evolve(start_time=rec.start_time - 1))
    code, _, err = run(capsys, "kill", "web")
    assert (code, err) == (
        1,
        f"torpor: error: managed process 'web' (pid {sleeper.pid}) is not running (gone) — "
        "`torpor ps -a` lists ended ones\n",
    )
    assert _alive(sleeper)


def test_an_old_record_without_the_keeper_start_time_is_not_signalled(
    torpor_home: Path,
    capsys: pytest.CaptureFixture[str],
    sleeper: subprocess.Popen[bytes],
    keeper_socket: None,
) -> None:
    data = asdict(_record(sleeper, "web"))
    del data["keeper_start_time"]
    (torpor_home / "procs").mkdir(mode=0o700)
    (torpor_home / "procs" / "web.json").write_text(json.dumps(data))
    code, _, err = run(capsys, "kill", "web")
    assert (code, err) == (
        1,
        "torpor: error: record 'web' does not say which keeper started pid "
        f"{sleeper.pid} (written by an older torpor), so torpor cannot tell it is its own; "
        f"nothing signalled — check it (`ps -o pid,ppid,args -p {sleeper.pid}`), then stop "
        "it with kill\n",
    )
    assert _alive(sleeper)


def test_agent_stop_never_signals_a_planted_agent_pid(
    torpor_home: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    me = _proc.ref(sleeper.pid)
    pid_file = torpor_home / "agent.pid"
    pid_file.write_text(json.dumps({"pid": me.pid, "start_time": me.start_time, "started": "x"}))
    pid_file.chmod(0o600)
    with pytest.raises(PermissionDeniedError) as info:
        _control.stop()
    assert str(info.value) == (
        f"{pid_file} names pid {me.pid}, which is not this home's agent (it does not serve "
        f"{torpor_home / 'agent.sock'}); nothing signalled — the record is stale or planted: "
        f"remove {pid_file}"
    )
    assert _alive(sleeper)
    # A record another user could have written is not even read.
    pid_file.chmod(0o666)
    assert _control.stop() is None
    assert _alive(sleeper)


# -- small files in the home --------------------------------------------------------------------


def test_home_files_are_written_0600_and_never_through_a_symlink(
    torpor_home: Path, tmp_path: Path
) -> None:
    from torpor import _paths

    victim = tmp_path / "victim"
    victim.write_text("precious")
    (torpor_home / "criu-version.json").symlink_to(victim)
    assert _paths.read_home_file("criu-version.json") is None
    old = os.umask(0)
    try:
        _paths.write_home_file("criu-version.json", b"{}")
    finally:
        os.umask(old)
    assert victim.read_text() == "precious"
    st = os.lstat(torpor_home / "criu-version.json")
    assert (stat.S_ISREG(st.st_mode), stat.S_IMODE(st.st_mode)) == (True, 0o600)
    assert _paths.read_home_file("criu-version.json") == b"{}"
    (torpor_home / "criu-version.json").chmod(0o620)
    assert _paths.read_home_file("criu-version.json") is None
    assert sorted(os.listdir(torpor_home)) == ["criu-version.json"]
