"""``torpor inspect`` on an image the real CRIU just wrote of a process started here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from torpor._images._inspect import inspect_image, render_text

pytestmark = [
    pytest.mark.criu,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="CRIU dumps need root"),
    pytest.mark.skipif(shutil.which("criu") is None, reason="no criu on PATH"),
]

# Holds a regular file, a listening TCP socket on 127.0.0.1 and a pipe, then reports the port
# by renaming a file into place (no descriptor to the test is left open in the child).
_HOLDER = """
import os, socket, sys, time
f = open(sys.argv[1], "r+b")
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(8)
r, w = os.pipe()
with open(sys.argv[2] + ".tmp", "w") as ready:
    ready.write(str(s.getsockname()[1]))
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
while True:
    time.sleep(1)
"""


@dataclass(frozen=True)
class Holder:
    proc: subprocess.Popen[bytes]
    data: Path
    port: int
    comm: str


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Holder]:
    data = tmp_path / "state.db"
    data.write_bytes(b"torpor" * 100)
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(data), str(ready)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert proc.poll() is None, f"holder exited with {proc.returncode}"
            assert time.monotonic() < deadline, "holder never became ready"
            time.sleep(0.02)
        comm = Path(f"/proc/{proc.pid}/comm").read_text().strip()
        yield Holder(proc=proc, data=data, port=int(ready.read_text()), comm=comm)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_inspect_real_dump(holder: Holder, tmp_path: Path) -> None:
    image = tmp_path / "image"
    work = tmp_path / "work"
    image.mkdir()
    work.mkdir()
    # A session leader without a terminal needs no --shell-job; --leave-running keeps the
    # holder alive so the fixture ends it itself.
    dump = subprocess.run(
        [
            "criu",
            "dump",
            "-t",
            str(holder.proc.pid),
            "-D",
            str(image),
            "-W",
            str(work),
            "--leave-running",
            "-o",
            "dump.log",
            "-v4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    log = work / "dump.log"
    assert dump.returncode == 0, log.read_text()[-3000:] if log.exists() else dump.stderr

    insp = inspect_image(image)

    (task,) = insp.tasks
    assert task.pid == holder.proc.pid
    assert task.comm == holder.comm
    assert task.state == "alive"
    assert task.sid == task.pid
    assert task.exe is not None

    assert task.vmas
    assert any(v.file_backed and v.path == task.exe for v in task.vmas)
    assert any(v.kind == "anon" for v in task.vmas)
    assert task.memory.pages_dumped > 0
    assert insp.memory.bytes_dumped == insp.pages_file_bytes
    assert sum(v.pages_dumped for v in task.vmas) == task.memory.pages_dumped

    data_fds = [f for f in task.files if f.path == str(holder.data)]
    assert len(data_fds) == 1
    assert data_fds[0].type == "file" and data_fds[0].size == holder.data.stat().st_size

    pipes = [f for f in task.files if f.type == "pipe"]
    assert len({p.pipe_id for p in pipes}) == 1 and len(pipes) == 2

    (listening,) = [s for s in insp.sockets if s.state == "LISTEN"]
    assert (listening.family, listening.protocol) == ("inet", "tcp")
    assert (listening.src_addr, listening.src_port) == ("127.0.0.1", holder.port)
    assert [pid for pid, _ in insp.holders(listening.file_id)] == [task.pid]

    text = render_text(insp)
    assert f"127.0.0.1:{holder.port}" in text
    assert str(holder.data) in text
    json.dumps(insp.to_dict())
