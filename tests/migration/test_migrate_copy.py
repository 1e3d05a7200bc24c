"""``torpor migrate --mode copy`` between two lab hosts, on real CRIU: the process moves with its
state, or stays where it was, unchanged; an untrusted peer and a failed pre-flight get nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import SCRIPT, Lab

pytestmark = pytest.mark.criu

TORPOR = (sys.executable, "-m", "torpor")
PORT = 7070
# Prints 0, 1, 2, ... to its log, one line every 20 ms.
COUNTER = (
    "import time\ni = 0\nwhile True:\n    print(i, flush=True)\n    i += 1\n    time.sleep(0.02)"
)


def torpor(lab: Lab, host: str, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.exec(host, *TORPOR, *args)


def trust(lab: Lab, tmp: Path, who: str, of: str) -> None:
    """Make ``who`` trust ``of`` by its certificate (given out of band, as an admin would)."""
    pem = torpor(lab, of, "identity", "show", "--cert")
    assert pem.returncode == 0, pem.stderr
    path = tmp / f"{of}.pem"
    path.write_text(pem.stdout)
    added = torpor(lab, who, "trust", "add", "--cert", str(path), "--name", of)
    assert added.returncode == 0, added.stderr


@pytest.fixture(scope="module")
def paired(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """The module's lab with a and b trusting each other."""
    tmp = tmp_path_factory.mktemp("certs")
    trust(lab, tmp, "a", "b")
    trust(lab, tmp, "b", "a")
    return lab


class Server:
    """``torpor agent run --listen`` on a host, started by the test (killed by its pid)."""

    def __init__(self, lab: Lab, host: str, env: dict[str, str] | None = None) -> None:
        where = f"{lab.address(host)}:{PORT}"
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        # lab-hosts exec execs the command (and env execs python): the pid is the server's.
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), host, "--",
             "env", *extra, *TORPOR, "agent", "run", "--listen", where],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == f"listening on {where}\n", self.stop()
        self.where = where

    def wait_log(self, start: str) -> str:
        """The first line it logs that begins with ``start`` (it has done what the line says)."""
        assert self.proc.stderr is not None
        seen = []
        for line in self.proc.stderr:
            seen.append(line)
            if line.startswith(start):
                self.seen = [*self.seen, *seen]
                return line.rstrip("\n")
        raise AssertionError(f"the server ended without logging {start!r}: {seen}")

    seen: list[str] = []

    def stop(self) -> str:
        """Kill it (if it runs) and return what it logged."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        _, err = self.proc.communicate(timeout=10)
        return "".join(self.seen) + err


@contextlib.contextmanager
def server(lab: Lab, host: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    srv = Server(lab, host, env)
    try:
        yield srv
    finally:
        srv.stop()


def start_counter(lab: Lab, host: str, name: str) -> int:
    """Run :data:`COUNTER` as ``name`` on ``host``; its pid once it has counted a little."""
    started = torpor(lab, host, "run", "--name", name, "--", sys.executable, "-c", COUNTER)
    assert started.returncode == 0, started.stderr
    wait_for(lambda: len(counts(lab, host, name)) >= 5)
    return int(ps(lab, host, name)["pid"])


def counts(lab: Lab, host: str, name: str) -> list[int]:
    """The numbers in ``name``'s log on ``host`` (whole lines only)."""
    text = lab.python(
        host, f"import os; print(open(os.environ['TORPOR_HOME'] + '/logs/{name}.log').read())"
    )
    return [int(line) for line in text.splitlines() if line.strip()]


def ps(lab: Lab, host: str, name: str) -> dict[str, Any]:
    """``name``'s entry in ``torpor ps --all --json`` on ``host`` ({} if it has none)."""
    res = torpor(lab, host, "ps", "--all", "--json")
    assert res.returncode == 0, res.stderr
    found = [p for p in json.loads(res.stdout) if p["name"] == name]
    assert len(found) <= 1
    return found[0] if found else {}


def running_names(lab: Lab, host: str) -> list[str]:
    res = torpor(lab, host, "ps", "--json")
    assert res.returncode == 0, res.stderr
    return sorted(p["name"] for p in json.loads(res.stdout))


