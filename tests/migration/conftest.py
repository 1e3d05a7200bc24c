"""Fixtures for tests on a lab of simulated hosts (``scripts/lab-hosts``).

``lab`` is one lab per test module (two hosts ``a`` and ``b`` and a ``client``), made on first
use in a temporary directory and always taken down at the end. ``make_lab`` makes labs of a
test's own (other sizes, options), each taken down after the test. Without root or the tools the
tests are skipped with the reason; with ``CI=true`` they fail instead, since CI must run them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "lab-hosts"
TOOLS = ("ip", "unshare", "mount")
IN_CI = os.environ.get("CI") == "true"

# A TCP server for a host: answers each connection with "<host> <peer address> <data>".
ECHO_SERVER = """
import os, socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    conn, peer = srv.accept()
    with conn:
        data = conn.recv(100).decode()
        conn.sendall(f"{os.environ['TORPOR_LAB_HOST']} {peer[0]} {data}".encode())
"""
# Its client: prints the answer, or "errno N" when the connection fails.
ECHO_CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as conn:
        conn.sendall(b"hello")
        print(conn.recv(200).decode())
except OSError as exc:
    print(f"errno {exc.errno}")
"""


def unavailable(reason: str) -> NoReturn:
    """Skip the test for ``reason``; in CI, fail it (a skipped lab test proves nothing)."""
    if IN_CI:
        pytest.fail(f"CI must run the migration tests, but: {reason}", pytrace=False)
    pytest.skip(reason)


def lab_problem() -> str | None:
    """Why a lab cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)}: apt-get install iproute2 util-linux"
    return None


def lab_hosts(*args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/lab-hosts ARGS``; output captured as text."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True, text=True, timeout=timeout, check=False, **kw,
    )  # fmt: skip


class Lab:
    """A lab made by ``scripts/lab-hosts up``: its JSON (``info``) and ways to use its hosts."""

    def __init__(self, directory: Path, info: dict[str, Any]) -> None:
        self.dir, self.info = directory, info
        self.servers: list[subprocess.Popen[str]] = []

    @property
    def name(self) -> str:
        return str(self.info["lab"])

    def node(self, host: str) -> dict[str, Any]:
        """The JSON of a host (``a``, ``b``, ...) or of the client."""
        if host == "client":
            client: dict[str, Any] = self.info["client"]
            return client
        nodes: list[dict[str, Any]] = [h for h in self.info["hosts"] if h["name"] == host]
        assert len(nodes) == 1, f"lab {self.name} has no host {host!r}"
        return nodes[0]

    def address(self, host: str) -> str:
        return str(self.node(host)["address"])

    def exec(self, host: str, *cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` on ``host`` through ``lab-hosts exec``."""
        return lab_hosts("exec", "--dir", str(self.dir), host, "--", *cmd, **kw)

    def python(self, host: str, code: str, *args: str) -> str:
        """Run Python ``code`` on ``host``; its stdout, stripped (it must exit 0)."""
        res = self.exec(host, sys.executable, "-c", code, *args)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    def echo_server(self, host: str, port: int) -> subprocess.Popen[str]:
        """Start :data:`ECHO_SERVER` on ``host``'s address; returns once it listens."""
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "exec", "--dir", str(self.dir), host, "--",
             sys.executable, "-c", ECHO_SERVER, self.address(host), str(port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.servers.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline() == "listening\n"
        return proc

    def connect(self, host: str, address: str, port: int) -> str:
        """What :data:`ECHO_CLIENT` on ``host`` got from ``address:port``."""
        return self.python(host, ECHO_CLIENT, address, str(port))

    def down(self) -> None:
        """``lab-hosts down``, then reap the servers this handle started (down killed them)."""
        res = lab_hosts("down", "--dir", str(self.dir))
        for proc in self.servers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        assert res.returncode == 0, res.stderr


def make(directory: Path, *args: str) -> Lab:
    """``lab-hosts up --dir DIRECTORY ARGS``; fails the test if it fails."""
    res = lab_hosts("up", "--dir", str(directory), *args)
    if res.returncode != 0:
        lab_hosts("down", "--dir", str(directory))
        pytest.fail(f"lab-hosts up failed: {res.stderr.strip()}", pytrace=False)
    return Lab(directory, json.loads(res.stdout))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The module's lab: hosts ``a`` and ``b`` and a ``client``, always taken down."""
    problem = lab_problem()
    if problem:
        unavailable(problem)
    the_lab = make(tmp_path_factory.mktemp("lab"))
    try:
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture
def make_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Lab]]:
    """``make_lab(*args)``: a lab of the test's own (``up`` options in ``args``), taken down
    after the test."""
    problem = lab_problem()
    if problem:
        unavailable(problem)
    made: list[Lab] = []

    def factory(*args: str) -> Lab:
        made.append(make(tmp_path_factory.mktemp("lab"), *args))
        return made[-1]

    try:
        yield factory
    finally:
        for one in made:
            one.down()
