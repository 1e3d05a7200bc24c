"""A lease renewal against a store that stopped answering fails within its bound, on the real
stores: the OSD (ceph) or RGW (s3) of the test cluster is paused (SIGSTOP, by the pid and
start time the cluster script recorded), so the holder learns in time to stop its copy
before its 15 s lease lapses (a supervisor fences at 12 s). Without the leases' own bounded
connection, librados waits for ever on the OSD, and boto3 60 s three times."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from torpor._errors import PoolError
from torpor._pools._pool import Pool
from torpor._pools._rados import RadosBackend
from torpor._pools._s3 import S3Backend
from torpor._supervise import _lease

pytestmark = pytest.mark.ceph

BOUND = 5.0  # seconds: ceph 2 s an operation, s3 1 s to connect and for each read (x2)
DAEMON = {"ceph": "osd.0", "s3": "client.rgw.x"}


def _pause(cluster_dir: str, name: str) -> int:
    """SIGSTOP the cluster's daemon ``name`` (checked by its recorded start time); its pid."""
    entry = json.loads((Path(cluster_dir) / "daemons.json").read_text())[name]
    stat = Path(f"/proc/{entry['pid']}/stat").read_text()
    assert int(stat[stat.rindex(")") + 2 :].split()[19]) == entry["start_time"]
    import os

    pidfd = os.pidfd_open(entry["pid"])
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
    finally:
        os.close(pidfd)
    return int(entry["pid"])


def _resume(pid: int) -> None:
    import os

    pidfd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGCONT)
    finally:
        os.close(pidfd)


@pytest.mark.parametrize("kind", ["ceph", "s3"])
def test_a_renewal_against_a_paused_store_fails_within_its_bound(
    kind: str, ceph_cluster: dict[str, Any], torpor_home: Path, request: pytest.FixtureRequest
) -> None:
    request.getfixturevalue("rados_module" if kind == "ceph" else "boto3_module")
    where = f"bound-{uuid.uuid4().hex[:12]}"
    info = ceph_cluster
    backend: Any
    if kind == "ceph":
        backend = RadosBackend(
            info["conf"], info["cluster"], info["rados_user"], "torpor-tests", 8, namespace=where
        )
    else:
        backend = S3Backend(
            info["s3_endpoint"], where, "us-east-1", info["s3_access_key"], info["s3_secret_key"]
        )
    pool = Pool("shared", backend)
    lease = _lease.acquire(pool, "app", holder="host-a /root/a pid 1", duration=15.0)
    outcome: list[object] = []

    def renew() -> None:
        start = time.monotonic()
        try:
            lease.renew()
            outcome.append("renewed")
        except PoolError as exc:
            outcome.append(exc)
        outcome.append(time.monotonic() - start)

    pid = _pause(info["dir"], DAEMON[kind])
    try:
        worker = threading.Thread(target=renew, daemon=True)
        worker.start()
        worker.join(BOUND + 5.0)
        assert outcome, f"the renewal still waits {BOUND + 5.0:.0f} s on the paused store"
    finally:
        _resume(pid)
    worker.join(120)
    assert isinstance(outcome[0], PoolError)  # not renewed, not lost: unreachable
    assert isinstance(outcome[1], float) and outcome[1] < BOUND
    lease.renew()  # the store back: still ours (it never lapsed)
    lease.release()
    for key in list(backend.list("")):
        backend.delete(key)
    if kind == "s3":
        backend._client.delete_bucket(Bucket=where)
    pool.close()
