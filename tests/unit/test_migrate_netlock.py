"""The migration's nftables locks (``torpor._migrate._netlock``) against a fake ``nft``: the
target's lock table, finding CRIU's lock left after a dump, deleting only well-formed tables,
and the table a killed server's journal names. (The lab tests run the real ``nft``.)"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from torpor._migrate import _netlock
from torpor._migrate._netlock import NetlockError

_CREATE = re.compile(r'create table (\S+) (\S+) \{ comment "(\S+)"; \}\Z')


class FakeNft:
    """Records each ``nft`` call; ``list tables`` answers from ``self.tables``; a script
    beginning with ``create table`` fails, as nft's transaction does, if the table exists,
    else adds it (with its comment, shown by ``list table``)."""

    def __init__(self, tables: list[tuple[str, str]]) -> None:
        self.tables = list(tables)
        self.comments: dict[tuple[str, str], str] = {}
        self.calls: list[tuple[tuple[str, ...], str | None]] = []

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        self.calls.append((args, stdin))
        if args == ("-j", "list", "tables"):
            items = [{"table": {"family": f, "name": n, "handle": 1}} for f, n in self.tables]
            return json.dumps({"nftables": [{"metainfo": {"version": "1.0.6"}}, *items]})
        if args[:2] == ("delete", "table"):
            self.tables.remove((args[2], args[3]))
        if args == ("-f", "-") and stdin is not None:
            m = _CREATE.match(stdin.splitlines()[0])
            if m is not None:
                if (m[1], m[2]) in self.tables:
                    raise NetlockError(
                        "nft -f - failed: Error: Could not process rule: File exists"
                    )
                self.tables.append((m[1], m[2]))
                self.comments[(m[1], m[2])] = m[3]
        if args[:2] == ("list", "table"):
            comment = self.comments.get((args[2], args[3]))
            inner = f'\tcomment "{comment}"\n' if comment else ""
            return f"table {args[2]} {args[3]} {{\n{inner}}}\n"
        return ""


@pytest.fixture
def nft(monkeypatch: pytest.MonkeyPatch) -> FakeNft:
    fake = FakeNft([("inet", "filter")])
    monkeypatch.setattr(_netlock, "_nft", fake)
    return fake


def test_block_drops_both_directions_but_criu_s_own_packets(nft: FakeNft) -> None:
    addrs = [ipaddress.ip_interface("10.0.0.100/24"), ipaddress.ip_interface("fd00::7/64")]
    assert _netlock.block("ab12", addrs) == ("inet", "torpor-mig-ab12")
    ((args, script),) = nft.calls
    assert args == ("-f", "-")
    assert script == (
        'create table inet torpor-mig-ab12 { comment "torpor-mig-ab12"; }\n'
        "table inet torpor-mig-ab12 {\n"
        "  chain input {\n"
        "    type filter hook input priority -10; policy accept;\n"
        "    meta mark 0xc114 accept\n"
        "    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept\n"
        "    ip daddr 10.0.0.100 drop\n"
        "    ip6 daddr fd00::7 drop\n"
        "  }\n"
        "  chain output {\n"
        "    type filter hook output priority -10; policy accept;\n"
        "    meta mark 0xc114 accept\n"
        "    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept\n"
        "    ip saddr 10.0.0.100 drop\n"
        "    ip6 saddr fd00::7 drop\n"
        "  }\n"
        "}\n"
    )


@pytest.mark.parametrize("tag", ["", "a b", "x;flush ruleset", "t" * 61, "é"])
def test_block_refuses_a_bad_tag(nft: FakeNft, tag: str) -> None:
    with pytest.raises(NetlockError, match="bad lock name"):
        _netlock.block(tag, [ipaddress.ip_interface("10.0.0.100/24")])
    assert nft.calls == []


def test_block_needs_an_address(nft: FakeNft) -> None:
    with pytest.raises(NetlockError, match="no address to lock"):
        _netlock.block("t", [])


def test_new_criu_tables_are_criu_s_made_since(nft: FakeNft) -> None:
    before = _netlock.tables()
    nft.tables += [("inet", "CRIU-59b7beb0-a3e8-4f9d-98"), ("inet", "other")]
    assert _netlock.new_criu_tables(before) == {("inet", "CRIU-59b7beb0-a3e8-4f9d-98")}
    nft.tables.append(("inet", "CRIU-older"))
    assert _netlock.new_criu_tables(_netlock.tables()) == set()


def test_drop_deletes_only_an_existing_well_formed_table(nft: FakeNft) -> None:
    nft.tables.append(("inet", "CRIU-1"))
    assert _netlock.drop(("inet", "CRIU-1")) is True
    assert _netlock.drop(("inet", "CRIU-1")) is False  # gone: nothing deleted
    assert [a for a, _ in nft.calls if a[0] == "delete"] == [("delete", "table", "inet", "CRIU-1")]
    for bad in (("inet", "x y"), ("bridge", "CRIU-1"), ("inet", "")):
        with pytest.raises(NetlockError, match="bad table"):
            _netlock.drop(bad)


def test_the_table_a_journal_names_is_one_block_could_have_made() -> None:
    criu = "CRIU-59b7beb0-a3e8-4f9d-98"
    assert _netlock.lock_table(criu, "ab12") == ("inet", criu)
    assert _netlock.lock_table(None, "ab12") == ("inet", "torpor-mig-ab12")
    for lock, tag in [("filter", "ab12"), (7, "ab12"), (None, None), (None, "x y"),
                      (None, ""), (None, "a" * 50), (None, 12)]:  # fmt: skip
        assert _netlock.lock_table(lock, tag) is None, (lock, tag)
    assert _netlock.lock_table(None, "a" * 49) == ("inet", "torpor-mig-" + "a" * 49)


def test_a_failing_nft_is_one_error_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_netlock, "_lib", lambda: None)  # the nft command, then
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(NetlockError, match=r"^nft could not run: ") as err:
        _netlock.tables()
    assert err.value.hint == "install nftables (scripts/install-criu.sh)"


def test_a_lock_named_after_the_dump_s_criu_table(nft: FakeNft) -> None:
    addr = ipaddress.ip_interface("10.0.0.100/24")
    name = "CRIU-59b7beb0-a3e8-4f9d-98"  # as CRIU cuts it (its 32-byte buffer)
    assert _netlock.block("t", [addr], criu=name) == ("inet", name)
    assert nft.calls[0][1] is not None
    assert nft.calls[0][1].startswith(f'create table inet {name} {{ comment "torpor-mig-t"; }}\n')
    for bad in ("CRIU-", "criu-1", "CRIU-1 ; flush ruleset", "CRIU-" + "a" * 22, "filter"):
        assert _netlock.criu_name(bad) is None
        with pytest.raises(NetlockError, match="bad CRIU lock name"):
            _netlock.block("t", [addr], criu=bad)
    assert _netlock.criu_name(7) is None
    assert _netlock.criu_name(name) == name


# -- the dump's own lock table, from its inventory ---------------------------------------------

RUN_ID = "3f2b8c1e-9d4a-4e6f-8b7c-1a2b3c4d5e6f"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, kind: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | kind)
    return key + (_varint(len(payload)) + payload if kind == 2 else payload)


def _inventory(*fields: bytes, magic: int = 0x58313116, size: int | None = None) -> bytes:
    msg = b"".join(fields)
    n = len(msg) if size is None else size
    return magic.to_bytes(4, "little") + n.to_bytes(4, "little") + msg


# What CRIU 4.2 writes: img_version, fdinfo_per_id, root_ids (a message), ns_per_id,
# dump_uptime, network_lock_method, then dump_criu_run_id.
TYPICAL = (
    _field(1, 0, _varint(2)),
    _field(2, 0, _varint(1)),
    _field(3, 2, _field(1, 0, _varint(7)) + _field(2, 0, _varint(300))),
    _field(4, 0, _varint(1)),
    _field(8, 0, _varint(123456789012)),
    _field(11, 0, _varint(2)),
    _field(13, 2, RUN_ID.encode()),
)


def _dir(tmp_path: Path, data: bytes | None) -> int:
    if data is not None:
        (tmp_path / "inventory.img").write_bytes(data)
    return os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)


def test_dump_table_is_named_from_the_inventory_s_run_id(tmp_path: Path) -> None:
    fd = _dir(tmp_path, _inventory(*TYPICAL))
    try:
        # CRIU's char table[32] holds "inet CRIU-" and 21 characters of the run id.
        assert _netlock.dump_table(fd) == ("inet", "CRIU-3f2b8c1e-9d4a-4e6f-8b")
        assert _netlock.criu_name(_netlock.dump_table(fd)[1]) is not None  # type: ignore[index]
    finally:
        os.close(fd)


def test_a_dump_without_inventory_or_run_id_names_no_table(tmp_path: Path) -> None:
    fd = _dir(tmp_path, None)
    try:
        assert _netlock.dump_table(fd) is None
        (tmp_path / "inventory.img").write_bytes(_inventory(*TYPICAL[:-1]))
        assert _netlock.dump_table(fd) is None
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x16\x31\x31",
        _inventory(*TYPICAL, magic=0x54564319),
        _inventory(*TYPICAL, size=10_000),
        _inventory(_field(13, 2, b"CRIU-pwned; flush ruleset")),
        _inventory(_field(13, 2, RUN_ID.upper().encode())),
        _inventory(_field(13, 2, "3f2b8c1e-9d4a-4e6f-8b7c-1a2b3c4d5e6\u00e9".encode())),
        _inventory(_field(13, 2, RUN_ID.encode())[:-5]),
        _inventory(_field(1, 0, b"\xff" * 11)),
        _inventory(_field(1, 3, b"")),
    ],
    ids=[
        "empty", "short", "wrong magic", "size past the end", "not a run id", "upper case",
        "not ascii", "string cut", "endless varint", "group wire type",
    ],
)  # fmt: skip
def test_a_malformed_inventory_is_one_error_and_names_nothing(tmp_path: Path, data: bytes) -> None:
    fd = _dir(tmp_path, data)
    try:
        with pytest.raises(NetlockError, match=r"^the dump's inventory\.img |cannot read"):
            _netlock.dump_table(fd)
    finally:
        os.close(fd)


def test_an_inventory_that_is_no_regular_file_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.write_bytes(_inventory(*TYPICAL))
    image = tmp_path / "image"
    image.mkdir()
    (image / "inventory.img").symlink_to(outside)
    fd = os.open(image, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(NetlockError, match=r"^cannot read the dump's inventory\.img"):
            _netlock.dump_table(fd)
        (image / "inventory.img").unlink()
        os.mkfifo(image / "inventory.img")
        with pytest.raises(NetlockError, match=r"^cannot read the dump's inventory\.img"):
            _netlock.dump_table(fd)  # a FIFO is refused, not read (it would hang)
    finally:
        os.close(fd)


def test_a_huge_inventory_is_refused_unread(tmp_path: Path) -> None:
    fd = _dir(tmp_path, _inventory(*TYPICAL) + b"\0" * (1 << 17))
    try:
        with pytest.raises(NetlockError, match=r"^cannot read the dump's inventory\.img"):
            _netlock.dump_table(fd)
    finally:
        os.close(fd)


# -- the target's lock, named by the peer ------------------------------------------------------


class FakeConn:
    """The source's end: what the target sends it."""

    peer = SimpleNamespace(name="a")

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)


