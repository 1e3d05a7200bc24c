"""Failover of a supervised process between two torpor homes through a shared real pool.

Two homes ("hosts" A and B: two TORPOR_HOME directories, each with its own supervisor daemon)
have the same pool P configured, a RADOS pool of the session's Ceph cluster (or an RGW bucket).
A supervises N with checkpoints every second into P. A dies: its supervisor, N's keeper and N
are SIGKILLed. B's ``torpor resume N@P`` is refused while A's lease is held (the daemon's lease
lasts 15 s, renewed every 5 s, and the CLI has no option to change it: the refusal is seen for
up to 15 s), and succeeds once it has expired: N runs on B from A's last checkpoint, its count
going on. A third home C then resumes N@P with ``--force`` while B holds the lease: it warns
what that risks, and B's supervisor, its lease taken, lets go of N.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from torpor._process._proc import ProcRef

pytestmark = [pytest.mark.ceph, pytest.mark.criu]

APPS = Path(__file__).resolve().parents[1] / "integration" / "apps"
COUNTER = [sys.executable, str(APPS / "counter.py")]
LEASE = 15.0  # the supervisor's lease duration (_daemon.LEASE_DURATION; no CLI option)


class Home:
    """One "host": a torpor home and the CLI run in it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def torpor(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "torpor", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, TORPOR_HOME=str(self.path)),
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"[{self.path.name}] torpor {' '.join(args)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def events(self, name: str, kind: str) -> list[dict[str, Any]]:
        path = self.path / "events" / f"{name}.jsonl"
        if not path.exists():
            return []
        lines = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [e for e in lines if e["kind"] == kind]

    def proc(self, name: str) -> dict[str, Any] | None:
        rows = [
            r for r in json.loads(self.torpor("ps", "-a", "--json").stdout) if r["name"] == name
        ]
        return rows[0] if rows else None

    def daemon(self) -> ProcRef | None:
        try:
            data = json.loads((self.path / "supervised" / ".daemon.pid").read_text())
        except (OSError, ValueError):
            return None
        return ProcRef(data["pid"], data["start_time"])

    def counts(self, pid: int) -> list[int]:
        log = self.path / "logs" / "n.log"
        out = []
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
                out.append(int(parts[1]))
        return out

    def kill_all(self) -> None:
        """SIGKILL what this test started in this home: its supervisor first (it would
        restore), then each managed process and its keeper (by pid and start time)."""
        _kill(self.daemon())
        for rec_file in (self.path / "procs").glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                rec = json.loads(rec_file.read_text())
                _kill(ProcRef(rec["pid"], rec["start_time"]))
                if rec.get("keeper_start_time") is not None:
                    _kill(ProcRef(rec["keeper_pid"], rec["keeper_start_time"]))


def _kill(ref: ProcRef | None) -> None:
    if ref is None or not ref.alive():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(ref.pid, signal.SIGKILL)
    _wait(lambda: not ref.alive(), 10, f"pid {ref.pid} to die")


def _wait(pred: Callable[[], object], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(params=["ceph", "s3"])
def homes(
    request: pytest.FixtureRequest,
    ceph_cluster: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Home, Home, Home, str]]:
    """Homes A, B and C with the same shared pool ``P`` of the driver; everything started in
    them killed at the end, the pool's data deleted."""
    tag = uuid.uuid4().hex[:8]
    if request.param == "ceph":
        request.getfixturevalue("rados_module")
        config = [
            f"ceph.conf={ceph_cluster['conf']}",
            f"ceph.user.name={ceph_cluster['rados_user']}",
            f"ceph.osd.pool_name=torpor-fo-{tag}",
            "ceph.osd.pg_num=8",
        ]
    else:
        request.getfixturevalue("boto3_module")
        config = [
            f"s3.bucket=torpor-fo-{tag}",
            f"s3.endpoint={ceph_cluster['s3_endpoint']}",
            "s3.region=us-east-1",
            f"s3.access_key={ceph_cluster['s3_access_key']}",
            f"s3.secret_key={ceph_cluster['s3_secret_key']}",
        ]
    made = []
    for host in ("a", "b", "c"):
        path = tmp_path_factory.mktemp(f"home-{host}")
        path.chmod(0o700)
        made.append(Home(path))
    try:
        for home in made:
            home.torpor("pool", "create", "P", request.param, *config)
        yield made[0], made[1], made[2], request.param
    finally:
        for home in made:
            home.kill_all()
            for events in sorted((home.path / "events").glob("*.jsonl")):
                print(f"[{home.path.name}] {events.read_text()}")
            log = home.path / "supervised" / ".daemon.log"
            if log.exists():
                print(f"[{home.path.name}] {log.read_text()}")
        made[0].torpor("pool", "delete", "--force", "P", check=False)


