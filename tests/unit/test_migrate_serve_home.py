"""One migration server per home, and what the sweep of a new one may take
(``torpor._migrate._serve_start``, ``_serve_sweep``), in a real home with a fake ``nft`` and
fake address removal:

- a second server of a home is refused (one line naming the home and the running server)
  before it sweeps anything; a port in use is one line too, and nothing is swept;
- a live server's journal is left whole by a sweep; a dead one's lock is dropped, but no
  other ``torpor-mig-*`` table (another home's lock);
- a half-moved copy that was killed (its keeper's report, or the next sweep) loses its
  service addresses, but never one a running process or a live server's journal holds."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from torpor import _paths
from torpor._errors import AlreadyExistsError, TorporError
from torpor._lazy._state import LazyState
from torpor._migrate import _address, _lazy_target, _netlock, _serve, _serve_start, _serve_sweep
from torpor._process import _registry
from torpor._process._proc import ProcRef, start_time

from .test_migrate_netlock import FakeNft

ADDR, HELD, INFLIGHT = "10.0.0.100/24", "10.0.0.101/24", "10.0.0.102/24"

# Holds the home's server lock (as a running server does) until its stdin closes.
_HOLDER = """
import sys
from torpor._migrate import _serve_start
with _serve_start.holding_home():
    print("held", flush=True)
    sys.stdin.read()
"""


class FakeHost:
    """The host's addresses, for ``_address.take_down``."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = set(addresses)
        self.removed: list[str] = []

    def take_down(self, addr: _address.IPAddr) -> bool:
        if str(addr) not in self.addresses:
            return False
        self.addresses.remove(str(addr))
        self.removed.append(str(addr))
        return True


@pytest.fixture
def nft(monkeypatch: pytest.MonkeyPatch) -> FakeNft:
    fake = FakeNft([("inet", "filter")])
    monkeypatch.setattr(_netlock, "_nft", fake)
    return fake


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    fake = FakeHost([ADDR, HELD, INFLIGHT, "10.0.0.1/24"])
    monkeypatch.setattr(_address, "take_down", fake.take_down)
    return fake


