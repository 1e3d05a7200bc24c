"""Service addresses (``torpor._migrate._address``): the one boundary for addresses from
outside (records, peers, command lines), the pre-flight check on fake interfaces, the gratuitous
ARP frame, the /proc/net/tcp decoding, and the record field that carries them."""

from __future__ import annotations

import ipaddress
import json
import struct
from pathlib import Path

import pytest

from torpor._migrate import _address
from torpor._migrate._address import AddressError, Connection, Link
from torpor._process import _registry

GOOD = ["10.0.0.100/24", "10.0.0.1/30", "192.168.7.9/16", "fd00::100/64", "2001:db8::5/48"]
BAD = {
    "10.0.0.100": "is not ADDR/PREFIX",
    "10.0.0.100/33": "is not ADDR/PREFIX",
    "ten/8": "is not ADDR/PREFIX",
    "0.0.0.0/8": "is unspecified",
    "::/64": "is unspecified",
    "127.0.0.5/8": "is loopback",
    "::1/64": "is loopback",
    "224.0.0.5/24": "is multicast",
    "ff02::1/64": "is multicast",
    "169.254.3.4/16": "is link-local",
    "fe80::1/64": "is link-local",
    "240.0.0.1/8": "is reserved",
    "::ffff:10.0.0.1/120": "is IPv4-mapped",
    "10.0.0.100/32": "is a single address, not one within a subnet",
    "fd00::1/128": "is a single address, not one within a subnet",
    "10.0.0.0/24": "is the subnet's network or broadcast address",
    "10.0.0.255/24": "is the subnet's network or broadcast address",
}


@pytest.mark.parametrize("text", GOOD)
def test_host_addresses_in_a_subnet_are_taken(text: str) -> None:
    assert str(_address.parse(text)) == text


@pytest.mark.parametrize(("text", "why"), sorted(BAD.items()))
def test_everything_else_is_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(AddressError) as err:
        _address.parse(text)
    shown = repr(text) if why == "is not ADDR/PREFIX" else text  # unparsed: quoted
    assert err.value.msg == f"service address {shown} {why}"


@pytest.mark.parametrize("value", [None, 7, ["10.0.0.1/24"], {"a": 1}, "1" * 65 + "/8"])
def test_non_strings_and_huge_strings_are_refused(value: object) -> None:
    with pytest.raises(AddressError, match="is not ADDR/PREFIX"):
        _address.parse(value)


def test_parse_all_refuses_duplicates_and_too_many() -> None:
    with pytest.raises(AddressError, match=r"^service address 10\.0\.0\.9 is given twice$"):
        _address.parse_all(["10.0.0.9/24", "10.0.0.9/16"])
    many = [f"10.0.1.{i}/24" for i in range(1, _address.MAX_ADDRESSES + 2)]
    with pytest.raises(AddressError, match="more than 16 service addresses"):
        _address.parse_all(many)
    assert len(_address.parse_all(many[:-1])) == _address.MAX_ADDRESSES


def _iface(text: str) -> _address.IPAddr:
    return ipaddress.ip_interface(text)


LINKS = [
    Link("lo", 1, None, True, (_iface("127.0.0.1/8"),)),
    Link("eth0", 2, b"\x02" * 6, True, (_iface("10.0.0.2/24"), _iface("10.0.0.150/24"))),
    Link("eth1", 3, b"\x04" * 6, False, (_iface("10.9.0.2/24"),)),  # down
]


def test_problems_name_the_address_and_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_address, "links", lambda: LINKS)
    assert _address.problems(["10.0.0.100/24"], where="b:7070") == []
    assert _address.problems(
        ["10.0.0.150/24", "10.5.0.1/24", "10.9.0.7/24", "127.0.0.2/24"], where="b:7070"
    ) == ["service address 127.0.0.2/24 is loopback (on b:7070)"]
    assert _address.problems(["10.0.0.150/24", "10.5.0.1/24", "10.9.0.7/24"], where="b") == [
        "service address 10.0.0.150 is in use on b (eth0)",
        "no interface of b is on 10.5.0.0/24 for service address 10.5.0.1/24",
        "no interface of b is on 10.9.0.0/24 for service address 10.9.0.7/24",  # eth1 is down
    ]
    # The prefix must match the interface's subnet, not merely contain the address.
    assert _address.problems(["10.0.0.100/16"], where="b") == [
        "no interface of b is on 10.0.0.0/16 for service address 10.0.0.100/16"
    ]


