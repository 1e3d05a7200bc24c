"""Issue 10 on real CRIU through the CLI: ``torpor restore IMAGE --lazy``.

A 256 MiB app (``apps/lazy_ballast.py``: random bytes, never zeros) is checkpointed, then:

- restored ``--lazy``: it answers (4 MiB touched) with the original's answer, then becomes
  fully resident and the checksum of all its memory matches the original's;
- restored ``--lazy`` and its lazy-pages daemon (the one torpor started: found through the
  keeper's lazy state) SIGKILLed while memory is still filling: the copy is killed (its record
  ends with signal 9) and the state says why, instead of a copy left hanging on a fault;
- restored ``--lazy --count 2``: two copies, each with its own daemon, both right.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._lazy import _restore as lazy
from torpor._process import _registry
from torpor._process._proc import running

from .helpers import APPS, PYTHON, copy_log, torpor, wait_for

pytestmark = pytest.mark.criu

MIB = 256


@pytest.fixture(autouse=True)
def _pipe_max_size() -> None:
    """CRIU's lazy page transfer splices through pipes of up to 4 MiB (see CRIU notes)."""
    path = Path("/proc/sys/fs/pipe-max-size")
    if int(path.read_text()) < 4 << 20:
        subprocess.run(["sysctl", "-q", "-w", "fs.pipe-max-size=4194304"], check=True)


@pytest.fixture
def daemons() -> Iterator[list[int]]:
    """Lazy-pages daemon pids a test saw (killed at the end if still ours and running)."""
    seen: list[int] = []
    yield seen
    for pid in seen:
        with contextlib.suppress(OSError):
            if b"lazy-pages" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


def _lines(log: Path, kind: str) -> dict[str, str]:
    out = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        parts = line.split()
        if len(parts) == 3 and parts[0] == kind:
            out[parts[1]] = parts[2]
    return out


def _ask(trig: Path, log: Path, kind: str, tag: str, timeout: float = 30) -> str:
    (trig / f"{kind}-{tag}").touch()
    word = "answer" if kind == "ask" else "sum"
    got = wait_for(lambda: _lines(log, word).get(tag), timeout=timeout, what=f"{kind} {tag}")
    assert isinstance(got, str)
    return got


def _image(home: Path, tmp_path: Path, name: str) -> tuple[Path, str, str]:
    """Run the app, read its answer and checksum, checkpoint it: (trigger dir, answer, sum)."""
    trig = tmp_path / f"trig-{name}"
    trig.mkdir()
    torpor("run", "--name", name, "--", PYTHON, str(APPS / "lazy_ballast.py"), str(trig), str(MIB))
    log = home / "logs" / f"{name}.log"
    wait_for(lambda: log.exists() and "ready" in log.read_text(), timeout=30, what="ready")
    answer = _ask(trig, log, "ask", "orig")
    total = _ask(trig, log, "sum", "orig")
    torpor("checkpoint", name, "--name", f"{name}-img")
    return trig, answer, total


def _restore_lazy(*args: str) -> list[dict[str, object]]:
    rows = json.loads(torpor("restore", *args, "--lazy", "--json").stdout)
    assert isinstance(rows, list)
    return rows


def test_lazy_restore_answers_then_is_fully_resident_with_the_same_memory(
    torpor_home: Path, tmp_path: Path, daemons: list[int]
) -> None:
    trig, answer, total = _image(torpor_home, tmp_path, "big")
    started = time.monotonic()
    (row,) = _restore_lazy("big-img")
    assert set(row) == {"name", "pid", "resume_s", "resident_s", "memory", "error"}
    assert row["name"] == "big-img" and row["error"] is None
    assert isinstance(row["resume_s"], float) and 0 < row["resume_s"] < 10
    assert row["memory"] in ("filling", "resident")
    st = lazy.read_state("big-img")
    assert st is not None and st.pid == row["pid"] and st.daemon_pid is not None
    daemons.append(st.daemon_pid)
    log = copy_log(torpor_home, "big-img")
    assert _ask(trig, log, "ask", "lazy") == answer
    first_answer = time.monotonic() - started
    final = lazy.wait_states(["big-img"], timeout=60)["big-img"]
    assert final.state == "resident", final
    assert final.resident_at is not None and final.resumed_at is not None
    assert final.resident_at >= final.resumed_at
    assert not running(st.daemon_pid)  # the daemon exited 0: every page moved
    assert _ask(trig, log, "sum", "lazy") == total
    assert _registry.load("big-img").ended is None
    print(f"lazy: resume {row['resume_s']:.3f}s, first answer {first_answer:.3f}s")


