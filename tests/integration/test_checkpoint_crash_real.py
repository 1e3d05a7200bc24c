"""Issue 12's first acceptance line, SIGKILL part, against real CRIU: ``torpor checkpoint``
(process stopped) killed at many moments, interrupted by SIGTERM/SIGHUP/SIGINT while CRIU
dumps, its checkpointer killed; each time the process runs (free, counting), or its image is
complete, restores and continues the count — never both lost, nothing left frozen."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from torpor._images._incomplete import COMMITTING_NAME
from torpor._process._proc import ProcRef
from torpor._safe import SPARE_PREFIX

from .crashes import (
    checkpointer_of,
    children,
    fill,
    frozen,
    leftovers,
    mount_tmpfs,
    reap_new,
    restores_and_continues,
    run_counter,
    still_counting,
    subreaper,
)
from .helpers import LOCAL_IMAGES_COLUMNS, PYTHON, parse_ps, parse_table, torpor, wait_for

pytestmark = pytest.mark.criu

ITERATIONS = 15
AT_DEATH = 4  # of them: the command killed the moment CRIU has killed the process
BALLAST_MIB = 64  # a dump long enough for kills to land inside it
SEED = int(os.environ.get("TORPOR_CRASH_SEED", "1207"))


def _checkpoint_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-m", "torpor", "checkpoint", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _traced(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "TracerPid:\t0\n" not in status


def _settle(home: Path, name: str, app, log: Path) -> str:  # type: ignore[no-untyped-def]
    """After the command ended (killed or not) and every process it detached ended: the
    invariants. Returns ``running`` or ``restored``."""
    images = home / "images"
    assert leftovers(images) == []  # a command's death never leaves an image unfinished
    image = images / f"{name}-img"
    if app.alive():
        assert frozen(app.pid) is None
        assert not image.exists()
        still_counting(log, app.pid)
        assert parse_ps(torpor("ps").stdout, "PID", "STATE")[name] == (str(app.pid), "running")
        torpor("kill", name)
        return "running"
    # The process is gone: its image must be whole, and the record says where it went.
    assert parse_ps(torpor("ps", "-a").stdout, "PID", "STATE")[name] == (
        str(app.pid),
        "checkpointed",
    )
    restores_and_continues(image, f"{name}-copy", app, log)
    return "restored"


def test_sigkill_at_many_moments_never_loses_the_process(torpor_home: Path) -> None:
    rng = random.Random(SEED)
    # How long a checkpoint command takes here, start to end (the moments are drawn in it).
    app, _ = run_counter(torpor_home, "calibrate", BALLAST_MIB)
    started = time.monotonic()
    torpor("checkpoint", "calibrate", "--leave-running", "-o", str(torpor_home / "calibration"))
    span = time.monotonic() - started
    torpor("kill", "calibrate")
    moments: list[float | None] = [rng.uniform(0, span) for _ in range(ITERATIONS - AT_DEATH)]
    moments += [None] * AT_DEATH
    rng.shuffle(moments)

    outcomes: list[str] = []
    deadline = time.monotonic() + 90
    for i, moment in enumerate(moments):
        name = f"app{i}"
        app, log = run_counter(torpor_home, name, BALLAST_MIB)
        before = children()
        with subreaper():
            cli = _checkpoint_cli(name, "--name", f"{name}-img")
            if moment is None:
                ended = lambda a=app, c=cli: _gone(a.pid) or c.poll() is not None  # noqa: E731
                assert _soon(ended), "no dump"
            else:
                time.sleep(moment)
            cli.kill()
            cli.communicate()
            reap_new(before, timeout=30)  # the checkpointer, and CRIU, have ended
        outcomes.append(_settle(torpor_home, name, app, log))
        assert time.monotonic() < deadline, f"{i + 1} iterations took too long: {outcomes}"
    print(f"seed {SEED}, span {span:.3f}s, moments {moments}: {outcomes}")
    # Both ways out were taken: kills that came while CRIU wrote aborted, the later ones did not.
    assert set(outcomes) == {"running", "restored"}, outcomes
    assert outcomes.count("restored") >= AT_DEATH


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_while_criu_dumps_aborts_and_the_process_runs_on(
    torpor_home: Path, sig: signal.Signals
) -> None:
    app, log = run_counter(torpor_home, "sig", 256)
    cli = _checkpoint_cli("sig", "--name", "sig-img")
    wait_for(lambda: _traced(app.pid) or cli.poll() is not None, what="CRIU to seize the app")
    cli.send_signal(sig)
    out, err = cli.communicate(timeout=60)
    assert (cli.returncode, out, err) == (
        130,
        "",
        f"torpor: error: checkpoint of pid {app.pid} aborted: the command was interrupted before "
        "CRIU had written the image (CRIU thawed it; the process keeps running)\n",
    )
    assert frozen(app.pid) is None
    still_counting(log, app.pid)
    assert leftovers(torpor_home / "images") == []
    assert not (torpor_home / "images" / "sig-img").exists()
    # And the next checkpoint of it simply works.
    torpor("checkpoint", "sig", "--name", "sig-img")
    restores_and_continues(torpor_home / "images" / "sig-img", "sig-copy", app, log)


def test_a_checkpointer_killed_while_criu_dumps_leaves_the_process_running(
    torpor_home: Path,
) -> None:
    """CRIU's post-dump question goes unanswered: CRIU thaws the process. The staging
    directory left behind is removed by the next checkpoint, which works."""
    app, log = run_counter(torpor_home, "ck", 256)
    before = children()
    with subreaper():
        cli = _checkpoint_cli("ck", "--name", "ck-img")
        checkpointer = checkpointer_of(cli, before)
        wait_for(lambda: _traced(app.pid), what="CRIU to seize the app")
        os.kill(checkpointer, signal.SIGKILL)
        _, err = cli.communicate(timeout=60)
        reap_new(before, timeout=30)
    assert cli.returncode == 1
    assert err == (
        f"torpor: error: checkpoint of pid {app.pid} failed: the checkpointer ended before CRIU "
        "had written the image (the process keeps running; nothing was kept) — checkpoint it "
        "again\n"
    )
    assert frozen(app.pid) is None
    still_counting(log, app.pid)
    assert leftovers(torpor_home / "images") == []  # removed on the way: it was stale
    torpor("checkpoint", "ck", "--name", "ck-img")
    restores_and_continues(torpor_home / "images" / "ck-img", "ck-copy", app, log)


def _soon(pred: Callable[[], bool], timeout: float = 30) -> bool:
    """Poll ``pred`` tightly (a commit takes milliseconds); whether it came true in time."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0002)
    return True


