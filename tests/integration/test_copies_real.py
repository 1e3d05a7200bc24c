"""Issue 12 item 3's acceptance against real CRIU: many copies of real servers.

- a gunicorn server with 2 workers restored as 3 copies, every copy serving on the one port;
- an app holding an unlinked file restored as 3 copies, each with a file of its own;
- an image that held a TCP connection restored with ``--tcp-close``, twice and as 2 copies.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
from pathlib import Path

import pytest

from torpor._process._proc import running

from .helpers import APPS, PYTHON, copy_log, torpor, wait_for

pytestmark = pytest.mark.criu

GUNICORN = str(Path(PYTHON).parent / "gunicorn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _restore(*args: str) -> list[int]:
    return [p["pid"] for p in json.loads(torpor("restore", *args, "--json").stdout)]


def _restore_named(*args: str) -> dict[str, int]:
    """Restored copies' names -> their pids."""
    return {p["name"]: p["pid"] for p in json.loads(torpor("restore", *args, "--json").stdout)}


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _http_pid(port: int) -> int:
    """Which gunicorn master answered a fresh connection (the app answers its host pid)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        assert resp.status == 200
        return int(resp.read())
    finally:
        conn.close()


def test_gunicorn_with_two_workers_restored_as_three_copies_all_serve(
    torpor_home: Path, tmp_path: Path
) -> None:
    port = _free_port()
    cmd = [GUNICORN, "-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", str(APPS)]
    # Its control socket (a unix socket bound to a path) out of /root, where other runs are.
    cmd += ["--control-socket", str(tmp_path / "gunicorn.ctl"), "gunicorn_app:app"]
    pid = int(torpor("run", "--name", "web", "--", *cmd).stdout.split()[1])
    log = torpor_home / "logs" / "web.log"
    wait_for(lambda: log.read_text().count("Booting worker") == 2, timeout=30, what="2 workers")
    wait_for(lambda: len(_children(pid)) == 2, what="2 worker processes")
    assert _http_pid(port) == pid

    torpor("checkpoint", "web", "--name", "web-img")
    wait_for(lambda: not running(pid), what="the original to stop")
    copies = _restore("web-img", "--count", "3")
    assert len(set(copies)) == 3
    assert [len(_children(c)) for c in copies] == [2, 2, 2]

    # The kernel spreads connections over the copies by a hash of the client's port: with 60
    # connections a copy that serves gets none with probability 3 * (2/3)^60, about 1e-10.
    answered = [_http_pid(port) for _ in range(60)]
    assert set(answered) == set(copies), {c: answered.count(c) for c in set(answered)}
    assert all(running(c) for c in copies)


def _unlinked_lines(log: Path) -> dict[int, list[tuple[int, str]]]:
    """unlinked_file.py's log: host pid -> [(inode, the file's distinct lines)] in order."""
    out: dict[int, list[tuple[int, str]]] = {}
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit():
            out.setdefault(int(parts[0]), []).append((int(parts[1]), parts[2]))
    return out


def test_app_with_an_unlinked_file_restores_as_copies_each_with_its_own_file(
    torpor_home: Path,
) -> None:
    app = [PYTHON, str(APPS / "unlinked_file.py")]
    pid = int(torpor("run", "--name", "tmpf", "--", *app).stdout.split()[1])
    log = torpor_home / "logs" / "tmpf.log"
    wait_for(lambda: len(_unlinked_lines(log).get(pid, [])) >= 2, what="the app writing")
    torpor("checkpoint", "tmpf", "--name", "tmpf-img")
    wait_for(lambda: not running(pid), what="the original to stop")
    kept = log.read_bytes()

    copies = _restore_named("tmpf-img", "--count", "3")
    # Two more, by two commands at once: restores of one image by separate commands take
    # their turns too.
    both = [
        subprocess.Popen(
            [PYTHON, "-m", "torpor", "restore", "tmpf-img", "--name", f"tmpf-x{i}", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (1, 2)
    ]
    for proc in both:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        copies |= {p["name"]: p["pid"] for p in json.loads(out)}
    assert sorted(copies) == ["tmpf-img-1", "tmpf-img-2", "tmpf-img-3", "tmpf-x1", "tmpf-x2"]
    assert len(set(copies.values())) == 5

    # Each copy writes to a log of its own.
    logs = {c: copy_log(torpor_home, name) for name, c in copies.items()}
    wait_for(
        lambda: all(len(_unlinked_lines(logs[c]).get(c, [])) >= 3 for c in logs),
        what="every copy writing to its file",
    )
    for c, own in logs.items():
        seen = _unlinked_lines(own)
        assert list(seen) == [c]  # only its own lines
        # What the image's file held (the original's lines) and this copy's own, nobody else's.
        assert seen[c][-1][1] == ",".join(sorted([str(pid), str(c), "before"])), seen[c][-1]
    # five files, not one shared
    assert len({_unlinked_lines(own)[c][-1][0] for c, own in logs.items()}) == 5
    assert log.read_bytes() == kept  # and none wrote to the original's log
    assert sorted(p.name for p in Path("/tmp").glob("torpor-unlinked-*.ghost")) == []


def _ask(sock: socket.socket, text: str) -> list[str]:
    """Send a line, return the answer's words (one answer per line sent: no read-ahead)."""
    sock.sendall(text.encode() + b"\n")
    answer = b""
    while not answer.endswith(b"\n"):
        data = sock.recv(1)
        assert data, f"connection closed after {answer!r}"
        answer += data
    return answer.decode().split()


