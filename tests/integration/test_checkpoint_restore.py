"""Issue 2's acceptance, against real CRIU on real processes, through the CLI."""

from __future__ import annotations

import os
import pty
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from torpor._images import _image
from torpor._images._image import Image
from torpor._process._proc import running

from .helpers import APPS, PYTHON, counts, parse_ps, torpor, wait_for

pytestmark = pytest.mark.criu


def _run_counter(home: Path, name: str) -> tuple[int, Path]:
    out = torpor("run", "--name", name, "--", PYTHON, str(APPS / "counter.py")).stdout.split()
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
    assert parse_ps(torpor("ps", "-a").stdout, "PID", "STATE") == {
        "count": (str(pid), "checkpointed")
    }

    out = torpor("restore", "count-img").stdout.split()
    new_pid = int(out[1])
    assert new_pid != pid
    wait_for(lambda: len(counts(log).get(new_pid, [])) >= 3, what="the restored copy counting")
    resumed = counts(log)[new_pid]
    # It continues from its count: the first number after restore follows the last before.
    assert resumed[0] in (last + 1, last + 2), (last, resumed[:3])
    assert resumed == sorted(resumed)
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
    wait_for(lambda: len(counts(log).get(new_pid, [])) >= 2, what="the copy counting")
    assert running(pid)


def test_restore_name_at_pool_pulls_and_continues(torpor_home: Path) -> None:
    pid, log = _run_counter(torpor_home, "pooled")
    out = torpor("checkpoint", "pooled", "--pool", "default", "--name", "pooled-img").stdout
    assert out.strip() == "pooled-img@default"
    wait_for(lambda: not running(pid), what="the original to stop")
    last = counts(log)[pid][-1]
    assert not (torpor_home / "images" / "pooled-img").exists()  # only the pool has it

    new_pid = int(torpor("restore", "pooled-img@default").stdout.split()[1])
    wait_for(lambda: len(counts(log).get(new_pid, [])) >= 3, what="the restored copy counting")
    resumed = counts(log)[new_pid]
    assert resumed[0] in (last + 1, last + 2), (last, resumed[:3])
    assert resumed == list(range(resumed[0], resumed[0] + len(resumed)))
    assert parse_ps(torpor("ps").stdout, "PID", "STATE") == {
        "pooled-img": (str(new_pid), "running")
    }


def test_full_verify_rehashes_what_the_stamp_trusts(
    torpor_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bit rot: a file's bytes change while its inode, size and times stay as the verification
    stamp recorded them. A plain restore trusts the stamp; only --full-verify re-hashes."""
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

    res = torpor("restore", "--full-verify", "rot-img", check=False)
    assert res.returncode == 1, res.stderr
    assert "is corrupted: file stats-dump does not match its SHA-256" in res.stderr
    assert res.stderr.count("\n") == 1
    assert parse_ps(torpor("ps").stdout, "PID") == {}  # nothing from the image runs

    new_pid = int(torpor("restore", "rot-img").stdout.split()[1])
    wait_for(lambda: len(counts(log).get(new_pid, [])) >= 2, what="the restored copy counting")
    assert counts(log)[new_pid][0] in (last + 1, last + 2)


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
    wait_for(lambda: all(len(counts(log).get(p, [])) >= 5 for p in pids), what="4 copies counting")
    start = counts(log)[pid][-1]
    for p in pids:
        seq = counts(log)[p]
        # Each copy counts on its own from the image's count, by steps of one.
        assert seq[0] in (start + 1, start + 2), log.read_text()
        assert seq == list(range(seq[0], seq[0] + len(seq))), log.read_text()
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: not running(pids[0]), what="one copy to die")
    assert all(running(p) for p in pids[1:])
    assert [p["name"] for p in procs] == [f"four-img-{i}" for i in range(1, 5)]
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


def test_corrupted_image_is_refused_naming_the_file(torpor_home: Path) -> None:
    pid, _ = _run_counter(torpor_home, "corrupt")
    image = Path(torpor("checkpoint", "corrupt", "--name", "corrupt-img").stdout.strip())
    pages = max(image.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0x01
    pages.write_bytes(bytes(data))
    before = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    res = torpor("restore", "corrupt-img", check=False)
    assert res.returncode != 0
    assert pages.name in res.stderr
    assert "corrupted" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    # Nothing from the image runs, nor is recorded.
    assert parse_ps(torpor("ps", "-a").stdout, "PID", "STATE") == {
        "corrupt": (str(pid), "checkpointed")
    }
    time.sleep(0.2)
    after = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    for p in after - before:
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        assert b"counter.py" not in cmd


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