def _kill_checkpointer_at_death(home: Path, name: str, dest: Path) -> tuple[ProcRef, Path, str]:
    """A counter ``name`` checkpointed into ``dest`` whose checkpointer is killed the moment
    CRIU has killed the counter, before the image is committed (tried again with a new
    counter if the commit was quicker)."""
    for attempt in range(5):
        app, log = run_counter(home, f"{name}{attempt}")
        before = children()
        with subreaper():
            cli = _checkpoint_cli(f"{name}{attempt}", "-o", str(dest), "--name", dest.name)
            checkpointer = checkpointer_of(cli, before)
            assert _soon(lambda a=app: _gone(a.pid)), "CRIU did not kill the app"
            os.kill(checkpointer, signal.SIGKILL)
            _, err = cli.communicate(timeout=60)
            reap_new(before, timeout=30)
        if leftovers(dest.parent):
            assert cli.returncode == 1
            return app, log, err
        assert (dest / "torpor.json").exists()  # committed before the kill: fine, again
        subprocess.run(["rm", "-rf", str(dest)], check=True)
    raise AssertionError("the checkpointer always committed before it could be killed")


def test_a_checkpointer_killed_once_the_process_is_gone_leaves_a_repairable_image(
    torpor_home: Path,
) -> None:
    images = torpor_home / "images"
    app, log, err = _kill_checkpointer_at_death(torpor_home, "inc", images / "inc-img")
    (staging,) = leftovers(images)
    assert err == (
        f"torpor: error: checkpoint of pid {app.pid}: the checkpointer ended before its image "
        f"was finished (the process is gone); it is kept at {images / staging} — `torpor image "
        f"repair {images / staging}` finishes it\n"
    )
    res = torpor("images")
    rows = parse_table(res.stdout, LOCAL_IMAGES_COLUMNS)
    assert {k: (r["ID"], r["PID"], r["PATH"], r["STATE"]) for k, r in rows.items()} == {
        "inc-img": ("", str(app.pid), str(images / staging), "incomplete")
    }
    assert res.stderr == (
        f"torpor: warning: image 'inc-img' is incomplete (kept at {images / staging}): "
        "`torpor image repair inc-img` finishes it\n"
    )
    assert torpor("restore", "inc-img", check=False).returncode == 1  # not an image yet
    repaired = torpor("image", "repair", "inc-img")
    assert repaired.stdout == f"{images / 'inc-img'}\n"
    assert leftovers(images) == []
    rows = parse_table(torpor("images").stdout, LOCAL_IMAGES_COLUMNS)
    assert (rows["inc-img"]["PATH"], rows["inc-img"]["STATE"]) == (str(images / "inc-img"), "ok")
    restores_and_continues(images / "inc-img", "inc-copy", app, log)


