"""``torpor migrate --mode lazy`` between two lab hosts, on real CRIU: the copy runs on b before
its memory has moved, its pages follow over the channel, and it counts on with the very
memory it had; a transfer broken halfway kills the half-moved copy with a record; CRIU's page
traffic has no port anyone could connect to.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import SCRIPT, Lab
from .test_migrate_copy import (
    TORPOR,
    alive,
    images,
    paired,  # noqa: F401 - the fixture
    ps,
    running_names,
    server,
    torpor,
    trust,
    wait_for,
)

pytestmark = pytest.mark.criu

# Fills MIB MiB with bytes from a seeded generator (touching every page), prints their SHA-256
# ("sum HEX"), then counts as COUNTER does, printing the SHA-256 again every 100 numbers.
MEMORY_COUNTER = """
import hashlib, random, sys, time
buf = bytearray(random.Random(7).randbytes(int(sys.argv[1]) << 20))
print("sum", hashlib.sha256(buf).hexdigest(), flush=True)
i = 0
while True:
    print(i, flush=True)
    i += 1
    if i % 100 == 0:
        print("sum", hashlib.sha256(buf).hexdigest(), flush=True)
    time.sleep(0.02)
"""


def start_app(lab: Lab, host: str, name: str, mib: int) -> int:
    """Run :data:`MEMORY_COUNTER` as ``name``; its pid once it has counted a little."""
    cmd = (sys.executable, "-c", MEMORY_COUNTER, str(mib))
    started = torpor(lab, host, "run", "--name", name, "--", *cmd)
    assert started.returncode == 0, started.stderr
    wait_for(lambda: len(log(lab, host, name)[0]) >= 5, timeout=30)
    return int(ps(lab, host, name)["pid"])


def log(lab: Lab, host: str, name: str) -> tuple[list[int], list[str]]:
    """The numbers and the sums in ``name``'s log on ``host`` (whole lines only)."""
    text = lab.python(
        host, f"import os; print(open(os.environ['TORPOR_HOME'] + '/logs/{name}.log').read())"
    )
    numbers, sums = [], []
    for line in text.splitlines():
        if line.startswith("sum "):
            sums.append(line.split()[1])
        elif line.strip():
            numbers.append(int(line))
    return numbers, sums


def home_file(lab: Lab, host: str, rel: str) -> str | None:
    """The text of ``<home>/REL`` on ``host``, None if there is none."""
    code = (
        "import os, sys\np = os.path.join(os.environ['TORPOR_HOME'], sys.argv[1])\n"
        "print(open(p).read() if os.path.exists(p) else '<none>')"
    )
    out = lab.python(host, code, rel)
    return None if out == "<none>" else out


def listening(lab: Lab, host: str) -> list[tuple[str, int]]:
    """``host``'s listening TCP sockets (IPv4 ``(address, port)``), its netns's only."""
    code = (
        "rows = []\nfor t in ('/proc/net/tcp', '/proc/net/tcp6'):\n"
        "    for line in open(t).read().splitlines()[1:]:\n"
        "        c = line.split()\n"
        "        if c[3] == '0A': rows.append(c[1])\nprint(' '.join(rows))"
    )
    out = []
    for col in lab.python(host, code).split():
        addr, port = col.split(":")
        if len(addr) == 8:  # /proc/net/tcp prints the address's 32-bit word in host order
            out.append((".".join(str(b) for b in bytes.fromhex(addr)[::-1]), int(port, 16)))
        else:
            out.append((addr, int(port, 16)))
    return out


