"""Issue 11 item 6: every file torpor (or CRIU, for it) writes in its home is 0600 and every
directory 0700, after a scenario that touches every part of the home: run, checkpoint (left
running and not), restore (one copy and two), images, inspect, a push and pull through the
default dir pool, a checkpoint into it and a restore from it, kill, and the agent.

The umask is 022 throughout, as on a stock system: private modes must come from torpor, not
from the caller."""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import APPS, PYTHON, counts, torpor, wait_for

pytestmark = pytest.mark.criu

TORPOR = Path(sys.executable).parent / "torpor"


@pytest.fixture
def stock_umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "char device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "file"


def offenders(home: Path) -> list[str]:
    """``MODE KIND PATH`` (PATH relative to ``home``) of everything in ``home`` that is not a
    0700 directory or a 0600 regular file or socket (the home itself included)."""
    out = []
    st = os.lstat(home)
    if stat.S_IMODE(st.st_mode) != 0o700:
        out.append(f"{stat.S_IMODE(st.st_mode):04o} dir .")
    for dirpath, dirnames, filenames in os.walk(home):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode)
            rel = path.relative_to(home)
            if stat.S_ISDIR(st.st_mode):
                if mode != 0o700:
                    out.append(f"{mode:04o} dir {rel}")
            elif not (stat.S_ISREG(st.st_mode) or stat.S_ISSOCK(st.st_mode)) or mode != 0o600:
                out.append(f"{mode:04o} {_kind(st.st_mode)} {rel}")
    return sorted(out, key=lambda line: line.split(" ", 2)[2])


def _scenario(home: Path) -> tuple[int, list[str]]:
    """Run the scenario; the number of entries it left in the home (files and dirs), and the
    offenders while the agent ran (its pid file and socket exist only then)."""
    run = torpor("run", "--name", "app", "--", PYTHON, str(APPS / "counter.py")).stdout
    pid = int(run.split()[1])
    log = home / "logs" / "app.log"
    wait_for(lambda: len(counts(log).get(pid, [])) >= 3, what="the app counting")

    torpor("checkpoint", "app", "--leave-running", "--name", "img-lr")
    torpor("checkpoint", "app", "--name", "img")
    torpor("restore", "img", "--name", "one")
    copies = json.loads(torpor("restore", "img-lr", "--count", "2", "--json").stdout)
    torpor("images")
    torpor("images", "--json")
    torpor("inspect", "img")

    torpor("image", "push", "img", "pushed@default")
    pulled = Path(torpor("image", "pull", "pushed@default").stdout.strip())
    assert pulled.is_relative_to(home)
    torpor("checkpoint", "one", "--leave-running", "--pool", "default", "--name", "pooled")
    torpor("restore", "pooled@default", "--name", "from-pool")

    for name in ("one", "from-pool", *(c["name"] for c in copies)):
        torpor("kill", name)
    torpor("ps", "-a")
    torpor("doctor", check=False)  # exit 1 on a machine missing an optional piece is fine

    # The agent: its files, and a keeper hosted in one of its workers.
    if not os.access(TORPOR, os.X_OK):
        pytest.fail(f"{TORPOR} is not installed: run scripts/setup.sh")
    cli = (str(TORPOR),)
    torpor("agent", "start", command=cli)
    try:
        torpor("run", "--name", "hosted", "--", "sleep", "60", command=cli)
        assert {"agent.pid", "agent.sock"} <= set(os.listdir(home))
        live = offenders(home)
        torpor("kill", "hosted", command=cli)
    finally:
        torpor("agent", "stop", command=cli)
    return sum(len(d) + len(f) for _, d, f in os.walk(home)), live


def test_every_file_is_0600_and_every_directory_0700(torpor_home: Path, stock_umask: None) -> None:
    entries, live = _scenario(torpor_home)
    # The walk saw the whole scenario: its logs, records, images, pool and agent files.
    for expected in (
        "logs/app.log",
        "logs/keeper.log",
        "logs/agent.log",
        "procs/app.json",
        "procs/hosted.json",
        "images/img/torpor.json",
        "images/img-lr/torpor.json",
        "agent.lock",
        "criu-version.json",
    ):
        assert (torpor_home / expected).exists(), expected
    assert entries > 40
    bad = sorted(set(offenders(torpor_home)) | set(live))
    assert bad == [], "not 0600 / 0700 (mode, kind, path in the home):\n" + "\n".join(bad)
