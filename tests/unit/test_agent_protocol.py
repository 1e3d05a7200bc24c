"""The launchers' side of the agent protocol against the worker's decoder, and both launchers
(the Python ``torpor-py`` and the native ``torpor``, compiled here) against a fake agent."""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from torpor import _paths
from torpor._agent._worker import AgentContext, BadRequest, Request, decode_request

ROOT = Path(__file__).resolve().parents[2]
NATIVE_SOURCE = ROOT / "bin" / "torpor.c"
PY_LAUNCHER = ROOT / "bin" / "torpor-py"


def _load_launcher() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("torpor_launcher", str(PY_LAUNCHER))
    spec = importlib.util.spec_from_loader("torpor_launcher", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


launcher = _load_launcher()


# -- encoding and decoding ------------------------------------------------------------------


def test_request_round_trips() -> None:
    argv = ["restore", "img-é", "--name", "x y", "\udcff"]  # undecodable byte as surrogate
    env = {b"PATH": b"/usr/bin", b"EMPTY": b"", b"EQ": b"a=b", b"BYTES": b"\xff"}
    rlimits = [(7, 1024, 4096), (3, -1, -1)]
    packet = launcher.encode_request(b"/venv/bin", argv, b"/some/where", 0o027, rlimits, env)
    req = decode_request(packet)
    assert req == Request(b"/venv/bin", tuple(argv), b"/some/where", 0o027, tuple(rlimits), env)


def test_no_arguments_and_no_environment() -> None:
    req = decode_request(launcher.encode_request(b"/b", [], b"/", 0, [], {}))
    assert req.argv == () and req.environ == {} and req.rlimits == ()


def test_a_nul_byte_cannot_be_sent() -> None:
    with pytest.raises(ValueError):
        launcher.encode_request(b"/b", ["a\0b"], b"/", 0, [], {})


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"torpor-agent/1\0/b\0/\x000\0\x000",
        b"torpor-agent/2\0/b\0/\x000\0\x000",  # an old launcher (no directory fd)
        b"torpor-agent/3\0/b\0/\0zz\0\x000",
        b"torpor-agent/3\0/b\0/\0-1\0\x000",
        b"torpor-agent/3\0/b\0/",
    ],
)
def test_bad_requests_are_refused(packet: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_request(packet)


def test_argument_count_beyond_the_packet_is_refused() -> None:
    packet = launcher.encode_request(b"/b", ["a"], b"/", 0, [], {})
    packet = packet.replace(b"\x001\x00", b"\x009\x00")
    with pytest.raises(BadRequest):
        decode_request(packet)


def test_an_environment_entry_without_a_name_is_dropped() -> None:
    req = decode_request(launcher.encode_request(b"/b", [], b"/", 0, [], {b"": b"x", b"A": b""}))
    assert req.environ == {b"A": b""}


def test_the_agent_runs_only_requests_of_its_own_installation(tmp_path: Path) -> None:
    ctx = AgentContext(install=bytes(tmp_path), criu_env=None)
    ok = Request(bytes(tmp_path), (), b"/", 0, (), {})
    assert ctx.mismatch(ok) is None
    other = Request(b"/elsewhere/bin", (), b"/", 0, (), {})
    assert "launcher from" in (ctx.mismatch(other) or "")
    criu = Request(bytes(tmp_path), (), b"/", 0, (), {b"TORPOR_CRIU": b"/opt/criu"})
    assert "TORPOR_CRIU" in (ctx.mismatch(criu) or "")


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["restore", "x"], {}, True),
        (["-q", "restore", "x"], {}, True),
        (["agent", "stop"], {}, False),
        (["-v", "agent", "status"], {}, False),
        (["run", "--", "agent"], {}, True),
        (["ps"], {b"TORPOR_AGENT": b"off"}, False),
        (["ps"], {b"TORPOR_AGENT": b"0"}, False),
        (["ps"], {b"TORPOR_AGENT": b"on"}, True),
        (["ps"], {b"TORPOR_AGENT_TRIED": b"1"}, False),
        ([], {}, True),
    ],
)
def test_which_commands_go_to_the_agent(
    argv: list[str], env: dict[bytes, bytes], expected: bool
) -> None:
    assert launcher.wants_agent(argv, env) is expected


