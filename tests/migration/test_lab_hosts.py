"""``scripts/lab-hosts`` itself: hosts that reach each other only over the lab's network, homes
that the other hosts cannot see, and a ``down`` that leaves nothing, even after a half-made up."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import ECHO_SERVER, SCRIPT, Lab, lab_hosts

pytestmark = pytest.mark.netns


def root_links() -> dict[str, tuple[Any, ...]]:
    """The root namespace's interfaces: name -> (flags, MAC, MTU, master)."""
    out = subprocess.check_output(["ip", "-j", "link"], text=True)
    return {
        link["ifname"]: (tuple(link["flags"]), link.get("address"), link["mtu"], link.get("master"))
        for link in json.loads(out)
    }


def netns_names() -> set[str]:
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def lab_names(lab: Lab) -> set[str]:
    """The root-side interfaces a lab of hosts a, b and a client makes."""
    return {f"{lab.name}-br", f"{lab.name}-a", f"{lab.name}-b", f"{lab.name}-client"}


def test_up_prints_the_lab_and_records_it(lab: Lab) -> None:
    info, name = lab.info, lab.name
    assert re.fullmatch(r"tl[0-9a-f]{4}", name)
    octet = info["subnet"].split(".")[2]
    net = f"10.231.{octet}"
    assert info["subnet"] == f"{net}.0/24"
    assert info["bridge"] == f"{name}-br"
    assert info["floating"] == f"{net}.100-{net}.199"
    home = str(lab.dir.resolve() / "home")
    assert [(h["name"], h["netns"], h["veth"], h["address"], h["home"], h["agent"])
            for h in info["hosts"]] == [
        ("a", f"{name}-a", f"{name}-a", f"{net}.1", home, None),
        ("b", f"{name}-b", f"{name}-b", f"{net}.2", home, None),
    ]  # fmt: skip
    client = info["client"]
    assert (client["name"], client["netns"], client["address"]) == (
        "client", f"{name}-client", f"{net}.250"
    )  # fmt: skip
    pids = [h["holder_pid"] for h in info["hosts"]] + [client["holder_pid"]]
    assert [running(p) for p in pids] == [True, True, True]
    assert {f"{name}-a", f"{name}-b", f"{name}-client"} <= netns_names()
    record = json.loads((lab.dir / "lab.json").read_text())
    assert (record["lab"], record["complete"]) == (name, True)
    assert (lab.dir / "lab.json").stat().st_mode & 0o777 == 0o600

    again = lab_hosts("up", "--dir", str(lab.dir))
    assert again.returncode == 1
    assert again.stderr == (
        f"lab-hosts: error: {lab.dir.resolve()} already holds lab {name};"
        f" `lab-hosts down --dir {lab.dir.resolve()}` first\n"
    )

    status = json.loads(lab_hosts("status", "--dir", str(lab.dir)).stdout)
    assert (status["lab"], status["complete"], status["bridge_exists"]) == (name, True, True)
    assert status["nodes"] == [
        {"name": n, "netns_exists": True, "veth_exists": True, "holder_alive": True}
        for n in ("a", "b", "client")
    ]


def test_hosts_and_client_reach_each_other_over_the_lab_network(lab: Lab) -> None:
    a, b, c = lab.address("a"), lab.address("b"), lab.address("client")
    lab.echo_server("b", 7001)
    lab.echo_server("a", 7002)
    assert lab.connect("a", b, 7001) == f"b {a} hello"
    assert lab.connect("b", a, 7002) == f"a {b} hello"
    assert lab.connect("client", b, 7001) == f"b {c} hello"
    assert lab.connect("client", a, 7002) == f"a {c} hello"
    # b's server listens on b's address only: a has no such server of its own.
    assert lab.connect("a", a, 7001) == f"errno {errno.ECONNREFUSED}"


