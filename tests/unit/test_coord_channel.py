"""The external trigger channel, both ends, against a real process running torpor's listener with
a fake engine (no CRIU): success, remote failures, the process exiting, peer authentication."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from torpor._coord import (
    Context,
    NotCoordinatedError,
    RemoteCheckpointError,
    _channel,
    request_checkpoint,
)
from torpor._coord._runtime import enable
from torpor._errors import (
    CheckpointRefusedError,
    DumpError,
    PermissionDeniedError,
    ProcessNotFoundError,
)

HELPER = textwrap.dedent(
    """
    import os, sys, time
    from dataclasses import dataclass
    from pathlib import Path
    import torpor._coord as coord
    from torpor._coord import _checkpoint
    from torpor._errors import DumpError

    mode, ready = sys.argv[1], Path(sys.argv[2])

    @dataclass(frozen=True)
    class Outcome:
        restored: bool
        image: Path | None

    def engine(dest, *, leave_running, tcp_established, name, labels):
        if mode == "dumpfail":
            raise DumpError("CRIU failed", log_lines=["Error (criu/sk-unix.c:1): boom"])
        if not leave_running:
            # What CRIU and the engine's finaliser do: write the image, kill the original.
            dest.mkdir(parents=True)
            (dest / "torpor.json").write_text("{}")
            os._exit(0)
        (dest / "args").parent.mkdir(parents=True, exist_ok=True)
        (dest / "args").write_text(repr((name, tcp_established)))
        return Outcome(False, dest)

    class Db:
        def before_checkpoint(self, context):
            if mode == "hookfail":
                raise ConnectionError("db is busy")
        def after_restore(self, context):
            pass

    _checkpoint._default = _checkpoint.Coordinator(engine)
    db = Db()
    coord.global_context().register(db)
    held = open(ready.with_suffix(".data"), "w") if mode == "refuse" else None
    ready.write_text(str(os.getpid()))
    while True:
        time.sleep(1)
    """
)


@pytest.fixture
def helper(tmp_path: Path) -> Iterator[Callable[[str], int]]:
    """Start helper processes (stdio on /dev/null); kill them by pid at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    script = tmp_path / "helper.py"
    script.write_text(HELPER)

    def start(mode: str) -> int:
        ready = tmp_path / f"ready-{mode}"
        with open(tmp_path / f"{mode}.err", "a") as err:
            proc = subprocess.Popen(
                [sys.executable, str(script), mode, str(ready)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=tmp_path,
            )
        procs.append(proc)
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert proc.poll() is None, (tmp_path / f"{mode}.err").read_text()
            assert time.monotonic() < deadline, "helper did not start"
            time.sleep(0.02)
        return proc.pid

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


def _ask(pid: int, dest: Path, *, leave_running: bool = True, timeout: float = 20) -> object:
    return request_checkpoint(
        pid, dest, leave_running=leave_running, tcp_established=True, name="n", timeout=timeout
    )


def test_leave_running_success_is_reported(helper: Callable[[str], int], tmp_path: Path) -> None:
    pid = helper("ok")
    out = request_checkpoint(
        pid, tmp_path / "img", leave_running=True, tcp_established=True, name="n", timeout=20
    )
    assert out.pid == pid and out.image == tmp_path / "img" and not out.exited
    assert (tmp_path / "img" / "args").read_text() == "('n', True)"
    # The listener is back after the checkpoint: a second request works.
    again = request_checkpoint(
        pid, tmp_path / "img2", leave_running=True, tcp_established=False, name=None, timeout=20
    )
    assert again.image == tmp_path / "img2"


def test_without_leave_running_the_client_waits_for_exit_and_image(
    helper: Callable[[str], int], tmp_path: Path
) -> None:
    pid = helper("ok")
    out = request_checkpoint(
        pid, tmp_path / "img", leave_running=False, tcp_established=False, name=None, timeout=20
    )
    assert out.exited and (tmp_path / "img" / "torpor.json").exists()


def test_hook_failure_reaches_the_client(helper: Callable[[str], int], tmp_path: Path) -> None:
    pid = helper("hookfail")
    with pytest.raises(RemoteCheckpointError) as info:
        _ask(pid, tmp_path / "img")
    err = info.value
    assert err.kind == "CheckpointError" and err.pid == pid
    assert "db is busy" in str(err)
    assert any("ConnectionError: db is busy" in d for d in err.details)


def test_refused_descriptors_reach_the_client(helper: Callable[[str], int], tmp_path: Path) -> None:
    pid = helper("refuse")
    with pytest.raises(CheckpointRefusedError) as info:
        _ask(pid, tmp_path / "img")
    (line,) = info.value.offenders
    assert "ready-refuse.data" in line and "open for writing" in line


def test_dump_failure_reaches_the_client(helper: Callable[[str], int], tmp_path: Path) -> None:
    pid = helper("dumpfail")
    with pytest.raises(DumpError) as info:
        _ask(pid, tmp_path / "img")
    assert info.value.log_lines == ("Error (criu/sk-unix.c:1): boom",)


def test_uncoordinated_and_missing_processes(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(NotCoordinatedError) as info:
            _ask(sleeper.pid, tmp_path / "img")
        assert info.value.pid == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.raises(ProcessNotFoundError):
        _ask(sleeper.pid, tmp_path / "img")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to setuid() to nobody")
def test_other_users_are_refused(helper: Callable[[str], int], tmp_path: Path) -> None:
    pid = helper("ok")
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        os.close(r)
        try:
            os.setgid(65534)
            os.setuid(65534)
            _ask(pid, Path("/tmp/never"), timeout=10)
            result = {"kind": "none", "msg": ""}
        except BaseException as exc:
            result = {"kind": type(exc).__name__, "msg": str(exc)}
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        result = json.loads(fh.read())
    os.waitpid(child, 0)
    assert result["kind"] == PermissionDeniedError.__name__, result
    assert "uid 65534 may not checkpoint" in result["msg"]
    assert not Path("/tmp/never").exists()


def _listening(address: bytes) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        try:
            s.connect(address)
        except ConnectionRefusedError:
            return False
    return True


def test_listener_closes_before_checkpoint_and_listens_again_after() -> None:
    enable()
    listener = _channel._listener
    assert listener is not None and listener.address == _channel.listener_address(os.getpid())
    deadline = time.monotonic() + 5
    while not listener._accepting and time.monotonic() < deadline:
        time.sleep(0.01)
    ctx = Context()
    started = time.monotonic()
    # From another thread than the accepting one: shutdown wakes accept(), which closes.
    listener.before_checkpoint(ctx)
    assert time.monotonic() - started < 2
    assert listener._sock is None
    assert not _listening(listener.address)
    listener.after_restore(ctx)
    assert _listening(listener.address)


def test_forked_child_listens_under_its_own_pid() -> None:
    enable()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        listener = _channel._listener
        ok = listener is not None and listener.address == _channel.listener_address(os.getpid())
        os.write(w, b"1" if ok else b"0")
        time.sleep(2)
        os._exit(0)
    try:
        os.close(w)
        assert os.read(r, 1) == b"1"
        assert _listening(_channel.listener_address(pid))
        assert _channel._listener is not None and _listening(_channel._listener.address)
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
