"""The migration's nftables locks (``torpor._migrate._netlock``) against a fake ``nft``: the
target's lock table, finding CRIU's lock left after a dump, deleting only well-formed tables,
and the sweep of what a killed server left. (The lab tests run the real ``nft``.)"""

from __future__ import annotations

import ipaddress
import json

import pytest

from torpor._migrate import _netlock
from torpor._migrate._netlock import NetlockError


class FakeNft:
    """Records each ``nft`` call; ``list tables`` answers from ``self.tables``."""

    def __init__(self, tables: list[tuple[str, str]]) -> None:
        self.tables = list(tables)
        self.calls: list[tuple[tuple[str, ...], str | None]] = []

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        self.calls.append((args, stdin))
        if args == ("-j", "list", "tables"):
            items = [{"table": {"family": f, "name": n, "handle": 1}} for f, n in self.tables]
            return json.dumps({"nftables": [{"metainfo": {"version": "1.0.6"}}, *items]})
        if args[:2] == ("delete", "table"):
            self.tables.remove((args[2], args[3]))
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


def test_sweep_removes_torpor_locks_only(nft: FakeNft) -> None:
    nft.tables += [("inet", "torpor-mig-1"), ("inet", "torpor-mig-2"), ("inet", "CRIU-9")]
    assert _netlock.sweep() == ["inet torpor-mig-1", "inet torpor-mig-2"]
    assert sorted(nft.tables) == [("inet", "CRIU-9"), ("inet", "filter")]


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
    assert nft.calls[0][1] is not None and nft.calls[0][1].startswith(f"table inet {name} {{\n")
    for bad in ("CRIU-", "criu-1", "CRIU-1 ; flush ruleset", "CRIU-" + "a" * 22, "filter"):
        assert _netlock.criu_name(bad) is None
        with pytest.raises(NetlockError, match="bad CRIU lock name"):
            _netlock.block("t", [addr], criu=bad)
    assert _netlock.criu_name(7) is None
    assert _netlock.criu_name(name) == name