def test_lazy_daemon_killed_mid_restore_kills_and_records_the_copy(
    torpor_home: Path, tmp_path: Path, daemons: list[int]
) -> None:
    _image(torpor_home, tmp_path, "dies")
    (row,) = _restore_lazy("dies-img")
    st = lazy.read_state("dies-img")
    assert st is not None and st.daemon_pid is not None and st.pid == row["pid"]
    daemons.append(st.daemon_pid)
    # The daemon torpor started for this copy: CRIU's lazy-pages, a child of the copy's keeper.
    assert b"lazy-pages" in Path(f"/proc/{st.daemon_pid}/cmdline").read_bytes()
    keeper = _registry.load("dies-img").keeper_pid
    stat = Path(f"/proc/{st.daemon_pid}/stat").read_text()
    assert int(stat.rsplit(")", 1)[1].split()[1]) == keeper
    assert lazy.read_state("dies-img").state == "filling"  # type: ignore[union-attr]
    os.kill(st.daemon_pid, signal.SIGKILL)
    final = lazy.wait_states(["dies-img"], timeout=20)["dies-img"]
    assert final.state == "failed"
    assert final.error is not None
    assert final.error.startswith(
        f"lazy restore of {torpor_home / 'images' / 'dies-img'}: "
        "CRIU's lazy-pages daemon was killed by SIGKILL"
    ), final.error
    assert final.error.endswith(f"copy dies-img (pid {row['pid']}) was killed"), final.error
    rec = wait_for(
        lambda: (r := _registry.load("dies-img")).ended is not None and r, what="the record ended"
    )
    assert isinstance(rec, _registry.ManagedProcess)
    assert rec.exit_status == -9
    assert not running(int(str(row["pid"])))


def test_lazy_count_two_copies_each_with_its_daemon(
    torpor_home: Path, tmp_path: Path, daemons: list[int]
) -> None:
    trig, answer, total = _image(torpor_home, tmp_path, "two")
    rows = _restore_lazy("two-img", "--count", "2")
    assert [r["name"] for r in rows] == ["two-img-1", "two-img-2"]
    states = [lazy.read_state(str(r["name"])) for r in rows]
    pids = [s.daemon_pid for s in states if s is not None]
    assert len(pids) == 2 and len(set(pids)) == 2
    daemons.extend(p for p in pids if p is not None)
    final = lazy.wait_states(["two-img-1", "two-img-2"], timeout=60)
    assert [final[n].state for n in ("two-img-1", "two-img-2")] == ["resident", "resident"]
    # Both copies poll one trigger dir: each answers an ``each-`` trigger in its own log.
    logs = [copy_log(torpor_home, n) for n in ("two-img-1", "two-img-2")]
    (trig / "each-x").touch()
    got = wait_for(
        lambda: (
            len(sums := [_lines(log, "sum").get("x") for log in logs]) == 2 and all(sums) and sums
        ),
        timeout=30,
        what="both sums",
    )
    assert got == [total, total]
    (trig / "ask-y").touch()
    got = wait_for(
        lambda: [d for log in logs if (d := _lines(log, "answer").get("y"))], what="an answer"
    )
    assert got == [answer]


