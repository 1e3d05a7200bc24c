"""Shared helpers for the integration tests: run the CLI, read managed processes' logs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from torpor._process import _registry

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


def copy_log(home: Path, name: str) -> Path:
    """The log the restored copy ``name`` appends its stdout and stderr to: its record's
    ``log_path``, which must be its own ``<home>/logs/NAME.log`` (never the original's)."""
    path = _registry.load(name).log_path
    assert path == str(home / "logs" / f"{name}.log"), path
    return Path(path)


PS_COLUMNS = ("NAME", "PID", "STATE", "UPTIME", "COMMAND", "RESTORED-FROM")
# torpor images
LOCAL_IMAGES_COLUMNS = ("NAME", "ID", "CREATED", "SIZE", "PID", "COMMAND", "PATH", "STATE")
POOL_IMAGES_COLUMNS = ("NAME", "ID", "CREATED", "SIZE", "STORED")  # torpor images --pool P


def parse_table(text: str, columns: Sequence[str]) -> dict[str, dict[str, str]]:
    """One of torpor's text tables (``ps``, ``images``, ``pool list``) as rows keyed by their
    first column: {first value: {column: value}}. The header must be exactly ``columns`` (a
    changed table fails here, not in a substring check that still finds its word somewhere),
    and columns are cut where the header's start (values may hold spaces)."""
    header, *lines = text.splitlines()
    assert tuple(header.split()) == tuple(columns), header
    starts = [header.index(column) for column in columns]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    rows: dict[str, dict[str, str]] = {}
    for line in lines:
        row = {c: line[a:b].strip() for c, (a, b) in zip(columns, bounds, strict=True)}
        key = row[columns[0]]
        assert key not in rows, f"{key} listed twice:\n{text}"
        rows[key] = row
    return rows


def parse_ps(text: str, *columns: str) -> dict[str, tuple[str, ...]]:
    """``torpor ps`` output (see :func:`parse_table`) as NAME -> the values of ``columns``."""
    return {
        name: tuple(row[c] for c in columns) for name, row in parse_table(text, PS_COLUMNS).items()
    }
