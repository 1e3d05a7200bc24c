"""Every bad input of the supervision commands (``run`` with supervision options, ``supervise``,
``unsupervise``, ``resume``, ``stop``, ``events``, ``logs``) is refused with exactly one line
naming the problem and the fix, and starts nothing (no CRIU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from torpor._cli import main

DURATION_HINT = "write a number and a unit: 500ms, 10s, 1.5s, 5m, 1h (or 0)"


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORPOR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # the root-only commands get to their checks
    return tmp_path / "home"


RUN_U = ["run", "--name", "u", "--checkpoint-every", "1s"]

CASES = [
    (
        ["run", "--name", "u", "--checkpoint-every", "5x", "--", "true"],
        f"--checkpoint-every: invalid duration '5x' — {DURATION_HINT}",
    ),
    (
        ["run", "--name", "u", "--checkpoint-every", "10", "--", "true"],
        "--checkpoint-every: invalid duration '10': no unit — write 10s",
    ),
    (
        ["run", "--name", "u", "--checkpoint-every", "1s", "--min-uptime", "soon", "--", "true"],
        f"--min-uptime: invalid duration 'soon' — {DURATION_HINT}",
    ),
    (
        ["run", "--name", "u", "--checkpoint-every", "1s", "--restart-window", "0", "--", "true"],
        f"--restart-window must be longer than 0 — {DURATION_HINT}",
    ),
    (
        ["run", "--name", "u", "--checkpoint-every", "1s", "--keep", "0", "--", "true"],
        "--keep 0 is not within 1-10000 — keep 1 to 10000 checkpoints",
    ),
    (
        ["run", "--name", "u", "--checkpoint-every", "1s", "--keep", "two", "--", "true"],
        "--keep 'two' is not a whole number — e.g. --keep 3",
    ),
    (
        ["run", "--name", "u", "--checkpoint-every", "1s", "--restart", "bogus", "--", "true"],
        "--restart 'bogus' is not one of on-failure, always, no — use one of on-failure, "
        "always, no",
    ),
    (
        [*RUN_U, "--success-exit-codes", "0,x", "--", "true"],
        "--success-exit-codes 'x' is not a whole number — e.g. --success-exit-codes 3",
    ),
    (
        [*RUN_U, "--success-exit-codes", "300", "--", "true"],
        "--success-exit-codes 300 is not an exit code (0-255) — list exit codes 0-255, "
        "separated by commas",
    ),
    (
        ["run", "--name", "u", "--checkpoint-every", "1s", "--pool", "nopool", "--", "true"],
        "no pool named 'nopool' — `torpor pool list` shows the pools; `torpor pool create` "
        "makes one",
    ),
    (
        ["run", "--name", "u", "--keep", "2", "--", "true"],
        "--keep is a supervision option: it needs --checkpoint-every — add --checkpoint-every D "
        "(0: checkpoints only when the app asks)",
    ),
    (
        ["run", "--name", "u", "--no-restore", "--", "true"],
        "--no-restore goes with --resume — add --resume, or drop it",
    ),
    (
        ["run", "--resume", "--", "true"],
        "--resume needs --name (the process whose checkpoints to restore) — torpor run "
        "--resume --name N -- CMD",
    ),
    (
        ["supervise", "nosuch", "--checkpoint-every", "1s"],
        "no managed process named 'nosuch' — `torpor ps` lists managed processes",
    ),
    (
        ["unsupervise", "nosuch"],
        "'nosuch' is not supervised — `torpor ps` lists supervised processes",
    ),
    (
        ["resume", "nosuch"],
        "'nosuch' is not supervised here — torpor resume nosuch@POOL takes it over from a pool",
    ),
    (
        ["resume", "nosuch@nopool"],
        "no pool named 'nopool' — `torpor pool list` shows the pools; `torpor pool create` "
        "makes one",
    ),
    (
        ["resume"],
        "name what to resume: NAME, NAME@POOL or --all (one of them) — torpor resume --all",
    ),
    (
        ["resume", "--all", "x"],
        "name what to resume: NAME, NAME@POOL or --all (one of them) — torpor resume --all",
    ),
    (
        ["stop", "nosuch"],
        "no managed process named 'nosuch' — `torpor ps` lists managed processes",
    ),
    (
        ["events", "nosuch"],
        "no events of 'nosuch': it is not a managed process — `torpor ps -a` lists managed "
        "processes",
    ),
    (
        ["supervisor", "run", "--shutdown-timeout", "xx"],
        f"invalid duration 'xx' — {DURATION_HINT}",
    ),
]


@pytest.mark.parametrize(("argv", "line"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line(
    argv: list[str], line: str, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"torpor: error: {line}\n")
    # Nothing started: no process record, no supervision record.
    assert not (home / "procs").exists() or list((home / "procs").iterdir()) == []
    assert (
        not (home / "supervised").exists()
        or [p.name for p in (home / "supervised").iterdir() if p.suffix == ".json"] == []
    )


def test_logs_of_an_unknown_name(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["logs", "nosuch"]) == 1
    assert capsys.readouterr() == (
        "",
        f"torpor: error: no log of 'nosuch' ({home / 'logs' / 'nosuch.log'}) — `torpor ps -a` "
        "lists managed processes (started with --no-log: none)\n",
    )


def test_a_pool_that_exists_passes(home: Path) -> None:
    """The pool check refuses only a missing pool: the spec of the default pool is built."""
    import argparse

    from torpor._cli._supervise import add_options, spec_from

    p = argparse.ArgumentParser()
    add_options(p, interval_required=True)
    spec = spec_from(p.parse_args(["--checkpoint-every", "500ms", "--keep", "2"]), "n", ("x",))
    assert (spec.interval, spec.keep, spec.pool) == (0.5, 2, "default")
