"""``torpor checkpoint NAME --pool P`` (process stopped) against real CRIU: the push to the
pool is done by the detached checkpointer after its commit, so a SIGKILL of the command once
the image is written does not keep it from the pool; a push that fails keeps the image in the
local store under its name (``torpor restore NAME`` finds it) and says so in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from torpor._process._topool import memory_staging

from .crashes import children, reap_new, restores_and_continues, run_counter, subreaper
from .helpers import PYTHON, torpor, wait_for

pytestmark = pytest.mark.criu

BALLAST_MIB = 48  # a push long enough for the kill to land before it ends


def _checkpoint_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-m", "torpor", "checkpoint", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _staging_dirs(home: Path) -> list[Path]:
    """Where ``--pool`` checkpoints stage: the cache, or memory (``_topool.memory_staging``,
    where a process that fits is dumped)."""
    shm = memory_staging(0)
    return [home / "cache", *([shm] if shm is not None else [])]


def _pushes(home: Path) -> list[str]:
    """What ``--pool`` checkpoints left where they stage."""
    return sorted(
        n for d in _staging_dirs(home) for n in os.listdir(d) if n.startswith((".push-", "..push-"))
    )


def _pool_down(home: Path) -> str:
    """A dir pool ``down`` that cannot be opened (a file where its directory was); the
    error opening it says."""
    source = home / "down-pool"
    torpor("pool", "create", "down", "dir", f"source={source}")
    shutil.rmtree(source)
    source.write_bytes(b"")
    return f"cannot create dir pool {source}: File exists"


def _pool_names(pool: str) -> list[str]:
    rows = json.loads(torpor("images", "--pool", pool, "--json").stdout)
    return sorted(str(row["name"]) for row in rows)


def _killed_after_the_commit(home: Path, app_name: str, pid: int, image: str, pool: str) -> None:
    """Start ``checkpoint APP --name IMAGE --pool POOL`` of the app ``pid``, SIGKILL it once
    its image is committed in the cache, wait for everything it detached to end."""
    committed = [d / f".push-{image}-{pid}" / "torpor.json" for d in _staging_dirs(home)]
    before = children()
    with subreaper():
        cli = _checkpoint_cli(app_name, "--name", image, "--pool", pool)
        wait_for(
            lambda: any(c.exists() for c in committed) or cli.poll() is not None,
            timeout=60,
            what="commit",
        )
        assert cli.poll() is None, cli.communicate()  # killed before it ended on its own
        cli.kill()
        cli.communicate()
        reap_new(before, timeout=60)  # the checkpointer (and its push) have ended
    assert cli.returncode == -9


def test_a_command_killed_after_the_dump_still_gets_its_image_into_the_pool(
    torpor_home: Path,
) -> None:
    app, log = run_counter(torpor_home, "pa", BALLAST_MIB)
    _killed_after_the_commit(torpor_home, "pa", app.pid, "pimg", "default")
    assert not app.alive()
    assert _pool_names("default") == ["pimg"]
    # The cache copy was the push's: gone with it, and not listed any more.
    assert _pushes(torpor_home) == []
    local = json.loads(torpor("images", "--json").stdout)
    assert [row["name"] for row in local] == []
    # The pool's copy continues the app's count.
    pulled = Path(torpor("image", "pull", "pimg@default").stdout.strip())
    restores_and_continues(pulled, "pa-copy", app, log)


def test_a_failed_push_keeps_the_image_under_its_name(torpor_home: Path) -> None:
    # A pool that refuses unsigned images: the push fails after the dump stopped the app.
    why = _pool_down(torpor_home)
    app, log = run_counter(torpor_home, "pb", 0)
    out = torpor("checkpoint", "pb", "--name", "kimg", "--pool", "down", check=False)
    kept = torpor_home / "images" / "kimg"
    lines = out.stderr.splitlines()
    assert out.returncode != 0
    assert lines == [
        f"torpor: error: checkpoint of pid {app.pid}: the image was made but not stored in "
        f"pool 'down' ({why}); it is kept at {kept} — `torpor restore kimg` restores it; "
        f"`torpor image push {kept} kimg@down` stores it"
    ]
    assert not app.alive()
    assert torpor("images", "--pool", "down", check=False).returncode == 1
    rows = {row["name"]: row for row in json.loads(torpor("images", "--json").stdout)}
    assert sorted(rows) == ["kimg"]
    assert (rows["kimg"]["path"], rows["kimg"]["state"]) == (str(kept), "complete")
    assert _pushes(torpor_home) == []
    restores_and_continues(kept, "pb-copy", app, log)


def test_a_command_killed_before_a_failed_push_leaves_the_image_restorable_by_name(
    torpor_home: Path,
) -> None:
    _pool_down(torpor_home)
    app, log = run_counter(torpor_home, "pc", BALLAST_MIB)
    _killed_after_the_commit(torpor_home, "pc", app.pid, "cimg", "down")
    assert not app.alive()
    assert torpor("images", "--pool", "down", check=False).returncode == 1
    kept = torpor_home / "images" / "cimg"
    rows = {row["name"]: row for row in json.loads(torpor("images", "--json").stdout)}
    assert sorted(rows) == ["cimg"]
    assert (rows["cimg"]["path"], rows["cimg"]["state"]) == (str(kept), "complete")
    restores_and_continues(kept, "pc-copy", app, log)
    # By the name `torpor images` shows, too.
    new = torpor("restore", "cimg", "--name", "pc-copy2").stdout.split()
    assert new[0] == "pc-copy2"
    torpor("kill", "pc-copy2")
