"""``invariants.trapped_by_killed_criu``: the one accepted loss is exactly CRIU's own death
mid-infection (its fault fired on CRIU, the app ended by SIGTRAP, the command said so)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from .harness import Fault, Outcome
from .invariants import trapped_by_killed_criu

SAID = (
    "torpor: error: checkpoint of pid 6759 failed: CRIU was killed by SIGKILL before it "
    "answered (the process is gone; log: /x/dump.log) — something killed CRIU: retry\n"
)


def _case(tmp_path: Path, *, victim: str, status: int, said: str, fired: bool = True) -> bool:
    (tmp_path / "procs").mkdir(exist_ok=True)
    (tmp_path / "procs" / "a3.json").write_text(json.dumps({"exit_status": status}))
    out = Outcome(
        ("checkpoint", "a3"),
        1,
        "",
        said,
        Fault("criu", 0.009, victim),
        "killed criu (pid 1) at 0.155s" if fired else None,
    )
    lab: Any = SimpleNamespace(home=tmp_path)
    app: Any = SimpleNamespace(name="a3")
    return trapped_by_killed_criu(lab, app, out)


def test_criu_killed_mid_infection_is_the_accepted_loss(tmp_path: Path) -> None:
    assert _case(tmp_path, victim="criu", status=-signal.SIGTRAP, said=SAID)


@pytest.mark.parametrize(
    "victim, status, said, fired",
    [
        ("cli", -signal.SIGTRAP, SAID, True),  # torpor's own process killed: never accepted
        ("keeper", -signal.SIGTRAP, SAID, True),
        ("criu", -signal.SIGKILL, SAID, True),  # the app died otherwise
        ("criu", 0, SAID, True),
        ("criu", -signal.SIGTRAP, "torpor: error: checkpoint failed: no space\n", True),
        ("criu", -signal.SIGTRAP, SAID, False),  # the fault never fired
    ],
)
def test_every_other_loss_is_still_a_loss(
    tmp_path: Path, victim: str, status: int, said: str, fired: bool
) -> None:
    assert not _case(tmp_path, victim=victim, status=status, said=said, fired=fired)
