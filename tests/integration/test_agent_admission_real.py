"""A real agent's admission of its clients: a client judged by a pid it left behind, a
request cut short, a silent connection, a directory renamed under the request, and a client
in cgroups of its own (the command runs in them, not in the agent's)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from torpor._process._proc import ProcRef

from .helpers import wait_for
from .test_agent_real import TORPOR, _served_by_agent, cli
from .test_agent_real import agent as running_agent

agent = running_agent  # the same fixture: an agent serving the test's home

pytestmark = pytest.mark.criu

ROOT = Path(__file__).resolve().parents[2]
INSTALL = TORPOR.parent


def _encode(argv: list[str], cwd: bytes) -> bytes:
    """A request as the launchers send it (``bin/torpor-py``'s encoder)."""
    import importlib.machinery
    import importlib.util
    import resource

    path = str(ROOT / "bin" / "torpor-py")
    loader = importlib.machinery.SourceFileLoader("torpor_launcher_admission", path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    launcher = importlib.util.module_from_spec(spec)
    loader.exec_module(launcher)
    limits = [(r, *resource.getrlimit(r)) for r in range(16)]
    install = os.fsencode(os.path.realpath(INSTALL))
    env = {k: v for k, v in os.environb.items() if k != b"TORPOR_AGENT_TRIED"}
    packet: bytes = launcher.encode_request(install, argv, cwd, 0o022, limits, env)
    return packet


def _send(sock: socket.socket, packet: bytes, directory: int) -> None:
    fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2, directory))
    sock.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])


