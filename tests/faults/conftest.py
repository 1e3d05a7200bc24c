"""Fixtures of the fault suite: a lab (private home, process tree with this process as the
subreaper) per test, and tmpfs mounts for full disks, each torn down by the test."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import BASE_SEED, ITERATIONS, LAUNCHER, Lab
from .procs import Tree


def pytest_report_header(config: pytest.Config) -> str:
    return f"torpor faults: TORPOR_FAULT_SEED={BASE_SEED} TORPOR_FAULT_ITERATIONS={ITERATIONS}"


@pytest.fixture
def tree() -> Iterator[Tree]:
    """This process as a subreaper for the test; everything the test started is killed (by
    pid) at its end."""
    with Tree() as t:
        yield t


@pytest.fixture
def make_lab(
    tree: Tree, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Lab]]:
    """Make the test's lab: ``make_lab(home=None, agent=False)``. A home on a mount is the
    test's to make (see :func:`tmpfs`); an agent is started in it through the launcher."""
    labs: list[Lab] = []

    def make(home: Path | None = None, agent: bool = False) -> Lab:
        if home is None:
            home = tmp_path / "home"
            home.mkdir(mode=0o700)
        scratch = tmp_path / f"lab{len(labs)}"
        scratch.mkdir()
        lab = Lab(tree=tree, home=home, tmp=scratch, scenario=request.node.name)
        labs.append(lab)
        lab.note(f"fault scenario {lab.scenario}: home {home}")
        if agent:
            _start_agent(lab)
        return lab

    yield make
    for lab in labs:
        if lab.agent is not None and lab.agent.alive():
            with contextlib.suppress(Exception):
                lab.cli("agent", "stop", timeout=20)
        lab.agent = None
    left = tree.kill_all()
    assert not left, f"processes outlived SIGKILL: {left}"


def _start_agent(lab: Lab) -> None:
    import json

    from .procs import Ref

    if not os.access(LAUNCHER, os.X_OK):
        pytest.fail(f"{LAUNCHER} is not installed: run scripts/setup.sh")
    lab.cli_prefix = (LAUNCHER,)
    lab.use_agent = True
    out = lab.cli("agent", "start")
    assert out.rc == 0 and out.stdout.startswith("agent started (pid "), out
    data = json.loads((lab.home / "agent.pid").read_text())
    lab.agent = Ref(data["pid"], data["start_time"])


@pytest.fixture
def tmpfs(tree: Tree, tmp_path: Path) -> Iterator[Callable[[str, int], Path]]:
    """``tmpfs(name, size)``: a fresh tmpfs of ``size`` bytes (mode 0700) at ``tmp_path/name``,
    unmounted when the test ends (after its processes are killed)."""
    mounts: list[Path] = []

    def mount(name: str, size: int) -> Path:
        where = tmp_path / name
        where.mkdir(mode=0o700)
        run = tree.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
            os.environ,
        )
        assert run.returncode == 0, f"mount tmpfs at {where}: {run.stderr}"
        mounts.append(where)
        return where

    yield mount
    tree.kill_all()
    for where in reversed(mounts):
        for _attempt in range(50):
            run = tree.run(["umount", str(where)], os.environ)
            if run.returncode == 0:
                break
            time.sleep(0.1)
        else:
            tree.run(["umount", "-l", str(where)], os.environ)
            pytest.fail(f"tmpfs {where} stayed busy: {run.stderr} (lazily unmounted)")
