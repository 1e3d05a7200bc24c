"""Locks between torpor commands and records that match what runs (issue 12 item 4), and the
per-copy log plumbing (item 5), without CRIU: ``_locks``, ``_registry.reserve``/``update``,
the keeper's record keeping, ``_copies.stdio_keys`` and ``_logs.open_log``.

Locks held by "another command" are held by a helper process (flock conflicts between open
files, but a test must show the holder's pid is the other process's)."""

from __future__ import annotations

import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from torpor._errors import AlreadyExistsError, ProcessNotFoundError, TorporError, UnsafePathError
from torpor._images._criu_images import criu_images_pb2 as pb
from torpor._process import _copies, _keeper, _locks, _logs, _proc, _registry
from torpor._process._locks import CheckpointBusyError
from torpor._process._proc import ProcRef
from torpor._process._registry import ManagedProcess

TARGET = ProcRef(4321, 987654)
BUSY_HINT = "wait for it to finish, then checkpoint again"

HOLD = """
import sys
from torpor._process import _locks
from torpor._process._proc import ProcRef
kind, a, b = sys.argv[1:4]
if kind == "name":
    lock = _locks.starting(a)
elif kind == "dump":
    lock = _locks.dumping(ProcRef(int(a), int(b)))
else:
    lock = _locks.requesting(ProcRef(int(a), int(b)))
print("held", flush=True)
sys.stdin.read()
lock.release()
"""


