"""Leases on the real stores: RADOS object locks (ceph) and RGW conditional PUTs (s3).

Each "host" is its own Pool object with its own backend (its own RADOS client instance, its
own S3 client); one test runs the holder in another process and SIGKILLs it. Durations are
2 s so expiry is seen quickly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from torpor._pools._pool import Pool
from torpor._pools._rados import RadosBackend
from torpor._pools._s3 import S3Backend
from torpor._supervise import _lease
from torpor._supervise._lease import LeaseHeldError, LeaseLostError

pytestmark = pytest.mark.ceph

RADOS_POOL = "torpor-tests"
A = "host-a /root/a pid 1"
B = "host-b /root/b pid 2"
SRC = Path(__file__).resolve().parents[2] / "src"
# s3 judges expiry in whole seconds of the server's clock, one more for safety.
LATE = {"ceph": 0.5, "s3": 2.5}

Hosts = Callable[[], Pool]


def _spec(kind: str, info: dict[str, Any], where: str) -> dict[str, Any]:
    if kind == "ceph":
        return {"kind": kind, "conf": info["conf"], "cluster": info["cluster"],
                "user": info["rados_user"], "ns": where}  # fmt: skip
    return {"kind": kind, "endpoint": info["s3_endpoint"], "bucket": where,
            "key": info["s3_access_key"], "secret": info["s3_secret_key"]}  # fmt: skip


def _open(spec: dict[str, Any]) -> Pool:
    if spec["kind"] == "ceph":
        backend: Any = RadosBackend(
            spec["conf"], spec["cluster"], spec["user"], RADOS_POOL, 8, namespace=spec["ns"]
        )
    else:
        backend = S3Backend(spec["endpoint"], spec["bucket"], "us-east-1", spec["key"],
                            spec["secret"])  # fmt: skip
    return Pool("shared", backend)


@pytest.fixture(params=["ceph", "s3"])
def store(
    request: pytest.FixtureRequest, ceph_cluster: dict[str, Any], torpor_home: Path
) -> Iterator[tuple[str, dict[str, Any], Hosts]]:
    """The store's kind, how to open it, and a factory of "hosts" (Pool objects on it)."""
    kind: str = request.param
    request.getfixturevalue("rados_module" if kind == "ceph" else "boto3_module")
    where = f"lease-{uuid.uuid4().hex[:12]}"
    spec = _spec(kind, ceph_cluster, where)
    opened: list[Pool] = []

    def host() -> Pool:
        opened.append(_open(spec))
        return opened[-1]

    yield kind, spec, host
    cleaner = host()
    for key in list(cleaner.backend.list("")):
        cleaner.backend.delete(key)
    if kind == "s3":
        s3: Any = cleaner.backend
        s3._client.delete_bucket(Bucket=where)
    for pool in opened:
        pool.close()


def _wait_free(pool: Pool, name: str, limit: float) -> float:
    """Seconds until ``name`` is free in ``pool`` (fails after ``limit``)."""
    start = time.monotonic()
    while _lease.holder(pool, name) is not None:
        assert time.monotonic() - start < limit, f"lease on {name} still held after {limit} s"
        time.sleep(0.1)
    return time.monotonic() - start


def test_held_lease_refuses_another_host_and_renewal_keeps_it(
    store: tuple[str, dict[str, Any], Hosts],
) -> None:
    kind, _, host = store
    a, b = host(), host()
    lease = _lease.acquire(a, "web", holder=A, duration=2)
    start = time.monotonic()
    while time.monotonic() - start < 4:  # twice the duration, renewed every 0.5 s
        with pytest.raises(LeaseHeldError) as err:
            _lease.acquire(b, "web", holder=B, duration=2)
        assert (err.value.holder, err.value.pool, err.value.name) == (A, "shared", "web")
        assert err.value.expires_in is not None
        assert 0 < err.value.expires_in <= 2 + LATE[kind]
        time.sleep(0.5)
        lease.renew()
    info = _lease.holder(b, "web")
    assert info is not None and info.holder == A
    lease.release()
    assert _lease.holder(b, "web") is None


