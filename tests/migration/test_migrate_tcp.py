"""Issue 9's acceptance for ``torpor migrate --mode copy`` with a live TCP connection, on a
real lab and real CRIU: a web app with in-memory state, listening on a service address of host
a, serves a client in the lab's ``client`` node over ONE keep-alive connection at ~50
requests/s. Moved to b, the client sees no failed request, the same connection throughout and
the count going on; the address and the process are on b and gone from a, and no nftables rule
is left on either host. When the target's agent is killed, or its link cut, in the middle of
the move, the process runs on a unchanged, its address is still (only) there, and its client
goes on on the same connection.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import SCRIPT, Lab
from .test_migrate_copy import TORPOR, alive, paired, ps, server, torpor, wait_for

pytestmark = pytest.mark.criu
__all__ = ["paired"]  # the module's fixture, shared with test_migrate_copy

APP_PORT = 8080
# A web app with in-memory state: each GET answers the count so far and the peer port it sees.
WEB_APP = """
import http.server, json, socket, sys
count = 0
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        global count
        count += 1
        body = json.dumps({"count": count, "peer_port": self.client_address[1]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(http.server.HTTPServer):
    address_family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
Server((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
"""
# Its client: one keep-alive connection, a GET every 20 ms until STOP exists; one JSON line per
# request (or the error that ended it). Nothing is retried: a failure is what the client saw.
CLIENT = """
import http.client, json, os, sys, time
host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + 20
while True:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.connect()
        break
    except OSError:
        assert time.monotonic() < deadline, "the app never listened"
        time.sleep(0.1)
print(json.dumps({"local_port": conn.sock.getsockname()[1]}), flush=True)
while not os.path.exists(stop):
    t0 = time.monotonic()
    try:
        conn.request("GET", "/")
        body = json.loads(conn.getresponse().read())
    except Exception as exc:
        print(json.dumps({"error": repr(exc)}), flush=True)
        break
    print(json.dumps({"ms": (time.monotonic() - t0) * 1000, **body}), flush=True)
    time.sleep(max(0.0, 0.02 - (time.monotonic() - t0)))
print(json.dumps({"local_port": conn.sock.getsockname()[1]}), flush=True)
"""


def service_address(lab: Lab, n: int) -> str:
    """The lab's n-th floating address (kept free for services), as ADDR/PREFIX."""
    net = ipaddress.ip_network(lab.info["subnet"])
    return f"{net.network_address + 100 + n}/{net.prefixlen}"


def addresses(lab: Lab, host: str) -> list[str]:
    """Every address of ``host`` (``ip -j addr``), as ADDR/PREFIX."""
    res = lab.exec(host, "ip", "-j", "addr", "show")
    assert res.returncode == 0, res.stderr
    links = json.loads(res.stdout)
    return sorted(f"{a['local']}/{a['prefixlen']}" for link in links for a in link["addr_info"])


def ps_row(lab: Lab, host: str, name: str) -> dict[str, str]:
    """``name``'s row of the ``torpor ps -a`` table on ``host``, by column."""
    res = torpor(lab, host, "ps", "-a")
    assert res.returncode == 0, res.stderr
    header, *rows = res.stdout.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    cols = [header[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    found = [r for r in rows if r.split()[0] == name]
    assert len(found) == 1, res.stdout
    cells = [found[0][a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    return dict(zip(cols, cells, strict=True))


def ruleset(lab: Lab, host: str) -> str:
    res = lab.exec(host, "nft", "list", "ruleset")
    assert res.returncode == 0, res.stderr
    return res.stdout


# Resolves an address's MAC on the host it runs on (one datagram), as earlier traffic would.
RESOLVE = """
import socket, sys, time
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
with socket.socket(family, socket.SOCK_DGRAM) as s:
    s.sendto(b"x", (sys.argv[1], 9))
time.sleep(0.2)
"""


def knows(lab: Lab, host: str, address: str) -> None:
    """Make ``host`` know ``address``'s MAC: it will then send the client no neighbour
    solicitation (or ARP request) from the service address when the copy answers, which would
    tell the client where the address is by itself. Only the announcements can then."""
    lab.python(host, RESOLVE, address)
    res = lab.exec(host, "ip", "-j", "neigh", "show", address)
    assert res.returncode == 0, res.stderr
    states = [s for n in json.loads(res.stdout) for s in n.get("state", [])]
    assert "REACHABLE" in states, res.stdout


class Client:
    """:data:`CLIENT` in the lab's client node, started by the test (stopped by a file)."""

    def __init__(self, lab: Lab, address: str, tmp: Path) -> None:
        self.stop_file = tmp / "stop-client"
        self.err = tmp / "client-stderr"
        with self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "client", "--",
                 sys.executable, "-c", CLIENT, address, str(APP_PORT), str(self.stop_file)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
        self.lines: list[dict[str, Any]] = []

    def finish(self) -> list[dict[str, Any]]:
        """Stop it; every line it printed (read through the same buffer as :func:`answered`:
        ``communicate`` would skip what that buffer holds)."""
        self.stop_file.touch()
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        assert self.proc.wait(timeout=60) == 0, self.err.read_text()
        self.lines += [json.loads(line) for line in out.splitlines()]
        return self.lines


@contextlib.contextmanager
def client(lab: Lab, address: str, tmp: Path) -> Iterator[Client]:
    c = Client(lab, address, tmp)
    try:
        yield c
    finally:
        if c.proc.poll() is None:
            c.stop_file.touch()
            try:
                c.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()


def start_web(lab: Lab, name: str, service: str, *, record: bool = True) -> int:
    """The web app on a as ``name``, on ``service`` (brought up and recorded by torpor run,
    or, without ``record``, already there); its pid."""
    ip = service.split("/")[0]
    given = ("--service-address", service) if record else ()
    res = torpor(
        lab, "a", "run", "--name", name, *given, "--",
        sys.executable, "-c", WEB_APP, ip, str(APP_PORT),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return int(ps(lab, "a", name)["pid"])


def answered(c: Client, n: int) -> None:
    """Wait until the client has had ``n`` more answers (read from its stdout as they come)."""
    assert c.proc.stdout is not None
    got = 0
    while got < n:
        line = c.proc.stdout.readline()
        assert line, "the client ended"
        c.lines.append(json.loads(line))
        assert "error" not in c.lines[-1], c.lines[-1]
        got += "count" in c.lines[-1]


def check_one_connection(lines: list[dict[str, Any]]) -> list[int]:
    """What the client saw was one connection, no failure, the count going on by one each
    time; the counts."""
    assert [x for x in lines if "error" in x] == []
    ports = {x["local_port"] for x in lines if "local_port" in x}
    answers = [x for x in lines if "count" in x]
    assert len(ports) == 1
    assert {x["peer_port"] for x in answers} == ports  # the server saw that connection too
    counts = [x["count"] for x in answers]
    assert counts == list(range(counts[0], counts[0] + len(counts)))
    return counts


def test_copy_keeps_the_connection_state_and_address(paired: Lab, tmp_path: Path) -> None:
    lab = paired
    service = service_address(lab, 1)
    pid = start_web(lab, "web", service)
    assert service in addresses(lab, "a")
    knows(lab, "b", lab.address("client"))
    with client(lab, service.split("/")[0], tmp_path) as c, server(lab, "b") as srv:
        answered(c, 40)  # under load before the move
        res = torpor(lab, "a", "migrate", "web", "--to", srv.where, "--json")
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout)
        # Progress while the image moved, up to all of it.
        sent = [x for x in res.stderr.splitlines() if re.fullmatch(r"sent \S+ MiB of .*%\)", x)]
        mib = f"{summary['bytes'] / (1 << 20):.1f} MiB"
        assert len(sent) >= 2
        assert sent[-1] == f"sent {mib} of {mib} to {srv.where} (100%)"
        print(srv.wait_log("torpor-migrate: 'web' migrated from a: "))
        answered(c, 40)  # and after it
        lines = c.finish()
    counts = check_one_connection(lines)
    assert counts[0] == 1 and len(counts) >= 80  # every answer, from the first one on
    worst = max(x["ms"] for x in lines if "ms" in x)
    print(f"client's longest wait {worst:.0f} ms; summary {summary}")
    # The client waited about the process's downtime, not for a restored socket's first
    # retransmission (1 s): the target's lock went when CRIU's did, before the window probes.
    assert worst < summary["downtime_ms"] + 400
    assert (summary["tcp_connections"], summary["addresses"]) == (1, [service])
    # On b: the process, its address; nothing left on a; no lock left anywhere.
    there = ps(lab, "b", "web")
    assert (there["state"], there["pid"], there["migrated_from"]) == (
        "running",
        summary["target_pid"],
        "a",
    )
    assert there["service_addresses"] == [service]
    assert not alive(pid)
    here = ps(lab, "a", "web")
    assert (here["state"], here["migrated_to"]) == (f"migrated-to {srv.where}", srv.where)
    assert service in addresses(lab, "b")
    assert service not in addresses(lab, "a")
    assert ruleset(lab, "a") == ""
    assert ruleset(lab, "b") == ""
    # What users see in torpor ps on both hosts.
    assert ps_row(lab, "a", "web")["STATE"] == f"migrated-to {srv.where}"
    assert (ps_row(lab, "b", "web")["STATE"], ps_row(lab, "b", "web")["RESTORED-FROM"]) == (
        "running",
        "migrated-from a",
    )
    killed = torpor(lab, "b", "kill", "web")
    assert killed.returncode == 0, killed.stderr


def check_stayed_on_a(lab: Lab, name: str, pid: int, service: str) -> None:
    assert (ps(lab, "a", name)["state"], ps(lab, "a", name)["pid"]) == ("running", pid)
    assert ps(lab, "a", name)["migrating"] is None
    assert ps(lab, "b", name) == {}
    assert service in addresses(lab, "a")
    assert service not in addresses(lab, "b")
    assert ruleset(lab, "a") == ""
    assert ruleset(lab, "b") == ""


def test_target_killed_mid_copy_leaves_it_serving_on_a(paired: Lab, tmp_path: Path) -> None:
    lab = paired
    service = service_address(lab, 2)
    pid = start_web(lab, "held", service)
    hold = tmp_path / "image-arrived"
    with (
        client(lab, service.split("/")[0], tmp_path) as c,
        server(lab, "b", {"TORPOR_TEST_MIGRATE_HOLD": str(hold)}) as srv,
    ):
        answered(c, 20)
        migrate = subprocess.Popen(
            [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "a", "--",
             *TORPOR, "migrate", "held", "--to", srv.where],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_for(hold.exists)  # the image is on b; the app is frozen at post-dump
        assert ps(lab, "a", "held")["state"] == f"migrating to {srv.where}"
        srv.stop()  # SIGKILL, by the pid this test started
        _, err = migrate.communicate(timeout=30)
        assert migrate.returncode == 1, err
        answered(c, 40)  # the same client, served by a again
        lines = c.finish()
    assert err.strip().splitlines()[-1].endswith(f"(the process runs here, unchanged (pid {pid}))")
    check_one_connection(lines)
    check_stayed_on_a(lab, "held", pid, service)
    killed = torpor(lab, "a", "kill", "held")
    assert killed.returncode == 0, killed.stderr


def test_link_cut_mid_copy_leaves_it_serving_on_a(paired: Lab, tmp_path: Path) -> None:
    lab = paired
    service = service_address(lab, 3)
    pid = start_web(lab, "cut", service)
    hold = tmp_path / "image-arrived"
    veth = lab.node("b")["veth"]
    with (
        client(lab, service.split("/")[0], tmp_path) as c,
        server(lab, "b", {"TORPOR_TEST_MIGRATE_HOLD": str(hold)}) as srv,
    ):
        answered(c, 20)
        migrate = subprocess.Popen(
            [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "a", "--",
             *TORPOR, "migrate", "cut", "--to", srv.where, "--timeout", "3"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_for(hold.exists)
        # b's cable pulled, from the root namespace: a hears nothing more from it.
        subprocess.run(["ip", "link", "set", veth, "down"], check=True)
        try:
            _, err = migrate.communicate(timeout=30)
            assert migrate.returncode == 1, err
            answered(c, 40)
            lines = c.finish()
        finally:
            subprocess.run(["ip", "link", "set", veth, "up"], check=True)
        srv.stop()
    assert err.strip().splitlines()[-1].endswith(f"(the process runs here, unchanged (pid {pid}))")
    check_one_connection(lines)
    check_stayed_on_a(lab, "cut", pid, service)
    killed = torpor(lab, "a", "kill", "cut")
    assert killed.returncode == 0, killed.stderr


# On a host: a service address brought up behind the target's lock (or without it).
LOCKED_UP = """
import sys
from torpor._migrate import _address, _netlock
addr = _address.parse(sys.argv[1])
if sys.argv[2] == "lock":
    print(_netlock.block("test", [addr])[1])
_address.bring_up(addr)
"""
UNLOCK_DOWN = """
import sys
from torpor._migrate import _address, _netlock
print(_netlock.drop(("inet", "torpor-mig-test")), _address.take_down(_address.parse(sys.argv[1])))
"""


def test_the_targets_lock_keeps_resets_from_the_address_until_it_is_lifted(paired: Lab) -> None:
    """Why the target locks: an address up before its sockets are restored would answer a
    peer's packets with RSTs (a refused connection here); behind the lock they are dropped
    (the peer waits and retransmits), until the lock is lifted."""
    lab = paired
    service = service_address(lab, 4)
    ip = service.split("/")[0]
    assert lab.python("b", LOCKED_UP, service, "no-lock") == ""
    assert lab.connect("client", ip, 9) == "errno 111"  # ECONNREFUSED: b sent an RST
    assert lab.python("b", UNLOCK_DOWN, service) == "False True"
    assert lab.python("b", LOCKED_UP, service, "lock") == "torpor-mig-test"
    assert lab.connect("client", ip, 9) == "errno None"  # timed out: nothing came back
    assert ruleset(lab, "b").startswith("table inet torpor-mig-test {")
    assert lab.python("b", UNLOCK_DOWN, service) == "True True"
    assert ruleset(lab, "b") == ""
    assert service not in addresses(lab, "b")


# A hostile (but trusted) source: pre-flight offers with bad service addresses.
OFFER = """
import json, sys
from torpor._migrate import _channel, _preflight
host, port = sys.argv[1], int(sys.argv[2])
for addresses in json.loads(sys.argv[3]):
    with _channel.connect(host, port) as conn:
        conn.send({**_preflight.facts("offer", 1 << 20), "addresses": addresses})
        reply = conn.recv()
        print(json.dumps([reply["type"], *reply.get("problems", [])]))
"""


def test_target_refuses_service_addresses_it_must_not_bring_up(paired: Lab) -> None:
    lab = paired
    other = service_address(lab, 5)
    b_own = f"{lab.address('b')}/24"
    echo = lab.echo_server("b", 7)  # something of b's own that must not be disturbed
    before = addresses(lab, "b")
    offers = [
        ["0.0.0.0/24"],
        ["127.0.0.9/8"],
        ["224.0.0.9/4"],
        [b_own],
        ["192.0.2.100/24"],
        [f"{ipaddress.ip_network(lab.info['subnet'])}"],
        "10.0.0.1/24",
        [other, other],
    ]
    with server(lab, "b") as srv:
        host, port = srv.where.rsplit(":", 1)
        out = lab.python("a", OFFER, host, port, json.dumps(offers))
        log = srv.stop()
    replies = [json.loads(line) for line in out.splitlines()]
    w = srv.where
    net = ipaddress.ip_network(lab.info["subnet"])
    assert replies == [
        ["refused", f"service address 0.0.0.0/24 is unspecified (on {w})"],
        ["refused", f"service address 127.0.0.9/8 is loopback (on {w})"],
        ["refused", f"service address 224.0.0.9/4 is multicast (on {w})"],
        ["refused", f"service address {lab.address('b')} is in use on {w} (eth0)"],
        ["refused", f"no interface of {w} is on 192.0.2.0/24 for service address 192.0.2.100/24"],
        [
            "refused",
            f"service address {net.network_address}/{net.prefixlen} is the subnet's network or "
            f"broadcast address (on {w})",
        ],
        ["refused", f"service address None is not ADDR/PREFIX (on {w})"],
        ["refused", f"service address {other.split('/')[0]} is given twice (on {w})"],
    ]
    assert len([line for line in log.splitlines() if " refused 'offer' from a: " in line]) == 8
    assert b_own in before
    assert addresses(lab, "b") == before
    assert lab.connect("client", lab.address("b"), 7) == f"b {lab.address('client')} hello"
    assert echo.poll() is None
    assert ruleset(lab, "b") == ""


HOLDS_A_CONNECTION = """
import socket, sys, time
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print("connected from", conn.getsockname()[1], flush=True)
time.sleep(600)
"""


def test_a_connection_on_the_hosts_own_address_is_refused_before_any_freeze(paired: Lab) -> None:
    """A connection whose address stays on a cannot survive: said before anything is frozen,
    with nothing sent to b."""
    lab = paired
    lab.echo_server("client", 7)
    res = torpor(lab, "a", "run", "--name", "pinned", "--",
                 sys.executable, "-c", HOLDS_A_CONNECTION, lab.address("client"), "7")  # fmt: skip
    assert res.returncode == 0, res.stderr
    pid = int(ps(lab, "a", "pinned")["pid"])
    log = Path(ps(lab, "a", "pinned")["log_path"])

    def port() -> str:
        text = lab.python("a", f"print(open({str(log)!r}).read())")
        return text.removeprefix("connected from ").strip() if text else ""

    wait_for(lambda: port() != "")
    with server(lab, "b") as srv:
        res = torpor(lab, "a", "migrate", "pinned", "--to", srv.where)
        seen = srv.stop()
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        f"torpor: error: pinned holds TCP connections on addresses that stay here "
        f"({lab.address('a')}:{port()} -> {lab.address('client')}:7): they cannot survive the "
        f"move (nothing was frozen; the process runs here, pid {pid}) — serve them on a service "
        "address (torpor run --service-address, or torpor migrate --address ADDR/PREFIX), or "
        "close them first"
    )
    assert seen == ""  # b was never even asked
    assert (ps(lab, "a", "pinned")["state"], ps(lab, "a", "pinned")["pid"]) == ("running", pid)
    killed = torpor(lab, "a", "kill", "pinned")
    assert killed.returncode == 0, killed.stderr


BLOCKER = """
import socket, time
srv = socket.create_server(("0.0.0.0", int(__import__("sys").argv[1])))
print("listening", flush=True)
time.sleep(600)
"""


def test_restore_failing_on_b_after_its_address_came_up_undoes_everything(
    paired: Lab, tmp_path: Path
) -> None:
    """b takes its lock and the address, then its restore fails (its port is taken there by
    a wildcard listener): the lock and the address go, the process runs on a, unchanged, and
    its client goes on."""
    lab = paired
    service = service_address(lab, 6)
    pid = start_web(lab, "blocked", service)
    blocker = subprocess.Popen(
        [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "b", "--",
         sys.executable, "-c", BLOCKER, str(APP_PORT)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert blocker.stdout is not None and blocker.stdout.readline() == "listening\n"
        with client(lab, service.split("/")[0], tmp_path) as c, server(lab, "b") as srv:
            answered(c, 20)
            res = torpor(lab, "a", "migrate", "blocked", "--to", srv.where)
            line = srv.wait_log("torpor-migrate: migration from a failed: ")
            answered(c, 40)
            lines = c.finish()
    finally:
        blocker.kill()
        blocker.wait()
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"torpor: error: migration of blocked to {srv.where} failed: ")
    assert last.endswith(f"(the process runs here, unchanged (pid {pid}))")
    assert line.startswith("torpor-migrate: migration from a failed: ")
    check_one_connection(lines)
    check_stayed_on_a(lab, "blocked", pid, service)
    killed = torpor(lab, "a", "kill", "blocked")
    assert killed.returncode == 0, killed.stderr


# What a server killed between bringing the addresses up and the restore's end leaves.
LEFT_BEHIND = """
import json, os, sys
from torpor import _paths
from torpor._migrate import _address, _netlock
addrs = [_address.parse(a) for a in sys.argv[1:]]
_netlock.block("killed", addrs)
for a in addrs:
    _address.bring_up(a)
_paths.write_home_file(
    "migrate-inflight.json",
    json.dumps({"addresses": [*sys.argv[1:], "0.0.0.0/0"], "tag": "killed"}).encode(),
)
"""


ADD_TO_JOURNAL = """
import json, sys
from torpor import _paths
j = json.loads(_paths.read_home_file("migrate-inflight.json"))
j["addresses"].append(sys.argv[1])
_paths.write_home_file("migrate-inflight.json", json.dumps(j).encode())
"""
MARK_MIGRATING = """
import sys
from torpor._process import _registry
rec = _registry.load(sys.argv[1])
print(_registry.update(rec.name, rec.ref, migrating="from b"))
"""
READ_JOURNAL = "from torpor import _paths; print(_paths.read_home_file('migrate-inflight.json'))"


def test_a_restarted_server_removes_what_a_killed_one_left(paired: Lab) -> None:
    lab = paired
    left, kept = service_address(lab, 7), service_address(lab, 8)
    pid = start_web(lab, "keeper-of-8", kept)  # a running process's address is never taken
    assert lab.python("a", LEFT_BEHIND, left) == ""
    assert lab.python("a", ADD_TO_JOURNAL, kept) == ""
    # ... and a copy it restored, the source's verdict never read.
    assert lab.python("a", MARK_MIGRATING, "keeper-of-8") == "True"
    assert left in addresses(lab, "a") and kept in addresses(lab, "a")
    with server(lab, "a") as srv:  # a as a target now: it sweeps when it starts
        log = srv.stop()
    doubt = "in doubt: the server ended before the source's verdict"
    assert log.splitlines() == [
        "torpor-migrate: removed the network lock inet torpor-mig-killed, left by a migration",
        f"torpor-migrate: removed {left}, brought up by a migration that did not finish",
        f"torpor-migrate: 'keeper-of-8' (pid {pid}) runs here, migration {doubt}",
    ]
    assert ps(lab, "a", "keeper-of-8")["state"] == f"migrating from b ({doubt})"
    assert left not in addresses(lab, "a")
    assert kept in addresses(lab, "a")
    assert ruleset(lab, "a") == ""
    assert lab.python("a", READ_JOURNAL) == "None"
    assert ps(lab, "a", "keeper-of-8")["pid"] == pid
    killed = torpor(lab, "a", "kill", "keeper-of-8")
    assert killed.returncode == 0, killed.stderr


def test_copy_keeps_an_ipv6_connection_and_address(paired: Lab, tmp_path: Path) -> None:
    """The same over IPv6, the address given to migrate (--address) rather than recorded by
    run: it is added without duplicate address detection, and an unsolicited neighbour
    advertisement turns the client to b at once."""
    lab = paired
    octet = ipaddress.ip_network(lab.info["subnet"]).network_address.packed[2]
    prefix = f"fd00:{octet:x}::"
    hosts = {"a": 1, "b": 2, "client": 250}
    for host, n in hosts.items():
        res = lab.exec(host, "ip", "-6", "addr", "add", f"{prefix}{n:x}/64", "dev", "eth0", "nodad")
        assert res.returncode == 0, res.stderr
    service = f"{prefix}100/64"
    try:
        up = lab.exec("a", "ip", "-6", "addr", "add", service, "dev", "eth0", "nodad")
        assert up.returncode == 0, up.stderr
        pid = start_web(lab, "web6", service, record=False)
        assert ps(lab, "a", "web6")["service_addresses"] == []
        knows(lab, "b", f"{prefix}{hosts['client']:x}")
        with client(lab, f"{prefix}100", tmp_path) as c, server(lab, "b") as srv:
            answered(c, 40)
            res = torpor(
                lab, "a", "migrate", "web6", "--to", srv.where, "--address", service, "--json"
            )
            assert res.returncode == 0, res.stderr
            summary = json.loads(res.stdout)
            answered(c, 40)
            lines = c.finish()
        check_one_connection(lines)
        worst = max(x["ms"] for x in lines if "ms" in x)
        assert worst < summary["downtime_ms"] + 400, (worst, summary)
        assert (summary["tcp_connections"], summary["addresses"]) == (1, [service])
        assert not alive(pid)
        assert service in addresses(lab, "b") and service not in addresses(lab, "a")
        assert ps(lab, "b", "web6")["service_addresses"] == [service]  # moves on from b
        assert ruleset(lab, "a") == "" and ruleset(lab, "b") == ""
        killed = torpor(lab, "b", "kill", "web6")
        assert killed.returncode == 0, killed.stderr
    finally:
        for host, n in hosts.items():
            lab.exec(host, "ip", "-6", "addr", "del", f"{prefix}{n:x}/64", "dev", "eth0")
        lab.exec("b", "ip", "-6", "addr", "del", service, "dev", "eth0")


def test_run_takes_its_service_address_back_when_the_command_cannot_start(paired: Lab) -> None:
    lab = paired
    service = service_address(lab, 9)
    res = torpor(lab, "a", "run", "--name", "nothing", "--service-address", service, "--",
                 "/nonexistent/command")  # fmt: skip
    assert res.returncode != 0
    assert service not in addresses(lab, "a")
    assert ps(lab, "a", "nothing") == {}
    bad = torpor(lab, "a", "run", "--name", "nothing", "--service-address", "127.0.0.7/8", "--",
                 "sleep", "60")  # fmt: skip
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == (
        "torpor: error: service address 127.0.0.7/8 is loopback — give a free host address of "
        "the hosts' shared subnet, e.g. 10.0.0.100/24"
    )
    assert ps(lab, "a", "nothing") == {}


def test_kill_takes_the_service_address_down_unless_another_process_has_it(
    paired: Lab,
) -> None:
    lab = paired
    service = service_address(lab, 8)
    for name in ("holder", "sharer"):
        res = torpor(lab, "a", "run", "--name", name, "--service-address", service, "--",
                     "sleep", "600")  # fmt: skip
        assert res.returncode == 0, res.stderr
    assert service in addresses(lab, "a")
    first = torpor(lab, "a", "kill", "holder")
    assert first.returncode == 0, first.stderr
    assert service in addresses(lab, "a")  # sharer still runs with it
    last = torpor(lab, "a", "kill", "sharer")
    assert last.returncode == 0, last.stderr
    assert last.stderr.splitlines()[-1] == f"service address {service} taken down"
    assert service not in addresses(lab, "a")
