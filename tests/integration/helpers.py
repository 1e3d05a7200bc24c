"""Shared helpers for the integration tests: run the CLI, read managed processes' logs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

APPS = Path(__file__).parent / "apps"
PYTHON = sys.executable


def torpor(
    *args: str,
    check: bool = True,
    timeout: float = 120,
    command: Sequence[str] = (PYTHON, "-m", "torpor"),
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """Run the torpor CLI (as a user would) with the test's TORPOR_HOME: in-process by default,
    or through ``command`` (the installed launcher), with ``env`` added to the environment."""
    proc = subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **env),
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torpor {' '.join(args)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def wait_for(pred: Callable[[], object], timeout: float = 10, what: str = "condition") -> object:
    """Poll ``pred`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def counts(log: Path) -> dict[int, list[int]]:
    """Parse a counter app's log: host pid -> the counts it printed, in order."""
    out: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            out.setdefault(int(parts[0]), []).append(int(parts[1]))
    return out
