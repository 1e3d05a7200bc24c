"""A migration server and its home, on real hosts of a lab (real ``nft``, real addresses, real
CRIU):

- a second ``torpor agent run|start --listen`` in a home whose server is mid-restore is
  refused with one line, and takes nothing of the live server's (its service address, its
  network lock, its journal); a server of another home on the same port is refused with
  one line too, and on another port it starts without deleting the first home's lock;
- the target's server killed mid lazy transfer: the half-moved copy is killed by its keeper,
  and its service address goes from b (the source takes it back for its resumed original),
  never up on both hosts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import SCRIPT, Lab
from .test_migrate_copy import (
    PORT,
    TORPOR,
    alive,
    paired,  # noqa: F401 - the fixture
    ps,
    server,
    torpor,
    wait_for,
)
from .test_migrate_lazy import log
from .test_migrate_tcp import addresses, ruleset, service_address

pytestmark = pytest.mark.criu

# On the target: what a server mid-restore has made (as _Incoming.with_addresses does), its
# journal naming the server (from the home's lock file) as its owner.
MID_RESTORE = """
import json, os, sys
from torpor import _paths
from torpor._process._proc import start_time
from torpor._migrate import _address, _netlock
pid = json.loads(_paths.read_home_file("migrate-server.lock"))[0]
addr = _address.parse(sys.argv[1])
journal = {"addresses": [str(addr)], "lock": None, "tag": "live1", "owner": [pid, start_time(pid)]}
_paths.write_home_file("migrate-inflight.json", json.dumps(journal).encode())
_netlock.block("live1", [addr])
_address.bring_up(addr)
print(pid)
"""
READ_JOURNAL = "from torpor import _paths; print(_paths.read_home_file('migrate-inflight.json'))"
UNDO = """
import sys
from torpor._migrate import _address, _netlock
_netlock.drop(("inet", "torpor-mig-live1"))
_address.take_down(_address.parse(sys.argv[1]))
"""


def _error_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_a_second_server_takes_nothing_of_a_live_one(paired: Lab, tmp_path: Path) -> None:  # noqa: F811
    lab = paired
    svc = service_address(lab, 11)
    home = lab.python("b", "import os; print(os.environ['TORPOR_HOME'])")
    other_home = tmp_path / "other-home"
    with server(lab, "b") as srv:
        pid = int(lab.python("b", MID_RESTORE, svc))
        assert pid == srv.proc.pid
        journal = lab.python("b", READ_JOURNAL)
        try:
            refused = f"a migration server (pid {pid}) already serves {home}"
            hint = f"stop it first (kill {pid}), or give this one a home of its own (TORPOR_HOME)"
            # A retry of the same command, and a start on another port: refused, one line.
            again = torpor(lab, "b", "agent", "run", "--listen", srv.where)
            assert again.returncode == 1
            assert _error_line(again) == f"torpor: error: {refused} — {hint}"
            other_port = f"{lab.address('b')}:{PORT + 1}"
            started = torpor(lab, "b", "agent", "start", "--listen", other_port)
            assert started.returncode == 1
            assert _error_line(started) == f"torpor: error: {refused} — {hint}"
            # Another home: the same port is in use (one line); another port serves, and its
            # sweep leaves the first home's lock.
            env = ("env", f"TORPOR_HOME={other_home}")
            taken = lab.exec("b", *env, *TORPOR, "agent", "run", "--listen", srv.where)
            assert taken.returncode == 1
            assert _error_line(taken) == (
                f"torpor: error: cannot listen on {srv.where}: the address is in use — another "
                f"program or migration server has it: `ss -ltnp 'sport = :{PORT}'`"
            )
            beside = lab.exec("b", *env, *TORPOR, "agent", "start", "--listen", other_port)
            assert beside.returncode == 0, beside.stderr
            beside_pid = int(beside.stdout.split("(pid ")[1].split(")")[0])
            try:
                assert svc in addresses(lab, "b")
                assert "table inet torpor-mig-live1 " in ruleset(lab, "b")
                assert lab.python("b", READ_JOURNAL) == journal
                assert srv.proc.poll() is None
            finally:
                os.kill(beside_pid, signal.SIGKILL)  # the server this test started
        finally:
            lab.python("b", UNDO, svc)
    assert svc not in addresses(lab, "b")


def test_target_server_killed_mid_lazy_leaves_the_address_on_one_host(
    paired: Lab,  # noqa: F811
    tmp_path: Path,
) -> None:
    lab = paired
    svc = service_address(lab, 12)
    pid = start_app_with_address(lab, "rv", svc)
    mark = tmp_path / "pages-flowing"
    with server(lab, "b") as srv:
        migrate = subprocess.Popen(
            [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "a", "--",
             "env", f"TORPOR_TEST_LAZY_STALL={mark}",
             *TORPOR, "migrate", "rv", "--to", srv.where, "--mode", "lazy"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_for(mark.exists, timeout=30)  # the copy runs on b, a first MiB has moved
        copy = ps(lab, "b", "rv")
        assert copy["state"] == "migrating from a, pages in flight"
        assert svc in addresses(lab, "b") and svc not in addresses(lab, "a")
        os.kill(srv.proc.pid, signal.SIGKILL)  # the target's server, by the pid we started
        _, err = migrate.communicate(timeout=60)
    assert migrate.returncode == 1, err
    # The copy is killed by its keeper, which takes its address down; the original runs on
    # a again with the address back.
    wait_for(lambda: not alive(int(copy["pid"])), timeout=20)
    wait_for(lambda: svc not in addresses(lab, "b"), timeout=10)
    assert alive(pid)
    wait_for(lambda: svc in addresses(lab, "a"), timeout=10)
    # A new server's sweep on b changes nothing of that.
    with server(lab, "b"):
        pass
    assert svc not in addresses(lab, "b") and svc in addresses(lab, "a")
    killed = torpor(lab, "a", "kill", "rv")
    assert killed.returncode == 0, killed.stderr
    assert svc not in addresses(lab, "a")


def start_app_with_address(lab: Lab, name: str, svc: str) -> int:
    """:func:`start_app` on a, 32 MiB, with the service address ``svc``."""
    from .test_migrate_lazy import MEMORY_COUNTER

    cmd = (sys.executable, "-c", MEMORY_COUNTER, "32")
    started = torpor(lab, "a", "run", "--name", name, "--service-address", svc, "--", *cmd)
    assert started.returncode == 0, started.stderr
    wait_for(lambda: len(log(lab, "a", name)[0]) >= 5, timeout=30)
    return int(ps(lab, "a", name)["pid"])
