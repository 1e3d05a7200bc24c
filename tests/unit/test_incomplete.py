"""Crash-safe checkpoints without CRIU: the checkpointer's rule (abort until CRIU has written
the image, vouch at post-dump, commit in the reserved space, keep what cannot be finished)
driven by a fake engine, the detached checkpointer and its relay, and the staging
directories a checkpoint leaves (records, classification, sweep, repair)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from torpor._engine import DumpOptions, DumpResult, NotifyEvent
from torpor._errors import AlreadyExistsError, DumpError, ImageError, ImageNotFoundError
from torpor._images import _incomplete
from torpor._images._image import Image, Staging
from torpor._images._incomplete import (
    COMMITTING_NAME,
    IN_USE,
    INCOMPLETE,
    RECORD_NAME,
    RESERVE_NAME,
    STALE,
    IncompleteImageError,
    Record,
)
from torpor._process import _checkpointer
from torpor._process._checkpointer import (
    CheckpointAbortedError,
    Checkpointer,
    Control,
    Job,
    decode_error,
    encode_error,
)
from torpor._process._proc import ref
from torpor._safe import SPARE_PREFIX

from ._staging import leftover, record

PAGES = os.urandom(3 << 20)
BOOKKEEPING_OF_A_CHECKPOINT = {RECORD_NAME, RESERVE_NAME, COMMITTING_NAME}


@pytest.fixture(autouse=True)
def _no_criu(monkeypatch: pytest.MonkeyPatch, torpor_home: Path) -> None:
    monkeypatch.setattr(_checkpointer, "criu_version", lambda: "4.2.1")


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """A process for the fake engine to 'dump' (and kill, as CRIU does)."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