def test_nothing_routes_out_of_the_lab(lab: Lab) -> None:
    for host in ("a", "client"):
        routes = json.loads(lab.exec(host, "ip", "-j", "route").stdout)
        assert [(r["dst"], r["dev"]) for r in routes] == [(lab.info["subnet"], "eth0")]
        links = json.loads(lab.exec(host, "ip", "-j", "link").stdout)
        assert sorted(link["ifname"] for link in links) == ["eth0", "lo"]
        # The machine's own address and its gateway, outside the lab: no route there.
        assert lab.connect(host, "192.0.2.1", 80) == f"errno {errno.ENETUNREACH}"
        assert lab.connect(host, "192.0.2.2", 80) == f"errno {errno.ENETUNREACH}"
    # The root namespace is not on the lab's network: no address on the bridge or its ports.
    for dev in lab_names(lab):
        addrs = json.loads(subprocess.check_output(["ip", "-j", "addr", "show", "dev", dev]))
        assert addrs[0]["addr_info"] == []


def test_a_host_cannot_see_another_hosts_home(lab: Lab) -> None:
    home = lab.node("b")["home"]
    shm = f"/dev/shm/{lab.name}-test"
    assert lab.node("a")["home"] == home
    assert lab.exec("b", "sh", "-c", 'echo b-secret > "$TORPOR_HOME/secret"').returncode == 0
    assert lab.exec("b", "sh", "-c", f"echo b-shm > {shm}").returncode == 0
    assert lab.exec("b", "cat", f"{home}/secret").stdout == "b-secret\n"
    assert lab.exec("b", "cat", shm).stdout == "b-shm\n"
    assert lab.exec("a", "test", "-e", f"{home}/secret").returncode == 1
    assert lab.exec("a", "test", "-e", shm).returncode == 1
    assert not Path(home, "secret").exists()
    assert not Path(shm).exists()
    assert lab.exec("client", "test", "-e", f"{home}/secret").returncode == 1
    # Each host's home is a tmpfs of its own, closed to others.
    assert lab.exec("a", "stat", "-f", "-c", "%T", home).stdout == "tmpfs\n"
    assert lab.exec("a", "stat", "-c", "%a", home).stdout == "700\n"
    env = "import os; print(os.environ.get('TORPOR_HOME'), os.environ['TORPOR_LAB_HOST'])"
    assert lab.python("a", env) == f"{home} a"
    assert lab.python("client", env) == "None client"


def test_exec_passes_the_exit_status_stdio_and_working_directory(lab: Lab, tmp_path: Path) -> None:
    res = lab.exec("a", "sh", "-c", "cat; echo to-err >&2; exit 7", input="from-stdin\n")
    assert (res.returncode, res.stdout, res.stderr) == (7, "from-stdin\n", "to-err\n")
    assert lab.exec("b", "pwd", cwd=tmp_path).stdout == f"{tmp_path}\n"
    missing = lab.exec("nosuch", "true")
    assert missing.returncode == 1
    assert (
        missing.stderr
        == f"lab-hosts: error: lab {lab.name} has no host 'nosuch' (it has a, b, client)\n"
    )


def test_down_removes_exactly_what_up_added(make_lab: Callable[..., Lab]) -> None:
    before, ns_before = root_links(), netns_names()
    lab = make_lab()
    after = root_links()
    assert set(after) - set(before) == lab_names(lab)
    assert {n: after[n] for n in before} == before
    assert {after[n][3] for n in lab_names(lab) - {f"{lab.name}-br"}} == {f"{lab.name}-br"}
    lab.echo_server("b", 7003)
    sleeper = subprocess.Popen(
        [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "a", "--", "sleep", "600"],
        start_new_session=True,
    )
    pids = [h["holder_pid"] for h in lab.info["hosts"]] + [lab.info["client"]["holder_pid"]]
    time.sleep(0.2)
    lab.down()
    assert sleeper.wait(timeout=5) == -signal.SIGTERM
    assert root_links() == before
    assert netns_names() == ns_before
    assert [running(p) for p in pids] == [False, False, False]
    assert [running(s.pid) for s in lab.servers] == [False]
    assert sorted(p.name for p in lab.dir.iterdir()) == ["log"]
    mounts = Path("/proc/self/mountinfo").read_text()
    assert f"/run/netns/{lab.name}-" not in mounts
    res = lab_hosts("down", "--dir", str(lab.dir))
    assert (res.returncode, res.stderr) == (0, f"lab-hosts: no lab in {lab.dir.resolve()}\n")