def test_repair_on_a_full_disk_says_so_and_works_once_there_is_space(
    torpor_home: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    mount_tmpfs(disk, 64 << 10)
    try:
        app, log, _ = _kill_checkpointer_at_death(torpor_home, "full", disk / "img")
        (staging,) = leftovers(disk)
        # The disk fills, and the space the checkpoint had reserved is spent too.
        mark = disk / staging / COMMITTING_NAME
        if mark.exists():
            os.truncate(mark, 0)
        spares = sorted((disk / staging).glob(f"{SPARE_PREFIX}*"))
        assert [p.name for p in spares] == [f"{SPARE_PREFIX}{i}" for i in range(3)]
        for spare in spares:
            spare.unlink()
        filler = fill(disk)
        res = torpor("image", "repair", str(disk / "img"), check=False)
        assert (res.returncode, res.stdout, res.stderr) == (
            1,
            "",
            f"torpor: error: cannot finish the image in {disk / staging}: no space left on "
            f"{disk} (0 B free) — free space, then run `torpor image repair {disk / staging}` "
            "again\n",
        )
        assert leftovers(disk) == [staging]
        filler.unlink()
        repaired = torpor("image", "repair", str(disk / "img"))
        assert repaired.stdout == f"{disk / 'img'}\n"
        restores_and_continues(disk / "img", "full-copy", app, log)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


AGENT_TORPOR = Path(PYTHON).parent / "torpor"  # the native launcher


@pytest.mark.parametrize("when", ["while CRIU dumps", "once the process is gone"])
def test_through_the_agent_the_clients_death_is_the_same(torpor_home: Path, when: str) -> None:
    """The agent's worker runs the command, so the launcher's death (SIGKILL) reaches it as an
    interrupt: while CRIU dumps it aborts (the process runs on); once CRIU stopped the process
    the worker's checkpointer commits the image."""
    launcher = [str(AGENT_TORPOR)]
    torpor("agent", "start", command=launcher)
    try:
        app, log = run_counter(torpor_home, "ag", 256 if when == "while CRIU dumps" else 0)
        client = subprocess.Popen(
            [*launcher, "checkpoint", "ag", "--name", "ag-img"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if when == "while CRIU dumps":
            assert _soon(lambda: _traced(app.pid)), "CRIU did not seize the app"
        else:
            assert _soon(lambda: _gone(app.pid)), "CRIU did not kill the app"
        client.kill()
        client.communicate()
        images = torpor_home / "images"
        # The checkpointer is not ours to wait for: its staging directory goes when it ends.
        wait_for(lambda: leftovers(images) == [], timeout=30, what="the checkpointer to end")
        if when == "while CRIU dumps":
            wait_for(lambda: not _traced(app.pid), what="CRIU to let go")
            assert frozen(app.pid) is None
            still_counting(log, app.pid)
            assert not (images / "ag-img").exists()
        else:
            restores_and_continues(images / "ag-img", "ag-copy", app, log)
    finally:
        torpor("agent", "stop", command=launcher, check=False)
