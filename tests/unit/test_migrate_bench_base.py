"""``bench/bench_migrate.py --base-src``: the before/after variant's arguments and commands."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_migrate as bm
import migrate_lab

SRC = Path(__file__).resolve().parents[2] / "src"


def test_base_variant_needs_a_tree_and_the_tree_needs_the_variant(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        bm.parse_args(["--variants", "base lazy"])
    with pytest.raises(SystemExit):
        bm.parse_args(["--base-src", str(SRC)])  # the default variants have no base
    with pytest.raises(SystemExit):
        bm.parse_args(["--variants", "base lazy", "--base-src", str(tmp_path)])  # no torpor
    args = bm.parse_args(["--variants", "torpor lazy,base lazy", "--base-src", str(SRC)])
    assert args.base_src == SRC and args.variant_list == ["torpor lazy", "base lazy"]
    assert "base lazy" not in bm.parse_args([]).variant_list


def test_base_agent_runs_from_the_tree_on_its_own_port(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[tuple[str, ...]] = []

    class Proc:
        def __init__(self, where: str) -> None:
            self.stdout = self
            self.where = where

        def readline(self) -> str:
            return f"listening on {self.where}\n"

    class Lab:
        def address(self, host: str) -> str:
            return "10.231.7.2"

        def start(self, host: str, *cmd: str) -> Proc:
            started.append((host, *cmd))
            return Proc(cmd[-1])

    assert migrate_lab.start_agent(Lab()) == "10.231.7.2:7070"  # type: ignore[arg-type]
    assert migrate_lab.start_agent(Lab(), SRC) == "10.231.7.2:7071"  # type: ignore[arg-type]
    assert started[0][:2] == ("b", sys.executable)
    assert started[1][:3] == ("b", "env", f"PYTHONPATH={SRC}")