def consecutive(numbers: list[int]) -> bool:
    return numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def test_lazy_moves_the_process_with_its_memory(paired: Lab) -> None:  # noqa: F811
    lab = paired
    pid = start_app(lab, "a", "lz", 64)
    with server(lab, "b") as srv:
        res = torpor(lab, "a", "migrate", "lz", "--to", srv.where, "--mode", "lazy", "--json")
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout)
        done = srv.wait_log("torpor-migrate: 'lz' migrated from a: ")
        srv.stop()
    assert (summary["name"], summary["mode"], summary["source_pid"]) == ("lz", "lazy", pid)
    assert summary["target"] == srv.where
    assert 0 < summary["downtime_ms"] <= summary["total_ms"]
    # Most of the memory moved as pages after the copy resumed, not in the files.
    assert summary["bytes"] >= 64 << 20
    print(f"\nlazy 64 MiB: downtime {summary['downtime_ms']} ms, total {summary['total_ms']} ms")
    # The user was told the source must stay up while the memory moves.
    said = [line for line in res.stderr.splitlines() if "must stay up" in line]
    assert len(said) == 1 and said[0].startswith(f"lz resumes on {srv.where}; its memory follows")
    there = ps(lab, "b", "lz")
    assert (there["state"], there["pid"]) == ("running", summary["target_pid"])
    assert (there["migrated_from"], there["migrating"]) == ("a", None)
    before, sums_a = log(lab, "a", "lz")
    wait_for(lambda: len(log(lab, "b", "lz")[1]) >= 1, timeout=30)  # a sum printed on b
    after, sums_b = log(lab, "b", "lz")
    assert after[0] == before[-1] + 1  # state continues
    assert consecutive(before) and consecutive(after)
    assert len(set(sums_a)) == 1 and set(sums_b) == set(sums_a)  # memory identical
    # Nothing of it left running on a; its record says where it went.
    assert not alive(pid)
    here = ps(lab, "a", "lz")
    assert (here["state"], here["migrated_to"]) == (f"migrated-to {srv.where}", srv.where)
    assert done.startswith(f"torpor-migrate: 'lz' migrated from a: pid {there['pid']}, ")
    # The image and the lazy work dir were only in transit; the copy's filling is recorded.
    assert images(lab, "b") == "[]"
    state = json.loads(home_file(lab, "b", "lazy/lz.json") or "{}")
    assert (state["state"], state["pid"]) == ("resident", there["pid"])


