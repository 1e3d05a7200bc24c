"""``scripts/ceph-cluster`` itself: what ``start`` promises, and that ``stop`` leaves nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import SCRIPT, ceph_problem, recorded_alive, start_cluster, stop_cluster, unavailable

pytestmark = pytest.mark.ceph


def ceph(info: dict[str, Any], *args: str) -> Any:
    out = subprocess.check_output(
        ["ceph", "-c", info["conf"], "-n", "client.admin", "--format", "json", *args], timeout=30
    )
    return json.loads(out)


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A cluster of this test's own (the session's must keep running), always stopped."""
    problem = ceph_problem()
    if problem:
        unavailable(problem)
    directory = tmp_path / "cluster"
    try:
        yield directory, start_cluster(directory)
    finally:
        stop_cluster(directory)


def test_start_gives_a_healthy_cluster_and_stop_leaves_no_daemon(
    own_cluster: tuple[Path, dict[str, Any]],
) -> None:
    directory, info = own_cluster
    assert set(info) >= {"conf", "keyring", "cluster", "rados_user", "mon_addr", "s3_endpoint",
                         "s3_access_key", "s3_secret_key", "pids"}  # fmt: skip
    assert set(info["pids"]) == {"mon.a", "mgr.x", "osd.0", "client.rgw.x"}
    assert ceph(info, "health")["status"] == "HEALTH_OK"
    assert sorted(recorded_alive(directory)) == sorted(info["pids"])

    # msgr2 only, on loopback, at the advertised address
    mons = ceph(info, "mon", "dump")["mons"]
    assert [a["addr"].rsplit("/", 1)[0] for a in mons[0]["public_addrs"]["addrvec"]] == [
        info["mon_addr"].removeprefix("v2:")
    ]
    assert info["mon_addr"].startswith("v2:127.0.0.1:")
    assert ceph(info, "osd", "stat")["num_up_osds"] == 1

    # RGW answers S3 (an anonymous request is refused, not ignored)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(info["s3_endpoint"] + "/some-bucket", timeout=10)
    assert refused.value.code in (403, 404)

    # everything the daemons wrote is in the cluster's directory
    assert Path(info["conf"]).parent == directory.resolve()
    assert (directory / "keyring").stat().st_mode & 0o077 == 0
    assert sorted(p.name for p in (directory / "log").glob("*.log")) == [
        "ceph.log", "client.rgw.x.log", "mgr.x.log", "mon.a.log", "osd.0.log", "setup.log",
    ]  # fmt: skip

    stop_cluster(directory)
    assert recorded_alive(directory) == []
    stop_cluster(directory)  # stopping again is harmless


def test_start_refuses_a_directory_that_holds_a_cluster(ceph_cluster: dict[str, Any]) -> None:
    directory = ceph_cluster["dir"]
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "start", str(directory)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1
    assert res.stderr.startswith("ceph-cluster: error: ")
    assert "already holds a cluster" in res.stderr


def test_stop_of_a_directory_without_a_cluster_is_an_error(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "stop", str(tmp_path)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stderr == f"ceph-cluster: error: {tmp_path} holds no cluster (no ceph.conf)\n"
