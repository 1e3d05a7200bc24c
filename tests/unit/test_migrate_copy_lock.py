"""The copy source's CRIU lock table (``torpor._migrate._copy._Move``) against a fake ``nft``
and a fake CRIU dump: the move unlocks, journals and names to the target only the table of its
own dump (from the dump's ``inventory.img``), never a ``CRIU-*`` table another dump made on
this host meanwhile, after a good move and after a failed one alike. (The lab tests run the
real CRIU and ``nft``; ``tests/integration/test_netlock_real.py`` a real dump's table.)"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from torpor._errors import DumpError
from torpor._migrate import _address, _copy, _leftovers, _netlock
from torpor._migrate._copy import MigrationError, _Move
from torpor._migrate._dedup import Counts
from torpor._migrate._send import Sent
from torpor._process._proc import ProcRef, start_time

from .test_migrate_lazy_lock import DECOY, OURS, RUN_ID, FakeConn, FakeNft, _inventory

GOT: dict[str, Any] = {}


class FakeCriu:
    """A TCP dump: CRIU's lock table made (and another dump's, at the same time), the
    inventory written, ``post-dump``; answered false, CRIU lifts its own lock and fails."""

    run_id: str | None = RUN_ID

    def dump(self, pid: int, staging: Path, options: object, notify: Any) -> None:
        nft = GOT["nft"]
        notify(SimpleNamespace(name="pre-dump", pid=0))
        nft.tables += [OURS, DECOY]
        (staging / "inventory.img").write_bytes(_inventory(FakeCriu.run_id))
        listed = nft.listings
        answer = notify(SimpleNamespace(name="post-dump", pid=0))
        GOT["in_freeze"] = nft.listings - listed
        if answer is False:
            nft.tables.remove(OURS)  # network_unlock on CRIU's failure path
            raise DumpError("post-dump answered false")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("TORPOR_HOME", str(home))
    nft = FakeNft()
    monkeypatch.setattr(_netlock, "_nft", nft)
    GOT.clear()
    GOT.update(nft=nft, journalled=None, facts=None, in_freeze=None)
    real_record = _leftovers.record

    def record(*args: Any, **kw: Any) -> Any:
        GOT["journalled"] = sorted(kw["tables"])
        return real_record(*args, **kw)

    def transfer_image(conn: Any, staging: Path, image_facts: dict[str, Any], **_kw: Any) -> Sent:
        GOT["facts"] = image_facts
        return Sent(10, 1, Counts(sent=10))

    monkeypatch.setattr(_leftovers, "record", record)
    monkeypatch.setattr(_copy, "CriuEngine", FakeCriu)
    monkeypatch.setattr(_copy, "facts", lambda pid: ((f"pid{pid}",), 0))
    monkeypatch.setattr(_copy, "criu_version", lambda: "4.2")
    monkeypatch.setattr(_copy, "transfer_image", transfer_image)
    for name in ("take_down", "announce", "bring_up"):
        monkeypatch.setattr(_address, name, lambda a: None)
    FakeCriu.run_id = RUN_ID
    yield GOT


def _move(conn: FakeConn) -> _Move:
    began = start_time(os.getpid())
    assert began is not None
    ref = ProcRef(os.getpid(), began)
    move = _Move(conn, "web", "b:7000", ref, tcp_established=True, say=None)  # type: ignore[arg-type]
    move.addresses = (ipaddress.ip_interface("10.0.0.100/24"),)
    return move


def test_a_good_move_drops_its_own_lock_only(env: dict[str, Any]) -> None:
    summary = _move(FakeConn([{"type": "running", "pid": 9}])).run(5.0)
    assert summary.target_pid == 9
    nft = env["nft"]
    assert env["journalled"] == [OURS]  # the other dump's table is not the move's to undo
    assert env["facts"]["criu_lock"] == OURS[1]
    assert env["in_freeze"] == 0  # named from the inventory: no listing in the freeze
    assert nft.deleted == [OURS]
    assert DECOY in nft.tables


def test_a_failed_move_leaves_the_other_dump_s_lock(env: dict[str, Any]) -> None:
    conn = FakeConn([{"type": "failed", "error": "the disk of b failed"}])
    with pytest.raises(MigrationError, match="the disk of b failed"):
        _move(conn).run(5.0)
    nft = env["nft"]
    assert nft.deleted == [] and OURS not in nft.tables  # CRIU lifted its own
    assert DECOY in nft.tables


def test_without_a_run_id_two_new_tables_are_left_alone(env: dict[str, Any]) -> None:
    FakeCriu.run_id = None
    move = _move(FakeConn([{"type": "running", "pid": 9}]))
    move.run(5.0)
    nft = env["nft"]
    assert env["journalled"] == [] and env["facts"]["criu_lock"] is None
    assert nft.deleted == [] and {OURS, DECOY} <= set(nft.tables)
    assert move.warnings[0].startswith("warning: the dump names no lock table and several")
    assert json.dumps(move.warnings)  # said on the command's stderr