def test_source_killed_mid_transfer_kills_the_copy_with_a_record(
    paired: Lab,  # noqa: F811
    tmp_path: Path,
) -> None:
    lab = paired
    pid = start_app(lab, "a", "cut", 32)
    mark = tmp_path / "pages-flowing"
    with server(lab, "b") as srv:
        migrate = subprocess.Popen(
            [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "a", "--",
             "env", f"TORPOR_TEST_LAZY_STALL={mark}",
             *TORPOR, "migrate", "cut", "--to", srv.where, "--mode", "lazy"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_for(mark.exists, timeout=30)  # the copy runs on b, a first MiB has moved
        # Both hosts show the pages in flight.
        copy = ps(lab, "b", "cut")
        assert copy["state"] == "migrating from a, pages in flight"
        assert ps(lab, "a", "cut")["state"] == f"migrating to {srv.where}, pages in flight"
        killed_at = time.monotonic()
        os.kill(migrate.pid, signal.SIGKILL)  # the source's torpor, by the pid we started
        migrate.communicate(timeout=30)
        line = srv.wait_log("torpor-migrate: 'cut' from a: copy killed: ")
        took = time.monotonic() - killed_at
        srv.stop()
    assert took < 15, took  # no hang
    assert line.startswith("torpor-migrate: 'cut' from a: copy killed: the transfer from a broke")
    # The half-moved copy is dead (SIGKILLed when the line was logged: it may take a moment
    # to exit under load) and its record says why; nothing runs under the name on b.
    wait_for(lambda: not alive(int(copy["pid"])), timeout=10)
    rec = ps(lab, "b", "cut")
    assert rec["state"] == "killed (signal 9)"
    assert rec["restored_from"].startswith("aborted lazy migration from a: ")
    state = json.loads(home_file(lab, "b", "lazy/cut.json") or "{}")
    assert state["state"] == "failed"
    assert state["error"].startswith("lazy migration from a: ")
    events = [json.loads(e) for e in (home_file(lab, "b", "events/cut.jsonl") or "").splitlines()]
    assert [(e["kind"], e["migrated_from"], e["mode"]) for e in events] == [
        ("restore-failed", "a", "lazy")
    ]
    assert "cut" not in running_names(lab, "b")
    # On a, CRIU took the closed socket for the end of the transfer: the original is gone too
    # (the source must stay up until the last page has moved).
    wait_for(lambda: not alive(pid), timeout=10)


def test_no_port_serves_the_memory_and_a_plain_client_gets_nothing(
    paired: Lab,  # noqa: F811
    tmp_path: Path,
) -> None:
    lab = paired
    start_app(lab, "a", "peek", 16)
    mark = tmp_path / "pages-flowing"
    probe = (
        "import socket, struct, sys\n"
        "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
        "s.sendall(struct.pack('<I4xQQQ', 7, 1, 0x400000, 1))\n"  # a PS_IOV_GET
        "got = b''\n"
        "try:\n"
        "    while len(got) < 1 << 16:\n"
        "        d = s.recv(65536)\n"
        "        if not d: break\n"
        "        got += d\n"
        "except OSError: pass\n"
        "print(len(got), got[:1].hex())"
    )
    with server(lab, "b") as srv:
        migrate = subprocess.Popen(
            [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "a", "--",
             "env", f"TORPOR_TEST_LAZY_STALL={mark}",
             *TORPOR, "migrate", "peek", "--to", srv.where, "--mode", "lazy"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            srv.wait_log("torpor-migrate: received 'peek' from a: ")
            # From here on a's CRIU serves the pages (the copy runs on b once a first MiB
            # has moved) on no port: a listens on nothing at all.
            with contextlib.suppress(AssertionError):
                wait_for(mark.exists, timeout=5)
            assert listening(lab, "a") == []
            # b listens on its agent's address only; a plain client asking it for a page (a
            # PS_IOV_GET) gets nothing.
            host, port = srv.where.rsplit(":", 1)
            assert listening(lab, "b") == [(host, int(port))]
            got = lab.python("client", probe, host, port)
        finally:
            os.kill(migrate.pid, signal.SIGKILL)
            migrate.communicate(timeout=30)
        srv.wait_log("torpor-migrate: 'peek' from a: copy killed: ")
        log_text = srv.stop()
    # The server was busy with the migration: the client got nothing, not a byte of memory.
    # (Once free, the server answers a client without a certificate only with a TLS alert.)
    size, first = got.split() if " " in got else (got, "")
    assert int(size) == 0 or (int(size) < 100 and first == "15"), got
    assert "peek" not in running_names(lab, "b")
    assert log_text.count("torpor-migrate: refused: ") <= 1


def test_link_cut_mid_transfer_kills_the_copy_and_the_original_resumes(
    paired: Lab,  # noqa: F811
    tmp_path: Path,
) -> None:
    lab = paired
    pid = start_app(lab, "a", "link", 16)
    mark = tmp_path / "pages-flowing"
    veth = str(lab.node("a")["veth"])
    with server(lab, "b") as srv:
        migrate = subprocess.Popen(
            [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "a", "--",
             "env", f"TORPOR_TEST_LAZY_STALL={mark}",
             *TORPOR, "migrate", "link", "--to", srv.where, "--mode", "lazy"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_for(mark.exists, timeout=30)
            copy = ps(lab, "b", "link")
            frozen, _ = log(lab, "a", "link")
            subprocess.run(["ip", "link", "set", veth, "down"], check=True)  # silently
            line = srv.wait_log("torpor-migrate: 'link' from a: copy killed: ")
            _, err = migrate.communicate(timeout=60)
        finally:
            subprocess.run(["ip", "link", "set", veth, "up"], check=True)
            if migrate.poll() is None:
                os.kill(migrate.pid, signal.SIGKILL)
                migrate.communicate(timeout=30)
        srv.stop()
    # b gave up the copy when its relay went silent, and recorded why.
    assert line.startswith("torpor-migrate: 'link' from a: copy killed: the transfer from a broke")
    assert not alive(int(copy["pid"]))
    assert ps(lab, "b", "link")["restored_from"].startswith("aborted lazy migration from a: ")
    # a resumed its original only after that: the same process, counting on from its freeze.
    assert migrate.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"torpor: error: migration of link to {srv.where} failed: the transfer of its memory "
        "broke: "
    )
    assert last.endswith(
        f"the original resumed here from its state at the freeze, pid {pid}: what the copy did "
        "meanwhile is lost)"
    )
    assert ps(lab, "a", "link")["state"] == "running" and alive(pid)
    wait_for(lambda: len(log(lab, "a", "link")[0]) >= len(frozen) + 10)
    numbers, _ = log(lab, "a", "link")
    assert numbers[0] == 0 and consecutive(numbers)


def test_untrusted_source_gets_nothing_and_nothing_is_frozen(make_lab: Any, tmp_path: Path) -> None:
    lab = make_lab()
    trust(lab, tmp_path, "a", "b")  # a trusts b, b does not trust a
    pid = start_app(lab, "a", "alien", 8)
    with server(lab, "b") as srv:
        res = torpor(lab, "a", "migrate", "alien", "--to", srv.where, "--mode", "lazy")
        log_text = srv.stop()
    assert res.returncode == 1
    assert (
        res.stderr.strip()
        .splitlines()[-1]
        .startswith(f"torpor: error: {srv.where} refused this host's certificate")
    )
    lines = log_text.splitlines()
    assert len(lines) == 1  # the refusal in the TLS handshake, and nothing else on b
    assert lines[0].endswith(" refused in the TLS handshake: CERTIFICATE_VERIFY_FAILED")
    assert (ps(lab, "a", "alien")["state"], ps(lab, "a", "alien")["pid"]) == ("running", pid)
    numbers, _ = log(lab, "a", "alien")
    assert consecutive(numbers)
    assert running_names(lab, "b") == [] and images(lab, "b") == "[]"


def test_lazy_keeps_a_keep_alive_connection_and_the_address(
    paired: Lab,  # noqa: F811
    tmp_path: Path,
) -> None:
    from .test_migrate_tcp import (
        addresses,
        answered,
        check_one_connection,
        client,
        knows,
        ruleset,
        service_address,
        start_web,
    )

    lab = paired
    service = service_address(lab, 7)
    pid = start_web(lab, "lazyweb", service)
    # Earlier tests here left b an entry for the client that a datagram only moves to DELAY:
    # flushed, it is resolved afresh (REACHABLE), as knows() wants.
    flushed = lab.exec("b", "ip", "neigh", "flush", "to", lab.address("client"))
    assert flushed.returncode == 0, flushed.stderr
    knows(lab, "b", lab.address("client"))
    with client(lab, service.split("/")[0], tmp_path) as c, server(lab, "b") as srv:
        answered(c, 40)  # under load (~50 requests/s) before the move
        res = torpor(lab, "a", "migrate", "lazyweb", "--to", srv.where, "--mode", "lazy", "--json")
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout)
        srv.wait_log("torpor-migrate: 'lazyweb' migrated from a: ")
        answered(c, 40)  # and after it
        lines = c.finish()
    counts = check_one_connection(lines)  # one connection, no failed request, state going on
    assert counts[0] == 1 and len(counts) >= 80
    worst = max(x["ms"] for x in lines if "ms" in x)
    print(f"\nlazy keep-alive: client's longest wait {worst:.0f} ms; summary {summary}")
    assert (summary["mode"], summary["tcp_connections"], summary["addresses"]) == (
        "lazy",
        1,
        [service],
    )
    there = ps(lab, "b", "lazyweb")
    assert (there["state"], there["migrated_from"], there["service_addresses"]) == (
        "running",
        "a",
        [service],
    )
    assert not alive(pid)
    assert service in addresses(lab, "b") and service not in addresses(lab, "a")
    assert ruleset(lab, "a") == "" and ruleset(lab, "b") == ""
    killed = torpor(lab, "b", "kill", "lazyweb")
    assert killed.returncode == 0, killed.stderr


def test_lazy_restore_failing_on_b_leaves_it_serving_on_a_with_its_address(
    paired: Lab,  # noqa: F811
    tmp_path: Path,
) -> None:
    """b's restore fails after the source let the address go (a wildcard listener takes the
    app's port there): a takes the address back, drops CRIU's lock, and the original runs on,
    unchanged, its client served throughout on the same connection."""
    from .test_migrate_tcp import (
        APP_PORT,
        BLOCKER,
        answered,
        check_one_connection,
        check_stayed_on_a,
        client,
        service_address,
        start_web,
    )

    lab = paired
    service = service_address(lab, 8)
    pid = start_web(lab, "lzblocked", service)
    blocker = subprocess.Popen(
        [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "b", "--",
         sys.executable, "-c", BLOCKER, str(APP_PORT)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert blocker.stdout is not None and blocker.stdout.readline() == "listening\n"
        with client(lab, service.split("/")[0], tmp_path) as c, server(lab, "b") as srv:
            answered(c, 20)
            res = torpor(lab, "a", "migrate", "lzblocked", "--to", srv.where, "--mode", "lazy")
            line = srv.wait_log("torpor-migrate: migration from a failed: ")
            answered(c, 40)
            lines = c.finish()
    finally:
        blocker.kill()
        blocker.wait()
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"torpor: error: migration of lzblocked to {srv.where} failed: {srv.where} ended the "
        "transfer: the restore failed: "
    )
    assert last.endswith(f"(the process runs here, unchanged (pid {pid}))")
    assert line.startswith("torpor-migrate: migration from a failed: ")
    check_one_connection(lines)
    check_stayed_on_a(lab, "lzblocked", pid, service)
    assert "lzblocked" not in running_names(lab, "b")
    killed = torpor(lab, "a", "kill", "lzblocked")
    assert killed.returncode == 0, killed.stderr