def test_home_rule_matches_torpor_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORPOR_HOME", str(tmp_path / "h"))
    assert launcher.home_dir(os.environb, os.geteuid()) == bytes(_paths.home_path())
    monkeypatch.delenv("TORPOR_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert launcher.home_dir(os.environb, 1000) == bytes(_paths.home_path())
    assert launcher.home_dir({}, 0) == b"/var/lib/torpor"


# -- both launchers against a fake agent ------------------------------------------------------


class FakeAgent:
    """Listens where an agent would; ``answer(request, fds, conn)`` handles each connection."""

    def __init__(
        self, home: Path, answer: Callable[[Request, list[int], socket.socket], None] | None
    ):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(str(home / "agent.sock"))
        self.sock.listen(4)
        self.answer = answer
        self.requests: list[Request] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                if self.answer is None:  # a worker that dies before it is ready
                    continue
                conn.send(b"ready")
                msg, anc, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 4))
                fds = [
                    int.from_bytes(data[i : i + 4], sys.byteorder)
                    for _, _, data in anc
                    for i in range(0, len(data), 4)
                ]
                req = decode_request(msg)
                self.requests.append(req)
                try:
                    self.answer(req, fds, conn)
                finally:
                    for fd in fds:
                        os.close(fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() in our thread
        self.sock.close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The native launcher, compiled with warnings as errors, beside a stand-in torpor-py
    that only says it ran."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("no C compiler: the native launcher cannot be built here")
    bindir = tmp_path_factory.mktemp("bin")
    exe = bindir / "torpor"
    subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(NATIVE_SOURCE)],
        check=True,
    )
    stand_in = bindir / "torpor-py"
    stand_in.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        "tried = os.environ.get('TORPOR_AGENT_TRIED', '')\n"
        "print(f\"fallback {' '.join(sys.argv[1:])} (tried={tried})\")\n"
        "print(next(ln for ln in open('/proc/self/status') if ln.startswith('SigBlk')),\n"
        "      file=sys.stderr)\n"
    )
    stand_in.chmod(0o755)
    return exe


LAUNCHERS = ("native", "python")


@pytest.fixture(params=LAUNCHERS)
def launch(request: pytest.FixtureRequest) -> Iterator[Callable[..., list[str]]]:
    # Only the native case needs a C compiler.
    native = request.getfixturevalue("native") if request.param == "native" else None

    def command(*args: str) -> list[str]:
        if native is not None:
            return [str(native), *args]
        return [sys.executable, str(PY_LAUNCHER), *args]

    yield command


def _home_env(home: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, TORPOR_HOME=str(home), **extra)


def test_the_command_runs_in_the_agent_with_the_clients_context(
    tmp_path: Path, launch: Callable[..., list[str]]
) -> None:
    directories = []

    def answer(req: Request, fds: list[int], conn: socket.socket) -> None:
        assert len(fds) == 4
        directories.append(os.fstat(fds[3]))  # the launcher's directory itself (O_PATH)
        os.write(fds[1], b"out from the worker\n")
        os.write(fds[2], b"err from the worker\n")
        conn.send(b"exit:7")

    agent = FakeAgent(tmp_path, answer)
    try:
        proc = subprocess.run(
            launch("restore", "img", "--name", "n"),
            capture_output=True,
            cwd=tmp_path,
            env=_home_env(tmp_path, MARK="here"),
            timeout=30,
        )
    finally:
        agent.close()
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == b"out from the worker\n"
    assert proc.stderr == b"err from the worker\n"
    [req] = agent.requests
    assert req.argv == ("restore", "img", "--name", "n")
    assert req.cwd == bytes(tmp_path)
    [here] = directories
    assert (here.st_dev, here.st_ino) == (tmp_path.stat().st_dev, tmp_path.stat().st_ino)
    assert req.environ[b"MARK"] == b"here"
    assert req.umask == _umask()
    import resource

    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert (resource.RLIMIT_NOFILE, *nofile) in req.rlimits


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _served(
    home: Path,
    answer: Callable[[Request, list[int], socket.socket], None] | None,
    command: list[str],
) -> tuple[subprocess.CompletedProcess[bytes], FakeAgent]:
    """Run ``command`` (a launcher) with a fake agent in ``home`` answering by ``answer``."""
    agent = FakeAgent(home, answer)
    try:
        proc = subprocess.run(command, capture_output=True, env=_home_env(home), timeout=30)
    finally:
        agent.close()
    return proc, agent


