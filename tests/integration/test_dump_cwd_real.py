"""Dumps of processes that share a working directory (``_engine/_cwdlock``), on real CRIU: CRIU's
parasite mounts a /proc at ``proc.crtools`` in the dumped task's working directory, so two dumps
there at once collide; torpor's dumps take a lock per working directory, and a leftover
``proc.crtools`` is removed under it if empty, else named with its fix."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torpor._engine import _cwdlock

from .helpers import PYTHON, wait_for

pytestmark = pytest.mark.criu

SLEEPER = (PYTHON, "-c", "import time\nwhile True: time.sleep(0.05)")


def cli(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "torpor", *args], cwd=cwd, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def run(cwd: Path, name: str) -> int:
    proc = cli(cwd, "run", "--name", name, "--", *SLEEPER)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return int(out.split()[1])


def test_a_dump_waits_for_another_in_the_same_working_directory(
    torpor_home: Path, tmp_path: Path
) -> None:
    first = run(tmp_path, "one")
    run(tmp_path, "two")
    with _cwdlock.held(first) as n:  # as a dump of "one" holds it
        assert n == 1
        blocked = cli(tmp_path, "checkpoint", "two", "--leave-running", "--name", "two-img")
        time.sleep(1.5)
        assert blocked.poll() is None, blocked.communicate()  # waits for "one"'s dump
    _, err = blocked.communicate(timeout=60)
    assert blocked.returncode == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    third = run(elsewhere, "three")
    with _cwdlock.held(first):  # another directory: not held up
        done = cli(tmp_path, "checkpoint", "three", "--leave-running", "--name", "three-img")
        _, err = done.communicate(timeout=60)
        assert done.returncode == 0, err
    assert os.path.exists(f"/proc/{third}")


def test_a_leftover_proc_crtools_is_removed_if_empty_else_named_with_its_fix(
    torpor_home: Path, tmp_path: Path
) -> None:
    pid = run(tmp_path, "left")
    left = tmp_path / "proc.crtools"
    left.mkdir()  # as a killed dump's parasite would leave it, but not empty: not CRIU's
    (left / "keep").write_text("a user's")
    failed = cli(tmp_path, "checkpoint", "left", "--leave-running", "--name", "left-img")
    _, err = failed.communicate(timeout=60)
    assert failed.returncode != 0
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"torpor: error: checkpoint of pid {pid} failed: pie/parasite.c:")
    assert line.endswith(
        "— CRIU's parasite found proc.crtools in the process's working directory: another dump "
        "of a process there ran at the same moment (retry), or a killed one left it (remove "
        "proc.crtools from the working directory, `ls -l /proc/PID/cwd/`, if no dump runs)"
    ), line
    assert (left / "keep").read_text() == "a user's"  # never touched
    (left / "keep").unlink()  # now as a killed dump leaves it: empty, removed by the next
    again = cli(tmp_path, "checkpoint", "left", "--leave-running", "--name", "left-img")
    _, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    assert not left.exists()
    wait_for(lambda: os.path.exists(f"/proc/{pid}"))
