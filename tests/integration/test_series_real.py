"""Checkpoints of a (supervised) process against real CRIU: ``torpor checkpoint NAME
--leave-running --pool default --json`` reports CRIU's frozen time and what the pool grew by
(small for a second checkpoint of a process that barely changed), stages the dump in a private
directory in /dev/shm and leaves nothing there; the manifest of a supervised process's
checkpoint carries its supervision spec (pool push and local image alike), and a supervised
app's own ``torpor.checkpoint(..., leave_running=True)`` joins its series (pushed by its keeper
as the next member, recorded, pruned to keep)."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from torpor._images._image import Image
from torpor._pools import open_pool
from torpor._process._topool import memory_staging
from torpor._supervise import _events, _state
from torpor._supervise._series import members, series_name
from torpor._supervise._spec import Spec

from .crashes import run_counter, still_counting
from .helpers import APPS, PYTHON, counts, torpor, wait_for

pytestmark = pytest.mark.criu

_KEYS = {"image", "pool", "duration_s", "frozen_ms", "bytes", "new_bytes", "staged"}


def _checkpoint_json(*args: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(torpor("checkpoint", *args, "--json").stdout)
    assert set(out) == _KEYS
    return out


def _watch(directory: Path) -> tuple[threading.Event, set[str]]:
    """Names seen in ``directory`` until the event is set (polled every millisecond)."""
    stop = threading.Event()
    seen: set[str] = set()

    def poll() -> None:
        while not stop.wait(0.001):
            seen.update(os.listdir(directory))

    threading.Thread(target=poll, daemon=True).start()
    return stop, seen


def test_json_checkpoints_into_a_pool_are_staged_in_memory(torpor_home: Path) -> None:
    app, log = run_counter(torpor_home, "sj", 64)
    shm = memory_staging(0)  # the directory this home stages in (made if missing)
    assert shm is not None and shm.parent == Path("/dev/shm")
    st = os.stat(shm)
    assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o700)
    stop, seen = _watch(shm)
    try:
        first = _checkpoint_json("sj", "--leave-running", "--pool", "default", "--name", "sj.s1")
    finally:
        stop.set()
    # CRIU wrote there: the staging directory (``.<dest>.partial-<random>``), then the image.
    dest = f".push-sj.s1-{app.pid}"
    staged = [n for n in seen if n.startswith(f".{dest}.partial-")]
    assert len(staged) == 1 and seen <= {dest, staged[0]}
    assert os.listdir(shm) == []  # and nothing is left
    assert first["image"] == "sj.s1" and first["pool"] == "default"
    assert first["staged"] == "memory"
    assert 0 < first["frozen_ms"] < first["duration_s"] * 1000
    assert first["bytes"] > 64 << 20
    assert first["new_bytes"] > 0
    second = _checkpoint_json("sj", "--leave-running", "--pool", "default", "--name", "sj.s2")
    assert second["frozen_ms"] > 0
    # The ballast did not change: the pool had nearly all of it.
    assert 0 < second["new_bytes"] < first["new_bytes"] / 4
    assert os.listdir(shm) == []
    with open_pool("default") as pool:
        assert sorted(i.name for i in pool.list_images()) == ["sj.s1", "sj.s2"]
    still_counting(log, app.pid)


def test_a_local_json_checkpoint(torpor_home: Path) -> None:
    run_counter(torpor_home, "sl")
    dest = torpor_home / "local-img"
    out = _checkpoint_json("sl", "--leave-running", "-o", str(dest))
    assert out["image"] == str(dest) and out["pool"] is None and out["new_bytes"] is None
    assert out["staged"] == "disk" and out["frozen_ms"] > 0
    assert out["bytes"] == Image.open(dest).manifest.total_bytes


def test_a_supervised_process_s_checkpoints_carry_its_spec(torpor_home: Path) -> None:
    run_counter(torpor_home, "sup")
    spec = Spec(name="sup", command=("python3", "counter.py"), interval=1.0, keep=2)
    _state.save(_state.State(spec=spec, status="supervised"))
    dest = torpor_home / "sup-local"
    torpor("checkpoint", "sup", "--leave-running", "-o", str(dest))
    assert Image.open(dest).manifest.supervision == spec.to_json()
    torpor("checkpoint", "sup", "--leave-running", "--pool", "default", "--name", "sup.s000001")
    with open_pool("default") as pool:
        pulled = pool.pull("sup.s000001")
    assert pulled.manifest.supervision == spec.to_json()
    # Not supervised any more: its next checkpoint carries no spec.
    _state.save(_state.State(spec=spec, status="stopped"))
    other = torpor_home / "sup-after"
    torpor("checkpoint", "sup", "--leave-running", "-o", str(other))
    assert Image.open(other).manifest.supervision is None


def test_a_supervised_app_s_checkpoint_without_a_path_lands_in_its_series_only(
    torpor_home: Path,
) -> None:
    where = torpor_home / "selfck"
    where.mkdir(mode=0o700)
    app = [PYTHON, str(APPS / "self_checkpoint.py"), str(where), "series"]
    pid = int(torpor("run", "--name", "own", "--", *app).stdout.split()[1])
    log = torpor_home / "logs" / "own.log"
    wait_for(lambda: log.exists() and len(counts(log).get(pid, [])) >= 2, what="counting")
    spec = Spec(name="own", command=tuple(app), interval=0.0, keep=2)
    _state.save(_state.State(spec=spec, status="supervised"))
    before = set(Path(tempfile.gettempdir()).glob("torpor-checkpoint-*"))
    (where / "go").touch()
    done = where / "done-1"
    wait_for(lambda: done.exists() and done.read_text(), timeout=30, what="the checkpoint")
    # Answered once in the pool: the member named, no local image, its directory gone.
    assert (where / "done-1").read_text() == "False own.s000001@default None"
    assert set(Path(tempfile.gettempdir()).glob("torpor-checkpoint-*")) == before
    with open_pool("default") as pool:
        assert [i.name for i in members(pool, "own")] == ["own.s000001"]
        assert pool.pull("own.s000001").manifest.supervision == spec.to_json()
    still_counting(log, pid)


def _last_image(name: str) -> str | None:
    state = _state.read(name)
    if state is None or state.last_checkpoint is None:
        return None
    return state.last_checkpoint.image


def test_a_supervised_app_s_own_checkpoints_join_its_series(torpor_home: Path) -> None:
    where = torpor_home / "selfck"
    where.mkdir(mode=0o700)
    app = [PYTHON, str(APPS / "self_checkpoint.py"), str(where)]
    pid = int(torpor("run", "--name", "own", "--", *app).stdout.split()[1])
    log = torpor_home / "logs" / "own.log"
    wait_for(lambda: log.exists() and len(counts(log).get(pid, [])) >= 2, what="counting")
    spec = Spec(name="own", command=tuple(app), interval=0.0, keep=2)
    _state.save(_state.State(spec=spec, status="supervised"))
    # One of the supervisor's periodic checkpoints first: the app's own ones come after it.
    torpor("checkpoint", "own", "--leave-running", "--pool", "default", "--name", "own.s000001")
    for n in (1, 2):
        (where / "go").touch()
        done = where / f"done-{n}"
        wait_for(lambda d=done: d.exists() and d.read_text(), timeout=30, what=f"checkpoint {n}")
        assert (where / f"done-{n}").read_text() == "False"  # the original, running on
        assert Image.open(where / f"img-{n}").manifest.supervision == spec.to_json()
        wait_for(
            lambda n=n: _last_image("own") == series_name("own", n + 1),
            timeout=30,
            what=f"member {n + 1} recorded",
        )
    with open_pool("default") as pool:
        assert [i.name for i in members(pool, "own")] == ["own.s000003", "own.s000002"]
        assert pool.pull("own.s000003").manifest.supervision == spec.to_json()
    state = _state.read("own")
    assert state is not None and state.kept == 2
    last = state.last_checkpoint
    assert last is not None and last.frozen_ms is not None and last.frozen_ms > 0
    own = [e for e in _events.read("own") if e.kind == "checkpoint"]
    assert [e.fields["image"] for e in own] == ["own.s000002", "own.s000003"]
    assert {e.fields["by"] for e in own} == {"app"}
    still_counting(log, pid)