@contextmanager
def held_by_other(kind: str, a: object, b: object = 0) -> Iterator[subprocess.Popen[str]]:
    """A helper process holding a lock (until the block ends)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, kind, str(a), str(b)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        yield proc
    finally:
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()
        proc.wait(timeout=10)


def busy(pid: int, holder: int) -> str:
    return f"pid {pid} is being checkpointed by another torpor command (pid {holder}) — {BUSY_HINT}"


def lock_files(home: Path) -> set[str]:
    return {p.name for p in (home / "locks").iterdir()}


# -- the checkpoint locks ---------------------------------------------------------------------


def test_a_second_dump_is_refused_naming_the_holder(torpor_home: Path) -> None:
    with held_by_other("dump", TARGET.pid, TARGET.start_time) as other:
        with pytest.raises(CheckpointBusyError) as info:
            _locks.dumping(TARGET)
        assert str(info.value) == busy(TARGET.pid, other.pid)
        assert (info.value.pid, info.value.holder) == (TARGET.pid, other.pid)
    # Once the holder let go, the next one gets it.
    with _locks.dumping(TARGET) as lock:
        assert lock.held


def test_a_killed_holder_lets_go_and_its_file_is_swept(torpor_home: Path) -> None:
    with held_by_other("dump", TARGET.pid, TARGET.start_time) as other:
        other.send_signal(signal.SIGKILL)
        other.wait()
        file = f"dump.{TARGET.pid}-{TARGET.start_time}.lock"
        assert lock_files(torpor_home) == {file}  # left behind: it never let go itself
        assert _locks.holder_of(file) is None
        with _locks.dumping(TARGET):
            record = json.loads((torpor_home / "locks" / file).read_bytes())
            assert record == {"pid": os.getpid(), "start_time": _proc.start_time(os.getpid())}
    assert lock_files(torpor_home) == set()
    with held_by_other("dump", TARGET.pid, TARGET.start_time) as other:
        other.send_signal(signal.SIGKILL)
        other.wait()
    # A file with no record yet is a taker's between its create and its lock: never swept.
    fresh = torpor_home / "locks" / "dump.1-2.lock"
    fresh.touch(mode=0o600)
    with _locks.starting("web"):  # any lock taken sweeps what killed holders left
        assert lock_files(torpor_home) == {_locks.name_file("web"), fresh.name}


def test_the_same_pid_with_another_start_time_is_another_process(torpor_home: Path) -> None:
    later = ProcRef(TARGET.pid, TARGET.start_time + 1)
    with held_by_other("dump", TARGET.pid, TARGET.start_time), _locks.dumping(later) as lock:
        assert lock.held


def test_a_coordinated_request_and_a_plain_dump_exclude_each_other(torpor_home: Path) -> None:
    with held_by_other("request", TARGET.pid, TARGET.start_time) as other:
        with pytest.raises(CheckpointBusyError) as info:
            _locks.dumping(TARGET, unless_requested=True)  # a plain dump (the checkpointer)
        assert str(info.value) == busy(TARGET.pid, other.pid)
        with pytest.raises(CheckpointBusyError) as info:
            _locks.requesting(TARGET)
        assert str(info.value) == busy(TARGET.pid, other.pid)
        # The keeper's self-dump that the request asked for.
        with _locks.dumping(TARGET) as lock:
            assert lock.held
    with held_by_other("dump", TARGET.pid, TARGET.start_time) as other:
        with pytest.raises(CheckpointBusyError) as info:
            _locks.requesting(TARGET)
        assert str(info.value) == busy(TARGET.pid, other.pid)
    assert lock_files(torpor_home) == set()


def test_lock_files_are_private_and_named_from_numbers(torpor_home: Path) -> None:
    with _locks.dumping(TARGET), _locks.requesting(ProcRef(5, 6)), _locks.starting("web"):
        assert stat.S_IMODE((torpor_home / "locks").stat().st_mode) == 0o700
        names = lock_files(torpor_home)
        assert names == {
            f"dump.{TARGET.pid}-{TARGET.start_time}.lock",
            "checkpoint.5-6.lock",
            _locks.name_file("web"),
        }
        assert _locks.name_file("web").startswith("name.") and "web" not in _locks.name_file("web")
        for name in names:
            assert stat.S_IMODE((torpor_home / "locks" / name).stat().st_mode) == 0o600


@pytest.mark.parametrize("plant", ["symlink", "fifo", "writable"])
def test_a_planted_lock_file_is_refused(torpor_home: Path, tmp_path: Path, plant: str) -> None:
    locks = torpor_home / "locks"
    locks.mkdir(mode=0o700)
    path = locks / f"dump.{TARGET.pid}-{TARGET.start_time}.lock"
    victim = tmp_path / "victim"
    victim.write_text("keep")
    problem = {
        "symlink": "is a symlink",
        "fifo": "is a FIFO, not a regular file",
        "writable": "is writable by group or others (mode 0666)",
    }[plant]
    if plant == "symlink":
        path.symlink_to(victim)
    elif plant == "fifo":
        os.mkfifo(path, 0o600)
    else:
        path.write_text("")
        path.chmod(0o666)
    started = time.monotonic()
    with pytest.raises(UnsafePathError) as info:
        _locks.dumping(TARGET)
    assert time.monotonic() - started < 2  # a FIFO is never waited on
    assert str(info.value) == (
        f"lock file {path} {problem}; refused — torpor did not make it: remove {path}"
    )
    assert victim.read_text() == "keep"


def test_a_name_being_started_is_refused_naming_the_holder(torpor_home: Path) -> None:
    with held_by_other("name", "web") as other:
        with pytest.raises(AlreadyExistsError) as info:
            _locks.starting("web")
        assert str(info.value) == (
            f"a managed process named 'web' is being started by another torpor command "
            f"(pid {other.pid}) — choose another --name"
        )
        with _locks.starting("web2") as lock:
            assert lock.held


# -- names and records ------------------------------------------------------------------------


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def _record(pid: int, name: str = "web", **changes: object) -> ManagedProcess:
    """A record of our child ``pid`` (never of this process: the home fixture kills what
    records name)."""
    born = _proc.start_time(pid)
    assert born is not None and pid != os.getpid()
    rec = ManagedProcess(
        name=name,
        pid=pid,
        start_time=born,
        keeper_pid=os.getpid(),
        command=("sleep", "60"),
        started="2026-01-01T00:00:00+00:00",
        keeper_start_time=_proc.start_time(os.getpid()),
    )
    return rec.evolve(**changes)


def test_a_running_name_is_refused_and_an_ended_one_reused(
    torpor_home: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    running = _record(sleeper.pid)
    _registry.save(running)
    with pytest.raises(AlreadyExistsError) as info, _registry.reserve(["web"]):
        pass
    assert str(info.value) == (
        f"a managed process named 'web' is running (pid {sleeper.pid}) — choose another --name"
    )
    assert lock_files(torpor_home) == set()  # nothing of a refused reservation is held
    with _registry.reserve(["web"], rename_taken=True) as held:
        (fresh,) = held.names
        assert fresh.startswith("web-") and len(fresh) == 10 and int(fresh[4:], 16) >= 0
    _registry.save(running.evolve(exit_status=0, ended="2026-01-01T00:00:01+00:00"))
    newer = running.evolve(start_time=running.start_time + 1, command=("newer",))
    with _registry.reserve(["web"]) as held:
        assert held.names == ["web"]
        held.commit(newer)
    assert _registry.load("web") == newer


RESERVE = """
import os, sys, time
from torpor._process import _registry
go = sys.argv[1]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.0002)
try:
    with _registry.reserve(["web"]):
        print("won", flush=True)
        time.sleep(0.3)
