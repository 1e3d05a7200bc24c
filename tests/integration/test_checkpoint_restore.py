"""Issue 2's acceptance, against real CRIU on real processes, through the CLI."""

from __future__ import annotations

import os
import pty
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from torpor._images import _image
from torpor._images._image import Image
from torpor._process import _registry
from torpor._process._proc import running

from .helpers import APPS, PYTHON, copy_log, counts, parse_ps, torpor, wait_for

pytestmark = pytest.mark.criu


def _run_counter(home: Path, name: str, app: Path = APPS / "counter.py") -> tuple[int, Path]:
    out = torpor("run", "--name", name, "--", PYTHON, str(app)).stdout.split()
    pid = int(out[1])
    log = home / "logs" / f"{name}.log"
    wait_for(lambda: log.exists() and len(counts(log).get(pid, [])) >= 5, what="counting")
    return pid, log


def test_counter_continues_from_its_count(torpor_home: Path) -> None:
    pid, log = _run_counter(torpor_home, "count")
    image = torpor("checkpoint", "count", "--name", "count-img").stdout.strip()
    assert Path(image, "torpor.json").exists()
    wait_for(lambda: not running(pid), what="the original to stop")
    last = counts(log)[pid][-1]
    kept = log.read_bytes()
    assert parse_ps(torpor("ps", "-a").stdout, "PID", "STATE") == {
        "count": (str(pid), "checkpointed")
    }

    out = torpor("restore", "count-img").stdout.split()
    assert out[0] == "count-img"
    new_pid = int(out[1])
    assert new_pid != pid
    own = copy_log(torpor_home, "count-img")
    wait_for(lambda: len(counts(own).get(new_pid, [])) >= 3, what="the restored copy counting")
    resumed = counts(own)[new_pid]
    # It continues from its count: the first number after restore follows the last before.
    assert resumed[0] in (last + 1, last + 2), (last, resumed[:3])
    assert resumed == sorted(resumed)
    assert list(counts(own)) == [new_pid]
    assert log.read_bytes() == kept  # the copy writes to its own log, not the original's
    assert parse_ps(torpor("ps").stdout, "PID", "STATE", "RESTORED-FROM") == {
        "count-img": (str(new_pid), "running", image)
    }


def test_leave_running_keeps_the_original(torpor_home: Path) -> None:
    pid, log = _run_counter(torpor_home, "lr")
    torpor("checkpoint", "lr", "--leave-running", "--name", "lr-img")
    before = len(counts(log)[pid])
    wait_for(lambda: len(counts(log)[pid]) > before + 3, what="the original to keep counting")
    assert running(pid)
    # A copy restores while the original still runs (its own PID namespace).
    new_pid = int(torpor("restore", "lr-img").stdout.split()[1])
    own = copy_log(torpor_home, "lr-img")
    wait_for(lambda: len(counts(own).get(new_pid, [])) >= 2, what="the copy counting")
    assert running(pid)
    # Each writes to its own log: the original's holds only its lines, the copy's only the copy's.
    assert list(counts(log)) == [pid]
    assert list(counts(own)) == [new_pid]


def test_restore_name_at_pool_pulls_and_continues(torpor_home: Path) -> None:
    pid, log = _run_counter(torpor_home, "pooled")
    out = torpor("checkpoint", "pooled", "--pool", "default", "--name", "pooled-img").stdout
    assert out.strip() == "pooled-img@default"
    wait_for(lambda: not running(pid), what="the original to stop")
    last = counts(log)[pid][-1]
    kept = log.read_bytes()
    assert not (torpor_home / "images" / "pooled-img").exists()  # only the pool has it

    new_pid = int(torpor("restore", "pooled-img@default").stdout.split()[1])
    own = copy_log(torpor_home, "pooled-img")
    wait_for(lambda: len(counts(own).get(new_pid, [])) >= 3, what="the restored copy counting")
    resumed = counts(own)[new_pid]
    assert resumed[0] in (last + 1, last + 2), (last, resumed[:3])
    assert resumed == list(range(resumed[0], resumed[0] + len(resumed)))
    assert parse_ps(torpor("ps").stdout, "PID", "STATE") == {
        "pooled-img": (str(new_pid), "running")
    }
    assert list(counts(own)) == [new_pid]
    assert log.read_bytes() == kept