@pytest.fixture
def home(torpor_home: Path, nft: FakeNft, host: FakeHost) -> Path:
    return torpor_home


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts, killed by pid at its end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _sleeper(procs: list[subprocess.Popen[bytes]]) -> ProcRef:
    proc = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    procs.append(proc)
    deadline = time.monotonic() + 5
    while (born := start_time(proc.pid)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return ProcRef(proc.pid, born)


def _dead(procs: list[subprocess.Popen[bytes]]) -> ProcRef:
    ref = _sleeper(procs)
    procs[-1].kill()
    procs[-1].wait()
    return ref


def _record(name: str, ref: ProcRef, *addrs: str, migrating: str | None = None) -> None:
    _registry.save(
        _registry.ManagedProcess(
            name=name, pid=ref.pid, start_time=ref.start_time, keeper_pid=os.getpid(),
            command=("sleep", "60"), started=f"2026-01-01T00:00:0{len(name) % 10}",
            service_addresses=addrs, migrating=migrating,
        )
    )  # fmt: skip


def _journal(owner: ProcRef | None, *addrs: str, tag: str = "ab12") -> None:
    journal: dict[str, Any] = {"addresses": list(addrs), "lock": None, "tag": tag}
    if owner is not None:
        journal["owner"] = [owner.pid, owner.start_time]
    _paths.write_home_file(_serve_sweep._JOURNAL, json.dumps(journal).encode())


# -- one server per home ------------------------------------------------------------------------


class Swept(Exception):
    """The server got as far as its sweep (raised there: the test has seen enough)."""


@pytest.fixture
def swept(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each call of the server's sweep, which ends the server (the test has seen enough)."""
    calls: list[str] = []

    def sweep(log: Any) -> None:
        calls.append("swept")
        raise Swept

    monkeypatch.setattr(_serve, "_sweep", sweep)
    return calls


def test_a_second_server_of_the_home_is_refused_before_it_sweeps(
    home: Path, swept: list[str]
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(AlreadyExistsError) as err:
            _serve.serve("127.0.0.1", 0, ready=lambda where: None, log=lambda line: None)
        assert err.value.msg == f"a migration server (pid {holder.pid}) already serves {home}"
        assert err.value.hint == (
            f"stop it first (kill {holder.pid}), or give this one a home of its own (TORPOR_HOME)"
        )
        with pytest.raises(AlreadyExistsError):  # as `torpor agent start` checks first
            _serve_start.check_home_free()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    assert swept == []
    with pytest.raises(Swept):  # its server gone, the lock is free again
        _serve.serve("127.0.0.1", 0, ready=lambda where: None, log=lambda line: None)
    assert swept == ["swept"]
    assert (home / _serve_start.LOCK).stat().st_mode & 0o777 == 0o600


def test_a_port_in_use_is_one_line_and_nothing_is_swept(home: Path, swept: list[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(TorporError) as err:
            _serve.serve("127.0.0.1", port, ready=lambda where: None, log=lambda line: None)
    assert type(err.value) is TorporError
    assert err.value.msg == f"cannot listen on 127.0.0.1:{port}: the address is in use"
    assert err.value.hint == (
        f"another program or migration server has it: `ss -ltnp 'sport = :{port}'`"
    )
    assert isinstance(err.value.__cause__, OSError)
    assert err.value.__cause__.errno == errno.EADDRINUSE
    assert swept == []


def test_the_sweep_runs_once_the_server_is_bound(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []

    def sweep(log: Any) -> None:
        with socket.socket() as probe:  # the server's port is taken by now
            seen.append(probe.connect_ex(("127.0.0.1", port)) == 0)
        raise Swept

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setattr(_serve, "_sweep", sweep)
    with pytest.raises(Swept):
        _serve.serve("127.0.0.1", port, ready=lambda where: None, log=lambda line: None)
    assert seen == [True]


def test_a_planted_lock_file_is_refused(home: Path, tmp_path: Path) -> None:
    (home / _serve_start.LOCK).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(TorporError, match="is a symlink"):
        _serve_start.check_home_free()
    assert not (tmp_path / "elsewhere").exists()


# -- the sweep and the journal -------------------------------------------------------------------


def test_a_live_server_s_journal_is_left_whole(
    home: Path, nft: FakeNft, host: FakeHost, procs: list[subprocess.Popen[bytes]]
) -> None:
    live = _sleeper(procs)  # stands for the server that wrote it, mid-restore
    _journal(live, ADDR)
    table = _netlock.block("ab12", [ipaddress.ip_interface(ADDR)])
    logged: list[str] = []
    _serve_sweep._sweep(logged.append)
    assert logged == [
        f"left the service addresses and lock of {_serve_sweep._JOURNAL} alone: the server "
        f"that recorded them (pid {live.pid}) runs"
    ]
    assert table in nft.tables and ADDR in host.addresses and host.removed == []
    assert _paths.read_home_file(_serve_sweep._JOURNAL) is not None


def test_a_dead_server_s_lock_goes_and_no_other_home_s(
    home: Path, nft: FakeNft, host: FakeHost, procs: list[subprocess.Popen[bytes]]
) -> None:
    addr = ipaddress.ip_interface(ADDR)
    theirs = _netlock.block("cd34", [ipaddress.ip_interface(HELD)])  # another home's server
    ours = _netlock.block("ab12", [addr])
    _journal(_dead(procs), ADDR)
    logged: list[str] = []
    _serve_sweep._sweep(logged.append)
    assert logged == [
        "removed the network lock inet torpor-mig-ab12, left by a migration",
        f"removed {ADDR}, brought up by a migration that did not finish",
    ]
    assert ours not in nft.tables and theirs in nft.tables
    assert host.removed == [ADDR]
    assert _paths.read_home_file(_serve_sweep._JOURNAL) is None


# -- a half-moved copy killed --------------------------------------------------------------------


def _killed_copy(procs: list[subprocess.Popen[bytes]]) -> ProcRef:
    """The dead copy ``web`` (addresses ADDR, HELD, INFLIGHT), and what holds two of them:
    the running ``db`` (HELD) and a live server's journal (INFLIGHT)."""
    copy = _dead(procs)
    _record("web", copy, ADDR, HELD, INFLIGHT, migrating="from a, pages in flight")
    _record("db", _sleeper(procs), HELD)
    _journal(_sleeper(procs), INFLIGHT)
    return copy


def test_the_keeper_s_report_takes_down_what_nothing_alive_holds(
    home: Path, host: FakeHost, procs: list[subprocess.Popen[bytes]]
) -> None:
    copy = _killed_copy(procs)
    state = LazyState(name="web", image="/x", state="failed", pid=copy.pid, error="broke")
    _lazy_target._failed("a")(state)
    assert host.removed == [ADDR]
    assert HELD in host.addresses and INFLIGHT in host.addresses
    assert _registry.load("web").service_addresses == ()  # never again
    assert _registry.load("db").service_addresses == (HELD,)


def test_the_keeper_s_report_leaves_another_process_s_record(
    home: Path, host: FakeHost, procs: list[subprocess.Popen[bytes]]
) -> None:
    copy = _killed_copy(procs)
    state = LazyState(name="web", image="/x", state="failed", pid=copy.pid + 1, error="broke")
    _lazy_target._failed("a")(state)  # (the record names another pid: not this copy's)
    assert host.removed == []


def test_the_sweep_takes_down_a_dead_copy_s_addresses_only(
    home: Path, host: FakeHost, procs: list[subprocess.Popen[bytes]]
) -> None:
    _killed_copy(procs)
    ended = _dead(procs)  # a process run here that ended: not a migration's copy
    _record("job", ended, "10.0.0.103/24")
    host.addresses.add("10.0.0.103/24")
    logged: list[str] = []
    _serve_sweep._sweep(logged.append)
    assert host.removed == [ADDR]
    assert "10.0.0.103/24" in host.addresses
    kept = "a running process or migration holds it"
    assert logged == [
        f"left the service addresses and lock of {_serve_sweep._JOURNAL} alone: the server "
        f"that recorded them (pid {procs[2].pid}) runs",
        f"removed {ADDR} of 'web', whose migration did not finish",
        f"kept {HELD} of 'web': {kept}",
        f"kept {INFLIGHT} of 'web': {kept}",
    ]
    assert _registry.load("web").service_addresses == ()
    logged.clear()
    _serve_sweep._sweep(logged.append)  # once only
    assert host.removed == [ADDR] and len(logged) == 1
