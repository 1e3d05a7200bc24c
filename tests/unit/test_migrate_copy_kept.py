"""Copy mode's verdict after a failed dump (review finding 5): once the target reported
``running``, a dump that fails with the original gone all the same (CRIU killed it, then died
before its dump returned) must not tell the target ``abort``, which kills its copy, the last
one: it is told ``done`` (its copy, restored stopped, then runs: exactly one copy) and the
service addresses leave this host as after a commit. A dump that fails with the original
thawed still aborts. CRIU and the channel are fakes; the original is a real child process."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from torpor._errors import DumpError
from torpor._migrate import _address, _copy
from torpor._migrate._copy import _Move
from torpor._migrate._dedup import Counts
from torpor._migrate._send import MigrationError, Sent
from torpor._process._proc import ProcRef, start_time

ADDR = ipaddress.ip_interface("192.0.2.7/24")


class FakeConn:
    """The target's end: answers the image with ``running`` (pid 4242), records the rest."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)

    def recv(self) -> dict[str, Any]:
        return {"type": "running", "pid": 4242, "restore_ms": 1.0, "stopped": True}

    def settimeout(self, timeout: float | None) -> None:
        pass


class Original:
    """The process being migrated: a real child, so that ``ProcRef.alive`` is the real one."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        began = start_time(self.proc.pid)
        assert began is not None
        self.ref = ProcRef(self.proc.pid, began)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def original() -> Iterator[Original]:
    o = Original()
    try:
        yield o
    finally:
        if o.proc.poll() is None:
            o.kill()


@pytest.fixture
def calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """A home of its own; the address moves recorded (nothing touches this host's)."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("TORPOR_HOME", str(home))
    monkeypatch.setattr(_copy, "facts", lambda pid: ((f"pid{pid}",), 0))
    monkeypatch.setattr(_copy, "criu_version", lambda: "4.2")
    monkeypatch.setattr(_copy, "transfer_image", lambda *a, **k: Sent(10, 1, Counts(sent=10)))
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(_address, "take_down", lambda a: seen.append(("down", str(a))) or True)
    monkeypatch.setattr(_address, "announce", lambda a, *_: seen.append(("announce", str(a))))
    return seen


def criu(original: Original, *, kills: bool) -> type:
    """A dump that freezes, is answered at post-dump, then (``kills``) kills the original
    and fails as if CRIU died before returning, or fails having thawed it."""

    class FakeCriu:
        def dump(self, pid: int, staging: Path, options: object, notify: Any) -> None:
            notify(SimpleNamespace(name="pre-dump", pid=0))
            assert notify(SimpleNamespace(name="post-dump", pid=0)) is True
            if kills:
                original.kill()
            raise DumpError("CRIU ended without answering")

    return FakeCriu


def move(original: Original, monkeypatch: pytest.MonkeyPatch, *, kills: bool) -> tuple:
    monkeypatch.setattr(_copy, "CriuEngine", criu(original, kills=kills))
    conn = FakeConn()
    m = _Move(conn, "app", "t:1", original.ref, tcp_established=False, say=None)  # type: ignore[arg-type]
    m.addresses = (ADDR,)
    with pytest.raises(MigrationError) as err:
        m.run(5.0)
    return conn, err.value.msg


def test_a_dump_failing_after_the_kill_lets_the_copy_run(
    original: Original, calls: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    conn, msg = move(original, monkeypatch, kills=True)
    verdicts = [m["type"] for m in conn.sent]
    assert verdicts == ["done"]  # never "abort": that copy is the process now
    assert msg == (
        "migration of app to t:1 failed: CRIU ended without answering (the original is gone "
        "here; its copy was told to run on t:1 (pid 4242))"
    )
    assert calls[0] == ("down", str(ADDR))  # its address is the copy's, there
    assert ("announce", str(ADDR)) not in calls


def test_a_dump_failing_with_the_original_thawed_aborts_the_copy(
    original: Original, calls: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    conn, msg = move(original, monkeypatch, kills=False)
    assert [m["type"] for m in conn.sent] == ["abort"]
    assert msg == (
        "migration of app to t:1 failed: CRIU ended without answering (the process runs "
        f"here, unchanged (pid {original.proc.pid}))"
    )
    assert calls == [("announce", str(ADDR))]
