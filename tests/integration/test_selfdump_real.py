"""Self-dumps of a process torpor did not start: CRIU runs from a detached finaliser (double
fork), which also completes the image when CRIU kills the process."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from .helpers import PYTHON, copy_log, torpor, wait_for

pytestmark = pytest.mark.criu

APP = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from torpor._process._selfdump import self_checkpoint

    dest, leave_running = Path(sys.argv[1]), sys.argv[2] == "leave"
    state = {"n": 41}
    out = self_checkpoint(dest, leave_running=leave_running, name="unmanaged")
    state["n"] += 1
    os.write(1, f"{os.readlink('/proc/self')} restored={out.restored} n={state['n']}\\n".encode())
    time.sleep(60)
    """
)


@pytest.mark.parametrize("mode", ["leave", "stop"])
def test_unmanaged_self_dump_completes_and_restores(
    torpor_home: Path, tmp_path: Path, mode: str
) -> None:
    app = tmp_path / "app.py"
    app.write_text(APP)
    log = tmp_path / "out.log"
    dest = tmp_path / "img"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [PYTHON, str(app), str(dest), mode],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        wait_for(lambda: (dest / "torpor.json").exists(), timeout=20, what="the image")
        if mode == "leave":
            wait_for(lambda: f"{proc.pid} restored=False n=42" in log.read_text(), what="original")
            # Not in a PID namespace of its own: its copy needs its pid back.
            os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=20) == -signal.SIGKILL
        kept = log.read_text()
        assert kept == (f"{proc.pid} restored=False n=42\n" if mode == "leave" else "")
        new_pid = int(torpor("restore", str(dest), "--name", f"u-{mode}").stdout.split()[1])
        # The copy writes where the image's stdout went no more, but to a log of its own.
        own = copy_log(torpor_home, f"u-{mode}")
        wait_for(lambda: own.read_text().endswith("\n"), what="the restored copy")
        assert own.read_text() == f"{new_pid} restored=True n=42\n"
        assert log.read_text() == kept
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
