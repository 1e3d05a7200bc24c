"""Faults at the worst moments of ``torpor migrate``, on a real lab and real CRIU.

The source's command SIGKILLed right after CRIU killed the original (the commit), before it
took the service address down and deleted CRIU's lock table: both are left on the source, and
the sweep of :mod:`torpor._migrate._leftovers` removes them, and only them. The same in lazy
mode, the command killed with pages in flight (after ``post-dump`` was answered true: the
process is lost, as documented): its journal names the address and CRIU's lock, and the sweep
removes them once the original is gone, and only them. The target's disk filling in the middle
of the receive: the migration fails, the original runs on, unchanged, with its client, and the
target keeps nothing.

Until ``_copy.py`` calls ``_leftovers.record`` itself (the wiring is listed in the report of
the helper that wrote this), :data:`LAUNCHER` adds that call to the command it runs, exactly
where the wiring goes (after a successful post-dump transfer, before CRIU is answered true),
and holds the command at its first ``_address.take_down`` (the first step after the commit)
so the test can kill it there: the hook ``TORPOR_TEST_MIGRATE_SOURCE_COMMITTED`` that
``_copy.py`` lacks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import SCRIPT, Lab
from .test_migrate_copy import TORPOR, alive, paired, ps, server, torpor, wait_for
from .test_migrate_tcp import (
    APP_PORT,
    WEB_APP,
    addresses,
    answered,
    check_one_connection,
    client,
    ruleset,
    service_address,
    start_web,
)

pytestmark = pytest.mark.criu
__all__ = ["paired"]

LAUNCHER = """
import os, sys, time
from torpor._migrate import _address, _copy, _leftovers, _netlock
hold = os.environ["FAULT_HOLD"]
if "_leftovers" not in vars(_copy):  # not wired yet: the call the report asks for
    notify = _copy._Move._notify
    def _notify(self, event):
        ok = notify(self, event)
        if ok and event.name == "post-dump":
            try:
                self.journal = _leftovers.record(
                    self.name, self.ref, target=self.where, addresses=self.addresses,
                    tables=_netlock.new_criu_tables(self.before)
                    if self.options.tcp_established else (),
                )
            except BaseException as exc:
                self.failure = exc
                return False
        return ok
    _copy._Move._notify = _notify
def take_down(addr):  # the first step after the commit: held here, to be killed
    with open(hold, "x"):
        pass
    time.sleep(3600)
_address.take_down = take_down
from torpor._cli import main
sys.exit(main(sys.argv[1:]))
"""
SWEEP = "from torpor._migrate import _leftovers\nfor line in _leftovers.sweep(): print(line)"
JOURNALS = (
    "import os\nd = os.environ['TORPOR_HOME'] + '/migrate-undo'\n"
    "print(sorted(os.listdir(d)) if os.path.isdir(d) else [])"
)


def test_source_killed_after_the_commit_leaves_what_the_sweep_removes(
    paired: Lab, tmp_path: Path
) -> None:
    lab = paired
    service, other = service_address(lab, 20), service_address(lab, 21)
    pid = start_web(lab, "web", service)
    # Not the migration's: another process's address and another table must stay.
    bystander = torpor(lab, "a", "run", "--name", "bystander", "--service-address", other,
                       "--", "sleep", "600")  # fmt: skip
    assert bystander.returncode == 0, bystander.stderr
    made = lab.exec("a", "nft", "add", "table", "inet", "keepme")
    assert made.returncode == 0, made.stderr
    hold = tmp_path / "committed"
    try:
        with client(lab, service.split("/")[0], tmp_path) as c, server(lab, "b") as srv:
            answered(c, 20)
            migrate = subprocess.Popen(
                [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "a", "--",
                 "env", f"FAULT_HOLD={hold}", "TORPOR_AGENT=off", sys.executable, "-c",
                 LAUNCHER, "migrate", "web", "--to", srv.where],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            wait_for(hold.exists, timeout=60)  # committed: CRIU killed the original
            os.kill(migrate.pid, signal.SIGKILL)  # the command, by the pid this test started
            migrate.communicate(timeout=30)
            srv.wait_log("torpor-migrate: 'web' migrated from a: ")
            # What the killed command left on a: the address and CRIU's lock, and its journal.
            wait_for(lambda: not alive(pid))
            assert service in addresses(lab, "a")
            left = ruleset(lab, "a")
            tables = [line.split()[2] for line in left.splitlines() if line.startswith("table")]
            criu = [t for t in tables if t.startswith("CRIU-")]
            assert sorted(tables) == sorted(["keepme", *criu]) and len(criu) == 1, left
            assert len(json.loads(lab.python("a", JOURNALS).replace("'", '"'))) == 1
            # The sweep, by the next `torpor ps`: those two go, nothing else.
            swept = torpor(lab, "a", "ps")
            assert swept.returncode == 0, swept.stderr
            assert swept.stderr.splitlines() == [
                f"torpor: warning: removed {service}, left here by the migration of web "
                f"(migrated to {srv.where})",
                f"torpor: warning: removed CRIU's network lock inet {criu[0]}, left by web "
                f"(migrated to {srv.where})",
            ]
            assert service not in addresses(lab, "a") and other in addresses(lab, "a")
            assert ruleset(lab, "a").startswith("table inet keepme {")
            assert "CRIU-" not in ruleset(lab, "a")
            assert lab.python("a", JOURNALS) == "[]"
            assert lab.python("a", SWEEP) == ""  # once
            # The process is b's, with its address; its client goes on there.
            assert ps(lab, "b", "web")["state"] == "running"
            assert service in addresses(lab, "b")
            answered(c, 20)
            c.finish()
    finally:
        lab.exec("a", "nft", "delete", "table", "inet", "keepme")
        torpor(lab, "a", "kill", "bystander")
        torpor(lab, "b", "kill", "web")


# A web app with ~40 MiB of memory of its own (an image of about that size).
BIG_WEB = "import os\nballast = os.urandom(40 << 20)\n" + WEB_APP
# On the target: waits for the image's pages to start arriving, then takes the disk's free
# space (so the announced size fitted when the target checked it, and no longer does).
FILLER = """
import os, sys, time
images = sys.argv[1]
deadline = time.monotonic() + 60
while True:
    staging = [e for e in os.listdir(images) if ".migrating-" in e]
    if staging and any(n.startswith("pages-") for n in os.listdir(f"{images}/{staging[0]}")):
        break
    assert time.monotonic() < deadline, "no image arrived"
    time.sleep(0.001)
