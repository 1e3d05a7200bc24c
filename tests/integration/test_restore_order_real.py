"""Issue 12 item 2's acceptance against real CRIU: restored copies run application code only
after the after-restore resources and hooks, whether the checkpoint was taken from inside (by
a worker thread while the main loop draws) or from outside (``torpor checkpoint PID``, run by
the channel thread while both loops draw). One image, 20 rounds of ``restore --count 3``.

The app (``apps/random_loop.py``) writes, per iteration, the host pid the iteration began in,
the flag its after-restore hook sets (the copy's host pid) as the iteration saw it when it
began, and a random number. Without the hold, the copies' loops ran before the hooks: they saw
no flag and drew the image's next number, the same in every copy.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from torpor._process._proc import running

from .helpers import APPS, PYTHON, torpor, wait_for

pytestmark = pytest.mark.criu

ROUNDS = 20
COPIES = 3


def _lines(out: Path, pid: int) -> list[tuple[str, int, int, str]]:
    path = out / str(pid)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        tag, start, seen, number = line.split()
        rows.append((tag, int(start), int(seen), number))
    return rows


def _first_own(out: Path, pid: int) -> dict[str, tuple[str, int, int, str]] | None:
    """Each loop's first line from an iteration the copy began, once both loops wrote one."""
    first: dict[str, tuple[str, int, int, str]] = {}
    for row in _lines(out, pid):
        if row[1] == pid:
            first.setdefault(row[0], row)
    return first if len(first) == 2 else None


def _checkpoint(mode: str, pid: int, out: Path) -> Path:
    if mode == "outside":
        image = out / "img-outside"
        torpor("checkpoint", str(pid), "--leave-running", "-o", str(image))
    else:
        image = out / "img-inside"
        (out / "go-inside").touch()
        events = out / "events"
        wait_for(
            lambda: (
                events.exists() and events.read_text() == f"{pid} checkpointed restored=False\n"
            ),
            what="the worker's checkpoint",
        )
    assert (image / "torpor.json").exists()
    return image


@pytest.mark.parametrize("mode", ["inside", "outside"])
def test_copies_run_app_code_only_after_the_after_restore_hooks(
    mode: str, torpor_home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    name = f"rand-{mode}"
    started = torpor("run", "--name", name, "--", PYTHON, str(APPS / "random_loop.py"), str(out))
    pid = int(started.stdout.split()[1])
    wait_for(lambda: {r[0] for r in _lines(out, pid)} == {"main", "work"}, what="both loops")
    image = _checkpoint(mode, pid, out)
    assert running(pid)

    firsts: list[str] = []
    for r in range(ROUNDS):
        copies = json.loads(
            torpor(
                "restore", str(image), "--count", str(COPIES), "--json", "--name", f"{name}-{r}"
            ).stdout
        )
        pids = [int(c["pid"]) for c in copies]
        assert len(set(pids)) == COPIES
        try:
            for p in pids:
                wait_for(lambda p=p: _first_own(out, p), what=f"copy {p} of round {r}")
        finally:
            for p in pids:
                os.kill(p, signal.SIGKILL)
        numbers = []
        for p in pids:
            rows = _lines(out, p)
            # An iteration in flight at the checkpoint ends in the copy: it began in the
            # original (at most one per loop, before any of the copy's own).
            inherited = [row for row in rows if row[1] != p]
            assert all(row[1] == pid for row in inherited), rows
            assert sorted(row[0] for row in inherited) in ([], ["main"], ["work"], ["main", "work"])
            first = _first_own(out, p)
            assert first is not None
            # The hook had run before either loop began its first iteration in the copy.
            assert first["main"][2] == p, (r, p, rows)
            assert first["work"][2] == p, (r, p, rows)
            numbers.append(first["main"][3])
        assert len(set(numbers)) == COPIES, (r, numbers)
        firsts += numbers
    # No two copies of the image, in any round, began with the same number.
    assert len(set(firsts)) == ROUNDS * COPIES