def _connect(home: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(30)
    sock.connect(str(home / "agent.sock"))
    return sock


def _workers(agent: ProcRef) -> list[int]:
    with open(f"/proc/{agent.pid}/task/{agent.pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


def _agent_log(home: Path) -> str:
    return (home / "logs" / "agent.log").read_text()


# A confined client (no capabilities left) that connects, hands its connection to a child and
# exits; the child reports what the worker says, and sends a request if told `ready`.
CLIENT = textwrap.dedent(
    """
    import os, socket, sys
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(sys.argv[1])
    if os.fork():
        os._exit(0)  # the connecting process is gone; its child holds the connection
    sys.stdin.readline()  # until the test has reused our parent's pid
    first = sock.recv(4096)
    print(first.decode(errors="replace"), flush=True)
    if first == b"ready":
        packet = open(sys.argv[2], "rb").read()
        here = os.open(".", os.O_PATH | os.O_DIRECTORY)
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2, here))
        sock.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        print(sock.recv(4096).decode(errors="replace"), flush=True)
    """
)


def _reuse_pid(pid: int) -> subprocess.Popen[bytes]:
    """An unconfined process with pid ``pid`` (free again), by ``ns_last_pid``."""
    for _ in range(50):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        proc = subprocess.Popen(["sleep", "120"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    raise AssertionError(f"pid {pid} could not be reused")


def test_a_client_judged_by_a_pid_it_left_behind_is_declined(
    torpor_home: Path, tmp_path: Path, agent: ProcRef
) -> None:
    marker = tmp_path / "ran"
    packet = tmp_path / "request"
    argv = ["run", "--name", "reused", "--", "sh", "-c", f"echo ran > {marker}; sleep 600"]
    packet.write_bytes(_encode(argv, os.fsencode(tmp_path)))
    idle = _workers(agent)
    assert len(idle) == 2
    for pid in idle:  # no worker takes the connection until the client's pid is reused
        os.kill(pid, signal.SIGSTOP)
    sleeper = None
    try:
        client = subprocess.Popen(
            [
                *("setpriv", "--inh-caps=-all", "--bounding-set=-all"),
                *(sys.executable, "-c", CLIENT, str(torpor_home / "agent.sock"), str(packet)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=tmp_path,
        )
        assert client.wait(timeout=30) == 0  # reaped: its pid is free
        sleeper = _reuse_pid(client.pid)
    finally:
        for pid in idle:
            os.kill(pid, signal.SIGCONT)
    try:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(b"go\n")
        client.stdin.flush()
        first = client.stdout.readline().decode().strip()
        assert first.startswith("declined:"), first
        assert "the client process" in first or "SO_PEERPIDFD" in first
        assert not marker.exists()
        assert not (torpor_home / "procs" / "reused.json").exists()
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()


def test_a_request_cut_short_is_declined(torpor_home: Path, tmp_path: Path, agent: ProcRef) -> None:
    marker = tmp_path / "ran"
    argv = ["run", "--name", "cut", "--", "sh", "-c", f"echo ran > {marker}; sleep 600"]
    packet = _encode(argv, os.fsencode(tmp_path)) + b"\0PAD=" + b"x" * (1 << 20)
    sock = _connect(torpor_home)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, 32, 8 << 20)  # SO_SNDBUFFORCE: the packet fits
    with sock:
        assert sock.recv(64) == b"ready"
        here = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
        try:
            _send(sock, packet, here)
        finally:
            os.close(here)
        reply = sock.recv(4096)
    assert reply.startswith(b"declined:the request did not fit"), reply
    assert not marker.exists()
    assert not (torpor_home / "procs" / "cut.json").exists()


def test_fds_cut_short_are_declined(torpor_home: Path, tmp_path: Path, agent: ProcRef) -> None:
    marker = tmp_path / "ran"
    argv = ["run", "--name", "fds", "--", "sh", "-c", f"echo ran > {marker}; sleep 600"]
    sock = _connect(torpor_home)
    with sock:
        assert sock.recv(64) == b"ready"
        here = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
        try:  # 20 fds: more than a worker receives (16), the first four as they should be
            fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2, *[here] * 17))
            packet = _encode(argv, os.fsencode(tmp_path))
            sock.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        finally:
            os.close(here)
        reply = sock.recv(4096)
    assert reply.startswith(b"declined:the fds did not fit"), reply
    assert not marker.exists()


def test_a_request_of_the_old_protocol_is_declined(
    torpor_home: Path, tmp_path: Path, agent: ProcRef
) -> None:
    # A torpor-agent/2 launcher sends no directory fd: it must be declined, never misrun.
    marker = tmp_path / "ran"
    argv = ["run", "--name", "old", "--", "sh", "-c", f"echo ran > {marker}; sleep 600"]
    packet = _encode(argv, os.fsencode(tmp_path)).replace(b"torpor-agent/3", b"torpor-agent/2", 1)
    sock = _connect(torpor_home)
    with sock:
        assert sock.recv(64) == b"ready"
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))
        sock.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        reply = sock.recv(4096)
    assert reply.startswith(b"declined:protocol b'torpor-agent/2'"), reply
    assert not marker.exists()


def test_a_silent_connection_is_declined_and_frees_its_worker(
    torpor_home: Path, agent: ProcRef
) -> None:
    sock = _connect(torpor_home)
    with sock:
        assert sock.recv(64) == b"ready"
        started = time.monotonic()
        reply = sock.recv(4096)  # nothing sent
    assert reply == b"declined:no request within 10 s"
    assert 9 < time.monotonic() - started < 25
    [line] = [ln for ln in _agent_log(torpor_home).splitlines() if "declined" in ln]
    worker = int(line.split()[2].rstrip(":"))  # agent worker PID: declined: ...
    assert line == f"agent worker {worker}: declined: no request within 10 s"
    wait_for(lambda: worker not in _workers(agent), what="the worker to end")


def test_silent_connections_do_not_make_the_agent_fork_without_bound(
    torpor_home: Path, agent: ProcRef
) -> None:
    from torpor._agent._master import MAX_WAITING

    socks = []
    try:
        for _ in range(MAX_WAITING + 3):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.connect(str(torpor_home / "agent.sock"))  # queued once no worker is forked
            socks.append(sock)
            time.sleep(0.3)  # the master forks a replacement, if it may, meanwhile
        time.sleep(1)
        assert len(_workers(agent)) == MAX_WAITING  # all waiting, none idle, none more
    finally:
        for sock in socks:
            sock.close()  # the workers see them go: each declines (nothing sent) and ends
    # Then the agent serves again.
    wait_for(lambda: len(_workers(agent)) == 2, what="the spare workers to be back")
    assert cli("ps").returncode == 0


def test_the_worker_goes_to_the_clients_directory_not_its_path(
    torpor_home: Path, tmp_path: Path, agent: ProcRef
) -> None:
    # The launcher's directory is renamed away (and another put at its path) after the
    # launcher opened it: the command runs in the directory the launcher was in.
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "pwd"
    argv = ["run", "--name", "where", "--", "sh", "-c", f"pwd -P > {out}; sleep 600"]
    here = os.open(work, os.O_PATH | os.O_DIRECTORY)
    try:
        work.rename(tmp_path / "moved")
        work.mkdir()
        sock = _connect(torpor_home)
        with sock:
            assert sock.recv(64) == b"ready"
            _send(sock, _encode(argv, os.fsencode(work)), here)
            sock.settimeout(120)
            assert sock.recv(4096) == b"exit:0"
    finally:
        os.close(here)
    wait_for(lambda: out.exists() and out.read_text() != "", what="the command's pwd")
    assert out.read_text().strip() == str(tmp_path / "moved")


CGROUPS = {"pids": Path("/sys/fs/cgroup/pids"), "": Path("/sys/fs/cgroup/unified")}


def _own_cgroups(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/cgroup") as fh:
        for line in fh:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            out[controllers] = path
    return out


@pytest.mark.parametrize("launcher", ["torpor", "torpor-py"])
def test_the_command_runs_in_the_clients_cgroups(
    torpor_home: Path, agent: ProcRef, launcher: str
) -> None:
    name = f"torpor-test-{os.getpid()}-{launcher}"
    made = []
    for mount in CGROUPS.values():
        if not (mount / "cgroup.procs").exists():
            pytest.fail(f"{mount} is not a cgroup mount")
        (mount / name).mkdir()
        made.append(mount / name)

    def enter() -> None:
        for group in made:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    pid = None
    try:
        out = subprocess.run(
            [str(INSTALL / launcher), "run", "--name", "cg", "--", "sleep", "600"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=enter,
        ).stdout.split()
        pid = int(out[1])
        assert _served_by_agent(pid, agent)
        groups = _own_cgroups(pid)
        assert (groups["pids"], groups[""]) == (f"/{name}", f"/{name}")
        assert _agent_log(torpor_home).count("declined") == 0
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            record = torpor_home / "procs" / "cg.json"
            wait_for(
                lambda: json.loads(record.read_text()).get("exit_status") is not None,
                what="the keeper to record the exit",
            )
        for group in made:
            wait_for(lambda g=group: not (g / "cgroup.procs").read_text(), what="it to empty")
            group.rmdir()


def test_a_device_the_clients_cgroup_denies_stays_denied(
    torpor_home: Path, tmp_path: Path, agent: ProcRef
) -> None:
    # The review's case: a shell whose devices cgroup denies /dev/zero (and /dev/null) ran
    # `head -c1 /dev/zero` through the agent, in the agent's cgroup.
    group = Path("/sys/fs/cgroup/devices") / f"torpor-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "devices.deny").write_text("c 1:5 rwm")  # /dev/zero

        def enter() -> None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

        out = tmp_path / "out"
        script = f"head -c1 /dev/zero > {out} 2>&1; echo $? >> {out}; exec sleep 600"
        proc = subprocess.run(
            [str(TORPOR), "run", "--name", "zero", "--", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=enter,
        )
        assert proc.returncode == 0, proc.stderr
        pid = int(proc.stdout.split()[1])
        assert _served_by_agent(pid, agent)
        wait_for(lambda: out.exists() and out.read_text().endswith("\n"), what="its output")
        assert out.read_text().endswith("1\n")  # head could not open /dev/zero
        assert "Operation not permitted" in out.read_text()
        os.kill(pid, signal.SIGKILL)
        record = torpor_home / "procs" / "zero.json"
        wait_for(
            lambda: json.loads(record.read_text()).get("exit_status") is not None,
            what="the keeper to record the exit",
        )
        # With /dev/null denied as well, the worker (in the cgroup too) still answers once the
        # command is done (it used to open /dev/null for itself then, and died).
        (group / "devices.deny").write_text("c 1:3 rwm")
        ps = subprocess.run(
            [str(TORPOR), "ps"], capture_output=True, text=True, timeout=120, preexec_fn=enter
        )
        assert ps.returncode == 0, ps.stderr
        assert "declined" not in _agent_log(torpor_home)
    finally:
        wait_for(lambda: not (group / "cgroup.procs").read_text(), what="it to empty")
        group.rmdir()
