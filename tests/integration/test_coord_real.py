"""Coordinated checkpoint/restore against real CRIU: ``torpor.checkpoint()`` from inside an app,
``torpor checkpoint NAME`` through the trigger channel, and a failing hook that keeps the app
running. The app is written by the test and run under ``torpor run``.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from .helpers import LOCAL_IMAGES_COLUMNS, PYTHON, parse_ps, parse_table, torpor, wait_for

pytestmark = pytest.mark.criu

APP = textwrap.dedent(
    """
    import logging, os, random, sys, time
    from pathlib import Path
    from torpor._coord import after_restore, before_checkpoint, checkpoint, global_context

    out, mode = Path(sys.argv[1]), sys.argv[2]
    log = logging.getLogger("app")
    handler = logging.FileHandler(out / "app.log", mode="w")
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    def note(text):
        with open(out / "events", "a") as fh:
            fh.write(f"{os.readlink('/proc/self')} {text}\\n")

    class Db:
        def before_checkpoint(self, context):
            note("db-close")
            if mode == "refuse":
                raise ConnectionError("db refuses to close")

        def after_restore(self, context):
            note("db-open")

    db = Db()
    global_context().register(db)

    @before_checkpoint
    def flush():
        note("hook-before")

    @after_restore
    def reopen():
        note("hook-after")

    log.info("started")
    note("ready")
    if mode == "self":
        result = checkpoint(out / "img", leave_running=True)
        note(f"result restored={result.restored} count={result.restore_count} "
             f"rand={random.random()}")
        log.info("after checkpoint, restored=%s", result.restored)
    while True:
        time.sleep(0.05)
    """
)


def _events(out: Path) -> list[tuple[int, str]]:
    path = out / "events"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        pid, _, text = line.partition(" ")
        rows.append((int(pid), text))
    return rows


def _start(home: Path, tmp_path: Path, name: str, mode: str) -> tuple[int, Path]:
    app = tmp_path / "app.py"
    app.write_text(APP)
    out = tmp_path / name
    out.mkdir()
    pid = int(
        torpor("run", "--name", name, "--", PYTHON, str(app), str(out), mode).stdout.split()[1]
    )
    wait_for(lambda: any(t == "ready" for _, t in _events(out)), what="the app to start")
    return pid, out


def test_self_checkpoint_returns_in_original_and_restored_copies(
    torpor_home: Path, tmp_path: Path
) -> None:
    pid, out = _start(torpor_home, tmp_path, "selfck", "self")
    wait_for(lambda: any(t.startswith("result") for _, t in _events(out)), what="the checkpoint")
    assert (out / "img" / "torpor.json").exists()
    mine = [t for p, t in _events(out) if p == pid]
    assert mine[1:6] == ["hook-before", "db-close", "db-open", "hook-after", mine[5]]
    assert mine[5].startswith("result restored=False count=0")

    copies = json.loads(torpor("restore", str(out / "img"), "--count", "2", "--json").stdout)
    pids = {int(c["pid"]) for c in copies} if isinstance(copies, list) else set()
    assert len(pids) == 2, copies

    def restored_results() -> list[str]:
        return [t for p, t in _events(out) if p in pids and t.startswith("result")]

    wait_for(lambda: len(restored_results()) == 2, what="both copies to report")
    results = restored_results()
    assert all("restored=True count=1" in r for r in results)
    # Random streams are reseeded at restore: copies of one image draw different numbers.
    assert len({r.split("rand=")[1] for r in results}) == 2
    for p in pids:
        assert [t for q, t in _events(out) if q == p][:2] == ["db-open", "hook-after"]
    # The log file was closed before the dump and reopened (appending) in every copy.
    lines = (out / "app.log").read_text().splitlines()
    assert lines[0] == "started" and lines.count("after checkpoint, restored=True") == 2


def test_external_trigger_runs_the_hooks(torpor_home: Path, tmp_path: Path) -> None:
    pid, out = _start(torpor_home, tmp_path, "ext", "external")
    image = Path(torpor("checkpoint", "ext", "--name", "ext-img").stdout.strip())
    assert (image / "torpor.json").exists()
    assert [t for p, t in _events(out) if p == pid][1:] == ["hook-before", "db-close"]
    new_pid = int(torpor("restore", "ext-img").stdout.split()[1])
    wait_for(
        lambda: [t for p, t in _events(out) if p == new_pid] == ["db-open", "hook-after"],
        what="the restored copy's after-restore hooks",
    )
    # The restored copy listens again under its new pid: a second coordinated checkpoint works.
    torpor("checkpoint", str(new_pid), "--leave-running", "--name", "ext-img2")
    assert [t for p, t in _events(out) if p == new_pid][2:] == [
        "hook-before",
        "db-close",
        "db-open",
        "hook-after",
    ]


def test_failing_hook_reaches_the_cli_and_keeps_the_app(torpor_home: Path, tmp_path: Path) -> None:
    pid, out = _start(torpor_home, tmp_path, "refuse", "refuse")
    res = torpor("checkpoint", "refuse", "--name", "refuse-img", check=False)
    assert res.returncode != 0
    assert "db refuses to close" in res.stderr
    assert [t for p, t in _events(out) if p == pid][1:] == [
        "hook-before",
        "db-close",
        "db-open",
        "hook-after",
    ]
    assert parse_table(torpor("images").stdout, LOCAL_IMAGES_COLUMNS) == {}
    assert parse_ps(torpor("ps").stdout, "PID", "STATE") == {"refuse": (str(pid), "running")}
