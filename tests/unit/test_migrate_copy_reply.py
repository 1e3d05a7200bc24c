"""What the source reads from the target's ``running`` after the commit
(``torpor._migrate._copy._Move.run``): once CRIU has killed the original nothing the target
sent may raise, or the command fails as an internal error, the record never says where the
process went and an operator may start it here again (two copies). CRIU and the channel are
fakes here; the lab test ``tests/migration/test_migrate_copy.py`` runs the real ones."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from torpor._errors import DumpError
from torpor._migrate import _copy, _viapool
from torpor._migrate._copy import _Move
from torpor._migrate._dedup import Counts
from torpor._migrate._send import Sent, reply_number
from torpor._process._proc import ProcRef, start_time

HOSTILE = ["x", [1], {"a": 1}, 10**400, -5, float("nan"), float("inf"), True, None]
IDS = ["str", "list", "dict", "huge", "negative", "nan", "inf", "bool", "null"]


class FakeConn:
    """The target's end of the channel: answers ``running`` with ``reply``'s fields."""

    def __init__(self, reply: dict[str, Any]) -> None:
        self.replies = [reply]
        self.sent: list[dict[str, Any]] = []

    def send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)

    def recv(self) -> dict[str, Any]:
        return self.replies.pop(0)

    def settimeout(self, timeout: float) -> None:
        pass


class FakeCriu:
    """A dump that freezes, asks post-dump, and kills the original on ``true``."""

    killed = False

    def dump(self, pid: int, staging: Path, options: object, notify: Any) -> None:
        notify(SimpleNamespace(name="pre-dump", pid=0))
        if notify(SimpleNamespace(name="post-dump", pid=0)) is False:
            raise DumpError("post-dump answered false")
        FakeCriu.killed = True


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    h = tmp_path / "home"
    h.mkdir(mode=0o700)
    monkeypatch.setenv("TORPOR_HOME", str(h))
    monkeypatch.setattr(_copy, "CriuEngine", FakeCriu)
    monkeypatch.setattr(_copy, "facts", lambda pid: ((f"pid{pid}",), 0))
    monkeypatch.setattr(_copy, "criu_version", lambda: "4.2")
    monkeypatch.setattr(_copy, "transfer_image", lambda *a, **k: Sent(10, 1, Counts(sent=10)))
    FakeCriu.killed = False
    yield h


def _ref() -> ProcRef:
    began = start_time(os.getpid())
    assert began is not None
    return ProcRef(os.getpid(), began)


@pytest.mark.parametrize("value", HOSTILE, ids=IDS)
def test_a_hostile_restore_ms_after_the_commit_is_read_as_zero(home: Path, value: object) -> None:
    conn = FakeConn({"type": "running", "pid": 1, "restore_ms": value})
    move = _Move(conn, "app", "t:1", _ref(), tcp_established=False, say=None)  # type: ignore[arg-type]
    summary = move.run(5.0)
    assert FakeCriu.killed
    assert summary.restore_ms == 0.0 and summary.target_pid == 1
    assert conn.sent[-1] == {"type": "done"}


def test_a_good_restore_ms_is_kept(home: Path) -> None:
    conn = FakeConn({"type": "running", "pid": 7, "restore_ms": 12.5})
    move = _Move(conn, "app", "t:1", _ref(), tcp_established=False, say=None)  # type: ignore[arg-type]
    assert move.run(5.0).restore_ms == 12.5


class FakePool:
    def push(self, image: object, record: str, progress: object) -> object:
        return SimpleNamespace(stored_bytes=0)


@pytest.mark.parametrize("value", HOSTILE, ids=IDS)
def test_pool_mode_reads_the_reply_as_copy_mode(
    home: Path, monkeypatch: pytest.MonkeyPatch, value: object
) -> None:
    import torpor._pools

    manifest = SimpleNamespace(total_bytes=10, files=[SimpleNamespace(name="a", sha256="0")])
    monkeypatch.setattr(
        _viapool._PoolMove, "_seal", lambda self: SimpleNamespace(manifest=manifest)
    )
    monkeypatch.setattr(torpor._pools, "open_pool", lambda name: contextlib.nullcontext(FakePool()))
    conn = FakeConn({"type": "running", "pid": 1, "restore_ms": value})
    move = _viapool._PoolMove(conn, "app", "t:1", _ref(), tcp_established=False, say=None)  # type: ignore[arg-type]
    move.pool = "p"
    summary = move.run(5.0)
    assert FakeCriu.killed and summary.restore_ms == 0.0
    assert conn.sent[0]["type"] == "restore"


def test_reply_number() -> None:
    assert reply_number(3) == 3.0 and reply_number(2.5) == 2.5 and reply_number(0) == 0.0
    for value in HOSTILE:
        assert reply_number(value) == 0.0, value