class FakeEngine:
    """Writes what a CRIU dump writes and calls the notifications a dump sends; kills the
    process once post-dump said yes (unless ``leave_running``), as CRIU does."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        *,
        before: dict[str, Callable[[Path], None]] | None = None,
        fail: str | None = None,
        pause: float = 0.0,
        linger: float = 0.0,
        die: bool = False,
    ) -> None:
        self.proc = proc
        self.before = before or {}
        self.fail = fail  # a log line: CRIU fails after writing the pages
        self.pause = pause  # seconds between pre-dump and post-dump
        self.linger = linger  # seconds after post-dump before returning
        self.die = die  # the checkpointer is killed once CRIU stopped the process
        self.answers: dict[str, bool] = {}
        self.reserve_at_post_dump: int | None = None

    def dump(
        self,
        pid: int,
        images_dir: Path,
        options: DumpOptions,
        *,
        notify: Callable[[NotifyEvent], bool | None] | None = None,
    ) -> DumpResult:
        assert notify is not None and pid == self.proc.pid
        (images_dir / "criu-dump.log").write_text("log\n")
        if not self._ask(notify, "pre-dump", images_dir):
            raise DumpError(f"checkpoint of pid {pid} failed: pre-dump refused", pid=pid)
        for name, data in {
            "inventory.img": b"inv",
            "pstree.img": b"pst",
            "core-1.img": b"c",
        }.items():
            (images_dir / name).write_bytes(data)
        (images_dir / "pages-1.img").write_bytes(PAGES)
        if self.fail is not None:
            raise DumpError(
                f"checkpoint of pid {pid} failed: {self.fail}", pid=pid, log_lines=[self.fail]
            )
        time.sleep(self.pause)
        # The reserve: the mark and the spares the commit writes into.
        held = [
            p
            for p in images_dir.iterdir()
            if p.name in (RESERVE_NAME, COMMITTING_NAME) or p.name.startswith(SPARE_PREFIX)
        ]
        if held:
            self.reserve_at_post_dump = sum(p.stat().st_size for p in held)
        if not self._ask(notify, "post-dump", images_dir):
            raise DumpError(
                f"checkpoint of pid {pid} failed: RPC client reported script error", pid=pid
            )
        if not options.leave_running:
            # By pid: in a forked checkpointer the Popen object is not ours to kill with.
            os.kill(self.proc.pid, signal.SIGKILL)
            while ref_alive(self.proc.pid):
                time.sleep(0.001)
        (images_dir / "stats-dump").write_bytes(b"stats")
        if self.die:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.linger)
        return DumpResult(False, images_dir / "criu-dump.log", 0.01)

    def _ask(self, notify: Callable[[NotifyEvent], bool | None], name: str, d: Path) -> bool:
        if name in self.before:
            self.before[name](d)
        self.answers[name] = notify(NotifyEvent(name, 0)) is not False
        return self.answers[name]


def ref_alive(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


def _job(proc: subprocess.Popen[bytes], dest: Path, **options: Any) -> Job:
    return Job(ref(proc.pid), dest, DumpOptions(**options), dest.name)


def _perform(job: Job, engine: FakeEngine, control: Control | None = None) -> Image:
    staging = Staging(job.dest)
    image, _ = Checkpointer(job, engine, staging, control or Control(None)).perform()  # type: ignore[arg-type]
    return image


def _listing(parent: Path) -> list[str]:
    return sorted(os.listdir(parent))


# -- the rule, in one process -----------------------------------------------------------------


def test_a_checkpoint_commits_an_image_without_its_bookkeeping(
    tmp_path: Path, victim: subprocess.Popen[bytes]
) -> None:
    engine = FakeEngine(victim)
    image = _perform(_job(victim, tmp_path / "img"), engine)
    assert engine.answers == {"pre-dump": True, "post-dump": True}
    assert image.path == tmp_path / "img"
    assert _listing(tmp_path) == ["img"]
    listed = {e.name for e in image.manifest.files}
    assert listed == {"core-1.img", "inventory.img", "pages-1.img", "pstree.img", "stats-dump"}
    assert not BOOKKEEPING_OF_A_CHECKPOINT & set(os.listdir(image.path))
    Image.open(image.path).verify(full=True)
    # The reserve was still whole at post-dump (given back only for the commit).
    assert engine.reserve_at_post_dump == 4096 + 8192 + 64 * 1024 + 8 * 1024


def test_the_reserve_is_given_back_only_for_the_commit(
    tmp_path: Path, victim: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    commit = Staging.commit

    def watched(self: Staging, *args: Any, **kwargs: Any) -> Image:
        sizes.append((self.path / COMMITTING_NAME).stat().st_size)
        return commit(self, *args, **kwargs)

    monkeypatch.setattr(Staging, "commit", watched)
    engine = FakeEngine(victim)
    _perform(_job(victim, tmp_path / "img"), engine)
    assert engine.reserve_at_post_dump == 4096 + 8192 + 72 * 1024
    assert sizes == [0]


def test_an_interruption_before_the_dump_does_nothing(
    tmp_path: Path, victim: subprocess.Popen[bytes]
) -> None:
    r, w = os.pipe()
    os.write(w, b"a")
    engine = FakeEngine(victim)
    with pytest.raises(CheckpointAbortedError) as err:
        _perform(_job(victim, tmp_path / "img"), engine, Control(r))
    assert str(err.value) == (
        f"checkpoint of pid {victim.pid} aborted: the command was interrupted before CRIU had "
        "written the image (nothing was done; the process keeps running)"
    )
    assert engine.answers == {}
    assert _listing(tmp_path) == []
    os.close(r)
    os.close(w)


@pytest.mark.parametrize("when", ["pre-dump", "post-dump"])
@pytest.mark.parametrize("how", ["byte", "eof"])
def test_an_interruption_while_criu_dumps_aborts_and_the_process_lives(
    tmp_path: Path, victim: subprocess.Popen[bytes], when: str, how: str
) -> None:
    r, w = os.pipe()

    def interrupt(_: Path) -> None:
        if how == "byte":
            os.write(w, b"a")
        else:
            os.close(w)  # the command is gone

    engine = FakeEngine(victim, before={when: interrupt})
    with pytest.raises(CheckpointAbortedError) as err:
        _perform(_job(victim, tmp_path / "img"), engine, Control(r))
    reason = "the command was interrupted" if how == "byte" else "the command ended"
    assert str(err.value) == (
        f"checkpoint of pid {victim.pid} aborted: {reason} before CRIU had written the image "
        "(CRIU thawed it; the process keeps running)"
    )
    assert engine.answers[when] is False
    assert victim.poll() is None
    assert _listing(tmp_path) == []
    os.close(r)
    if how == "byte":
        os.close(w)


def test_a_sigterm_to_the_checkpointer_aborts(
    tmp_path: Path, victim: subprocess.Popen[bytes]
) -> None:
    control = Control(None)
    engine = FakeEngine(victim, before={"post-dump": lambda _: control.on_sigterm(15, None)})
    with pytest.raises(CheckpointAbortedError, match="the checkpointer got SIGTERM before"):
        _perform(_job(victim, tmp_path / "img"), engine, control)
    assert victim.poll() is None


def test_an_image_that_cannot_be_vouched_for_is_refused_before_the_kill(
    tmp_path: Path, victim: subprocess.Popen[bytes]
) -> None:
    def plant(d: Path) -> None:
        (d / "fdinfo-2.img").symlink_to("/etc/shadow")

    engine = FakeEngine(victim, before={"post-dump": plant})
    with pytest.raises(DumpError) as err:
        _perform(_job(victim, tmp_path / "img"), engine)
    assert engine.answers["post-dump"] is False
    assert str(err.value).startswith(
        f"checkpoint of pid {victim.pid} failed: its image could not be checked before the "
        "process was stopped: staged image "
    )
    assert str(err.value).endswith(
        "holds fdinfo-2.img, a symlink, not a regular file; refused (the process keeps running)"
        " — something other than CRIU wrote into the staging directory"
    )
    assert victim.poll() is None
    assert _listing(tmp_path) == []


def test_a_full_disk_before_the_dump_is_one_line_and_nothing_done(
    tmp_path: Path, victim: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    monkeypatch.setattr(_incomplete, "free_bytes", lambda path: 4096)
    engine = FakeEngine(victim)
    with pytest.raises(DumpError) as err:
        _perform(_job(victim, tmp_path / "img"), engine)
    mount = _incomplete.mount_point(tmp_path)
    assert str(err.value) == (
        f"checkpoint of pid {victim.pid} refused: no space left on {mount} (4.0 KiB free), "
        "where its image goes (nothing was done; the process keeps running) — free space on "
        f"{mount}, or checkpoint to another disk with -o"
    )
    assert engine.answers == {}
    assert _listing(tmp_path) == []


def test_a_disk_filled_while_criu_writes_is_one_line_naming_it(
    tmp_path: Path, victim: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_incomplete, "free_bytes", lambda path: 8192)
    line = "page-xfer.c:263: page-xfer: Unable to spice data: No space left on device"
    engine = FakeEngine(victim, fail=line)
    with pytest.raises(DumpError) as err:
        _perform(_job(victim, tmp_path / "img"), engine)
    mount = _incomplete.mount_point(tmp_path)
    assert str(err.value) == (
        f"checkpoint of pid {victim.pid} failed: no space left on {mount} (8.0 KiB free) while "
        "CRIU wrote the image (the process keeps running) — free space on "
        f"{mount}, or checkpoint to another disk with -o"
    )
    assert _listing(tmp_path) == []


def test_another_dump_failure_is_passed_on(
    tmp_path: Path, victim: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_incomplete, "free_bytes", lambda path: 10 << 30)
    engine = FakeEngine(victim, fail="Can't dump ghost file")
    with pytest.raises(DumpError) as err:
        _perform(_job(victim, tmp_path / "img"), engine)
    assert str(err.value) == f"checkpoint of pid {victim.pid} failed: Can't dump ghost file"


def test_a_commit_that_fails_once_the_process_is_gone_keeps_the_image(
    tmp_path: Path, victim: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = Staging.commit

    def full(self: Staging, *args: Any, **kwargs: Any) -> Image:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Staging, "commit", full)
    monkeypatch.setattr(_incomplete, "free_bytes", lambda path: 0)
    with pytest.raises(IncompleteImageError) as err:
        _perform(_job(victim, tmp_path / "img"), FakeEngine(victim))
    (kept,) = _listing(tmp_path)
    path = tmp_path / kept
    mount = _incomplete.mount_point(tmp_path)
    assert str(err.value) == (
        f"checkpoint of pid {victim.pid} stopped the process but could not finish its image: "
        f"no space left on {mount} (0 B free); the image is kept at {path} — free space on "
        f"{mount}, then `torpor image repair {path}` finishes it"
    )
    assert err.value.image == str(path)
    (left,) = _incomplete.scan(tmp_path)
    assert (left.path, left.state, left.record.dest) == (path, INCOMPLETE, "img")
    monkeypatch.setattr(Staging, "commit", commit)
    image = _incomplete.repair(left)
    assert image.path == tmp_path / "img"
    Image.open(image.path).verify(full=True)
    assert image.manifest.pid == victim.pid
    assert not BOOKKEEPING_OF_A_CHECKPOINT & set(os.listdir(image.path))


def test_leave_running_commits_after_criu_and_a_failure_keeps_nothing(
    tmp_path: Path, victim: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = _perform(_job(victim, tmp_path / "one", leave_running=True), FakeEngine(victim))
    assert "stats-dump" in {e.name for e in image.manifest.files}
    assert victim.poll() is None

    def full(self: Staging, *args: Any, **kwargs: Any) -> Image:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Staging, "commit", full)
    monkeypatch.setattr(_incomplete, "free_bytes", lambda path: 0)
    with pytest.raises(DumpError) as err:
        _perform(_job(victim, tmp_path / "two", leave_running=True), FakeEngine(victim))
    mount = _incomplete.mount_point(tmp_path)
    assert str(err.value) == (
        f"checkpoint of pid {victim.pid} failed: its image could not be finished: no space left "
        f"on {mount} (0 B free) (the process keeps running)"
    )
    assert _listing(tmp_path) == ["one"]


# -- the detached checkpointer and its relay --------------------------------------------------


def _later(seconds: float, action: Callable[[], None]) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


def _interrupt_main() -> None:
    ident = threading.main_thread().ident
    assert ident is not None
    signal.pthread_kill(ident, signal.SIGINT)


def test_the_checkpointer_is_detached_and_reports(
    tmp_path: Path, victim: subprocess.Popen[bytes]
) -> None:
    r, w = os.pipe()  # an fd of the command, as its stdout pipe would be
    seen: dict[str, str] = {}

    def look(_: Path) -> None:
        seen["parent"] = str(os.getppid())
        seen["session"] = str(os.getsid(0))
        seen["inherited"] = os.readlink(f"/proc/self/fd/{w}")
        seen["sigint"] = str(signal.getsignal(signal.SIGINT))

    engine = FakeEngine(victim, before={"post-dump": lambda d: (look(d), _save(d, seen))[0]})
    outcome = _checkpointer.run(_job(victim, tmp_path / "img"), engine=engine)  # type: ignore[arg-type]
    assert outcome.interrupted is False
    data = json.loads((outcome.image.path / "seen.json").read_bytes())
    assert data["parent"] != str(os.getpid())  # not our child
    assert data["session"] != str(os.getsid(0))  # a session of its own
    assert data["inherited"] == "/dev/null"  # our pipe is not held open
    assert data["sigint"] == str(signal.SIG_IGN)
    os.close(w)
    assert os.read(r, 10) == b""  # EOF: nothing else holds the write end
    os.close(r)


def _save(d: Path, seen: dict[str, str]) -> None:
    (d / "seen.json").write_text(json.dumps(seen))


def test_ctrl_c_while_criu_dumps_aborts_through_the_pipe(
    tmp_path: Path, victim: subprocess.Popen[bytes]
) -> None:
    engine = FakeEngine(victim, pause=1.5)
    timer = _later(0.3, _interrupt_main)
    try:
        with pytest.raises(CheckpointAbortedError) as err:
            _checkpointer.run(_job(victim, tmp_path / "img"), engine=engine)  # type: ignore[arg-type]
    finally:
        timer.cancel()
    assert str(err.value) == (
        f"checkpoint of pid {victim.pid} aborted: the command was interrupted before CRIU had "
        "written the image (CRIU thawed it; the process keeps running)"
    )
    assert err.value.pid == victim.pid
    assert victim.poll() is None
    assert _listing(tmp_path) == []


def test_ctrl_c_once_criu_may_kill_is_too_late(
    tmp_path: Path, victim: subprocess.Popen[bytes]
) -> None:
    engine = FakeEngine(victim, linger=1.5)
    timer = _later(0.5, _interrupt_main)
    try:
        outcome = _checkpointer.run(_job(victim, tmp_path / "img"), engine=engine)  # type: ignore[arg-type]
    finally:
        timer.cancel()
    assert outcome.interrupted is True
    assert outcome.image.path == tmp_path / "img"
    Image.open(outcome.image.path).verify(full=True)


def test_a_checkpointer_killed_once_the_process_is_gone_leaves_an_incomplete_image(
    tmp_path: Path, victim: subprocess.Popen[bytes]
) -> None:
    engine = FakeEngine(victim, die=True)
    with pytest.raises(IncompleteImageError) as err:
        _checkpointer.run(_job(victim, tmp_path / "img"), engine=engine)  # type: ignore[arg-type]
    (kept,) = _listing(tmp_path)
    path = tmp_path / kept
    assert str(err.value) == (
        f"checkpoint of pid {victim.pid}: the checkpointer ended before its image was finished "
        f"(the process is gone); it is kept at {path} — `torpor image repair {path}` finishes it"
    )
    assert sorted(os.listdir(path)) == sorted(
        [
            "criu-dump.log",
            "core-1.img",
            "inventory.img",
            "pages-1.img",
            "pstree.img",
            "stats-dump",
            RECORD_NAME,
            COMMITTING_NAME,
            # the spares the commit writes into: the repair uses them
            *(f"{SPARE_PREFIX}{i}" for i in range(3)),
        ]
    )
    image = _incomplete.repair(_incomplete.find(str(tmp_path / "img"), tmp_path))
    Image.open(image.path).verify(full=True)


def test_errors_cross_the_pipe_with_their_fields() -> None:
    exc = DumpError("dump failed", pid=7, image="/x", log_path="/l", log_lines=["a", "b"], hint="h")
    back = decode_error(json.loads(json.dumps(encode_error(exc))))
    assert type(back) is DumpError
    assert (str(back), back.pid, back.image, back.log_path, back.log_lines) == (
        "dump failed — h",
        7,
        "/x",
        "/l",
        ("a", "b"),
    )
    kept = decode_error(encode_error(IncompleteImageError("kept", image="/s", hint="repair")))
    assert type(kept) is IncompleteImageError and kept.image == "/s"
    assert type(decode_error(encode_error(CheckpointAbortedError("a", pid=1)))) is (
        CheckpointAbortedError
    )
    other = decode_error(encode_error(ZeroDivisionError("x")))
    assert (type(other), str(other)) == (
        DumpError,
        "the checkpointer failed: ZeroDivisionError('x')",
    )
    forged = decode_error({"class": "os:system", "msg": "m", "hint": None})
    assert type(forged) is DumpError


# -- leftovers ---------------------------------------------------------------------------------


def test_records_round_trip_and_malformed_ones_are_refused(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        record().write(fd)
        assert Record.read(fd, source="s") == record()
        good = json.loads((tmp_path / RECORD_NAME).read_text())
        bad_values = {
            "dest": ["../x", "a/b", "", 3],
            "pid": ["1", 1.5, True],
            "leave_running": [1, "no"],
            "cmdline": ["python", [1]],
            "name": [None],
        }
        for key, values in bad_values.items():
            for value in values:
                (tmp_path / RECORD_NAME).write_text(json.dumps(dict(good, **{key: value})))
                with pytest.raises(ImageError, match="is not a checkpoint's record"):
                    Record.read(fd, source="s")
        (tmp_path / RECORD_NAME).write_text("[" * 100000)
        with pytest.raises(ImageError, match="is not a checkpoint's record"):
            Record.read(fd, source="s")
    finally:
        os.close(fd)


def test_leftovers_are_classified_by_what_they_hold(tmp_path: Path) -> None:
    stale = leftover(tmp_path, "a")
    by_mark = leftover(tmp_path, "b", marks=(COMMITTING_NAME,))
    by_stats = leftover(tmp_path, "c", marks=("stats-dump",))
    leftover(tmp_path, "d", marks=("stats-dump",), with_record=False)  # not ours
    os.chmod(leftover(tmp_path, "f", marks=("stats-dump",)), 0o770)  # others could write in
    busy = leftover(tmp_path, "e")
    fd = os.open(busy, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        got = {left.path: left.state for left in _incomplete.scan(tmp_path)}
    finally:
        os.close(fd)
    assert got == {stale: STALE, by_mark: INCOMPLETE, by_stats: INCOMPLETE, busy: IN_USE}


def test_sweep_removes_stale_leftovers_only(tmp_path: Path) -> None:
    stale = leftover(tmp_path, "a")
    kept = leftover(tmp_path, "b", marks=(COMMITTING_NAME,))
    foreign = leftover(tmp_path, "c", with_record=False)
    busy = leftover(tmp_path, "d")
    fd = os.open(busy, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        left = _incomplete.sweep(tmp_path)
    finally:
        os.close(fd)
    assert sorted((x.path, x.state) for x in left) == [(kept, INCOMPLETE), (busy, IN_USE)]
    assert not stale.exists()
    assert foreign.exists() and busy.exists()


def test_repair_finishes_an_incomplete_image(tmp_path: Path) -> None:
    path = leftover(tmp_path, "img", marks=(COMMITTING_NAME, "stats-dump"))
    image = _incomplete.repair(_incomplete.find(str(path), tmp_path))
    assert image.path == tmp_path / "img"
    assert (image.manifest.name, image.manifest.pid, image.manifest.cmdline) == (
        "img",
        4242,
        ("python", "app.py"),
    )
    assert {e.name for e in image.manifest.files} == {
        "inventory.img",
        "pages-1.img",
        "pstree.img",
        "stats-dump",
    }
    assert not BOOKKEEPING_OF_A_CHECKPOINT & set(os.listdir(image.path))
    Image.open(image.path).verify(full=True)
    assert _listing(tmp_path) == ["img"]


def test_repair_by_name_and_under_another_name(tmp_path: Path) -> None:
    leftover(tmp_path, "img", marks=("stats-dump",))
    (tmp_path / "img").mkdir()  # the name was taken meanwhile
    left = _incomplete.find("img", tmp_path)
    with pytest.raises(AlreadyExistsError) as err:
        _incomplete.repair(left)
    assert str(err.value) == (
        f"cannot finish {left.path}: image directory {tmp_path / 'img'} exists already — give "
        "the image another name: `torpor image repair PATH --name NEW`"
    )
    image = _incomplete.repair(left, name="other")
    assert (image.path, image.manifest.name) == (tmp_path / "other", "other")


def test_repair_refuses_what_it_must_not_touch(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFoundError, match="no incomplete image 'nothing'"):
        _incomplete.find("nothing", tmp_path)
    stale = leftover(tmp_path, "a")
    with pytest.raises(ImageError) as err:
        _incomplete.repair(_incomplete.find("a", tmp_path))
    assert str(err.value) == (
        f"nothing to repair in {stale}: its dump never succeeded (CRIU left the process "
        "running); removed it — checkpoint the process again"
    )
    assert not stale.exists()
    busy = leftover(tmp_path, "b", marks=("stats-dump",))
    left = _incomplete.find("b", tmp_path)
    fd = os.open(busy, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ImageError, match="is still being written by a checkpoint"):
            _incomplete.repair(left)
    finally:
        os.close(fd)
    leftover(tmp_path, "c", marks=("stats-dump",))
    leftover(tmp_path, "c", marks=("stats-dump",))
    with pytest.raises(Exception, match="2 incomplete images are named 'c'"):
        _incomplete.find("c", tmp_path)


def test_a_repair_without_space_names_the_disk_and_keeps_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = leftover(tmp_path, "img", marks=("stats-dump",))

    def full(self: Staging, *args: Any, **kwargs: Any) -> Image:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Staging, "commit", full)
    monkeypatch.setattr(_incomplete, "free_bytes", lambda p: 0)
    with pytest.raises(IncompleteImageError) as err:
        _incomplete.repair(_incomplete.find("img", tmp_path))
    mount = _incomplete.mount_point(tmp_path)
    assert str(err.value) == (
        f"cannot finish the image in {path}: no space left on {mount} (0 B free) — free space, "
        f"then run `torpor image repair {path}` again"
    )
    assert path.exists()


def test_control_reads_the_commands_pipe() -> None:
    r, w = os.pipe()
    control = Control(r)
    assert control.check() is None
    os.close(w)
    assert control.check() == "the command ended"
    os.close(r)
    assert Control(None).check() is None
