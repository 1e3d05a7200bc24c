"""Acceptance of supervision (issue 8) on real CRIU, through the CLI as a user runs it.

- a real uvicorn server under keep-alive load from outside, checkpointed every second with
  its established connection: no request fails, one connection throughout, the count never
  skips or repeats (the client's p50 / p99 / max latency printed);
- pool cost: ten periodic checkpoints of a 200 MiB app changing 1 % a second cost under 1.5x
  its first image; after 30 periods with --keep 3 only the 3 newest remain;
- a corrupted newest checkpoint is skipped (event ``skipped`` naming it) and the one before
  restored; a crash-looping app falls back to older checkpoints and gives up within
  --max-restarts, or when no older one is left, ``torpor ps --json`` and ``torpor events
  --json`` saying why.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from torpor._pools import open_pool
from torpor._supervise import _series, _state

from .helpers import APPS, PYTHON, counts, torpor, wait_for
from .load import KeepAliveLoad
from .supervision import daemon as _daemon
from .supervision import kinds as _kinds
from .supervision import members as _members
from .supervision import running as _running
from .supervision import supervised_home

pytestmark = pytest.mark.criu
home = supervised_home

COUNTER = [PYTHON, str(APPS / "counter.py")]
CRASHER = [PYTHON, str(APPS / "crash_when_restored.py")]


def _seq(image: str) -> int:
    parsed = _series.parse_series_name(image)
    assert parsed is not None, image
    return parsed[1]


def _settled(name: str) -> None:
    """Wait until ``name`` is stopped and the supervisor runs no job (checkpoint, prune) any
    more: its pool is then only read."""
    wait_for(lambda: _state.read(name).status == "stopped", what=f"{name} stopped")  # type: ignore[union-attr]
    wait_for(lambda: not _daemon_jobs(), timeout=30, what="the supervisor's jobs to end")


def _daemon_jobs() -> list[str]:
    """The supervisor's children (the torpor commands it runs)."""
    ref = _daemon(Path(os.environ["TORPOR_HOME"]))
    assert ref is not None and ref.alive()
    path = Path(f"/proc/{ref.pid}/task/{ref.pid}/children")
    return path.read_text().split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ready(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/ready")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def _ps(name: str) -> dict[str, Any]:
    # -a: a process given up on has ended; plain `torpor ps` lists running ones only.
    rows = [r for r in json.loads(torpor("ps", "-a", "--json").stdout) if r["name"] == name]
    assert len(rows) == 1, rows
    row: dict[str, Any] = rows[0]
    return row


def _events_json(name: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = json.loads(torpor("events", name, "-n", "all", "--json").stdout)
    return events


# -- 1. uvicorn under keep-alive load --------------------------------------------------------


def test_uvicorn_under_keepalive_load_across_periodic_checkpoints(home: Path) -> None:
    port = _free_port()
    server = [PYTHON, str(APPS / "uvicorn_app.py"), str(port)]
    torpor("run", "--name", "web", "--checkpoint-every", "1s", "--tcp-established", "--", *server)
    wait_for(lambda: _ready(port), timeout=30, what="uvicorn to answer")
    first = _running("web")
    assert first is not None
    with KeepAliveLoad(port, rate=50) as load:
        start = len(_kinds("web", "checkpoint"))
        wait_for(
            lambda: len(_kinds("web", "checkpoint")) >= start + 7 or load.report.failures,
            timeout=40,
            what="7 periodic checkpoints under load",
        )
    report = load.report
    during = _kinds("web", "checkpoint")[start:]
    frozen = [e.fields["frozen_ms"] for e in during]
    print(f"\nuvicorn under keep-alive load across {len(during)} periodic checkpoints "
          f"(frozen ms {frozen}): {report.summary()}")  # fmt: skip
    assert report.failures == []
    assert len(report.ports) == 1  # one connection throughout
    # Every request counted once, in order, from the first: nothing lost, nothing replayed.
    assert report.counts == list(range(1, len(report.counts) + 1))
    assert len(during) >= 7
    assert _kinds("web", "checkpoint-failed") == []
    assert _kinds("web", "crash") == []
    # The very process that started answered throughout (checkpoints left it running).
    assert _running("web").pid == first.pid  # type: ignore[union-attr]


# -- 2. pool cost and pruning ----------------------------------------------------------------


def test_ten_checkpoints_of_a_200mib_app_changing_1pct_cost_under_1_5x_one(home: Path) -> None:
    app = [PYTHON, str(APPS / "churn.py"), "200", "1"]
    torpor("run", "--name", "churn", "--checkpoint-every", "1s", "--keep", "10", "--", *app)
    wait_for(lambda: _kinds("churn", "checkpoint"), timeout=60, what="the first checkpoint")
    with open_pool("default") as pool:
        one = pool.image("churn.s000001").stored_bytes
    assert one > 200 << 20  # random pages: the first image stores them all
    wait_for(lambda: len(_kinds("churn", "checkpoint")) >= 10, timeout=90, what="10 checkpoints")
    torpor("stop", "churn")
    _settled("churn")
    members = _members("churn")
    with open_pool("default") as pool:
        stats = pool.stats()
    ratio = stats.pack_bytes / one
    stored, first = stats.pack_bytes / 2**20, one / 2**20
    print(f"\n{len(members)} checkpoints of a 200 MiB app changing 1 %/s: pool stores "
          f"{stored:.1f} MiB, one image {first:.1f} MiB: {ratio:.2f}x")  # fmt: skip
    assert len(members) == 10
    assert members[-1] in ("churn.s000001", "churn.s000002")  # at most one more was taken
    assert ratio < 1.5


def test_after_30_periods_only_keep_checkpoints_remain(home: Path) -> None:
    torpor("run", "--name", "pr", "--checkpoint-every", "100ms", "--keep", "3", "--", *COUNTER)
    wait_for(lambda: len(_kinds("pr", "checkpoint")) >= 30, timeout=60, what="30 checkpoints")
    torpor("stop", "pr")
    _settled("pr")
    taken = [e.fields["image"] for e in _kinds("pr", "checkpoint")]
    assert taken[:30] == [f"pr.s{i:06d}" for i in range(1, 31)]
    assert _members("pr") == taken[::-1][:3]
    with open_pool("default") as pool:
        assert sorted(i.name for i in pool.list_images()) == sorted(taken[-3:])
    assert _state.read("pr").kept == 3  # type: ignore[union-attr]


# -- 3. a corrupted checkpoint, a crash loop -------------------------------------------------


def _packs() -> set[str]:
    with open_pool("default") as pool:
        return {k.rsplit("/", 1)[-1] for k in pool.backend.list("index/")}


def _flip(pack_id: str) -> None:
    """Flip a byte in the middle of the stored pack ``pack_id`` of the home's dir pool."""
    from torpor._pools._pack import pack_key

    with open_pool("default") as pool:
        data = bytearray(pool.backend.get(pack_key(pack_id)))
        data[len(data) // 2] ^= 0x5A
        pool.backend.put(pack_key(pack_id), bytes(data))


def test_a_corrupted_newest_checkpoint_is_skipped_for_the_one_before(home: Path) -> None:
    torpor(
        "run", "--name", "cor", "--checkpoint-every", "3s", "--min-uptime", "0", "--",
        *COUNTER,
    )  # fmt: skip
    rec = _running("cor")
    assert rec is not None
    # The packs of checkpoint 2 are those the pool gained between checkpoints 1 and 2 (the
    # pool's garbage collection runs after the first prune, then 30 s later: not between).
    wait_for(lambda: len(_kinds("cor", "checkpoint")) == 1, timeout=20, what="checkpoint 1")
    wait_for(lambda: _state.read("cor").kept == 1, what="the prune of checkpoint 1")  # type: ignore[union-attr]
    wait_for(lambda: not _daemon_jobs(), what="the supervisor's jobs to end")
    before = _packs()
    wait_for(lambda: len(_kinds("cor", "checkpoint")) == 2, timeout=20, what="checkpoint 2")
    new = sorted(_packs() - before)
    assert len(new) >= 1
    for pack_id in new:
        _flip(pack_id)
    # The newest checkpoint's local copy (kept for fast restores) would be restored from
    # instead, and is sound: gone, as on another host, the pool's copy is what is left.
    local = home / "images" / "cor.s000002"
    assert local.is_dir()
    shutil.rmtree(local)
    assert _members("cor") == ["cor.s000002", "cor.s000001"]
    os.kill(rec.pid, signal.SIGKILL)  # the app this test started
    back = wait_for(lambda: _running("cor", other_than=rec.pid), timeout=15, what="a restore")
    wait_for(lambda: _kinds("cor", "restore"), what="the restore event")
    skipped = _kinds("cor", "skipped")
    assert [e.fields["image"] for e in skipped] == ["cor.s000002"]
    error = re.fullmatch(
        r"image 'cor\.s000002' in pool 'default' is corrupted: file (pages-\d+\.img), chunk \d+ "
        r"\(sha256 [0-9a-f]{16}…\) in pack ([0-9a-f]{32}) does not match its SHA-256 — the image "
        r"was refused before any use; use another image",
        skipped[0].fields["error"],
    )
    assert error is not None, skipped[0].fields["error"]
    assert error[2] in new
    assert [e.fields["image"] for e in _kinds("cor", "restore")] == ["cor.s000001"]
    assert _kinds("cor", "restore-failed") == []
    # The restored copy continues from checkpoint 1: on, not from zero.
    after = wait_for(lambda: counts(home / "logs" / "cor.log").get(back.pid), what="output")  # type: ignore[attr-defined]
    assert after[0] > 1  # type: ignore[index]
    kinds = [e["kind"] for e in _events_json("cor")]
    assert kinds[kinds.index("crash") :][:3] == ["crash", "skipped", "restore"]


def _crash_loop(name: str, where: Path, *options: str, checkpoints: int) -> list[str]:
    """Run the app that crashes whenever it is restored, wait for ``checkpoints`` of it, make
    it segfault and wait for the supervisor to give up; the images it restored, in order."""
    torpor(
        "run", "--name", name, "--checkpoint-every", "300ms", "--min-uptime", "5s", *options,
        "--", *CRASHER, str(where),
    )  # fmt: skip
    rec = _running(name)
    assert rec is not None
    wait_for(lambda: len(_kinds(name, "checkpoint")) >= checkpoints, timeout=30, what="checkpoints")
    # A segfault: a fault of its own (a SIGKILL from outside may not count towards
    # --max-restarts).
    (where / "segv").write_text("")
    wait_for(lambda: _state.read(name).status == "given-up", timeout=40, what="a give-up")  # type: ignore[union-attr]
    assert _running(name) is None
    crashes = [(e.fields["signal"], e.fields["exit_code"]) for e in _kinds(name, "crash")]
    restores = [e.fields["image"] for e in _kinds(name, "restore")]
    # A (None, None) here is a supervisor bug seen ~1 run in 4: a copy that exits 1 within
    # ~20 ms of its restore is recorded as "ended (exit status unknown: its keeper is gone
    # too)" although its keeper lives and records exit 1 (_daemon._restored hands _on_end the
    # record it read before the copy ended, instead of waiting for the keeper's exit status).
    assert crashes == [(11, None)] + [(None, 1)] * len(restores), "exit status lost"
    # Each restored copy failed within --min-uptime: below 5 s, as the crash events say.
    assert all(0 < e.fields["uptime_s"] < 5 for e in _kinds(name, "crash")[1:])
    return restores


def test_a_crash_loop_falls_back_then_gives_up_after_max_restarts(
    home: Path, tmp_path: Path
) -> None:
    restores = _crash_loop("loop", tmp_path, "--keep", "10", "--max-restarts", "3", checkpoints=5)
    assert len(restores) == 3
    newest = _seq(restores[0])
    # Each attempt one checkpoint older than the copy that just failed.
    assert restores == [f"loop.s{newest - i:06d}" for i in range(3)]
    reason = "exited 1; already restored 3 times within 5m (--max-restarts 3)"
    give_up = [e for e in _events_json("loop") if e["kind"] == "give-up"]
    assert [(e["reason"]) for e in give_up] == [reason]
    sup = _ps("loop")["supervision"]
    assert (sup["status"], sup["given_up"], sup["restores"]) == ("given-up", reason, 3)
    assert {k: sup["last_crash"][k] for k in ("signal", "exit_code")} == {
        "signal": None,
        "exit_code": 1,
    }
    assert (_ps("loop")["state"], _ps("loop")["exit_status"]) == ("exited 1", 1)
    # Plain `torpor ps` (no -a) shows what the supervisor gave up on, and why.
    lines = torpor("ps").stdout.splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == ["loop"]
    assert lines[-1] == f"loop: given up: {reason}"


def test_a_crash_loop_gives_up_when_no_older_checkpoint_is_left(home: Path, tmp_path: Path) -> None:
    restores = _crash_loop("dry", tmp_path, "--keep", "2", "--max-restarts", "10", checkpoints=4)
    assert len(restores) == 2
    newest = _seq(restores[0])
    assert restores == [f"dry.s{newest:06d}", f"dry.s{newest - 1:06d}"]
    reason = (
        f"exited 1 within --min-uptime of its restore from {restores[1]}, and no older "
        "checkpoint is left to fall back to"
    )
    give_up = [e for e in _events_json("dry") if e["kind"] == "give-up"]
    assert [e["reason"] for e in give_up] == [reason]
    sup = _ps("dry")["supervision"]
    assert (sup["status"], sup["given_up"], sup["restores"]) == ("given-up", reason, 2)