def _answerer(port: int) -> int:
    """Which copy answers a fresh connection (tcp_lines.py answers "<host pid> 1 <line>")."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        pid, n, line = _ask(s, "who")
    assert (n, line) == ("1", "who")
    return int(pid)


def test_image_that_held_a_connection_restores_with_tcp_close_twice_and_as_copies(
    torpor_home: Path,
) -> None:
    port = _free_port()
    app = [PYTHON, str(APPS / "tcp_lines.py"), str(port)]
    pid = int(torpor("run", "--name", "tcp", "--", *app).stdout.split()[1])
    log = torpor_home / "logs" / "tcp.log"
    wait_for(lambda: "listening" in log.read_text(), what="the server")
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        assert _ask(client, "a") == [str(pid), "1", "a"]
        torpor("checkpoint", "tcp", "--tcp-established", "--name", "tcp-img")
        wait_for(lambda: not running(pid), what="the original to stop")

        # The connection resumes in a first copy (which shares its port with later ones).
        (first,) = _restore("tcp-img", "--reuseport")
        assert _ask(client, "b") == [str(first), "2", "b"]
        # While it holds the connection, the image cannot be restored with its connection
        # again, and the error says what to do.
        again = torpor("restore", "tcp-img", "--name", "tcp-again", check=False)
        assert again.returncode == 1
        assert again.stderr.count("\n") == 1
        assert again.stderr.rstrip("\n").split(" — ")[-1] == (
            "the image's TCP connection still exists (a restored copy holds it, or it "
            "lingers): restore with --tcp-close to bring it back closed"
        )

        # With --tcp-close it can: twice, then as two copies. Each is single-threaded and was
        # dumped inside recv() on the held connection: that it answers a new connection shows
        # that connection came back closed.
        closed = _restore("tcp-img", "--tcp-close", "--reuseport", "--name", "closed-1")
        closed += _restore("tcp-img", "--tcp-close", "--reuseport", "--name", "closed-2")
        closed += _restore("tcp-img", "--tcp-close", "--name", "pair", "--count", "2")
        # The first copy still has the connection it resumed.
        assert _ask(client, "c") == [str(first), "3", "c"]
    finally:
        client.close()  # and then serves new ones, as the others do

    servers = {first, *closed}
    assert len(servers) == 5
    # All five share the port: 100 connections miss a serving one with probability
    # 5 * (4/5)^100, about 1e-9.
    answered = [_answerer(port) for _ in range(100)]
    assert set(answered) == servers, {c: answered.count(c) for c in set(answered)}