def test_full_verify_rehashes_what_the_stamp_trusts(
    torpor_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bit rot: a file's bytes change while its inode, size and times stay as the verification
    stamp recorded them. A plain restore trusts the stamp; only --full-verify re-hashes (and,
    finding the file bad, voids the stamp)."""
    pid, log = _run_counter(torpor_home, "rot")
    image = Path(torpor("checkpoint", "rot", "--name", "rot-img").stdout.strip())
    wait_for(lambda: not running(pid), what="the original to stop")
    last = counts(log)[pid][-1]
    # CRIU's statistics of the dump, which restore does not read: rotten, the image still runs.
    rotten = image / "stats-dump"
    data = bytearray(rotten.read_bytes())
    data[-1] ^= 0x01
    rotten.write_bytes(bytes(data))
    _stamp_as_verified(image, monkeypatch)

    new_pid = int(torpor("restore", "rot-img").stdout.split()[1])
    own = copy_log(torpor_home, "rot-img")
    wait_for(lambda: len(counts(own).get(new_pid, [])) >= 2, what="the restored copy counting")
    assert counts(own)[new_pid][0] in (last + 1, last + 2)
    assert list(counts(log)) == [pid]  # the copy wrote to its own log only
    torpor("kill", "rot-img")
    wait_for(lambda: not running(new_pid), what="the copy to die")

    refused = (
        f"torpor: error: image 'rot-img' ({image}) is corrupted: file stats-dump does not match"
        " its SHA-256 — restore refused; use another image or checkpoint again\n"
    )
    res = torpor("restore", "--full-verify", "rot-img", check=False)
    assert (res.returncode, res.stderr) == (1, refused)
    assert parse_ps(torpor("ps").stdout, "PID") == {}  # nothing from the image runs
    # Having found a file bad, the full verify removed the stamp that vouched for it: a plain
    # restore now re-hashes, and refuses too.
    res = torpor("restore", "rot-img", check=False)
    assert (res.returncode, res.stderr) == (1, refused)
    assert parse_ps(torpor("ps").stdout, "PID") == {}


def _stamp_as_verified(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Record the image's files, as they now are, as hashed and found matching: a verify whose
    hashing finds what the manifest says, as it would have just before the bytes rotted."""
    img = Image.open(image)
    assert not img.trusted()  # the write to the file voided the stamp
    with monkeypatch.context() as m:
        m.setattr(_image, "hash_files", lambda *args, **kwargs: list(img.manifest.files))
        img.verify()
    assert Image.open(image).trusted()


def test_count_four_gives_four_independent_copies(torpor_home: Path) -> None:
    pid, log = _run_counter(torpor_home, "four")
    torpor("checkpoint", "four", "--name", "four-img")
    out = torpor("restore", "four-img", "--count", "4", "--json").stdout
    import json

    procs = json.loads(out)
    pids = [p["pid"] for p in procs]
    assert len(set(pids)) == 4
    assert [p["name"] for p in procs] == [f"four-img-{i}" for i in range(1, 5)]
    own = {p["pid"]: copy_log(torpor_home, p["name"]) for p in procs}
    wait_for(
        lambda: all(len(counts(own[p]).get(p, [])) >= 5 for p in pids), what="4 copies counting"
    )
    start = counts(log)[pid][-1]
    for p in pids:
        seq = counts(own[p])[p]
        # Each copy counts on its own from the image's count, by steps of one, in its own log.
        assert seq[0] in (start + 1, start + 2), own[p].read_text()
        assert seq == list(range(seq[0], seq[0] + len(seq))), own[p].read_text()
        assert list(counts(own[p])) == [p]
    assert list(counts(log)) == [pid]  # none of the copies wrote to the original's log
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: not running(pids[0]), what="one copy to die")
    assert all(running(p) for p in pids[1:])
    assert parse_ps(torpor("ps").stdout, "PID", "STATE") == {
        p["name"]: (str(p["pid"]), "running") for p in procs[1:]
    }


