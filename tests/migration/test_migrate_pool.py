"""``torpor migrate --mode pool`` on a real lab and CRIU: the process moves with its state
through a pool both hosts reach, and a target that cannot reach the source's pool refuses in
pre-flight with nothing frozen.

The Ceph cluster runs on a host of the lab of its own (``c``): ``scripts/ceph-cluster start
--address`` binds its mon and RGW to c's address, so a and b reach it over the lab's network
(a Ceph on the root namespace's loopback is unreachable from the lab's namespaces). Its conf and
keyring are files both hosts read, as an admin would hand them out. The dir pool test uses a
directory of the filesystem the hosts share.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import SCRIPT, Lab, lab_problem, make, unavailable
from .test_migrate_tcp import (
    addresses,
    answered,
    check_one_connection,
    client,
    ruleset,
    service_address,
    start_web,
)

pytestmark = pytest.mark.criu

ROOT = Path(__file__).resolve().parents[2]
CEPH = ROOT / "scripts" / "ceph-cluster"
CEPH_BINARIES = ("ceph-mon", "ceph-mgr", "ceph-osd", "radosgw", "radosgw-admin", "osdmaptool")
TORPOR = (sys.executable, "-m", "torpor")
PORT = 7072
COUNTER = (
    "import time\ni = 0\nwhile True:\n    print(i, flush=True)\n    i += 1\n    time.sleep(0.02)"
)


def torpor(lab: Lab, host: str, *args: str) -> Any:
    return lab.exec(host, *TORPOR, *args)


def ok(res: Any) -> str:
    assert res.returncode == 0, (res.stdout, res.stderr)
    return str(res.stdout)


def pair(lab: Lab, tmp: Path, hosts: tuple[str, str] = ("a", "b")) -> None:
    """Make the two hosts trust each other by certificate."""
    for who, of in (hosts, hosts[::-1]):
        pem = tmp / f"{of}.pem"
        pem.write_text(ok(torpor(lab, of, "identity", "show", "--cert")))
        ok(torpor(lab, who, "trust", "add", "--cert", str(pem), "--name", of))


@contextlib.contextmanager
def server(lab: Lab, host: str) -> Iterator[str]:
    """``torpor agent run --listen`` on ``host`` (killed by its pid); yields its address."""
    where = f"{lab.address(host)}:{PORT}"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), host, "--",
         *TORPOR, "agent", "run", "--listen", where],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"listening on {where}\n"
        yield where
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


def home(lab: Lab, host: str) -> str:
    return str(lab.node(host)["home"])


def counts(lab: Lab, host: str, name: str) -> list[int]:
    log = f"{home(lab, host)}/logs/{name}.log"
    text = lab.python(host, "import sys; print(open(sys.argv[1]).read())", log)
    return [int(line) for line in text.splitlines() if line.strip()]


def ps(lab: Lab, host: str, name: str) -> dict[str, Any]:
    found = [
        p for p in json.loads(ok(torpor(lab, host, "ps", "--all", "--json"))) if p["name"] == name
    ]
    return found[0] if found else {}


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def start_counter(lab: Lab, host: str, name: str) -> int:
    ok(torpor(lab, host, "run", "--name", name, "--", sys.executable, "-c", COUNTER))
    wait_for(lambda: len(counts(lab, host, name)) >= 5)
    return int(ps(lab, host, name)["pid"])


def pool_images(lab: Lab, host: str, pool: str) -> list[str]:
    return [
        i["name"] for i in json.loads(ok(torpor(lab, host, "images", "--pool", pool, "--json")))
    ]


def moves_through(lab: Lab, pool: str, name: str) -> None:
    """A counter on a migrates to b through ``pool`` and counts on there; nothing of it is
    left on a, nor in the pool."""
    pid = start_counter(lab, "a", name)
    with server(lab, "b") as where:
        res = torpor(
            lab, "a", "migrate", name, "--to", where, "--mode", "pool", "--pool", pool, "--json"
        )
        summary = json.loads(ok(res))
    assert (summary["name"], summary["mode"], summary["source_pid"]) == (name, "pool", pid)
    assert summary["bytes"] > 0 and summary["files"] > 0
    assert 0 < summary["downtime_ms"] <= summary["total_ms"]
    there = ps(lab, "b", name)
    assert (there["state"], there["pid"]) == ("running", summary["target_pid"])
    before = counts(lab, "a", name)
    wait_for(lambda: len(counts(lab, "b", name)) >= 10)
    after = counts(lab, "b", name)
    assert after[0] == before[-1] + 1  # its memory came through the pool
    assert after == list(range(after[0], after[0] + len(after)))
    assert not alive(pid)
    assert ps(lab, "a", name)["state"] == f"migrated-to {summary['target']}"
    assert pool_images(lab, "a", pool) == []  # the record was only in transit
    ok(torpor(lab, "b", "kill", name))


def refused_for_pool(lab: Lab, pool: str, name: str, problem: str) -> None:
    """A migration through ``pool`` is refused in pre-flight with ``problem``, the process
    untouched on a."""
    pid = start_counter(lab, "a", name)
    with server(lab, "b") as where:
        res = torpor(lab, "a", "migrate", name, "--to", where, "--mode", "pool", "--pool", pool)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert res.stderr.strip().splitlines()[-1] == (
        f"torpor: error: migration of {name} to {where} refused in pre-flight: "
        f"{problem.format(where=where)} (nothing was frozen; the process runs here, pid {pid})"
        " — fix what the target reports, then migrate again"
    )
    assert (ps(lab, "a", name)["state"], ps(lab, "a", name)["pid"]) == ("running", pid)
    before = counts(lab, "a", name)
    wait_for(lambda: len(counts(lab, "a", name)) >= len(before) + 5)
    numbers = counts(lab, "a", name)
    assert numbers == list(range(len(numbers)))
    assert ps(lab, "b", name) == {}
    ok(torpor(lab, "a", "kill", name))


@pytest.fixture(scope="module")
def paired(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Lab:
    pair(lab, tmp_path_factory.mktemp("certs"))
    return lab


@pytest.fixture(scope="module")
def ceph_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, dict[str, Any]]]:
    """A lab of three hosts, a and b trusting each other, and a real Ceph cluster running on
    c (its mon and RGW on c's address); the cluster's JSON. Stopped and taken down after."""
    problem = lab_problem() or next(
        (f"Ceph is not installed (no {b})" for b in CEPH_BINARIES if shutil.which(b) is None), None
    )
    if problem:
        unavailable(problem)
    lab = make(tmp_path_factory.mktemp("lab"), "--hosts", "3")
    cluster = tmp_path_factory.mktemp("ceph")
    try:
        pair(lab, tmp_path_factory.mktemp("certs"))
        started = lab.exec(
            "c", sys.executable, str(CEPH), "start", "--address", lab.address("c"), str(cluster),
            timeout=180,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        info = json.loads(started.stdout)
        for host in ("a", "b"):
            ok(torpor(lab, host, "pool", "create", "shared", "ceph", f"ceph.conf={info['conf']}",
                      f"ceph.user.name={info['rados_user']}", "ceph.osd.pool_name=torpor-migrate",
                      "ceph.osd.pg_num=8"))  # fmt: skip
        yield lab, info
    finally:
        if (cluster / "daemons.json").exists():
            lab.exec("c", sys.executable, str(CEPH), "stop", str(cluster), timeout=120)
        lab.down()


def test_a_counter_moves_through_ceph_with_its_state(ceph_lab: tuple[Lab, dict[str, Any]]) -> None:
    lab, info = ceph_lab
    assert info["mon_addr"].startswith(f"v2:{lab.address('c')}:")  # on the lab's network
    moves_through(lab, "shared", "cephctr")


def test_a_ceph_pool_the_target_cannot_reach_is_refused_in_preflight(
    ceph_lab: tuple[Lab, dict[str, Any]],
) -> None:
    lab, _ = ceph_lab
    # b loses its way to c (the cluster), a keeps it: a partition, as on a real network.
    route = ("ip", "route", "add", "prohibit", f"{lab.address('c')}/32")
    ok(lab.exec("b", *route))
    try:
        pid = start_counter(lab, "a", "cut")
        with server(lab, "b") as where:
            res = torpor(
                lab, "a", "migrate", "cut", "--to", where, "--mode", "pool", "--pool", "shared"
            )
    finally:
        ok(lab.exec("b", "ip", "route", "del", "prohibit", f"{lab.address('c')}/32"))
    assert res.returncode == 1, (res.stdout, res.stderr)
    line = res.stderr.strip().splitlines()[-1]
    head = (
        f"torpor: error: migration of cut to {where} refused in pre-flight: no pool configured on "
        f"{where} is the source's pool 'shared' (ceph) (pool 'shared' there cannot be read: "
    )
    tail = (
        "): configure it there (torpor pool create) where it can be read (nothing was frozen; "
        f"the process runs here, pid {pid}) — fix what the target reports, then migrate again"
    )
    assert line.startswith(head) and line.endswith(tail), line
    assert (ps(lab, "a", "cut")["state"], ps(lab, "a", "cut")["pid"]) == ("running", pid)
    before = counts(lab, "a", "cut")
    wait_for(lambda: len(counts(lab, "a", "cut")) >= len(before) + 5)
    numbers = counts(lab, "a", "cut")
    assert numbers == list(range(len(numbers)))
    assert ps(lab, "b", "cut") == {}
    ok(torpor(lab, "a", "kill", "cut"))


def test_a_counter_moves_through_a_shared_dir_pool(paired: Lab, tmp_path: Path) -> None:
    shared = tmp_path / "pool"
    shared.mkdir(mode=0o700)
    for host in ("a", "b"):
        ok(torpor(paired, host, "pool", "create", "shared", "dir", f"source={shared}"))
    moves_through(paired, "shared", "dirctr")


def test_a_pool_the_target_cannot_see_is_refused_in_preflight(paired: Lab) -> None:
    # The same path on both, in each host's own home: two pools that only look alike.
    path = f"{home(paired, 'a')}/private-pool"
    for host in ("a", "b"):
        ok(torpor(paired, host, "pool", "create", "private", "dir", f"source={path}"))
    refused_for_pool(
        paired, "private", "lonely",
        "no pool configured on {where} is the source's pool 'private' (dir): configure it "
        "there (torpor pool create) where it can be read",
    )  # fmt: skip


@pytest.mark.parametrize("given", ["recorded", "--address"])
def test_pool_mode_keeps_the_connection_state_and_address(
    paired: Lab, tmp_path: Path, given: str
) -> None:
    """Issue 9's web app (in-memory count, one keep-alive client at ~50 requests/s from the
    lab's client node, on a service address) moved through a dir pool: no failed request, one
    connection throughout, the count going on; the address only on b; no nftables rule left.
    The address is the one ``torpor run --service-address`` recorded, or one already up that
    ``torpor migrate --address`` names."""
    lab = paired
    pool = f"tcp-{given.strip('-')}"  # the lab is the module's: a pool of its own
    shared = tmp_path / "pool"
    shared.mkdir(mode=0o700)
    for host in ("a", "b"):
        ok(torpor(lab, host, "pool", "create", pool, "dir", f"source={shared}"))
    # An address of its own each: the client's neighbour cache may still say b has the other.
    service = service_address(lab, 2 if given == "recorded" else 23)
    extra: tuple[str, ...] = ()
    if given == "--address":
        up = lab.exec("a", "ip", "addr", "add", service, "dev", "eth0")
        assert up.returncode == 0, up.stderr
        extra = ("--address", service)
    pid = start_web(lab, "pweb", service, record=given == "recorded")
    with client(lab, service.split("/")[0], tmp_path) as c, server(lab, "b") as where:
        answered(c, 40)
        res = torpor(
            lab, "a", "migrate", "pweb", "--to", where, "--mode", "pool", "--pool", pool,
            *extra, "--json",
        )  # fmt: skip
        summary = json.loads(ok(res))
        answered(c, 40)
        lines = c.finish()
    counts = check_one_connection(lines)
    assert counts[0] == 1 and len(counts) >= 80
    worst = max(x["ms"] for x in lines if "ms" in x)
    print(f"client's longest wait {worst:.0f} ms; summary {summary}")
    assert (summary["mode"], summary["tcp_connections"]) == ("pool", 1)
    assert summary["addresses"] == [service]
    assert (ps(lab, "b", "pweb")["state"], ps(lab, "b", "pweb")["pid"]) == (
        "running",
        summary["target_pid"],
    )
    assert ps(lab, "b", "pweb")["service_addresses"] == [service]  # moves on from b
    assert not alive(pid)
    assert service in addresses(lab, "b") and service not in addresses(lab, "a")
    assert (ruleset(lab, "a"), ruleset(lab, "b")) == ("", "")
    assert pool_images(lab, "a", pool) == []
    ok(torpor(lab, "b", "kill", "pweb"))