except Exception as exc:
    print(f"lost {exc}", flush=True)
"""


def test_two_commands_reserving_one_name_one_wins(torpor_home: Path, tmp_path: Path) -> None:
    for round_ in range(5):
        go = tmp_path / f"go-{round_}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", RESERVE, str(go)], stdout=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        go.touch()
        outs = [p.communicate(timeout=20)[0] for p in procs]
        winners = [p for p, out in zip(procs, outs, strict=True) if out == "won\n"]
        assert len(winners) == 1, outs
        (loser_out,) = [out for out in outs if out != "won\n"]
        assert loser_out == (
            f"lost a managed process named 'web' is being started by another torpor command "
            f"(pid {winners[0].pid}) — choose another --name\n"
        )


def test_updates_touch_only_the_very_process(
    torpor_home: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    rec = _record(sleeper.pid)
    _registry.save(rec)
    other = ProcRef(sleeper.pid, rec.start_time + 1)  # its pid reused by a newer process
    assert not _registry.update("web", other, exit_status=1)
    assert not _registry.delete_if("web", other)
    assert _registry.load("web") == rec
    assert _registry.update("web", rec.ref, exit_status=3, ended="x")
    assert _registry.load("web").state == "exited 3"
    assert not _registry.update("nobody", rec.ref, exit_status=3)
    assert _registry.delete_if("web", rec.ref)
    with pytest.raises(ProcessNotFoundError):
        _registry.load("web")


# -- the keeper's records -------------------------------------------------------------------------


def _spawn(*argv: str) -> int:
    """A child of this process that nothing else waits for (the keeper's reaper does)."""
    return os.posix_spawn(argv[0], list(argv), os.environ)


def _reaped(keeper: _keeper.Keeper, pid: int) -> None:
    deadline = time.monotonic() + 10
    while pid in keeper.children:
        assert time.monotonic() < deadline, "never reaped"
        time.sleep(0.01)


def test_a_discarded_child_leaves_no_record_and_an_old_one_as_it_was(torpor_home: Path) -> None:
    keeper = _keeper.Keeper()
    pid = _spawn("/bin/sleep", "60")
    rec = _record(pid)
    old = rec.evolve(start_time=rec.start_time - 1, exit_status=0, ended="2026-01-01T00:00:01")
    _registry.save(old)
    keeper._adopt(rec)
    keeper.discard([rec])  # what a failed restore does with its copies
    _reaped(keeper, pid)
    assert _registry.load("web") == old  # not 'killed (signal 9)' on the old one either
    assert keeper.unrecorded == {}


def test_a_child_is_recorded_once_and_its_end_after(torpor_home: Path) -> None:
    keeper = _keeper.Keeper()
    early = _spawn("/bin/sleep", "0.01")
    recs = [_record(early, "early")]
    keeper._adopt(recs[0])
    _reaped(keeper, early)
    with pytest.raises(ProcessNotFoundError):
        _registry.load("early")  # ended before it was recorded: nothing written yet
    late = _spawn("/bin/sleep", "60")
    recs.append(_record(late, "late"))
    keeper._adopt(recs[1])
    with _registry.reserve(["early", "late"]) as held:
        written = keeper.record(recs, held)
    assert [(r.name, r.state) for r in written] == [("early", "exited 0"), ("late", "running")]
    assert [_registry.load(n) for n in ("early", "late")] == written
    os.kill(late, signal.SIGKILL)
    _reaped(keeper, late)
    assert _registry.load("late").state == "killed (signal 9)"


def test_records_that_cannot_be_written_kill_what_was_started(torpor_home: Path) -> None:
    keeper = _keeper.Keeper()
    pids = [_spawn("/bin/sleep", "60") for _ in range(2)]
    recs = [_record(pids[0], "a"), _record(pids[1], "b")]
    for rec in recs:
        keeper._adopt(rec)
    with _registry.reserve(["a"]) as held, pytest.raises(TorporError) as info:
        keeper.record(recs, held)  # "b" is not reserved
    assert str(info.value) == "internal error: name 'b' is not reserved"
    for pid in pids:
        _reaped(keeper, pid)
    for name in ("a", "b"):
        with pytest.raises(ProcessNotFoundError):
            _registry.load(name)


# -- per-copy logs ---------------------------------------------------------------------------------

PSTREE, IDS, FDINFO, FILES = 0x50273030, 0x54432030, 0x56213732, 0x56303138


def _img(magic: int, *entries: bytes) -> bytes:
    return struct.pack("<II", 0x54564319, magic) + b"".join(
        struct.pack("<I", len(e)) + e for e in entries
    )


def _reg_file(file_id: int, name: str, flags: int, mode: int) -> bytes:
    reg = pb.RegFileEntry(id=file_id, flags=flags, pos=0, name=name, mode=mode)
    return pb.FileEntry(type=1, id=file_id, reg=reg).SerializeToString()


def _stdio_image(path: Path, fds: dict[int, int], files: list[bytes]) -> Path:
    path.mkdir()
    (path / "pstree.img").write_bytes(_img(PSTREE, pb.PstreeEntry(pid=1).SerializeToString()))
    (path / "ids-1.img").write_bytes(_img(IDS, pb.TaskKobjIdsEntry(files_id=7).SerializeToString()))
    entries = [pb.FdinfoEntry(id=i, type=1, fd=fd).SerializeToString() for fd, i in fds.items()]
    (path / "fdinfo-7.img").write_bytes(_img(FDINFO, *entries))
    (path / "files.img").write_bytes(_img(FILES, *files))
    return path


APPEND = os.O_WRONLY | os.O_APPEND


def test_stdio_keys_name_the_log_the_root_writes_to(tmp_path: Path) -> None:
    log = _reg_file(9, "/var/lib/torpor/logs/web.log", APPEND, stat.S_IFREG | 0o600)
    other = _reg_file(10, "/srv/data.log", APPEND, stat.S_IFREG | 0o600)  # on fd 3: the app's
    null = _reg_file(8, "/dev/null", os.O_RDWR, stat.S_IFCHR | 0o666)
    reader = _reg_file(11, "/srv/input", os.O_RDONLY, stat.S_IFREG | 0o600)
    image = _stdio_image(tmp_path / "a", {0: 8, 1: 9, 2: 9, 3: 10}, [null, log, other])
    assert _copies.stdio_keys(image) == ("var/lib/torpor/logs/web.log",)
    image = _stdio_image(tmp_path / "b", {0: 8, 1: 8, 2: 11}, [null, reader])
    assert _copies.stdio_keys(image) == ()
    plain = tmp_path / "c"
    plain.mkdir()
    assert _copies.stdio_keys(plain) == ()  # no pstree.img: nothing known


def test_a_copy_log_is_created_private_and_never_through_a_plant(
    torpor_home: Path, tmp_path: Path
) -> None:
    logs = torpor_home / "logs"
    fd = _logs.open_log(logs / "web.log")
    try:
        os.write(fd, b"one\n")
    finally:
        os.close(fd)
    assert stat.S_IMODE((logs / "web.log").stat().st_mode) == 0o600
    fd = _logs.open_log(logs / "web.log")
    try:
        assert os.fstat(fd).st_size == 4 and os.lseek(fd, 0, os.SEEK_CUR) == 0
        os.write(fd, b"two\n")  # appended
    finally:
        os.close(fd)
    assert (logs / "web.log").read_text() == "one\ntwo\n"
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (logs / "evil.log").symlink_to(victim)
    os.mkfifo(logs / "pipe.log", 0o600)
    for name, problem in (
        ("evil.log", "is a symlink"),
        ("pipe.log", "is a FIFO, not a regular file"),
    ):
        with pytest.raises(UnsafePathError) as info:
            _logs.open_log(logs / name)
        path = logs / name
        assert (
            str(info.value)
            == f"log {path} {problem}; refused — torpor did not make it: remove {path}"
        )
    assert victim.read_text() == "keep"


def test_torpors_own_log_names_are_not_process_names(
    torpor_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from torpor._cli import main

    for name in ("keeper", "agent"):
        assert main(["run", "--name", name, "--", "true"]) == 1
        assert capsys.readouterr().err == (
            f"torpor: error: {name!r} is reserved (logs/{name}.log is torpor's own log)"
            " — choose another --name\n"
        )