@pytest.fixture
def incoming(
    nft: FakeNft, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, list[str]]:
    from torpor._migrate import _address, _serve

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("TORPOR_HOME", str(home))
    brought: list[str] = []
    monkeypatch.setattr(_address, "bring_up", lambda addr, links=None: brought.append(str(addr)))
    monkeypatch.setattr(_address, "announce", lambda addr, link=None: True)
    monkeypatch.setattr(_address, "take_down", lambda addr: True)
    inc = _serve._Incoming(FakeConn(), "b:7070", lambda line: None)  # type: ignore[arg-type]
    inc.addresses = (ipaddress.ip_interface("10.0.0.100/24"),)
    return inc, brought


def test_a_lock_the_peer_names_after_a_table_here_is_refused(
    nft: FakeNft, incoming: tuple[Any, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from torpor._migrate import _serve

    inc, brought = incoming
    other = ("inet", "CRIU-59b7beb0-a3e8-4f9d-98")  # another dump's lock, here
    nft.tables.append(other)
    inc.criu_lock = other[1]

    def restore(*args: object, **kwargs: object) -> None:
        raise AssertionError("restored behind another dump's lock")

    monkeypatch.setattr(_serve, "_restore_apart", restore)
    with pytest.raises(NetlockError, match="exists here") as err:
        inc._restore(None, "app")
    assert isinstance(err.value.__cause__, _netlock.LockTakenError)
    ((failed,),) = [inc.conn.sent]
    assert failed == {
        "type": "failed",
        "error": f"a named its lock inet {other[1]}, a table that exists here: refused",
    }
    assert other in nft.tables  # not deleted (merged into: see the real nft's test)
    scripts = [s for a, s in nft.calls if a == ("-f", "-")]
    assert len(scripts) == 1 and scripts[0] is not None
    assert scripts[0].startswith(f"create table inet {other[1]} ")  # one step, no listing first
    assert [a for a, _ in nft.calls if a[0] == "delete"] == []
    assert brought == []
    assert not (Path(os.environ["TORPOR_HOME"]) / "migrate-inflight.json").exists()


def test_a_lock_name_free_here_is_taken(nft: FakeNft, incoming: tuple[Any, list[str]]) -> None:
    inc, brought = incoming
    inc.criu_lock = "CRIU-59b7beb0-a3e8-4f9d-98"
    assert inc.with_addresses(lambda: "rec") == "rec"
    script = [s for a, s in nft.calls if a == ("-f", "-")]
    assert len(script) == 1 and script[0] is not None
    assert script[0].startswith("create table inet CRIU-59b7beb0-a3e8-4f9d-98 {")
    assert brought == ["10.0.0.100/24"]


def test_a_lock_whose_table_exists_is_refused_by_block_itself(nft: FakeNft) -> None:
    addr = ipaddress.ip_interface("10.0.0.100/24")
    name = "CRIU-59b7beb0-a3e8-4f9d-98"
    nft.tables.append(("inet", name))
    with pytest.raises(_netlock.LockTakenError) as err:
        _netlock.block("t", [addr], criu=name)
    assert err.value.msg == (
        f"a table inet {name} exists here already: the lock was not made (nothing changed)"
    )
    assert _netlock.made_by_block(("inet", name), "t") is False


def test_a_failure_with_no_such_table_is_nft_s_own_error(
    nft: FakeNft, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*args: str, stdin: str | None = None) -> str:
        if args == ("-f", "-"):
            raise NetlockError("nft -f - failed: Error: Could not process rule: No buffer space")
        return nft(*args, stdin=stdin)

    monkeypatch.setattr(_netlock, "_nft", failing)
    with pytest.raises(NetlockError) as err:
        _netlock.block("t", [ipaddress.ip_interface("10.0.0.100/24")])
    assert type(err.value) is NetlockError
    assert err.value.msg == "nft -f - failed: Error: Could not process rule: No buffer space"


def test_the_mark_of_block_is_its_tag(nft: FakeNft) -> None:
    table = _netlock.block("ab12", [ipaddress.ip_interface("10.0.0.100/24")])
    assert _netlock.made_by_block(table, "ab12") is True
    for other in ("ab13", None, 7, "x y", ""):
        assert _netlock.made_by_block(table, other) is False
    assert _netlock.made_by_block(("inet", "torpor-mig-gone"), "ab12") is None


@pytest.mark.parametrize("made", [True, False])
def test_the_sweep_deletes_the_journal_s_lock_only_if_block_made_it(
    nft: FakeNft, incoming: tuple[Any, list[str]], made: bool
) -> None:
    from torpor import _paths
    from torpor._migrate import _serve_sweep

    name = "CRIU-59b7beb0-a3e8-4f9d-98"
    if made:  # the server was killed after making its lock
        _netlock.block("ab12", [ipaddress.ip_interface("10.0.0.100/24")], criu=name)
    else:  # ... after its journal, its lock refused: the table is another dump's
        nft.tables.append(("inet", name))
    journal = {"addresses": [], "lock": name, "tag": "ab12", "owner": [1, 1]}
    _paths.write_home_file(_serve_sweep._JOURNAL, json.dumps(journal).encode())
    logged: list[str] = []
    _serve_sweep._sweep(logged.append)
    if made:
        assert ("inet", name) not in nft.tables
        assert logged == [f"removed the network lock inet {name}, left by a migration"]
    else:
        assert ("inet", name) in nft.tables
        assert [a for a, _ in nft.calls if a[0] == "delete"] == []
        assert logged == [f"kept the table inet {name} a migration's journal names: not its lock"]
    assert _paths.read_home_file(_serve_sweep._JOURNAL) is None