def test_tcp_connection_survives_checkpoint_and_restore(torpor_home: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = torpor("run", "--name", "tcp", "--", PYTHON, str(APPS / "tcp_counter.py"), str(port))
    pid = int(out.stdout.split()[1])
    log = torpor_home / "logs" / "tcp.log"
    wait_for(lambda: log.exists() and "listening" in log.read_text(), what="the server")
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        reader = client.makefile("rb")

        def ask(text: str) -> bytes:
            client.sendall(text.encode() + b"\n")
            return reader.readline().strip()

        assert ask("a") == b"1 a"
        assert ask("b") == b"2 b"
        refused = torpor("checkpoint", "tcp", "--name", "tcp-bad", check=False)
        assert refused.returncode != 0
        assert "--tcp-established" in refused.stderr
        assert running(pid)
        assert ask("c") == b"3 c"

        torpor("checkpoint", "tcp", "--tcp-established", "--name", "tcp-img")
        wait_for(lambda: not running(pid), what="the original to stop")
        new_pid = int(torpor("restore", "tcp-img").stdout.split()[1])
        assert running(new_pid)
        # The same client connection keeps working, with the server's state.
        assert ask("d") == b"4 d"
        assert ask("e") == b"5 e"
    finally:
        client.close()


def _processes_with(marker: bytes) -> set[int]:
    """The running processes whose command line holds ``marker``."""
    found = set()
    for p in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmd and running(p):
            found.add(p)
    return found


def test_corrupted_image_is_refused_naming_the_file(torpor_home: Path, tmp_path: Path) -> None:
    # A copy of the app at a path of this test's: other tests' counters are not taken for a
    # process restored from this image.
    app = tmp_path / "corrupt_counter.py"
    shutil.copyfile(APPS / "counter.py", app)
    pid, _ = _run_counter(torpor_home, "corrupt", app)
    marker = str(app).encode()
    # Seen while they run: the app and its keeper (a fork of torpor run, whose command holds it).
    assert _processes_with(marker) == {pid, _registry.load("corrupt").keeper_pid}
    image = Path(torpor("checkpoint", "corrupt", "--name", "corrupt-img").stdout.strip())
    wait_for(lambda: not _processes_with(marker), what="the original and its keeper to end")
    pages = max(image.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0x01
    pages.write_bytes(bytes(data))
    res = torpor("restore", "corrupt-img", check=False)
    assert (res.returncode, res.stderr) == (
        1,
        f"torpor: error: image 'corrupt-img' ({image}) is corrupted: file {pages.name} does"
        " not match its SHA-256 — restore refused; use another image or checkpoint again\n",
    )
    # Nothing from the image runs, nor is recorded.
    assert parse_ps(torpor("ps", "-a").stdout, "PID", "STATE") == {
        "corrupt": (str(pid), "checkpointed")
    }
    time.sleep(0.2)
    assert _processes_with(marker) == set()


def test_truncated_image_is_refused(torpor_home: Path) -> None:
    _run_counter(torpor_home, "trunc")
    image = Path(torpor("checkpoint", "trunc", "--name", "trunc-img").stdout.strip())
    core = next(image.glob("core-*.img"))
    core.write_bytes(core.read_bytes()[:-10])
    res = torpor("restore", "trunc-img", check=False)
    assert res.returncode != 0 and core.name in res.stderr


def test_checkpoint_of_missing_pid_is_one_line(torpor_home: Path) -> None:
    res = torpor("checkpoint", "999999999", check=False)
    assert res.returncode != 0
    assert res.stderr.strip().count("\n") == 0
    assert "no process with pid 999999999" in res.stderr


def test_existing_image_dir_is_refused_and_process_kept(torpor_home: Path, tmp_path: Path) -> None:
    pid, _ = _run_counter(torpor_home, "exists")
    target = tmp_path / "taken"
    target.mkdir()
    (target / "precious").write_text("keep me")
    res = torpor("checkpoint", "exists", "-o", str(target), check=False)
    assert res.returncode != 0
    assert "exists already" in res.stderr and res.stderr.strip().count("\n") == 0
    assert (target / "precious").read_text() == "keep me"
    assert running(pid)


def test_terminal_holder_is_refused_and_keeps_running(torpor_home: Path) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [PYTHON, "-c", "import time; time.sleep(60)"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    try:
        res = torpor("checkpoint", str(proc.pid), check=False)
        assert res.returncode != 0
        assert "terminal" in res.stderr and res.stderr.strip().count("\n") == 0
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
        os.close(master)


def test_failed_dump_keeps_process_running(torpor_home: Path) -> None:
    """A socket to a process outside the tree makes CRIU fail; the process must survive."""
    a, b = socket.socketpair()
    proc = subprocess.Popen(
        [PYTHON, "-c", "import time; time.sleep(60)"],
        pass_fds=(b.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    b.close()
    try:
        res = torpor("checkpoint", str(proc.pid), check=False)
        assert res.returncode != 0
        assert res.stderr.strip().count("\n") == 0
        assert "keeps running" in res.stderr
        assert proc.poll() is None
        assert not any(p.name.startswith(".") for p in (torpor_home / "images").iterdir())
    finally:
        proc.kill()
        proc.wait()
        a.close()