def images(lab: Lab, host: str) -> str:
    """What ``host``'s images directory holds (the server makes it when it starts)."""
    return lab.python(host, "import os; print(os.listdir(os.environ['TORPOR_HOME'] + '/images'))")


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def consecutive(numbers: list[int]) -> bool:
    return numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def test_copy_moves_the_process_with_its_count(paired: Lab) -> None:
    lab = paired
    pid = start_counter(lab, "a", "ctr")
    with server(lab, "b") as srv:
        res = torpor(lab, "a", "migrate", "ctr", "--to", srv.where, "--mode", "copy", "--json")
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout)
        done = srv.wait_log("torpor-migrate: 'ctr' migrated from a: ")
        srv.stop()
    assert (summary["name"], summary["mode"], summary["source_pid"]) == ("ctr", "copy", pid)
    assert summary["target"] == srv.where
    assert summary["files"] > 0 and summary["bytes"] > 0
    assert 0 < summary["downtime_ms"] <= summary["total_ms"]
    assert summary["fenced"] is True  # b ran its copy only once a confirmed the kill
    # On b, under the same name, by b's own keeper, counting on from where a stopped.
    there = ps(lab, "b", "ctr")
    assert (there["state"], there["pid"]) == ("running", summary["target_pid"])
    assert (there["migrated_from"], there["migrating"]) == ("a", None)
    before = counts(lab, "a", "ctr")
    wait_for(lambda: len(counts(lab, "b", "ctr")) >= 10)
    after = counts(lab, "b", "ctr")
    assert after[0] == before[-1] + 1
    assert consecutive(before) and consecutive(after)
    # Nothing of it left running on a; its record says where it went.
    assert not alive(pid)
    here = ps(lab, "a", "ctr")
    assert (here["state"], here["migrated_to"]) == (f"migrated-to {srv.where}", srv.where)
    assert here["migrating"] is None
    assert counts(lab, "a", "ctr") == before
    assert done.startswith(f"torpor-migrate: 'ctr' migrated from a: pid {there['pid']}, ")
    # The image was only in transit: b's images directory keeps nothing of it.
    assert images(lab, "b") == "[]"


def test_target_killed_mid_migration_leaves_the_process_running_on_a(
    paired: Lab, tmp_path: Path
) -> None:
    lab = paired
    pid = start_counter(lab, "a", "held")
    hold = tmp_path / "image-arrived"
    with server(lab, "b", {"TORPOR_TEST_MIGRATE_HOLD": str(hold)}) as srv:
        migrate = subprocess.Popen(
            [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "a", "--",
             *TORPOR, "migrate", "held", "--to", srv.where],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_for(hold.exists)  # the image is on b; a's process is frozen at post-dump
        frozen = counts(lab, "a", "held")
        time.sleep(0.3)
        assert counts(lab, "a", "held") == frozen  # held frozen while b has the image
        srv.stop()  # SIGKILL, by the pid this test started
        out, err = migrate.communicate(timeout=30)
    assert migrate.returncode == 1, (out, err)
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"torpor: error: migration of held to {srv.where} failed: ")
    assert lines[-1].endswith(f"(the process runs here, unchanged (pid {pid}))")
    # The same process on a, counting on without a gap but its freeze; nothing on b.
    assert ps(lab, "a", "held")["state"] == "running"
    assert int(ps(lab, "a", "held")["pid"]) == pid
    wait_for(lambda: len(counts(lab, "a", "held")) >= len(frozen) + 10)
    numbers = counts(lab, "a", "held")
    assert numbers[0] == 0 and consecutive(numbers)
    assert "held" not in running_names(lab, "b")
    assert ps(lab, "b", "held") == {}


def test_untrusted_source_is_refused_and_nothing_starts_on_b(make_lab: Any, tmp_path: Path) -> None:
    lab = make_lab()
    trust(lab, tmp_path, "a", "b")  # a trusts b, b does not trust a
    pid = start_counter(lab, "a", "stranger")
    with server(lab, "b") as srv:
        res = torpor(lab, "a", "migrate", "stranger", "--to", srv.where)
        log = srv.stop()
    assert res.returncode == 1
    assert (
        res.stderr.strip()
        .splitlines()[-1]
        .startswith(f"torpor: error: {srv.where} refused this host's certificate")
    )
    assert log.splitlines()[0].startswith("torpor-migrate: refused: connection from ")
    assert log.splitlines()[0].endswith(" refused in the TLS handshake: CERTIFICATE_VERIFY_FAILED")
    assert len(log.splitlines()) == 1  # nothing else happened on b
    assert (ps(lab, "a", "stranger")["state"], ps(lab, "a", "stranger")["pid"]) == ("running", pid)
    assert running_names(lab, "b") == []
    assert images(lab, "b") == "[]"