def test_a_declined_command_runs_in_the_launcher(tmp_path: Path, native: Path) -> None:
    declined = lambda req, fds, conn: conn.send(b"declined:testing")  # noqa: E731
    proc, agent = _served(tmp_path, declined, [str(native), "ps"])
    assert proc.stdout == b"fallback ps (tried=1)\n"
    assert len(agent.requests) == 1
    # The launcher had SIGINT blocked while it waited; what runs the command gets it back.
    blocked = int(proc.stderr.split()[-1], 16)
    assert not blocked & (1 << (signal.SIGINT - 1))


def test_a_request_bigger_than_a_worker_takes_runs_in_the_launcher(
    tmp_path: Path, launch: Callable[..., list[str]]
) -> None:
    # A worker receives 1 MiB at most: a bigger request is never sent (the worker would get
    # it cut short), the launcher runs the command itself.
    agent = FakeAgent(tmp_path, lambda req, fds, conn: conn.send(b"exit:0"))
    try:
        proc = subprocess.run(
            launch("--help"),
            capture_output=True,
            env=_home_env(tmp_path, **{f"BIG{i}": "x" * 100_000 for i in range(11)}),
            timeout=60,
        )
    finally:
        agent.close()
    assert agent.requests == []
    assert proc.returncode == 0, proc.stderr


def test_the_python_launcher_never_sends_more_than_a_worker_takes(tmp_path: Path) -> None:
    # Even through a send buffer big enough for it (net.core.wmem_default raised).
    agent = FakeAgent(tmp_path, lambda req, fds, conn: conn.send(b"exit:0"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setsockopt(socket.SOL_SOCKET, 32, 8 << 20)  # SO_SNDBUFFORCE
    env = {**os.environb, b"PAD": b"x" * (1 << 20)}
    try:
        assert launcher._hand_over(sock, bytes(tmp_path / "agent.sock"), ["ps"], env) is None
    finally:
        sock.close()
        agent.close()
    assert agent.requests == []


def test_a_connection_no_worker_took_runs_in_the_launcher(tmp_path: Path, native: Path) -> None:
    proc, _ = _served(tmp_path, None, [str(native), "ps"])  # accepts, closes: no `ready`
    assert proc.stdout == b"fallback ps (tried=1)\n"


@pytest.mark.parametrize(
    ("args", "extra"),
    [(["ps"], {}), (["agent", "stop"], {}), (["ps"], {"TORPOR_AGENT": "off"})],
)
def test_without_an_agent_the_native_launcher_runs_torpor_py(
    tmp_path: Path, native: Path, args: list[str], extra: dict[str, str]
) -> None:
    agent = FakeAgent(tmp_path, lambda req, fds, conn: conn.send(b"exit:0")) if extra else None
    if not extra and args[0] == "ps":
        (tmp_path / "agent.sock").unlink(missing_ok=True)  # nobody listens
    try:
        proc = subprocess.run(
            [str(native), *args],
            capture_output=True,
            env=_home_env(tmp_path, **extra),
            timeout=30,
        )
    finally:
        if agent is not None:
            agent.close()
    assert proc.stdout == f"fallback {' '.join(args)} (tried=1)\n".encode()
    assert agent is None or agent.requests == []


def test_a_worker_that_dies_is_reported(tmp_path: Path, launch: Callable[..., list[str]]) -> None:
    # The worker takes the request, then closes without answering.
    proc, _ = _served(tmp_path, lambda req, fds, conn: None, launch("ps"))
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert err.startswith("torpor: error: the agent's worker ended")
    assert err.count("\n") == 1


def test_ctrl_c_is_forwarded_to_the_worker(
    tmp_path: Path, launch: Callable[..., list[str]]
) -> None:
    got = threading.Event()

    def answer(req: Request, fds: list[int], conn: socket.socket) -> None:
        got.set()
        if conn.recv(64) == b"interrupt":
            conn.send(b"exit:130")

    agent = FakeAgent(tmp_path, answer)
    proc = subprocess.Popen(
        launch("checkpoint", "x"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_home_env(tmp_path),
    )
    try:
        assert got.wait(30)
        _wait_catching_sigint(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        agent.close()


def _wait_catching_sigint(pid: int) -> None:
    """Until process ``pid`` catches SIGINT (the launcher's handler is in place)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            caught = next(int(ln.split()[1], 16) for ln in fh if ln.startswith("SigCgt"))
        if caught & (1 << (signal.SIGINT - 1)):
            return
        time.sleep(0.005)
    raise AssertionError("the launcher never caught SIGINT")
