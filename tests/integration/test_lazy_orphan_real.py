"""No lazy-pages daemon outlives its starters unless it serves a copy, on real CRIU.

- A daemon begun the way an agent worker begins one (``_prestart.begin``), or started the way
  a keeper does before its restore (``LazyCopy.start``), by a child process then SIGKILLed
  before any restore connected: ``torpor ps`` (its sweep) kills the daemon, which would wait
  on its socket for ever, and removes the copy's work dir.
- A daemon that holds the userfaultfds of a live lazy copy whose keeper was SIGKILLed (the
  daemon stopped once the copy resumed, so that it is still filling when the sweep looks):
  left alone;
  once let go it fills the copy, whose memory is then all the original's, and the next sweep
  removes the work dir.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from torpor._lazy import _restore as lazy
from torpor._lazy import _sweep
from torpor._process import _registry
from torpor._process._proc import running

from .helpers import PYTHON, copy_log, torpor, wait_for
from .test_lazy_restore_real import _ask, _image, _pipe_max_size, _restore_lazy, daemons

pytestmark = pytest.mark.criu
__all__ = ["_pipe_max_size", "daemons"]  # fixtures, used by name

CRIU = "/usr/local/sbin/criu"

STARTER = """
import sys, time
from pathlib import Path
from torpor._images._image import Image
from torpor._lazy import _prestart, _warm
from torpor._lazy._restore import LazyCopy

how, path, criu = sys.argv[1:]
image = Image.open(Path(path))
if how == "prestart":  # as an agent worker running `torpor restore IMAGE --lazy`
    _warm.save(image, [("pages-1.img", 0, 4096)])  # a warm set: the daemon starts early
    _prestart.allow()
    _prestart.begin(LazyCopy, image, "early", criu)
    assert _prestart._begun is not None
    copy = _prestart._begun[2]
    assert copy.daemon is not None and copy.daemon.spawned  # not waited for
else:  # as a keeper: the daemon ready, the restore not begun
    copy = LazyCopy(image, "early", binary=criu)
    copy.start()
assert copy.daemon is not None
print(copy.daemon.pid, copy.work_dir, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("how", ["prestart", "keeper"])
def test_a_daemon_whose_starter_was_killed_before_the_restore_is_ended_and_swept(
    torpor_home: Path, tmp_path: Path, daemons: list[int], how: str
) -> None:
    _image(torpor_home, tmp_path, "early")
    starter = subprocess.Popen(
        [PYTHON, "-c", STARTER, how, str(torpor_home / "images" / "early-img"), CRIU],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert starter.stdout is not None
        pid_s, work_s = starter.stdout.readline().split()
        daemon, work = int(pid_s), Path(work_s)
        daemons.append(daemon)
        assert b"lazy-pages" in Path(f"/proc/{daemon}/cmdline").read_bytes()
        wait_for(lambda: (work / "lazy-pages.socket").exists(), what="the daemon listening")
    finally:
        starter.kill()  # SIGKILL: no drop(), no abort()
        starter.wait()
    assert running(daemon) and work.is_dir()  # left waiting for a restore that never comes
    torpor("ps")
    wait_for(lambda: not running(daemon), timeout=5, what="the daemon ended")
    assert not work.exists()


def _stop_once_resumed(name: str, stopped: list[int]) -> None:
    """SIGSTOP the daemon of the lazy copy ``name`` the moment its keeper records it resumed
    (else a 256 MiB copy may be resident before the test looks); its pid into ``stopped``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = lazy.read_state(name)
        if st is not None and st.resumed_at is not None and st.daemon_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(st.daemon_pid, signal.SIGSTOP)
                stopped.append(st.daemon_pid)
            return
        time.sleep(0.001)


def test_a_daemon_filling_a_copy_whose_keeper_was_killed_is_left_to_fill_it(
    torpor_home: Path, tmp_path: Path, daemons: list[int]
) -> None:
    trig, _, total = _image(torpor_home, tmp_path, "live")
    stopped: list[int] = []
    stopper = threading.Thread(target=_stop_once_resumed, args=("live-img", stopped))
    stopper.start()
    try:
        (row,) = _restore_lazy("live-img")
    finally:
        stopper.join()
        daemons.extend(stopped)  # killed at the end if still there (stopped or not)
    assert len(stopped) == 1
    daemon = stopped[0]
    try:
        st = lazy.read_state("live-img")
        assert st is not None and st.daemon_pid == daemon and st.pid == row["pid"]
        assert running(daemon) and st.state == "filling"
        assert not _sweep.idle(daemon)  # it holds the copy's userfaultfd
        work = [p for p in (torpor_home / "lazy").iterdir() if p.name.startswith("live-img-")]
        assert len(work) == 1 and work[0].is_dir()
        keeper = _registry.load("live-img").keeper_pid
        os.kill(keeper, signal.SIGKILL)
        wait_for(lambda: not running(keeper), what="the keeper gone")
        torpor("ps")
        assert running(daemon) and work[0].is_dir()
        assert (work[0] / "lazy-pages.socket").exists()
    finally:
        os.kill(daemon, signal.SIGCONT)
    wait_for(lambda: not running(daemon), timeout=60, what="the daemon done")
    log = copy_log(torpor_home, "live-img")
    assert _ask(trig, log, "sum", "after") == total  # every page the original's, no zeros
    torpor("ps")
    assert not work[0].exists()
