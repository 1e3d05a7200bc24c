"""Issue 11's signed-images acceptance against the real thing: two torpor homes (two host
identities) share a real ``dir`` pool through the CLI; a real process checkpointed on one is
refused on the other while the pool requires signatures from trusted keys, and restores (and
goes on counting) once that host's key is trusted."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from torpor._process._proc import running

from .helpers import APPS, PYTHON, copy_log, counts, parse_ps, torpor, wait_for

pytestmark = pytest.mark.criu


def test_require_signed_refuses_an_untrusted_host_then_restores_a_trusted_one(
    torpor_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    maker = tmp_path_factory.mktemp("maker-host")  # the other host; torpor_home restores
    shared = tmp_path_factory.mktemp("shared") / "pool"
    there = {"TORPOR_HOME": str(maker)}
    torpor("pool", "create", "shared", "dir", f"source={shared}", **there)
    out = torpor("run", "--name", "count", "--", PYTHON, str(APPS / "counter.py"), **there)
    pid = int(out.stdout.split()[1])
    try:
        log = maker / "logs" / "count.log"
        wait_for(lambda: log.exists() and len(counts(log).get(pid, [])) >= 5, what="counting")
        torpor("checkpoint", "count", "--pool", "shared", "--name", "img", **there)
        wait_for(lambda: not running(pid), what="the original to stop")
    finally:
        if running(pid):
            os.kill(pid, signal.SIGKILL)
    last = counts(log)[pid][-1]
    kept = log.read_bytes()
    maker_key = torpor("identity", "show", **there).stdout.strip()
    my_key = torpor("identity", "show").stdout.strip()
    assert maker_key != my_key and len(maker_key) == 64

    torpor("pool", "create", "shared", "dir", f"source={shared}")  # adopts the shared pool
    torpor("pool", "set", "shared", "security.require_signed=true")
    refused = torpor("restore", "img@shared", check=False)
    assert refused.returncode == 1
    assert refused.stderr == (
        f"torpor: error: image 'img' in pool 'shared' is signed by key {maker_key}, which pool"
        f" 'shared' does not trust; refused — if that host is trusted:"
        f" torpor pool set shared security.trusted_keys={maker_key}\n"
    )
    assert parse_ps(torpor("ps", "-a").stdout, "PID") == {}
    assert not (torpor_home / "cache" / "images").exists() or not list(
        (torpor_home / "cache" / "images").iterdir()
    )

    torpor("pool", "set", "shared", f"security.trusted_keys={maker_key}")
    new_pid = int(torpor("restore", "img@shared").stdout.split()[1])
    # The copy writes to a log of its own in this home, not to the other host's.
    own = copy_log(torpor_home, "img")
    wait_for(lambda: len(counts(own).get(new_pid, [])) >= 3, what="the restored copy counting")
    resumed = counts(own)[new_pid]
    assert resumed[0] in (last + 1, last + 2), (last, resumed[:3])
    assert list(counts(own)) == [new_pid]
    assert log.read_bytes() == kept
