"""``_engine._thp``: a CRIU started for a restore has transparent huge pages off; we do not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from torpor._engine import _thp


def _thp_enabled(pid: int | str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("THP_enabled:"):
            return line.split()[1]
    pytest.skip("this kernel reports no THP_enabled")


def _child_says() -> str:
    code = "from pathlib import Path; print(Path('/proc/self/status').read_text())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    [line] = [x for x in out.stdout.splitlines() if x.startswith("THP_enabled:")]
    return line.split()[1]


def test_a_child_spawned_inside_has_thp_off_and_we_get_ours_back() -> None:
    assert _thp_enabled("self") == "1" and _thp.disabled() is False
    with _thp.children_without_thp():
        assert _child_says() == "0"
    assert _thp_enabled("self") == "1" and _thp.disabled() is False
    assert _child_says() == "1"


def test_start_swrk_for_a_restore_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torpor._engine import _kdat, _rpc

    monkeypatch.setattr(_kdat, "ensure", lambda criu: None)
    fake = tmp_path / "criu"
    fake.write_text('#!/bin/sh\ngrep THP_enabled /proc/self/status > "$0.$$"\n')
    fake.chmod(0o755)
    for restoring, want in ((True, "0"), (False, "1")):
        proc = _rpc.start_swrk(str(fake), 0, restoring=restoring)
        assert proc.wait(10) == 0
        [said] = list(tmp_path.glob(f"criu.{proc.pid}"))
        assert said.read_text().split() == ["THP_enabled:", want], restoring