def test_preflight_refuses_a_taken_name_before_anything_is_frozen(paired: Lab) -> None:
    lab = paired
    pid = start_counter(lab, "a", "twin")
    taken = torpor(lab, "b", "run", "--name", "twin", "--", "sleep", "300")
    assert taken.returncode == 0, taken.stderr
    other = int(ps(lab, "b", "twin")["pid"])
    with server(lab, "b") as srv:
        res = torpor(lab, "a", "migrate", "twin", "--to", srv.where)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        f"torpor: error: migration of twin to {srv.where} refused in pre-flight: the name "
        f"'twin' is taken on {srv.where}: pid {other} runs under it (nothing was frozen; the "
        f"process runs here, pid {pid}) — fix what the target reports, then migrate again"
    )
    numbers = counts(lab, "a", "twin")
    assert (ps(lab, "a", "twin")["state"], ps(lab, "a", "twin")["pid"]) == ("running", pid)
    assert consecutive(numbers)
    assert int(ps(lab, "b", "twin")["pid"]) == other


def test_source_killed_in_the_fence_leaves_the_copy_stopped_in_doubt(
    paired: Lab, tmp_path: Path
) -> None:
    """The fence (docs/migration.md): b's copy waits stopped until a confirms the original's
    end. The source dies after b's 'running' and before its verdict: CRIU, its notification
    unanswered, thaws the original; b cannot know, keeps its copy *stopped* (never two
    running) and says the migration is in doubt, until ``--resolve`` settles it."""
    lab = paired
    pid = start_counter(lab, "a", "doubt")
    hold = tmp_path / "copy-running"
    with server(lab, "b") as srv:
        migrate = subprocess.Popen(
            [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "a", "--",
             "env", f"TORPOR_TEST_MIGRATE_SOURCE_HOLD={hold}",
             *TORPOR, "migrate", "doubt", "--to", srv.where],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_for(hold.exists)  # b holds its copy stopped; a's original is frozen at post-dump
        assert ps(lab, "a", "doubt")["state"] == f"migrating to {srv.where}"
        fenced = ps(lab, "b", "doubt")
        assert fenced["state"] == "migrating from a (stopped until the source confirms its end)"
        assert proc_state(int(fenced["pid"])) == "T"
        migrate.kill()  # the migrate command, by the pid this test started
        migrate.communicate(timeout=30)
        line = srv.wait_log("torpor-migrate: 'doubt' (pid ")
    copy = ps(lab, "b", "doubt")
    doubt = "in doubt: the source went silent; the copy is stopped"
    assert line.startswith(
        f"torpor-migrate: 'doubt' (pid {copy['pid']}) is stopped here, migration {doubt}: "
    )
    assert (copy["state"], copy["migrated_from"]) == (f"migrating from a ({doubt})", None)
    # The original runs on; the copy never ran: its log holds nothing of its own.
    wait_for(lambda: ps(lab, "a", "doubt").get("state") == "running")
    assert int(ps(lab, "a", "doubt")["pid"]) == pid
    assert alive(pid) and proc_state(int(copy["pid"])) == "T"
    before = len(counts(lab, "a", "doubt"))
    wait_for(lambda: len(counts(lab, "a", "doubt")) > before + 5)
    # Settled as the docs say: here the original is the process, so the copy goes.
    wrong = torpor(lab, "a", "migrate", "doubt", "--resolve", "kill")
    assert (wrong.returncode, wrong.stderr.splitlines()) == (1, [
        f"torpor: error: doubt has no migration in doubt here (its migration: to {srv.where})"
        " — --resolve is for a copy whose source went silent (see torpor ps)"
    ])  # fmt: skip
    killed = torpor(lab, "b", "migrate", "doubt", "--resolve", "kill")
    assert killed.returncode == 0, killed.stderr
    assert (
        killed.stdout
        == f"doubt (pid {copy['pid']}) killed here: the original on a is the process\n"
    )
    wait_for(lambda: not alive(int(copy["pid"])))
    assert alive(pid)


def test_resolve_continue_runs_a_fenced_copy(paired: Lab, tmp_path: Path) -> None:
    """The other way to settle it: the original is gone (killed here by the test, as CRIU
    would have), so the stopped copy is continued and counts on from where it was."""
    lab = paired
    pid = start_counter(lab, "a", "settle")
    hold = tmp_path / "copy-running"
    with server(lab, "b") as srv:
        migrate = subprocess.Popen(
            [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "a", "--",
             "env", f"TORPOR_TEST_MIGRATE_SOURCE_HOLD={hold}",
             *TORPOR, "migrate", "settle", "--to", srv.where],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_for(hold.exists)
        os.kill(pid, signal.SIGKILL)  # the original, frozen: a pid this test's app has
        migrate.kill()
        migrate.communicate(timeout=30)
        srv.wait_log("torpor-migrate: 'settle' (pid ")
    copy = ps(lab, "b", "settle")
    assert proc_state(int(copy["pid"])) == "T"
    done = torpor(lab, "b", "migrate", "settle", "--resolve", "continue")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"settle (pid {copy['pid']}) continues here: the migration from a is settled\n"
    )
    wait_for(lambda: len(counts(lab, "b", "settle")) >= 3)
    after = ps(lab, "b", "settle")
    assert (after["state"], after["migrated_from"]) == ("running", "a")
    numbers = counts(lab, "b", "settle")
    assert consecutive(numbers)
    killed = torpor(lab, "b", "kill", "settle")
    assert killed.returncode == 0, killed.stderr


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_pages_stream_to_the_target_as_they_are_dumped(paired: Lab) -> None:
    """Without a base the pages go to b's page server as CRIU dumps them, hashed there as they
    are written (the server's log says so, and the copy counts on); with the stream turned off
    they are written on a and sent after the dump, as before."""
    lab = paired
    for name, env in (("streamed", ""), ("unstreamed", "TORPOR_MIGRATE_NO_STREAM=1")):
        pid = start_counter(lab, "a", name)
        with server(lab, "b") as srv:
            cmd = ["env", *([env] if env else []), *TORPOR, "migrate", name, "--to", srv.where,
                   "--json"]  # fmt: skip
            res = lab.exec("a", *cmd)
            assert res.returncode == 0, res.stderr
            summary = json.loads(res.stdout)
            srv.wait_log(f"torpor-migrate: '{name}' migrated from a: ")
            log = srv.stop()
        streamed = [line for line in log.splitlines() if "page stream: " in line]
        if env:
            assert streamed == [], log
        else:
            # e.g. "page stream: 1949216 bytes relayed, 1945672 bytes in 2 files, hashed as
            # written": a pagemap and a pages file, most of the image.
            assert len(streamed) == 1, log
            in_files = int(streamed[0].split(" bytes in ")[0].rsplit(", ", 1)[1])
            assert streamed[0].endswith(" bytes in 2 files, hashed as written"), streamed
            assert summary["bytes"] > in_files > summary["bytes"] // 2
        assert summary["bytes_sent"] == summary["bytes"]
        before = counts(lab, "a", name)
        wait_for(lambda n=name: len(counts(lab, "b", n)) >= 5)  # type: ignore[misc]
        assert counts(lab, "b", name)[0] == before[-1] + 1
        assert not alive(pid)
        assert images(lab, "b") == "[]"
        assert torpor(lab, "b", "kill", name).returncode == 0


def test_target_killed_mid_stream_leaves_the_process_running_on_a(
    paired: Lab, tmp_path: Path
) -> None:
    """b dies while the pages stream to it (its page server has some, CRIU is still dumping):
    the dump fails, CRIU thaws the original, which counts on; b keeps nothing of it."""
    lab = paired
    pid = start_counter(lab, "a", "cutstream")
    hold = tmp_path / "pages-arriving"
    with server(lab, "b", {"TORPOR_TEST_MIGRATE_STREAM_HOLD": str(hold)}) as srv:
        migrate = subprocess.Popen(
            [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "a", "--",
             *TORPOR, "migrate", "cutstream", "--to", srv.where],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_for(hold.exists)  # pages have reached b; a's process is frozen, mid-dump
        frozen = counts(lab, "a", "cutstream")
        time.sleep(0.3)
        assert counts(lab, "a", "cutstream") == frozen
        srv.stop()  # SIGKILL, by the pid this test started
        out, err = migrate.communicate(timeout=30)
    assert migrate.returncode == 1, (out, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"torpor: error: migration of cutstream to {srv.where} failed: "), last
    assert last.endswith(f"(the process runs here, unchanged (pid {pid}))"), last
    assert (ps(lab, "a", "cutstream")["state"], ps(lab, "a", "cutstream")["pid"]) == (
        "running",
        pid,
    )
    wait_for(lambda: len(counts(lab, "a", "cutstream")) >= len(frozen) + 10)
    numbers = counts(lab, "a", "cutstream")
    assert numbers[0] == 0 and consecutive(numbers)
    assert ps(lab, "b", "cutstream") == {}
    # The next server sweeps what the killed one had received.
    with server(lab, "b"):
        assert images(lab, "b") == "[]"
    assert torpor(lab, "a", "kill", "cutstream").returncode == 0