def test_link_for_skips_loopback_and_the_address_itself() -> None:
    only_itself = [Link("eth0", 2, None, True, (_iface("10.0.0.100/24"),))]
    assert _address.link_for(_iface("10.0.0.100/24"), only_itself) is None
    assert _address.link_for(_iface("127.0.0.9/8"), LINKS) is None
    found = _address.link_for(_iface("10.0.0.77/24"), LINKS)
    assert found is not None and found.name == "eth0"


def test_gratuitous_arp_frames() -> None:
    mac, ip = bytes.fromhex("020000aabbcc"), bytes([10, 0, 0, 100])
    for op, target in ((1, b"\x00" * 6), (2, mac)):
        frame = _address.garp_frame(mac, ip, op)
        assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac
        assert struct.unpack("!H", frame[12:14]) == (0x0806,)
        assert struct.unpack("!HHBBH", frame[14:22]) == (1, 0x0800, 6, 4, op)
        # sender MAC and IP, target MAC and IP: the sender's own IP both times (gratuitous)
        assert frame[22:28] == mac and frame[28:32] == ip
        assert frame[32:38] == target and frame[38:42] == ip
        assert len(frame) == 42


def test_proc_net_tcp_addresses() -> None:
    assert _address._proc_addr("6400000A:1F90") == (ipaddress.ip_address("10.0.0.100"), 8080)
    v6 = "0000FDFD000000000000000001000000:0050"  # fdfd::1 in four host-order words
    assert _address._proc_addr(v6) == (ipaddress.ip_address("fdfd::1"), 80)
    mapped = "0000000000000000FFFF00006400000A:0050"  # ::ffff:10.0.0.100
    assert _address._proc_addr(mapped) == (ipaddress.ip_address("10.0.0.100"), 80)


def test_unmoved_connections_are_those_on_addresses_that_stay() -> None:
    def conn(local: str) -> Connection:
        return Connection(ipaddress.ip_address(local), 80, ipaddress.ip_address("10.0.0.9"), 5)

    conns = [conn("10.0.0.100"), conn("10.0.0.2"), conn("127.0.0.1"), conn("::1")]
    assert _address.unmoved(conns, [_iface("10.0.0.100/24")]) == [conn("10.0.0.2")]
    assert _address.unmoved(conns, []) == [conn("10.0.0.100"), conn("10.0.0.2")]
    assert str(conns[0]) == "10.0.0.100:80 -> 10.0.0.9:5"


def _record(tmp: Path, **extra: object) -> bytes:
    return json.dumps(
        {
            "name": "web",
            "pid": 10,
            "start_time": 1,
            "keeper_pid": 9,
            "command": ["app"],
            "started": "now",
            **extra,
        }
    ).encode()


def test_record_migration_fields(tmp_path: Path) -> None:
    raw = _record(
        tmp_path,
        service_addresses=["10.0.0.100/24"],
        migrating="to b:7070",
        migrated_from="a",
    )
    rec = _registry._parse(raw, tmp_path / "web.json", "web")
    assert rec.service_addresses == ("10.0.0.100/24",)
    assert (rec.migrating, rec.migrated_from, rec.migrated_to) == ("to b:7070", "a", None)
    ended = rec.evolve(ended="later", exit_status=-9, migrated_to="b:7070")
    assert ended.state == "migrated-to b:7070"
    assert rec.evolve(service_addresses=()).service_addresses == ()
    for bad in ("10.0.0.100/24", [1], None):
        with pytest.raises(_registry.RecordError, match="service_addresses"):
            _registry._parse(_record(tmp_path, service_addresses=bad), tmp_path / "w", "web")


def test_unsolicited_neighbour_advertisement() -> None:
    mac, ip = bytes.fromhex("020000aabbcc"), ipaddress.ip_address("fd00::100").packed
    packet = _address.na_packet(mac, ip)
    # type 136, code 0, checksum left to the kernel, flags: override only (not solicited)
    assert struct.unpack("!BBHI", packet[:8]) == (136, 0, 0, 0x20000000)
    assert packet[8:24] == ip
    assert packet[24:] == bytes([2, 1]) + mac  # target link-layer address option, 8 bytes