def up_log_facts(d: Path) -> tuple[str, list[int]]:
    """The lab name and holder pids that ``up`` logged in ``d``."""
    log = (d / "log" / "up.log").read_text()
    name = re.search(r"step 1: bridge (\w+)-br\n", log)
    assert name is not None, log
    return name.group(1), [int(p) for p in re.findall(r"holder of \w+ \(pid (\d+)\)", log)]


def test_a_failed_up_undoes_itself(tmp_path: Path) -> None:
    before, ns_before = root_links(), netns_names()
    res = lab_hosts("up", "--dir", str(tmp_path), "--fail-after", "6", "--prefix", "mig")
    name, holders = up_log_facts(tmp_path)
    assert re.fullmatch(r"mig[0-9a-f]{4}", name)
    assert res.returncode == 1
    assert res.stderr == (
        f"lab-hosts: error: --fail-after 6: simulated failure after netns {name}-b\n"
    )
    assert len(holders) == 1
    assert running(holders[0]) is False
    assert root_links() == before
    assert netns_names() == ns_before
    assert not (tmp_path / "lab.json").exists()


def test_down_after_a_crashed_up_leaves_nothing(tmp_path: Path) -> None:
    before, ns_before = root_links(), netns_names()
    try:
        res = lab_hosts("up", "--dir", str(tmp_path), "--crash-after", "7")
        name, holders = up_log_facts(tmp_path)
        assert res.returncode == 99
        # Half made: the bridge, host a, and b's netns and veth exist.
        assert set(root_links()) - set(before) == {f"{name}-br", f"{name}-a", f"{name}-b"}
        assert netns_names() - ns_before == {f"{name}-a", f"{name}-b"}
        assert [running(p) for p in holders] == [True]
        refused = lab_hosts("exec", "--dir", str(tmp_path), "a", "--", "true")
        assert (refused.returncode, refused.stderr) == (
            1, f"lab-hosts: error: lab {name} is half-made; `lab-hosts down --dir {tmp_path}`\n"
        )  # fmt: skip
        assert lab_hosts("up", "--dir", str(tmp_path)).returncode == 1
    finally:
        down = lab_hosts("down", "--dir", str(tmp_path))
    assert (down.returncode, down.stderr) == (0, "")
    assert [running(p) for p in holders] == [False]
    assert root_links() == before
    assert netns_names() == ns_before