def test_expired_lease_lets_another_host_proceed_and_the_old_holder_loses_it(
    store: tuple[str, dict[str, Any], Hosts],
) -> None:
    kind, _, host = store
    a, b = host(), host()
    old = _lease.acquire(a, "web", holder=A, duration=2)
    with pytest.raises(LeaseHeldError):
        _lease.acquire(b, "web", holder=B, duration=2)
    waited = _wait_free(b, "web", 2 + LATE[kind] + 2)
    assert waited >= 1.5  # never early (the first check came a moment after acquire)
    new = _lease.acquire(b, "web", holder=B, duration=2)
    with pytest.raises(LeaseLostError):
        old.renew()
    old.release()  # the loser's release leaves the winner's lease alone
    info = _lease.holder(a, "web")
    assert info is not None and info.holder == B
    new.renew()


def test_lapsed_lease_is_lost_even_if_nobody_took_it(
    store: tuple[str, dict[str, Any], Hosts],
) -> None:
    kind, _, host = store
    a = host()
    lease = _lease.acquire(a, "web", holder=A, duration=2)
    _wait_free(a, "web", 2 + LATE[kind] + 2)
    with pytest.raises(LeaseLostError):
        lease.renew()


def test_force_breaks_a_held_lease(store: tuple[str, dict[str, Any], Hosts]) -> None:
    _, _, host = store
    a, b = host(), host()
    old = _lease.acquire(a, "web", holder=A, duration=60)
    new = _lease.acquire(b, "web", holder=B, duration=60, force=True)
    info = _lease.holder(a, "web")
    assert info is not None and info.holder == B
    with pytest.raises(LeaseLostError):
        old.renew()
    new.renew()


def test_released_lease_is_free_at_once(store: tuple[str, dict[str, Any], Hosts]) -> None:
    _, _, host = store
    a, b = host(), host()
    _lease.acquire(a, "web", holder=A, duration=60).release()
    assert _lease.holder(b, "web") is None
    _lease.acquire(b, "web", holder=B, duration=60)
    info = _lease.holder(a, "web")
    assert info is not None and info.holder == B


def _race(hosts: list[Pool], name: str) -> tuple[list[str], list[str]]:
    """Every host acquires ``name`` at once: who won, and whom the losers were told holds it."""
    won: list[str] = []
    told: list[str] = []
    start = threading.Barrier(len(hosts))

    def take(pool: Pool, who: str) -> None:
        start.wait()
        try:
            _lease.acquire(pool, name, holder=who, duration=30)
            won.append(who)
        except LeaseHeldError as exc:
            told.append(exc.holder)

    threads = [
        threading.Thread(target=take, args=(p, f"host-{i} /h pid {i}")) for i, p in enumerate(hosts)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, told


def test_exactly_one_of_racing_hosts_wins(store: tuple[str, dict[str, Any], Hosts]) -> None:
    _, _, host = store
    hosts = [host() for _ in range(5)]
    for round_ in range(3):
        won, told = _race(hosts, f"race{round_}")
        assert len(won) == 1, won
        assert told == won * (len(hosts) - 1)


HOLDER = """
import json, sys, time
sys.path.insert(0, sys.argv[2])
from test_lease_real import _open
from torpor._supervise import _lease
lease = _lease.acquire(_open(json.loads(sys.argv[1])), "web", holder="host-a pid child",
                       duration=2)
print("held", flush=True)
while True:
    time.sleep(0.5)
    lease.renew()
"""


def test_killed_holder_process_keeps_the_lease_until_it_expires(
    store: tuple[str, dict[str, Any], Hosts],
) -> None:
    kind, spec, host = store
    b = host()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).parent)])}
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), json.dumps(spec),
         str(Path(__file__).parent)],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "held\n"
        time.sleep(2.5)  # past one duration: only renewal kept it
        with pytest.raises(LeaseHeldError) as err:
            _lease.acquire(b, "web", holder=B, duration=2)
        assert err.value.holder == "host-a pid child"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        killed = time.monotonic()
        with pytest.raises(LeaseHeldError):  # a dead holder's lease still fences...
            _lease.acquire(b, "web", holder=B, duration=2)
        _wait_free(b, "web", 2 + LATE[kind] + 2)  # ...until it expires
        assert time.monotonic() - killed <= 2 + LATE[kind] + 1
        _lease.acquire(b, "web", holder=B, duration=2)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