def _held_line(name: str, holder: str) -> re.Pattern[str]:
    return re.compile(
        rf"torpor: error: process {name} is leased in pool P by {re.escape(holder)}, expiring "
        rf"in (\d+) s — retry once it expires, or pass --force to take it now: if that holder "
        rf"still runs {name}, two live copies will run"
    )


def test_failover_to_another_home_after_the_lease_expires(
    homes: tuple[Home, Home, Home, str],
) -> None:
    a, b, c, _driver = homes
    a.torpor("run", "--name", "n", "--checkpoint-every", "1s", "--pool", "P", "--", *COUNTER)
    _wait(lambda: len(a.events("n", "checkpoint")) >= 3, 40, "3 checkpoints on A")
    # A dies: its supervisor (found by `torpor supervisor status --json`), then N's keeper
    # and N (found by `torpor ps --json`); all of them started by this test.
    status = json.loads(a.torpor("supervisor", "status", "--json").stdout)
    rec = a.proc("n")
    assert rec is not None and rec["state"] == "running" and status["running"] is True
    daemon = a.daemon()
    assert daemon is not None and daemon.pid == status["pid"]
    _kill(daemon)
    died = time.monotonic()
    _kill(ProcRef(rec["keeper_pid"], rec["keeper_start_time"]))
    _kill(ProcRef(rec["pid"], rec["start_time"]))
    last = a.events("n", "checkpoint")[-1]["image"]
    before = a.counts(rec["pid"])
    holder = f"{socket.gethostname()} {a.path} pid {daemon.pid}"

    # B is refused while A's lease runs, each time with the same one line.
    refused = 0
    while True:
        got = b.torpor("resume", "n@P", check=False)
        if got.returncode == 0:
            break
        assert time.monotonic() - died < LEASE + 4, got.stderr
        assert (got.returncode, got.stdout) == (1, "")
        line = _held_line("n", holder).fullmatch(got.stderr.rstrip("\n"))
        assert line is not None, got.stderr
        assert 0 < int(line[1]) <= LEASE
        refused += 1
        time.sleep(1.0)
    took = time.monotonic() - died
    print(f"\nB refused {refused} times; resumed {took:.1f}s after A died")
    assert refused >= 1
    # Never before A's last renewal could have lapsed: a third of the duration at most ago.
    assert took > LEASE * 2 / 3 - 1

    name, pid = got.stdout.split()
    assert name == "n"
    on_b = b.proc("n")
    assert on_b is not None and on_b["pid"] == int(pid) and on_b["state"] == "running"
    assert on_b["supervision"]["status"] == "supervised"
    assert on_b["supervision"]["spec"]["pool"] == "P"
    assert [e["image"] for e in b.events("n", "restore")] == [last]
    after = _wait(lambda: b.counts(int(pid)), 10, "B's copy to count")
    # From A's last checkpoint: on from where A was (a period of counts at most before its
    # end), never from zero.
    assert before[-1] - 60 <= after[0] <= before[-1] + 1, (before[-1], after[0])
    _wait(lambda: b.events("n", "checkpoint"), 20, "B's supervisor to checkpoint N")

    # C: refused while B holds the lease; --force takes it and says what it risks.
    holder_b = f"{socket.gethostname()} {b.path} pid {b.daemon().pid}"  # type: ignore[union-attr]
    got = c.torpor("resume", "n@P", check=False)
    assert (got.returncode, got.stdout) == (1, "")
    assert _held_line("n", holder_b).fullmatch(got.stderr.rstrip("\n")) is not None, got.stderr
    got = c.torpor("resume", "--force", "n@P", check=False)
    assert got.returncode == 0, got.stderr
    assert got.stderr.splitlines() == [
        "torpor: warning: took the lease on n by force: two copies run if its other home "
        "still runs",
        f"supervisor started (pid {c.daemon().pid})",  # type: ignore[union-attr]
    ]
    assert got.stdout.split()[0] == "n"
    # B's supervisor finds its lease taken at its next renewal and lets go of N.
    lost = _wait(lambda: b.events("n", "lease"), LEASE, "B to lose the lease")
    assert [e["held"] for e in lost] == [False]