def test_down_after_a_holder_died_stops_what_runs_on_that_host(
    make_lab: Callable[..., Lab],
) -> None:
    lab = make_lab()
    server = lab.echo_server("b", 7004)
    holder_b = lab.node("b")["holder_pid"]
    os.kill(holder_b, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while running(holder_b) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert running(holder_b) is False
    res = lab.exec("b", "true")
    assert res.returncode == 1
    assert res.stderr.startswith(f"lab-hosts: error: host b of lab {lab.name} is broken (")
    # What was started on b runs on in b's namespaces (and still answers), until down.
    assert lab.connect("a", lab.address("b"), 7004) == f"b {lab.address('a')} hello"
    before_down = root_links()
    lab.down()
    assert server.returncode == -signal.SIGTERM
    assert set(before_down) - set(root_links()) == lab_names(lab)
    assert not any(n.startswith(lab.name + "-") for n in netns_names())


def test_two_labs_at_once_do_not_collide(make_lab: Callable[..., Lab]) -> None:
    one, two = make_lab(), make_lab("--hosts", "3")
    assert one.name != two.name
    assert one.info["subnet"] != two.info["subnet"]
    assert [h["name"] for h in two.info["hosts"]] == ["a", "b", "c"]
    one.echo_server("b", 7005)
    two.echo_server("b", 7005)
    assert one.connect("a", one.address("b"), 7005) == f"b {one.address('a')} hello"
    assert two.connect("c", two.address("b"), 7005) == f"b {two.address('c')} hello"
    assert one.connect("a", two.address("b"), 7005) == f"errno {errno.ENETUNREACH}"
    one.down()
    assert two.connect("a", two.address("b"), 7005) == f"b {two.address('a')} hello"
    status = json.loads(lab_hosts("status", "--dir", str(two.dir)).stdout)
    assert [lab["bridge"] for lab in status["machine_labs"] if lab["bridge"] in
            (f"{one.name}-br", f"{two.name}-br")] == [f"{two.name}-br"]  # fmt: skip


# A stand-in agent starter: forks ECHO_SERVER on the host's address, returns once it listens
# (as `torpor agent start` does) and prints the server's pid.
AGENT_STARTER = """
import os, subprocess, sys
r, w = os.pipe()
server = subprocess.Popen(
    [sys.executable, "-c", open(sys.argv[1]).read(), sys.argv[2], "7100"],
    stdin=subprocess.DEVNULL, stdout=w, start_new_session=True,
)
os.close(w)
assert os.fdopen(r).readline() == "listening\\n"
print(server.pid)
"""


def test_the_agent_hook_runs_on_each_host_and_down_stops_the_agents(
    make_lab: Callable[..., Lab], tmp_path: Path
) -> None:
    (tmp_path / "server.py").write_text(ECHO_SERVER)
    (tmp_path / "agent.py").write_text(AGENT_STARTER)
    starter = f"{sys.executable} {tmp_path}/agent.py {tmp_path}/server.py"
    lab = make_lab("--agent-cmd", starter + " {address}")
    assert [h["agent"] for h in lab.info["hosts"]] == [
        {"command": f"{starter} {lab.address(h)}", "log": f"{lab.dir}/log/agent-{h}.log"}
        for h in ("a", "b")
    ]
    c = lab.address("client")
    assert lab.connect("client", lab.address("a"), 7100) == f"a {c} hello"
    assert lab.connect("client", lab.address("b"), 7100) == f"b {c} hello"
    agents = [int((lab.dir / "log" / f"agent-{h}.log").read_text()) for h in ("a", "b")]
    assert [running(p) for p in agents] == [True, True]
    lab.down()
    assert [running(p) for p in agents] == [False, False]


def test_a_failing_agent_fails_up_and_leaves_nothing(tmp_path: Path) -> None:
    before, ns_before = root_links(), netns_names()
    res = lab_hosts("up", "--dir", str(tmp_path), "--agent-cmd", "echo no agent here; exit 3")
    _, holders = up_log_facts(tmp_path)
    assert [running(p) for p in holders] == [False, False, False]
    assert res.returncode == 1
    assert res.stderr == (
        f"lab-hosts: error: agent of a: 'echo no agent here; exit 3' exited 3;"
        f" see {tmp_path}/log/agent-a.log\n"
    )
    assert (tmp_path / "log" / "agent-a.log").read_text() == "no agent here\n"
    assert root_links() == before
    assert netns_names() == ns_before


def test_a_command_on_a_host_holds_no_namespace_descriptor(lab: Lab) -> None:
    # CRIU refuses to dump a process that holds one ("Can't lookup mount ... /run/netns/...").
    code = (
        "import os; fds = [f'/proc/self/fd/{n}' for n in range(3, 1024)];"
        " links = [os.readlink(f) for f in fds if os.path.lexists(f)];"
        " print([l for l in links if l.startswith(('net:', 'mnt:', '/run/netns', '/proc/'))])"
    )
    assert lab.python("a", code) == "[]"


@pytest.mark.criu
def test_torpor_checkpoints_on_a_host_into_that_hosts_home_only(lab: Lab) -> None:
    torpor = [sys.executable, "-m", "torpor"]
    run = lab.exec("a", *torpor, "run", "--name", "lab-sleeper", "--", "sleep", "300")
    assert run.returncode == 0, run.stderr
    done = lab.exec("a", *torpor, "checkpoint", "lab-sleeper")
    assert done.returncode == 0, done.stderr
    images = "import os; print(sorted(os.listdir(os.environ['TORPOR_HOME'] + '/images')))"
    assert lab.python("a", images).startswith("['lab-sleeper-")
    assert lab.exec("b", "test", "-e", f"{lab.node('b')['home']}/images").returncode == 1
