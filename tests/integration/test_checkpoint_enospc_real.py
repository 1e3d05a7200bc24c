"""Issue 12's first acceptance line, ENOSPC part, against real CRIU: ``torpor checkpoint -o``
onto a small tmpfs that fills at each stage of a dump — before CRIU (not even the space the
commit needs fits), while CRIU writes the pages, at the sizes where CRIU's files fit but what
the commit writes would not, and after CRIU (another writer takes every free byte the moment
CRIU is done). Each time the process runs on (free, counting, nothing left on the disk, one
line naming the disk) or its image is complete, restores and continues its count."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._process._proc import ProcRef

from .crashes import (
    fill,
    frozen,
    leftovers,
    mount_tmpfs,
    restores_and_continues,
    run_counter,
    still_counting,
    used_bytes,
)
from .helpers import torpor

pytestmark = pytest.mark.criu

PAGE = 4096
RESERVE = 72 << 10  # what the checkpointer reserves for a one-process tree


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted for the test (unmounted after it)."""
    path = tmp_path / "disk"
    path.mkdir()
    mount_tmpfs(path, 64 << 10)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _resize(disk: Path, size: int) -> None:
    for entry in os.listdir(disk):
        shutil.rmtree(disk / entry)
    mount_tmpfs(disk, size // 1024)


def _runs_on(app: ProcRef, log: Path, disk: Path) -> None:
    assert app.alive()
    assert frozen(app.pid) is None
    still_counting(log, app.pid)
    assert os.listdir(disk) == []  # nothing left behind on the full disk


def _refused_before(app: ProcRef, disk: Path) -> re.Pattern[str]:
    return re.compile(
        f"torpor: error: checkpoint of pid {app.pid} refused: no space left on "
        f"{re.escape(str(disk))} \\([0-9.]+ (B|KiB)\\ free\\), where its image goes \\(nothing "
        f"was done; the process keeps running\\) — free space on {re.escape(str(disk))}, or "
        "checkpoint to another disk with -o\n"
    )


def _failed_in_criu(app: ProcRef, disk: Path) -> re.Pattern[str]:
    return re.compile(
        f"torpor: error: checkpoint of pid {app.pid} failed: no space left on "
        f"{re.escape(str(disk))} \\([0-9.]+ (B|KiB)\\ free\\) while CRIU wrote the image \\(the "
        "process keeps running; log: (?P<log>\\S+)\\) — free space on "
        f"{re.escape(str(disk))}, or checkpoint to another disk with -o\n"
    )


def _checkpoint(app_name: str, dest: Path) -> subprocess.CompletedProcess[str]:
    return torpor("checkpoint", app_name, "-o", str(dest), "--name", dest.name, check=False)


def _outcome(
    res: subprocess.CompletedProcess[str], app: ProcRef, log: Path, disk: Path, copy: str
) -> str:
    """``running`` (CRIU ran out of space; one line; the process runs on) or ``restored``
    (complete image, restored, counting on). Anything else fails."""
    if res.returncode == 0:
        assert res.stdout == f"{disk / 'img'}\n"
        assert not app.alive()
        restores_and_continues(disk / "img", copy, app, log)
        return "restored"
    assert (res.returncode, res.stdout) == (1, ""), res.stderr
    match = _failed_in_criu(app, disk).fullmatch(res.stderr)
    assert match is not None, res.stderr
    assert Path(match["log"]).is_file()
    _runs_on(app, log, disk)
    return "running"


def test_a_full_disk_at_every_stage_of_a_dump(torpor_home: Path, disk: Path) -> None:
    app, log = run_counter(torpor_home, "e")
    # What a checkpoint of it takes on disk, committed (CRIU's files and log, manifest,
    # signature, stamp).
    torpor("checkpoint", "e", "--leave-running", "-o", str(disk / "measure"))
    need = used_bytes(disk)

    # Before CRIU: not even the space the commit needs is there.
    _resize(disk, 32 << 10)
    res = _checkpoint("e", disk / "img")
    assert (res.returncode, res.stdout) == (1, "")
    assert _refused_before(app, disk).fullmatch(res.stderr), res.stderr
    _runs_on(app, log, disk)

    # While CRIU writes the pages.
    _resize(disk, need // 2 // PAGE * PAGE)
    assert _outcome(_checkpoint("e", disk / "img"), app, log, disk, "e-copy") == "running"

    # Where CRIU's files fit but not the manifest, signature and stamp: without the space
    # reserved before CRIU started, CRIU would finish, kill the process, and leave an image
    # that could not be committed. With it, CRIU runs out of space first.
    outcomes = []
    for pages in range(-6, 3):
        _resize(disk, need + pages * PAGE)
        outcomes.append(_outcome(_checkpoint("e", disk / "img"), app, log, disk, "e-copy"))
        if outcomes[-1] == "restored":
            app, log = run_counter(torpor_home, f"e{pages + 10}")
    assert outcomes == ["running"] * 9, outcomes

    # With room enough, it is complete.
    _resize(disk, need + RESERVE + 16 * PAGE)
    assert _outcome(_checkpoint("e", disk / "img"), app, log, disk, "e-copy") == "restored"


def test_a_disk_another_writer_fills_once_criu_is_done(torpor_home: Path, disk: Path) -> None:
    """The moment CRIU has written its last file (``stats-dump``, after it killed the
    process), another writer takes every free byte: the commit still fits, in the space it
    reserved before CRIU started."""
    for round_ in range(3):
        app, log = run_counter(torpor_home, f"f{round_}")
        if round_ == 0:
            torpor("checkpoint", f"f{round_}", "--leave-running", "-o", str(disk / "measure"))
            need = used_bytes(disk)
        _resize(disk, need + RESERVE + 32 * PAGE)
        filled = threading.Event()
        watcher = threading.Thread(target=_fill_once_criu_is_done, args=(disk, filled))
        watcher.start()
        try:
            res = _checkpoint(f"f{round_}", disk / "img")
        finally:
            filled.set()  # stops the watcher if it never saw the mark
            watcher.join()
        assert (disk / "filler").exists()  # the disk did fill after CRIU
        assert (res.returncode, leftovers(disk)) == (0, []), res.stderr
        (disk / "filler").unlink()
        assert _outcome(res, app, log, disk, f"f{round_}-copy") == "restored"


def _fill_once_criu_is_done(disk: Path, done: threading.Event) -> None:
    while not done.is_set():
        for name in leftovers(disk):
            if (disk / name / "stats-dump").exists():
                fill(disk)
                done.set()
                return
        time.sleep(0.0001)
