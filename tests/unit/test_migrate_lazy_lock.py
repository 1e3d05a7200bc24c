"""The lazy source's CRIU lock table (``torpor._migrate._lazy._LazyMove``) against a fake
``nft`` and a fake lazy dump: the move unlocks, journals and names to the target only the
table of its own dump (from the dump's ``inventory.img``), never a ``CRIU-*`` table another
dump made on this host meanwhile, after a good move and after a thaw alike. (The lab tests
run the real CRIU and ``nft``.)"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from torpor._errors import DumpError
from torpor._migrate import _address, _lazy, _leftovers, _netlock
from torpor._migrate._channel import ChannelError
from torpor._migrate._copy import MigrationError
from torpor._process._proc import ProcRef, stat_fields

RUN_ID = "3f2b8c1e-9d4a-4e6f-8b7c-1a2b3c4d5e6f"
OURS = ("inet", "CRIU-3f2b8c1e-9d4a-4e6f-8b")
DECOY = ("inet", "CRIU-77777777-1111-4222-8a")  # another dump's, made during ours


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _inventory(run_id: str | None) -> bytes:
    msg = b"\x08\x02\x10\x01"  # img_version 2, fdinfo_per_id
    if run_id is not None:
        msg += b"\x6a" + _varint(len(run_id)) + run_id.encode()  # field 13
    return (0x58313116).to_bytes(4, "little") + len(msg).to_bytes(4, "little") + msg


GOT: dict[str, Any] = {}


class FakeNft:
    def __init__(self) -> None:
        self.tables = [("inet", "filter")]
        self.deleted: list[tuple[str, str]] = []
        self.listings = 0

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        if args == ("-j", "list", "tables"):
            self.listings += 1
            items = [{"table": {"family": f, "name": n}} for f, n in self.tables]
            return json.dumps({"nftables": items})
        if args[:2] == ("delete", "table"):
            self.tables.remove((args[2], args[3]))
            self.deleted.append((args[2], args[3]))
            return ""
        raise AssertionError(f"unexpected nft {args}")


class FakeConn:
    def __init__(self, replies: list[dict[str, Any]]) -> None:
        self.replies = replies
        self.sent: list[dict[str, Any]] = []

    def send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)

    def recv(self) -> dict[str, Any]:
        return self.replies.pop(0)

    def settimeout(self, _t: float | None) -> None:
        pass


class Event:
    def __init__(self, name: str) -> None:
        self.name = name


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("TORPOR_HOME", str(home))
    nft = FakeNft()
    monkeypatch.setattr(_netlock, "_nft", nft)
    got = GOT
    got.clear()
    got.update(nft=nft, journalled=None, facts=None, in_freeze=None)

    real_record = _leftovers.record

    def record(*args: Any, **kw: Any) -> Any:
        got["journalled"] = sorted(kw["tables"])
        return real_record(*args, **kw)

    def transfer_image(conn: Any, staging: Path, image_facts: dict[str, Any], **_kw: Any) -> Any:
        got["facts"] = image_facts
        return type("Sent", (), {"bytes": 10, "files": 1})()

    monkeypatch.setattr(_leftovers, "record", record)
    monkeypatch.setattr(_lazy, "transfer_image", transfer_image)
    monkeypatch.setattr(_lazy, "criu_version", lambda: "4.2")
    monkeypatch.setattr(_lazy, "repair_off", lambda pids: 0)
    monkeypatch.setattr(_lazy, "FENCE", 0.0)
    return got


def _fake_dump(got: dict[str, Any], *, run_id: str | None, thaw: bool) -> Any:
    """CRIU's lazy dump as the move sees it: its lock table made (and another dump's, at the
    same time), the inventory written, ``post-dump``; then the transfer's end (a FAIL
    command from the move: the tree thawed, CRIU's dump fails)."""

    def lazy_dump(pid: int, staging: Path, ps_fd: int, *, notify: Any, **_kw: Any) -> None:
        nft = got["nft"]
        assert notify(Event("pre-dump"))
        nft.tables += [OURS, DECOY]
        (staging / "inventory.img").write_bytes(_inventory(run_id))
        listed = nft.listings
        answer = notify(Event("post-dump"))
        got["in_freeze"] = nft.listings - listed
        assert answer, got["move"].failure
        if thaw:
            sock = socket.socket(fileno=os.dup(ps_fd))
            sock.settimeout(10)
            assert len(sock.recv(64)) == 32  # the FAIL command
            sock.close()
            raise DumpError("lazy dump: CRIU failed", pid=pid)

    return lazy_dump


def _move(conn: FakeConn) -> _lazy._LazyMove:
    st = stat_fields(os.getpid())
    assert st is not None
    ref = ProcRef(os.getpid(), int(st[19]))
    move = _lazy._LazyMove(conn, "web", "b:7000", ref, say=None, timeout=5)  # type: ignore[arg-type]
    GOT["move"] = move
    move.tcp = True
    move.addresses = (ipaddress.ip_interface("10.0.0.100/24"),)
    return move


def _good_relay(conn: Any, plain: Any, *, idle_timeout: Any, gate: Any) -> None:
    gate.closed = True  # the daemon's PS_IOV_CLOSE: every page is in


def _broken_relay(conn: Any, plain: Any, *, idle_timeout: Any, gate: Any) -> None:
    raise ChannelError("the link broke")


def test_a_good_move_drops_its_own_lock_only(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_lazy, "lazy_dump", _fake_dump(env, run_id=RUN_ID, thaw=False))
    monkeypatch.setattr(_lazy, "relay", _good_relay)
    monkeypatch.setattr(_address, "take_down", lambda a: None)
    conn = FakeConn([{"type": "verified"}, {"type": "settled", "state": "resident", "pid": 9}])
    move = _move(conn)
    summary = move.run()
    assert summary.target_pid == 9
    nft = env["nft"]
    assert env["journalled"] == [OURS]  # the other dump's table is not the move's to undo
    assert env["facts"]["criu_lock"] == OURS[1]
    assert env["in_freeze"] == 0  # named from the inventory: no listing in the freeze
    assert nft.deleted == [OURS]
    assert DECOY in nft.tables


def test_a_thaw_drops_its_own_lock_only(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_lazy, "lazy_dump", _fake_dump(env, run_id=RUN_ID, thaw=True))
    monkeypatch.setattr(_lazy, "relay", _broken_relay)
    monkeypatch.setattr(_address, "take_down", lambda a: None)
    monkeypatch.setattr(_address, "bring_up", lambda a: None)
    monkeypatch.setattr(_address, "announce", lambda a: None)
    move = _move(FakeConn([{"type": "verified"}]))
    with pytest.raises(MigrationError, match="the link broke"):
        move.run()
    nft = env["nft"]
    assert env["journalled"] == [OURS]
    assert nft.deleted == [OURS]
    assert DECOY in nft.tables


def test_without_a_run_id_two_new_tables_are_left_alone(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_lazy, "lazy_dump", _fake_dump(env, run_id=None, thaw=False))
    monkeypatch.setattr(_lazy, "relay", _good_relay)
    monkeypatch.setattr(_address, "take_down", lambda a: None)
    conn = FakeConn([{"type": "verified"}, {"type": "settled", "state": "resident", "pid": 9}])
    said: list[str] = []
    move = _move(conn)
    move.say = said.append
    move.run()
    nft = env["nft"]
    assert env["journalled"] == []
    assert env["facts"]["criu_lock"] is None
    assert nft.deleted == []
    assert OURS in nft.tables and DECOY in nft.tables
    assert any("none is removed" in line for line in said)
