"""The lab ``bench_migrate.py`` runs in: ``scripts/lab-hosts`` hosts a and b and a client,
the agents on them, and the client node's recorder (``migrate_app.py client``)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_restore import kill

BENCH = Path(__file__).resolve().parent
APP = BENCH / "migrate_app.py"
LAB_HOSTS = BENCH.parent / "scripts" / "lab-hosts"
TORPOR = (sys.executable, "-m", "torpor")
AGENT_PORT, APP_PORT, HB_PORT = 7070, 8080, 9090
STEP_TIMEOUT = 600.0
POOL = "shared"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- the lab ----------------------------------------------------------------------------------


class Lab:
    """A lab of hosts a and b and a client, made by ``scripts/lab-hosts up`` and always taken
    down (``down`` signals every process in its namespaces, by pid)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        res = self.tool("up", "--dir", str(directory), "--hosts", "2")
        if res.returncode != 0:
            self.tool("down", "--dir", str(directory))
            raise RuntimeError(f"lab-hosts up failed: {res.stderr.strip()}")
        self.info = json.loads(res.stdout)
        self.procs: list[subprocess.Popen[str]] = []

    @staticmethod
    def tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, str(LAB_HOSTS), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def address(self, host: str) -> str:
        if host == "client":
            return str(self.info["client"]["address"])
        return str(next(h["address"] for h in self.info["hosts"] if h["name"] == host))

    @property
    def home(self) -> str:
        return str(self.info["hosts"][0]["home"])

    def argv(self, host: str, *cmd: str) -> list[str]:
        return [sys.executable, str(LAB_HOSTS), "exec", "--dir", str(self.dir), host, "--", *cmd]

    def run(self, host: str, *cmd: str, timeout: float = STEP_TIMEOUT) -> str:
        """``cmd`` on ``host``; its stdout (it must exit 0)."""
        res = subprocess.run(
            self.argv(host, *cmd), capture_output=True, text=True, timeout=timeout, check=False
        )
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} on {host} failed: {res.stderr.strip()}")
        return res.stdout

    def start(self, host: str, *cmd: str) -> subprocess.Popen[str]:
        """``cmd`` on ``host`` in the background, stdio piped (lab-hosts execs it: the pid is
        the command's)."""
        proc = subprocess.Popen(
            self.argv(host, *cmd),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def down(self) -> None:
        res = self.tool("down", "--dir", str(self.dir))
        for proc in self.procs:
            if proc.poll() is None:
                kill(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)
        if res.returncode != 0:
            log(f"lab-hosts down: {res.stderr.strip()}")


def torpor(lab: Lab, host: str, *args: str) -> str:
    return lab.run(host, *TORPOR, *args)


def trust_each_other(lab: Lab, tmp: Path) -> None:
    """a and b trust each other's certificate, given out of band (as an admin would)."""
    for who, of in (("a", "b"), ("b", "a")):
        pem = tmp / f"{of}.pem"
        pem.write_text(torpor(lab, of, "identity", "show", "--cert"))
        torpor(lab, who, "trust", "add", "--cert", str(pem), "--name", of)


def make_pool(lab: Lab, tmp: Path) -> None:
    """The dir pool ``shared`` on both hosts: one directory both see (/tmp is shared)."""
    shared = tmp / "pool"
    shared.mkdir(mode=0o700)
    for host in ("a", "b"):
        torpor(lab, host, "pool", "create", POOL, "dir", f"source={shared}")


def set_rto_min(lab: Lab, ms: int) -> None:
    """Every node's route to the lab's subnet gets ``rto_min`` (Linux's default is 200 ms):
    how soon a TCP peer retransmits what the move dropped, which decides the client's gap."""
    subnet = str(lab.info["subnet"])
    for host in ("a", "b", "client"):
        route = next(r for r in json.loads(lab.run(host, "ip", "-j", "route", "show"))
                 if r.get("dst") == subnet)  # fmt: skip
        lab.run(host, "ip", "route", "change", subnet, "dev", route["dev"], "proto", "kernel",
                "scope", "link", "src", route["prefsrc"], "rto_min", f"{ms}ms")  # fmt: skip


def start_source_agent(lab: Lab) -> None:
    """``--source-agent``: a's own agent (``torpor agent run``), as each host of a deployment
    runs one; a's ``torpor migrate`` then goes through the native launcher to one of its warm
    workers instead of starting Python and importing torpor for every move."""
    lab.start("a", *TORPOR, "agent", "run")
    deadline = time.monotonic() + 30
    while True:
        res = subprocess.run(lab.argv("a", *TORPOR, "agent", "status"), capture_output=True,
                             text=True, check=False)  # fmt: skip
        if res.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"a's agent never served: {res.stdout.strip()} {res.stderr.strip()}")
        time.sleep(0.1)


def base_env(src: Path) -> tuple[str, ...]:
    """The prefix that runs a command with torpor from ``src`` (``--base-src``)."""
    return ("env", f"PYTHONPATH={src}")


def start_agent(lab: Lab, base: Path | None = None) -> str:
    """b's agent (from ``base``, on the next port, for the ``base`` variants)."""
    where = f"{lab.address('b')}:{AGENT_PORT + (base is not None)}"
    prefix = base_env(base) if base is not None else ()
    proc = lab.start("b", *prefix, *TORPOR, "agent", "run", "--listen", where)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line != f"listening on {where}\n":
        raise RuntimeError(f"torpor agent run --listen {where}: {line!r}")
    return where


class Client:
    """``migrate_app.py client`` on the lab's client node, driven over its stdin."""

    def __init__(self, lab: Lab) -> None:
        self.proc = lab.start(
            "client", sys.executable, str(APP), "client", lab.address("client"), str(HB_PORT)
        )
        if not self.call("")["ready"]:
            raise RuntimeError("the client did not start")

    def call(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if line:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError("the client ended")
        answer: dict[str, Any] = json.loads(reply)
        return answer

    def ask(self, address: str, request: str) -> dict[str, Any]:
        return self.call(f"ask {address} {APP_PORT} {request}")
