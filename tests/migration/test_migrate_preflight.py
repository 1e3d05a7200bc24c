"""Pre-flight on a real lab and real CRIU: a target whose CPU lacks what the image needs, one
where a file the process has open is missing or has another size, one without the memory the
process needs — each is refused before anything is frozen, and the process runs on, untouched.

The CPU case simulates an older CPU the way issue 9 allows: the source sends a doctored
``cpuinfo.img`` (``TORPOR_TEST_MIGRATE_CPUINFO``: CRIU's own cpuinfo of this machine with every
capability bit set, among them instruction sets no CPU of today has), and b's real CRIU
(CPUINFO_CHECK) refuses it. The memory case claims a huge resident size
(``TORPOR_TEST_MIGRATE_RSS``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from torpor._engine import _cpuinfo

from .conftest import SCRIPT, Lab

pytestmark = pytest.mark.criu

TORPOR = (sys.executable, "-m", "torpor")
PORT = 7071
HINT = " — fix what the target reports, then migrate again"
# Prints 0, 1, 2, ... one line every 20 ms, holding the files named in argv open (r+).
COUNTER = """
import sys, time
held = [open(p, "r+") for p in sys.argv[1:]]
i = 0
while True:
    print(i, flush=True)
    i += 1
    time.sleep(0.02)
"""


def torpor(lab: Lab, host: str, *args: str, env: dict[str, str] | None = None) -> Any:
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    return lab.exec(host, "env", *extra, *TORPOR, *args)


@pytest.fixture(scope="module")
def paired(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """The module's lab with a and b trusting each other by certificate."""
    tmp = tmp_path_factory.mktemp("certs")
    for who, of in (("a", "b"), ("b", "a")):
        pem = torpor(lab, of, "identity", "show", "--cert")
        assert pem.returncode == 0, pem.stderr
        (tmp / f"{of}.pem").write_text(pem.stdout)
        added = torpor(lab, who, "trust", "add", "--cert", str(tmp / f"{of}.pem"), "--name", of)
        assert added.returncode == 0, added.stderr
    return lab


@contextlib.contextmanager
def server(lab: Lab, host: str) -> Iterator[str]:
    """``torpor agent run --listen`` on ``host`` (killed by its pid); yields its address."""
    where = f"{lab.address(host)}:{PORT}"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), host, "--",
         *TORPOR, "agent", "run", "--listen", where],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"listening on {where}\n"
        yield where
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


def home(lab: Lab, host: str) -> str:
    return str(lab.node(host)["home"])


def write(lab: Lab, host: str, path: str, data: str) -> None:
    lab.python(host, "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", path, data)


def counts(lab: Lab, host: str, name: str) -> list[int]:
    text = lab.python(
        host, "import sys; print(open(sys.argv[1]).read())", f"{home(lab, host)}/logs/{name}.log"
    )
    return [int(line) for line in text.splitlines() if line.strip()]


def ps(lab: Lab, host: str, name: str) -> dict[str, Any]:
    res = torpor(lab, host, "ps", "--all", "--json")
    assert res.returncode == 0, res.stderr
    found = [p for p in json.loads(res.stdout) if p["name"] == name]
    return found[0] if found else {}


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def start_counter(lab: Lab, host: str, name: str, *files: str) -> int:
    started = torpor(lab, host, "run", "--name", name, "--", sys.executable, "-c", COUNTER, *files)
    assert started.returncode == 0, started.stderr
    wait_for(lambda: len(counts(lab, host, name)) >= 5)
    return int(ps(lab, host, name)["pid"])


def refusal(res: Any, name: str, where: str, pid: int) -> str:
    """The problems of a pre-flight refusal (the error's middle), checking its frame."""
    assert res.returncode == 1, (res.stdout, res.stderr)
    line = res.stderr.strip().splitlines()[-1]
    head = f"torpor: error: migration of {name} to {where} refused in pre-flight: "
    tail = f" (nothing was frozen; the process runs here, pid {pid}){HINT}"
    assert line.startswith(head) and line.endswith(tail), line
    return str(line[len(head) : -len(tail)])


def untouched(lab: Lab, name: str, pid: int, before: list[int]) -> None:
    """``name`` runs on a as the same pid, was never dumped (no dump log, nothing staged for
    a migration: a failed dump keeps its log as dump-PID-...), counts on without a hole;
    nothing of it on b."""
    assert (ps(lab, "a", name)["state"], ps(lab, "a", name)["pid"]) == ("running", pid)
    logs = lab.python(
        "a",
        "import json, os, sys; print(json.dumps(os.listdir(sys.argv[1])))",
        f"{home(lab, 'a')}/logs",
    )
    assert [n for n in json.loads(logs) if n.startswith(f"dump-{pid}-")] == []
    staged = lab.python(
        "a", "import os, sys; p = sys.argv[1]; print(os.listdir(p) if os.path.isdir(p) else [])",
        f"{home(lab, 'a')}/migrate",
    )  # fmt: skip
    assert staged == "[]"
    wait_for(lambda: len(counts(lab, "a", name)) >= len(before) + 10)
    numbers = counts(lab, "a", name)
    assert numbers[: len(before)] == before
    assert numbers == list(range(len(numbers)))
    assert ps(lab, "b", name) == {}


def varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


def doctored_cpuinfo() -> bytes:
    """This machine's cpuinfo.img (CRIU's CPUINFO_DUMP) with every capability word all ones:
    an image of a CPU with instruction sets this one lacks (3DNow!, AVX512_4VNNIW, ...)."""
    real = _cpuinfo.dump()
    top = _cpuinfo._fields(real[12:])
    assert [(n, w) for n, w, _ in top] == [(1, 2)]
    entry = top[0][2]
    assert isinstance(entry, bytes)
    out = b""
    for number, wire, value in _cpuinfo._fields(entry):
        if number == 6:
            value = 0xFFFFFFFF
        out += varint(number << 3 | wire)
        out += varint(value) if isinstance(value, int) else varint(len(value)) + value
    body = varint(1 << 3 | 2) + varint(len(out)) + out
    return struct.pack("<III", _cpuinfo.IMG_COMMON_MAGIC, _cpuinfo.CPUINFO_MAGIC, len(body)) + body


def test_a_target_whose_cpu_lacks_a_feature_is_refused_and_nothing_is_frozen(
    paired: Lab, tmp_path: Path
) -> None:
    lab = paired
    img = tmp_path / "cpuinfo.img"
    img.write_bytes(doctored_cpuinfo())
    assert _cpuinfo.check(_cpuinfo.dump()) == []  # the true one fits: only the doctoring fails
    pid = start_counter(lab, "a", "cpu")
    with server(lab, "b") as where:
        res = torpor(
            lab, "a", "migrate", "cpu", "--to", where, env={"TORPOR_TEST_MIGRATE_CPUINFO": str(img)}
        )
        before = counts(lab, "a", "cpu")
    source_cpu = _cpuinfo.parse(img.read_bytes()).describe()
    assert refusal(res, "cpu", where, pid) == (
        f"the CPU of {where} ({_cpuinfo.this_cpu()}) lacks a feature the process may use on the "
        f"source's ({source_cpu}): CRIU's cpuinfo check says: arch/x86/cpu.c:223: cpu: CPU "
        "instruction capabilities do not match run time"
    )
    untouched(lab, "cpu", pid, before)


def test_a_missing_and_a_resized_open_file_are_named_and_nothing_is_frozen(paired: Lab) -> None:
    lab = paired
    missing, resized = f"{home(lab, 'a')}/missing.dat", f"{home(lab, 'a')}/resized.dat"
    write(lab, "a", missing, "kept")
    write(lab, "a", resized, "12345")
    write(lab, "b", resized, "123")  # b has its own home: same path, other file
    pid = start_counter(lab, "a", "files", missing, resized)
    with server(lab, "b") as where:
        res = torpor(lab, "a", "migrate", "files", "--to", where)
        before = counts(lab, "a", "files")
    assert refusal(res, "files", where, pid) == (
        f"{missing} is missing on {where}; {resized} is 3 bytes on {where}, 5 where the "
        "process has it open (CRIU refuses a file whose size changed)"
    )
    untouched(lab, "files", pid, before)
    # The same files on b as on a: the same process passes pre-flight and moves.
    write(lab, "b", missing, "kept")
    write(lab, "b", resized, "12345")
    with server(lab, "b") as where:
        moved = torpor(lab, "a", "migrate", "files", "--to", where)
    assert moved.returncode == 0, moved.stderr
    wait_for(lambda: ps(lab, "b", "files").get("state") == "running")
    killed = torpor(lab, "b", "kill", "files")
    assert killed.returncode == 0, killed.stderr


def test_more_memory_than_the_target_has_is_refused_and_nothing_is_frozen(paired: Lab) -> None:
    lab = paired
    pid = start_counter(lab, "a", "big")
    huge = 1 << 50  # 1 PiB: more than any memory (and disk) b has
    with server(lab, "b") as where:
        res = torpor(
            lab, "a", "migrate", "big", "--to", where, env={"TORPOR_TEST_MIGRATE_RSS": str(huge)}
        )
        before = counts(lab, "a", "big")
    found = refusal(res, "big", where, pid)
    images = f"{home(lab, 'b')}/images"
    assert re.fullmatch(
        rf"{re.escape(images)} on {re.escape(where)} has \d+ MiB free; an image of this "
        rf"process needs about \d+ MiB; {re.escape(where)} has \d+ MiB of memory available; "
        rf"the process's resident size is {huge >> 20} MiB",
        found,
    ), found
    untouched(lab, "big", pid, before)