def test_a_local_warm_set_is_recorded_then_restored_before_the_resume(
    torpor_home: Path, tmp_path: Path, daemons: list[int]
) -> None:
    """Issue 10 point 3, locally: the first lazy restore records the pages the copy faulted
    (from its daemon's log); the next restores them before the resume, from a warm image, and
    the copy is right (answer, then all its memory once resident)."""
    from torpor._images._image import Image
    from torpor._lazy import _warm

    trig, answer, total = _image(torpor_home, tmp_path, "warm")
    image = Image.open(torpor_home / "images" / "warm-img")
    assert _warm.load(image) == []
    assert len(_restore_lazy("warm-img", "--name", "w1")) == 1
    log = copy_log(torpor_home, "w1")
    assert _ask(trig, log, "ask", "w1") == answer  # touches 4 MiB
    assert lazy.wait_states(["w1"], timeout=60)["w1"].state == "resident"
    warm = _warm.load(image)
    # What it faulted before the background push got there (its first moments, at least the
    # interpreter's own pages), every page a lazy one.
    assert warm and sum(r[2] for r in warm) <= _warm.MAX_BYTES
    torpor("stop", "w1")
    assert len(_restore_lazy("warm-img", "--name", "w2")) == 1
    st = lazy.read_state("w2")
    assert st is not None and st.daemon_pid is not None
    daemons.append(st.daemon_pid)
    assert st.warm_bytes == sum(r[2] for r in warm), st  # all of them restored eagerly
    log = copy_log(torpor_home, "w2")
    assert _ask(trig, log, "ask", "w2") == answer
    assert lazy.wait_states(["w2"], timeout=60)["w2"].state == "resident"
    # What w2 still faulted is added, none lost (page by page: the ranges are coalesced).
    assert _pages(_warm.load(image)) >= _pages(warm)
    assert _ask(trig, log, "sum", "w2") == total
    assert image.trusted()  # the image's files untouched by the warm image's links
    # w2, resident, kept the warm image of the warm set it left: w3 restores from it as it is.
    from torpor._lazy import _warmcache

    kept = _warmcache.lookup(image)
    assert kept is not None
    os.close(kept.fd)
    torpor("stop", "w2")
    assert len(_restore_lazy("warm-img", "--name", "w3")) == 1
    st = lazy.read_state("w3")
    assert st is not None and st.daemon_pid is not None
    daemons.append(st.daemon_pid)
    assert st.warm_bytes == kept.warm_bytes, st
    log = copy_log(torpor_home, "w3")
    assert _ask(trig, log, "ask", "w3") == answer
    assert lazy.wait_states(["w3"], timeout=60)["w3"].state == "resident"
    assert _ask(trig, log, "sum", "w3") == total
    assert image.trusted()


def _pages(ranges: list[tuple[str, int, int]]) -> set[tuple[str, int]]:
    return {(f, o) for f, off, n in ranges for o in range(off, off + n, 4096)}


def test_a_killed_keepers_work_dir_is_swept_at_the_next_restore(
    torpor_home: Path, tmp_path: Path, daemons: list[int]
) -> None:
    _image(torpor_home, tmp_path, "orphan")
    assert len(_restore_lazy("orphan-img", "--name", "o1")) == 1
    st = lazy.read_state("o1")
    assert st is not None and st.daemon_pid is not None and st.pid is not None
    daemons.append(st.daemon_pid)
    rec = _registry.load("o1")
    work = [p for p in (torpor_home / "lazy").iterdir() if p.name.startswith("o1-")]
    assert len(work) == 1 and work[0].is_dir()
    # Its keeper killed mid-watch: the work dir stays while the daemon that uses it lives...
    os.kill(rec.keeper_pid, signal.SIGKILL)
    wait_for(lambda: not running(rec.keeper_pid), what="the keeper gone")
    torpor("restore", "orphan-img", "--name", "o2", "--no-lazy")
    if running(st.daemon_pid):
        assert work[0].exists()
        os.kill(st.daemon_pid, signal.SIGKILL)
        wait_for(lambda: not running(st.daemon_pid), what="the daemon gone")
    os.kill(st.pid, signal.SIGKILL)
    # ... and goes at the next restore once nothing that claimed it lives.
    torpor("restore", "orphan-img", "--name", "o3", "--no-lazy")
    assert not work[0].exists()
