"""Issue 3's remaining acceptance against real CRIU: an open file refused with its path named,
accepted once a policy says ``reopen``; a SnapStart-hooked module working unchanged."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from .helpers import PYTHON, torpor, wait_for

pytestmark = pytest.mark.criu

POLICY_APP = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import torpor

    out = Path(sys.argv[1])
    data = open(out / "data.txt", "w")
    data.write("first\\n"); data.flush()

    def note(text):
        with open(out / "events", "a") as fh:
            fh.write(text + "\\n")

    try:
        torpor.checkpoint(out / "img1", leave_running=True)
        note("unexpected: first checkpoint passed")
    except torpor.CheckpointRefusedError as exc:
        note("refused: " + str(exc).replace("\\n", " | "))
    torpor.add_fd_rules(torpor.FdRule(type="file", path=str(out / "*.txt"), action="reopen",
                                      warn=False))
    result = torpor.checkpoint(out / "img2", leave_running=True)
    data.write(f"after restored={result.restored}\\n"); data.flush()
    note(f"checkpointed restored={result.restored}")
    while True:
        time.sleep(0.05)
    """
)

SNAPSTART_MODULE = textwrap.dedent(
    """
    # Written for AWS Lambda SnapStart's Python runtime hooks; not a line of torpor in it.
    import os
    from snapshot_restore_py import register_after_restore, register_before_snapshot

    OUT = os.environ["OUT"]

    def note(text):
        with open(os.path.join(OUT, "events"), "a") as fh:
            fh.write(f"{os.readlink('/proc/self')} {text}\\n")

    @register_before_snapshot
    def before():
        note("before-snapshot")

    @register_after_restore
    def after():
        note("after-restore")

    def handler(event, context):
        return {"ok": True}
    """
)

SNAPSTART_MAIN = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[1])
    import lambda_function  # noqa: F401  (registers its SnapStart hooks at import)
    lambda_function.note("ready")
    while True:
        time.sleep(0.05)
    """
)


def test_open_file_refused_then_reopened_by_policy(torpor_home: Path, tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(POLICY_APP)
    torpor("run", "--name", "pol", "--", PYTHON, str(app), str(tmp_path))
    events = tmp_path / "events"
    wait_for(lambda: events.exists() and "checkpointed" in events.read_text(), what="checkpoints")
    refused, checkpointed = events.read_text().splitlines()
    assert refused.startswith("refused: ") and str(tmp_path / "data.txt") in refused, refused
    assert checkpointed == "checkpointed restored=False"
    assert not (tmp_path / "img1").exists()
    assert (tmp_path / "img2" / "torpor.json").exists()
    torpor("restore", str(tmp_path / "img2"), "--name", "pol-copy")
    wait_for(
        lambda: "after restored=True" in (tmp_path / "data.txt").read_text().splitlines(),
        what="the restored copy to write through its reopened file",
    )


def test_snapstart_hooked_module_works_unchanged(
    torpor_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lambda_function.py").write_text(SNAPSTART_MODULE)
    main = tmp_path / "main.py"
    main.write_text(SNAPSTART_MAIN)
    monkeypatch.setenv("OUT", str(tmp_path))
    events = tmp_path / "events"
    out = torpor("run", "--name", "snap", "--", PYTHON, str(main), str(tmp_path)).stdout
    pid = int(out.split()[1])
    wait_for(lambda: events.exists() and "ready" in events.read_text(), what="the app")
    torpor("checkpoint", "snap", "--name", "snap-img")
    assert events.read_text().splitlines() == [f"{pid} ready", f"{pid} before-snapshot"]
    new_pid = int(torpor("restore", "snap-img").stdout.split()[1])
    wait_for(
        lambda: f"{new_pid} after-restore" in events.read_text().splitlines(),
        what="the after-restore hook",
    )
    assert events.read_text().splitlines() == [
        f"{pid} ready",
        f"{pid} before-snapshot",
        f"{new_pid} after-restore",
    ]
