"""Issue 10 point 2 on a real Ceph cluster: ``torpor restore NAME@POOL --lazy`` from a ``ceph``
(RADOS) pool and from an ``s3`` (RGW) pool, nothing of the image local beforehand.

A 128 MiB app (``apps/lazy_ballast.py``: random bytes, never zeros) is checkpointed into the
pool, every local copy removed, then restored lazily: only the small files and the non-lazy
pages are local at resume, it answers with the original's answer, becomes fully resident (the
lazy pages fetched from the cluster, each chunk verified), and the checksum of all its memory
matches the original's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration.helpers import APPS, PYTHON, copy_log, torpor, wait_for

from torpor._lazy import _restore as lazy
from torpor._pools import create_pool, delete_pool

pytestmark = [pytest.mark.ceph, pytest.mark.criu]

MIB = 128


@pytest.fixture(autouse=True)
def _pipe_max_size() -> None:
    """CRIU's lazy page transfer splices through pipes of up to 4 MiB (see CRIU notes)."""
    path = Path("/proc/sys/fs/pipe-max-size")
    if int(path.read_text()) < 4 << 20:
        subprocess.run(["sysctl", "-q", "-w", "fs.pipe-max-size=4194304"], check=True)


@pytest.fixture(params=["ceph", "s3"])
def pool_name(
    request: pytest.FixtureRequest, ceph_cluster: dict[str, Any], torpor_home: Path
) -> Iterator[str]:
    """A fresh pool of each driver on the session's cluster, deleted with its data after."""
    tag = uuid.uuid4().hex[:8]
    if request.param == "ceph":
        request.getfixturevalue("rados_module")
        config = {
            "ceph.conf": ceph_cluster["conf"],
            "ceph.user.name": ceph_cluster["rados_user"],
            "ceph.osd.pool_name": f"torpor-lazy-{tag}",
            "ceph.osd.pg_num": "8",
        }
    else:
        request.getfixturevalue("boto3_module")
        config = {
            "s3.bucket": f"torpor-lazy-{tag}",
            "s3.endpoint": ceph_cluster["s3_endpoint"],
            "s3.region": "us-east-1",
            "s3.access_key": ceph_cluster["s3_access_key"],
            "s3.secret_key": ceph_cluster["s3_secret_key"],
        }
    name = f"{request.param}-{tag}"
    create_pool(name, request.param, config)
    yield name
    delete_pool(name, force=True)


def _lines(log: Path, kind: str) -> dict[str, str]:
    out = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        parts = line.split()
        if len(parts) == 3 and parts[0] == kind:
            out[parts[1]] = parts[2]
    return out


def _ask(trig: Path, log: Path, kind: str, tag: str, timeout: float = 60) -> str:
    (trig / f"{kind}-{tag}").touch()
    word = "answer" if kind == "ask" else "sum"
    got = wait_for(lambda: _lines(log, word).get(tag), timeout=timeout, what=f"{kind} {tag}")
    assert isinstance(got, str)
    return got


def test_lazy_restore_from_a_cluster_pool_answers_and_becomes_whole(
    torpor_home: Path, tmp_path: Path, pool_name: str
) -> None:
    trig = tmp_path / "trig"
    trig.mkdir()
    torpor("run", "--name", "cl", "--", PYTHON, str(APPS / "lazy_ballast.py"), str(trig), str(MIB))
    log = torpor_home / "logs" / "cl.log"
    wait_for(lambda: log.exists() and "ready" in log.read_text(), timeout=30, what="ready")
    answer = _ask(trig, log, "ask", "orig")
    total = _ask(trig, log, "sum", "orig")
    torpor("checkpoint", "cl", "--name", "cl-img", "--pool", pool_name)
    for local in (torpor_home / "images", torpor_home / "cache"):
        shutil.rmtree(local, ignore_errors=True)
    started = time.monotonic()
    rows = json.loads(torpor("restore", f"cl-img@{pool_name}", "--lazy", "--json").stdout)
    (row,) = rows
    assert row["name"] == "cl-img" and row["error"] is None
    local, whole = row["local_bytes"], row["image_bytes"]
    assert isinstance(local, int) and isinstance(whole, int) and whole > MIB << 20
    assert local < whole // 8, (local, whole)
    copy = copy_log(torpor_home, "cl-img")
    assert _ask(trig, copy, "ask", "lazy") == answer
    first_answer = time.monotonic() - started
    final = lazy.wait_states(["cl-img"], timeout=120)["cl-img"]
    assert final.state == "resident", final
    assert _ask(trig, copy, "sum", "lazy") == total
    print(f"lazy from {pool_name}: resume {row['resume_s']:.3f}s, first answer {first_answer:.3f}s")
