"""The sweep of what a killed keep/copy into the image store left (``_topool.sweep_keep_temps``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from torpor._process._topool import sweep_keep_temps


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_dead_temporaries_go_live_ones_and_others_stay(tmp_path: Path) -> None:
    dead = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f".app.s000001.keep-{dead}", f".keep-app-{dead}"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "pages-1.img").write_bytes(b"x")
        (tmp_path / f".app.keep-{live.pid}").mkdir()
        (tmp_path / f".keep-mine-{os.getpid()}").mkdir()
        (tmp_path / "app").mkdir()  # an image
        (tmp_path / f"x.keep-{dead}").mkdir()  # not one of ours: no leading dot
        target = tmp_path / "elsewhere"
        target.mkdir()
        (target / "precious").write_text("kept")
        (tmp_path / f".link.keep-{dead}").symlink_to(target)
        gone = sweep_keep_temps(tmp_path)
    finally:
        live.kill()
        live.wait()
    assert sorted(gone) == sorted([f".app.s000001.keep-{dead}", f".keep-app-{dead}"])
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f".app.keep-{live.pid}", f".keep-mine-{os.getpid()}", "app", f"x.keep-{dead}",
         "elsewhere", f".link.keep-{dead}"]
    )  # fmt: skip
    assert (target / "precious").read_text() == "kept"


def test_missing_store_is_nothing(tmp_path: Path) -> None:
    assert sweep_keep_temps(tmp_path / "absent") == []
