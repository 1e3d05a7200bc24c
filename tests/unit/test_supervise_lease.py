"""Leases (fencing for failover, issue 8 point 5) on the memory and dir backends.

The memory backend's clock is replaced, so expiry is exact and instant. The dir backend's lease
is a real ``flock``: a holder in another process is SIGKILLed by pid and the lease is free at
once, even though a child it spawned still runs (its fd is close-on-exec).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._errors import PoolError, UsageError
from torpor._pools._dir import DirBackend
from torpor._pools._memory import MemoryBackend
from torpor._pools._pool import Pool
from torpor._supervise import _lease
from torpor._supervise._lease import LeaseHeldError, LeaseInfo, LeaseLostError

A = "host-a /home/a/.torpor pid 100"
B = "host-b /home/b/.torpor pid 200"
SRC = Path(__file__).resolve().parents[2] / "src"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hosts(torpor_home: Path, clock: Clock) -> Iterator[tuple[Pool, Pool]]:
    """Two Pool objects ("hosts") on one memory backend whose lease clock is ``clock``."""
    backend = MemoryBackend()
    backend.leases().clock = clock
    a, b = Pool("shared", backend), Pool("shared", backend)
    yield a, b
    a.close()


# --- memory: the logic --------------------------------------------------------------------


def test_a_held_lease_refuses_another_holder(hosts: tuple[Pool, Pool], clock: Clock) -> None:
    a, b = hosts
    _lease.acquire(a, "web", holder=A, duration=15)
    clock.now += 5
    assert _lease.holder(b, "web") == LeaseInfo(A, 10.0)
    with pytest.raises(LeaseHeldError) as err:
        _lease.acquire(b, "web", holder=B, duration=15)
    e = err.value
    assert (e.holder, e.expires_in, e.pool, e.name) == (A, 10.0, "shared", "web")
    assert str(e) == (
        f"process web is leased in pool shared by {A}, expiring in 10 s — retry once it"
        " expires, or pass --force to take it now: if that holder still runs web, two live"
        " copies will run"
    )


def test_renewal_keeps_the_lease(hosts: tuple[Pool, Pool], clock: Clock) -> None:
    a, b = hosts
    lease = _lease.acquire(a, "web", holder=A, duration=15)
    for _ in range(4):  # 40 s in all, far past one duration
        clock.now += 10
        lease.renew()
    with pytest.raises(LeaseHeldError):
        _lease.acquire(b, "web", holder=B, duration=15)
    assert _lease.holder(b, "web") == LeaseInfo(A, 15.0)


def test_an_expired_lease_is_taken_and_the_old_holder_loses_it(
    hosts: tuple[Pool, Pool], clock: Clock
) -> None:
    a, b = hosts
    old = _lease.acquire(a, "web", holder=A, duration=15)
    clock.now += 15
    assert _lease.holder(b, "web") is None
    new = _lease.acquire(b, "web", holder=B, duration=15)
    with pytest.raises(LeaseLostError) as err:
        old.renew()
    assert str(err.value) == (
        "lease on process web in pool shared is lost: it lapsed or was taken by another"
        " holder — stop running web here: another host may run it now"
    )
    old.release()  # the loser's release never frees the winner's lease
    assert _lease.holder(a, "web") == LeaseInfo(B, 15.0)
    new.renew()


def test_a_lapsed_lease_is_lost_even_if_nobody_took_it(
    hosts: tuple[Pool, Pool], clock: Clock
) -> None:
    a, _ = hosts
    lease = _lease.acquire(a, "web", holder=A, duration=15)
    clock.now += 15.5
    with pytest.raises(LeaseLostError):
        lease.renew()


def test_force_takes_a_held_lease(hosts: tuple[Pool, Pool], clock: Clock) -> None:
    a, b = hosts
    old = _lease.acquire(a, "web", holder=A, duration=15)
    _lease.acquire(b, "web", holder=B, duration=15, force=True)
    assert _lease.holder(a, "web") == LeaseInfo(B, 15.0)
    with pytest.raises(LeaseLostError):
        old.renew()


def test_release_frees_the_name(hosts: tuple[Pool, Pool]) -> None:
    a, b = hosts
    with _lease.acquire(a, "web", holder=A, duration=15) as lease:
        assert _lease.holder(b, "web") is not None
    assert _lease.holder(b, "web") is None
    with pytest.raises(LeaseLostError):
        lease.renew()
    _lease.acquire(b, "web", holder=B, duration=15)
    lease.release()  # twice: a no-op, B keeps it
    assert _lease.holder(a, "web") == LeaseInfo(B, 15.0)


def test_leases_of_other_names_are_independent(hosts: tuple[Pool, Pool]) -> None:
    a, b = hosts
    _lease.acquire(a, "web", holder=A)
    _lease.acquire(b, "web.2", holder=B)
    assert _lease.holder(a, "web") == LeaseInfo(A, 15.0)
    assert _lease.holder(a, "web.2") == LeaseInfo(B, 15.0)


@pytest.mark.parametrize(
    ("name", "holder", "duration"),
    [
        ("../web", A, 15.0),
        ("web/x", A, 15.0),
        ("web", "", 15.0),
        ("web", "host\nforged line", 15.0),
        ("web", "x" * 600, 15.0),
        ("web", A, 0.0),
        ("web", A, -1.0),
        ("web", A, 86401.0),
    ],
)
def test_bad_arguments_are_refused(
    hosts: tuple[Pool, Pool], name: str, holder: str, duration: float
) -> None:
    with pytest.raises(UsageError):
        _lease.acquire(hosts[0], name, holder=holder, duration=duration)


def test_a_backend_without_leases_is_refused(torpor_home: Path) -> None:
    class Bare(MemoryBackend):
        leases = None  # type: ignore[assignment]

    with pytest.raises(PoolError) as err:
        _lease.acquire(Pool("bare", Bare()), "web", holder=A)
    assert str(err.value) == (
        "pool 'bare' cannot hold leases: its driver has none — use a dir, ceph or s3 pool to"
        " fence failover"
    )


def test_local_holder_names_host_home_and_pid(torpor_home: Path) -> None:
    import socket

    assert _lease.local_holder(42) == f"{socket.gethostname()} {torpor_home} pid 42"


# --- dir: a real flock --------------------------------------------------------------------


@pytest.fixture
def dir_hosts(torpor_home: Path, tmp_path: Path) -> Iterator[tuple[Pool, Pool, Path]]:
    root = tmp_path / "pool"
    a, b = Pool("shared", DirBackend(root)), Pool("shared", DirBackend(root))
    yield a, b, root
    a.close()
    b.close()


def test_dir_lease_is_a_private_file_holding_the_holder(
    dir_hosts: tuple[Pool, Pool, Path],
) -> None:
    a, b, root = dir_hosts
    lease = _lease.acquire(a, "web", holder=A, duration=15)
    path = root / "leases+" / "web"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_bytes())["holder"] == A
    assert _lease.holder(b, "web") == LeaseInfo(A, None)
    with pytest.raises(LeaseHeldError) as err:
        _lease.acquire(b, "web", holder=B)
    assert (err.value.holder, err.value.expires_in) == (A, None)
    assert str(err.value) == (
        f"process web is leased in pool shared by {A} until its holder dies — stop the holder"
        f" ({A}) first, then retry"
    )
    lease.renew()  # nothing can take it: renewal only checks the file is still the lease


def test_dir_force_cannot_break_a_live_holder(dir_hosts: tuple[Pool, Pool, Path]) -> None:
    a, b, _ = dir_hosts
    _lease.acquire(a, "web", holder=A)
    with pytest.raises(LeaseHeldError) as err:
        _lease.acquire(b, "web", holder=B, force=True)
    assert str(err.value) == (
        f"process web is leased in pool shared by {A} until its holder dies; --force cannot"
        f" break a dir pool's lease while its holder lives — stop the holder ({A}) first, then"
        " retry"
    )
    assert _lease.holder(b, "web") == LeaseInfo(A, None)


def test_dir_release_frees_and_removes_the_file(dir_hosts: tuple[Pool, Pool, Path]) -> None:
    a, b, root = dir_hosts
    _lease.acquire(a, "web", holder=A).release()
    assert not (root / "leases+" / "web").exists()
    assert _lease.holder(b, "web") is None
    _lease.acquire(b, "web", holder=B)
    assert _lease.holder(a, "web") == LeaseInfo(B, None)


def test_dir_lease_whose_file_was_removed_is_lost(dir_hosts: tuple[Pool, Pool, Path]) -> None:
    a, b, root = dir_hosts
    lease = _lease.acquire(a, "web", holder=A)
    (root / "leases+" / "web").unlink()  # by hand: a newcomer would lock a new file
    with pytest.raises(LeaseLostError):
        lease.renew()
    _lease.acquire(b, "web", holder=B)
    lease.release()  # must not remove B's file
    assert _lease.holder(a, "web") == LeaseInfo(B, None)


def test_dir_one_of_two_racing_acquirers_wins(dir_hosts: tuple[Pool, Pool, Path]) -> None:
    a, b, _ = dir_hosts
    won: list[str] = []
    lost: list[str] = []
    start = threading.Barrier(2)

    def take(pool: Pool, who: str) -> None:
        start.wait()
        try:
            _lease.acquire(pool, "web", holder=who)
            won.append(who)
        except LeaseHeldError as exc:
            lost.append(exc.holder)

    threads = [threading.Thread(target=take, args=(p, w)) for p, w in ((a, A), (b, B))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert lost == won  # the loser was told who won


def test_dir_a_holder_probe_does_not_make_acquire_fail(
    dir_hosts: tuple[Pool, Pool, Path],
) -> None:
    a, _, root = dir_hosts
    _lease.acquire(a, "web", holder=A).release()
    (root / "leases+").mkdir(mode=0o700, exist_ok=True)
    fd = os.open(root / "leases+" / "web", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)  # what holder() takes for a moment
    timer = threading.Timer(0.03, os.close, (fd,))
    timer.start()
    try:
        lease = _lease.acquire(a, "web", holder=A)
    finally:
        timer.join()
    lease.release()


def test_dir_symlink_planted_as_the_lease_is_refused(
    dir_hosts: tuple[Pool, Pool, Path], tmp_path: Path
) -> None:
    a, _, root = dir_hosts
    (root / "leases+").mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    target.write_text("x")
    (root / "leases+" / "web").symlink_to(target)
    with pytest.raises(PoolError) as err:
        _lease.acquire(a, "web", holder=A)
    assert str(err.value) == (
        f"lease 'leases/web' in dir pool {root} is a symlink; refused — remove it: torpor"
        " never makes one"
    )
    assert target.read_text() == "x"


def test_dir_hostile_record_is_shown_cleaned(dir_hosts: tuple[Pool, Pool, Path]) -> None:
    a, b, root = dir_hosts
    lease = _lease.acquire(a, "web", holder=A)
    record = {"v": 1, "holder": "evil\x1b[2Jhost\n", "duration": 15, "token": "t", "n": 0}
    (root / "leases+" / "web").write_text(json.dumps({**record, "released": False}))
    assert _lease.holder(b, "web") == LeaseInfo("evil?[2Jhost?", None)
    (root / "leases+" / "web").write_bytes(b"\xff not json")
    assert _lease.holder(b, "web") == LeaseInfo("(unknown)", None)
    lease.release()


HOLDER_SCRIPT = """
import subprocess, sys, time
from pathlib import Path
from torpor._pools._dir import DirBackend
from torpor._pools._pool import Pool
from torpor._supervise import _lease
pool = Pool("shared", DirBackend(Path(sys.argv[1])))
lease = _lease.acquire(pool, "web", holder=_lease.local_holder())
# Outlives us, every inheritable fd kept: must not keep the lease.
child = subprocess.Popen(["sleep", "60"], close_fds=False)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_dir_lease_ends_when_its_holder_is_killed(
    dir_hosts: tuple[Pool, Pool, Path], torpor_home: Path
) -> None:
    _, b, root = dir_hosts
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER_SCRIPT), str(root)],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    grandchild = 0
    try:
        assert holder.stdout is not None
        grandchild = int(holder.stdout.readline())
        info = _lease.holder(b, "web")
        assert info is not None and info.holder.endswith(f"{torpor_home} pid {holder.pid}")
        with pytest.raises(LeaseHeldError):
            _lease.acquire(b, "web", holder=B)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        assert _alive(grandchild)  # it still runs, and does not keep the lease
        assert _lease.holder(b, "web") is None
        lease = _lease.acquire(b, "web", holder=B)
        assert _lease.holder(b, "web") == LeaseInfo(B, None)
        lease.release()
    finally:
        for pid in (holder.pid, grandchild):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        holder.wait(timeout=10)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_memory_expiry_uses_the_real_clock_by_default(torpor_home: Path) -> None:
    pool = Pool("m", MemoryBackend())
    lease = _lease.acquire(pool, "web", holder=A, duration=0.05)
    time.sleep(0.1)
    assert _lease.holder(pool, "web") is None
    with pytest.raises(LeaseLostError):
        lease.renew()