fd = os.open(f"{images}/filler", os.O_WRONLY | os.O_CREAT, 0o600)
block = b"x" * (1 << 20)
try:
    while True:
        os.write(fd, block)
except OSError as exc:
    assert exc.errno == 28, exc  # ENOSPC: the disk is full
print("filled", os.statvfs(images).f_bavail, flush=True)
"""
HOME_IMAGES = "import os; print(os.environ['TORPOR_HOME'] + '/images')"


def test_target_disk_filling_mid_receive_fails_cleanly_and_leaves_nothing(
    paired: Lab, tmp_path: Path
) -> None:
    lab = paired
    service = service_address(lab, 22)
    images = lab.python("b", HOME_IMAGES)
    made = lab.exec("b", "sh", "-c", f"mkdir -p -m 0700 {images} && mount -t tmpfs -o "
                    f"size=128m,mode=0700 torpor-fault {images}")  # fmt: skip
    assert made.returncode == 0, made.stderr
    ip = service.split("/")[0]
    res = torpor(lab, "a", "run", "--name", "big", "--service-address", service, "--",
                 sys.executable, "-c", BIG_WEB, ip, str(APP_PORT))  # fmt: skip
    assert res.returncode == 0, res.stderr
    pid = int(ps(lab, "a", "big")["pid"])
    filler = subprocess.Popen(
        [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "b", "--",
         sys.executable, "-c", FILLER, images],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with client(lab, ip, tmp_path) as c, server(lab, "b") as srv:
            answered(c, 20)
            migrate = torpor(lab, "a", "migrate", "big", "--to", srv.where)
            filled = filler.communicate(timeout=90)[0]
            log = srv.stop()
            answered(c, 20)  # the same connection, served by a again
            lines = c.finish()
        print(migrate.stderr, log, filled)
        assert filled.startswith("filled "), filled
        # The process stayed, unchanged, with its address and its client's connection.
        assert migrate.returncode == 1, migrate.stderr
        last = migrate.stderr.strip().splitlines()[-1]
        assert last.endswith(f"(the process runs here, unchanged (pid {pid}))"), last
        check_one_connection(lines)
        assert (ps(lab, "a", "big")["state"], ps(lab, "a", "big")["pid"]) == ("running", pid)
        assert service in addresses(lab, "a")
        assert ruleset(lab, "a") == ""
        # The target kept nothing: no staging, no address, no lock, no process.
        assert lab.python("b", f"import os; print(os.listdir({images!r}))") == "['filler']"
        assert service not in addresses(lab, "b")
        assert ruleset(lab, "b") == ""
        assert ps(lab, "b", "big") == {}
        # One line naming the target's full disk: the target read the rest and said why.
        prefix = f"torpor: error: migration of big to {srv.where} failed: {srv.where} could not "
        assert last.startswith(prefix + "take it: the disk of "), last
        assert f"{images}: No space left on device (the process runs here" in last, last
    finally:
        if filler.poll() is None:
            filler.kill()
            filler.wait()
        lab.exec("b", "umount", images)
        torpor(lab, "a", "kill", "big")


def test_lazy_source_killed_with_pages_in_flight_leaves_what_the_sweep_removes(
    paired: Lab, tmp_path: Path
) -> None:
    """``TORPOR_TEST_LAZY_STALL`` holds the transfer once a first MiB of pages has moved (the
    copy runs on b): the command is killed there. CRIU takes the closed socket for the end and
    kills the original; its lock table stays, and the journal the command wrote before it
    answered ``post-dump`` names it and the address (which the command had let go already for
    b). The next ``torpor ps`` removes the lock, once, and leaves the rest alone."""
    lab = paired
    service, other = service_address(lab, 23), service_address(lab, 24)
    ip = service.split("/")[0]
    started = torpor(lab, "a", "run", "--name", "lzfault", "--service-address", service, "--",
                     sys.executable, "-c", BIG_WEB, ip, str(APP_PORT))  # fmt: skip
    assert started.returncode == 0, started.stderr
    pid = int(ps(lab, "a", "lzfault")["pid"])
    bystander = torpor(lab, "a", "run", "--name", "lzbystander", "--service-address", other,
                       "--", "sleep", "600")  # fmt: skip
    assert bystander.returncode == 0, bystander.stderr
    made = lab.exec("a", "nft", "add", "table", "inet", "keepme")
    assert made.returncode == 0, made.stderr
    mark = tmp_path / "pages-flowing"
    try:
        with client(lab, ip, tmp_path) as c, server(lab, "b") as srv:
            answered(c, 20)  # a connection: the dump takes CRIU's network lock
            migrate = subprocess.Popen(
                [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "a", "--",
                 "env", f"TORPOR_TEST_LAZY_STALL={mark}", "TORPOR_AGENT=off",
                 *TORPOR, "migrate", "lzfault", "--to", srv.where, "--mode", "lazy"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            wait_for(mark.exists, timeout=60)  # committed: the copy runs on b, pages flow
            # The command's journal, written before post-dump was answered true.
            assert len(json.loads(lab.python("a", JOURNALS).replace("'", '"'))) == 1
            os.kill(migrate.pid, signal.SIGKILL)  # the command, by the pid this test started
            _, err = migrate.communicate(timeout=30)
            srv.wait_log("torpor-migrate: 'lzfault' from a: copy killed: ")
            # CRIU took the closed socket for the end: the original is gone (lost, as
            # documented), and with it whatever CRIU held.
            wait_for(lambda: not alive(pid), timeout=20)
            # What the killed command left on a: CRIU's lock and its journal. The address had
            # left already, for b, before the pages began to flow.
            assert service not in addresses(lab, "a") and other in addresses(lab, "a"), err
            left = ruleset(lab, "a")
            tables = [line.split()[2] for line in left.splitlines() if line.startswith("table")]
            criu = [t for t in tables if t.startswith("CRIU-")]
            assert sorted(tables) == sorted(["keepme", *criu]) and len(criu) == 1, left
            assert len(json.loads(lab.python("a", JOURNALS).replace("'", '"'))) == 1
            # The sweep, by the next `torpor ps`: CRIU's lock goes, nothing else.
            swept = torpor(lab, "a", "ps")
            assert swept.returncode == 0, swept.stderr
            assert swept.stderr.splitlines() == [
                f"torpor: warning: removed CRIU's network lock inet {criu[0]}, left by lzfault "
                f"(migrated to {srv.where})",
            ]
            assert other in addresses(lab, "a") and service not in addresses(lab, "a")
            assert ruleset(lab, "a").startswith("table inet keepme {")
            assert "CRIU-" not in ruleset(lab, "a")
            assert lab.python("a", JOURNALS) == "[]"
            assert lab.python("a", SWEEP) == ""  # once
            assert ps(lab, "a", "lzbystander")["state"] == "running"
            # b gave up its half-moved copy, and with it the address.
            assert "lzfault" not in [p["name"] for p in running(lab, "b")]
            wait_for(lambda: service not in addresses(lab, "b"), timeout=20)
    finally:
        lab.exec("a", "nft", "delete", "table", "inet", "keepme")
        torpor(lab, "a", "kill", "lzbystander")
        torpor(lab, "a", "kill", "lzfault")
        torpor(lab, "b", "kill", "lzfault")


def running(lab: Lab, host: str) -> list[dict[str, object]]:
    res = torpor(lab, host, "ps", "--json")
    assert res.returncode == 0, res.stderr
    return list(json.loads(res.stdout))
