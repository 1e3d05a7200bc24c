"""Service addresses that move with a migrated process (issue 9, point 4).

A process whose connections must survive a migration listens on a *service address*, one that
belongs to no host: ``torpor run --service-address ADDR/PREFIX`` brings it up on the host's
interface on that subnet and records it; ``torpor migrate`` takes it down on the source and up
on the target, in the order :mod:`._copy` and :mod:`._serve` describe. This module does the
host side of that, with ``ip`` (iproute2) and, for IPv4, a gratuitous ARP sent from an
``AF_PACKET`` socket so that the peers' neighbour caches follow the address at once.

Every address comes from outside (a record, a peer's message, a command line):
:func:`parse` is the one boundary. Only a host address inside a subnet (prefix shorter than
the address) is taken: never unspecified, loopback, multicast, link-local or reserved
addresses, nor an IPv4 subnet's network or broadcast address.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .._errors import TorporError

IPAddr = ipaddress.IPv4Interface | ipaddress.IPv6Interface
MAX_ADDRESSES = 16  # service addresses of one process
_IP_TIMEOUT = 10.0


class AddressError(TorporError):
    """A service address that cannot be taken, brought up or down here."""


def parse(text: object) -> IPAddr:
    """``ADDR/PREFIX`` as a service address, or :class:`AddressError` naming the problem."""
    if not isinstance(text, str) or "/" not in text or len(text) > 64:
        raise AddressError(
            f"service address {text!r} is not ADDR/PREFIX", hint="e.g. 10.0.0.100/24"
        )
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError as exc:
        raise AddressError(
            f"service address {text!r} is not ADDR/PREFIX", hint="e.g. 10.0.0.100/24"
        ) from exc
    ip, net = iface.ip, iface.network
    bad = (
        "unspecified" if ip.is_unspecified
        else "loopback" if ip.is_loopback
        else "multicast" if ip.is_multicast
        else "link-local" if ip.is_link_local
        else "reserved" if ip.is_reserved
        else None
    )  # fmt: skip
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        bad = "IPv4-mapped"
    if bad is None and net.prefixlen >= net.max_prefixlen:
        bad = "a single address, not one within a subnet"
    v4_ends = (net.network_address, net.broadcast_address) if net.prefixlen < 31 else ()
    if bad is None and isinstance(ip, ipaddress.IPv4Address) and ip in v4_ends:
        bad = "the subnet's network or broadcast address"
    if bad is not None:
        raise AddressError(
            f"service address {text} is {bad}",
            hint="give a free host address of the hosts' shared subnet, e.g. 10.0.0.100/24",
        )
    return iface


def parse_all(items: Iterable[object]) -> tuple[IPAddr, ...]:
    """Each of ``items`` parsed (:func:`parse`), without duplicates, at most
    :data:`MAX_ADDRESSES`."""
    out: list[IPAddr] = []
    for item in items:
        addr = parse(item)
        if any(a.ip == addr.ip for a in out):
            raise AddressError(f"service address {addr.ip} is given twice")
        out.append(addr)
        if len(out) > MAX_ADDRESSES:
            raise AddressError(f"more than {MAX_ADDRESSES} service addresses")
    return tuple(out)


@dataclass(frozen=True)
class Link:
    """An interface of this host and its addresses."""

    name: str
    index: int
    mac: bytes | None
    up: bool
    addresses: tuple[IPAddr, ...]


def _ip(*args: str) -> str:
    try:
        res = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise AddressError(f"ip {' '.join(args)} could not run: {exc}") from exc
    if res.returncode != 0:
        raise AddressError(f"ip {' '.join(args)} failed: {res.stderr.strip() or res.returncode}")
    return res.stdout


def links() -> list[Link]:
    """This host's interfaces (its network namespace's), from ``ip -j addr show``."""
    try:
        data = json.loads(_ip("-j", "addr", "show"))
    except ValueError as exc:
        raise AddressError("ip -j addr show printed no JSON") from exc
    out = []
    for item in data if isinstance(data, list) else []:
        addrs = []
        for a in item.get("addr_info", []):
            try:
                addrs.append(ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}"))
            except (KeyError, ValueError, TypeError):
                continue
        mac_text = item.get("address")
        mac = None
        if isinstance(mac_text, str) and len(mac_text) == 17:
            try:
                mac = bytes.fromhex(mac_text.replace(":", ""))
            except ValueError:
                mac = None
        out.append(
            Link(
                name=str(item.get("ifname", "")),
                index=int(item.get("ifindex", 0)),
                mac=mac,
                up="UP" in item.get("flags", []),
                addresses=tuple(addrs),
            )
        )
    return out


def link_for(addr: IPAddr, found: Sequence[Link] | None = None) -> Link | None:
    """The interface (up, not loopback) holding another address of ``addr``'s subnet."""
    for link in links() if found is None else found:
        if not link.up or link.name == "lo":
            continue
        for a in link.addresses:
            if a.ip != addr.ip and a.network == addr.network:
                return link
    return None


def held(addr: IPAddr, found: Sequence[Link] | None = None) -> str | None:
    """The interface that has ``addr``'s address, or None."""
    for link in links() if found is None else found:
        if any(a.ip == addr.ip for a in link.addresses):
            return link.name
    return None


def problems(addresses: Iterable[object], *, where: str) -> list[str]:
    """Why the service ``addresses`` (as the peer sent them) cannot be brought up on this host
    (``where``, as the source names it), one line each; empty if they can. For pre-flight:
    each must be a service address (:func:`parse`), an interface must be on its subnet here,
    and no interface may have it already."""
    try:
        parsed = parse_all(addresses)
    except AddressError as exc:
        return [f"{exc.msg} (on {where})"]
    try:
        found = links()
    except AddressError as exc:
        return [f"the addresses of {where} cannot be read: {exc.msg}"]
    out = []
    for addr in parsed:
        owner = held(addr, found)
        if owner is not None:
            out.append(f"service address {addr.ip} is in use on {where} ({owner})")
        elif link_for(addr, found) is None:
            out.append(f"no interface of {where} is on {addr.network} for service address {addr}")
    return out


def bring_up(addr: IPAddr, found: Sequence[Link] | None = None) -> Link:
    """Add ``addr`` to the interface on its subnet (among ``found``, else as they are now;
    IPv6 without duplicate address detection, which would hold it tentative); that
    interface."""
    link = link_for(addr, found)
    if link is None:
        raise AddressError(f"no interface here is on {addr.network} for {addr}")
    try:
        _netlink_add(addr, link.index)
    except OSError as exc:
        raise AddressError(f"{addr} could not be added to {link.name}: {exc.strerror}") from exc
    return link


# rtnetlink (linux/rtnetlink.h, linux/if_addr.h): one RTM_NEWADDR, as ``ip addr add`` sends,
# without starting ``ip`` in the middle of the migration's downtime.
_RTM_NEWADDR, _NLMSG_ERROR = 20, 2
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
_IFA_ADDRESS, _IFA_LOCAL, _IFA_F_NODAD = 1, 2, 0x02
_NLMSG = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")


def _netlink_add(addr: IPAddr, index: int) -> None:
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    flags = _IFA_F_NODAD if addr.version == 6 else 0
    body = _IFADDRMSG.pack(family, addr.network.prefixlen, flags, 0, index)
    raw = addr.ip.packed
    for kind in (_IFA_LOCAL, _IFA_ADDRESS):
        body += _RTATTR.pack(_RTATTR.size + len(raw), kind) + raw  # 4 or 16 bytes: aligned
    nl_flags = _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_EXCL | _NLM_F_CREATE
    msg = _NLMSG.pack(_NLMSG.size + len(body), _RTM_NEWADDR, nl_flags, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sk:
        sk.settimeout(_IP_TIMEOUT)
        sk.bind((0, 0))
        sk.send(msg)
        reply = sk.recv(65536)
    if len(reply) < _NLMSG.size + 4:
        raise OSError(0, "rtnetlink sent no answer")
    _, kind, _, _, _ = _NLMSG.unpack_from(reply)
    (error,) = struct.unpack_from("=i", reply, _NLMSG.size)
    if kind != _NLMSG_ERROR:
        raise OSError(0, f"rtnetlink answered message type {kind}")
    if error:
        raise OSError(-error, os.strerror(-error))


def take_down(addr: IPAddr) -> bool:
    """Remove ``addr`` from whichever interface has it; whether one had it."""
    owner = held(addr)
    if owner is None:
        return False
    _ip("addr", "del", str(addr), "dev", owner)
    return True


def announce(addr: IPAddr, link: Link | None = None) -> bool:
    """Tell the subnet that ``addr`` is here now, from ``link`` (or the interface that has
    it): for IPv4 a gratuitous ARP (a request and a reply, broadcast), for IPv6 an unsolicited
    neighbour advertisement with the override flag to all nodes; whether one was sent. Peers
    update the entry they have for the address at once, instead of sending to the old host
    until their entry goes stale (up to a minute with TCP confirming it)."""
    if link is None:
        found = links()
        owner = held(addr, found)
        link = next((lk for lk in found if lk.name == owner), None)
    if link is None or link.mac is None:
        return False
    if addr.version == 6:
        _advertise(addr, link)
        return True
    ip = addr.ip.packed
    # Protocol 0 and no bind: the socket receives nothing, so the kernel hooks it nowhere.
    # Made for ARP and bound, it was hooked, then unhooked and hooked again by the bind,
    # which waits for an RCU grace period (~10 ms here). Each frame names its link and type.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        for op in (1, 2):  # some stacks heed only requests, others only replies
            sock.sendto(garp_frame(link.mac, ip, op), (link.name, 0x0806))
    finally:
        close_later(sock)
    return True


def close_later(sock: socket.socket) -> None:
    """Close ``sock`` in a thread of its own. Closing an ``AF_PACKET`` socket waits for an RCU
    grace period (``packet_release`` calls ``synchronize_net``): 30-60 ms on this project's
    VM, measured, inside a migration's downtime when the announcement is. The frames are
    sent already; the close only frees the socket."""
    import threading

    threading.Thread(target=sock.close, name="torpor-close-packet-socket", daemon=True).start()


def _advertise(addr: IPAddr, link: Link) -> None:
    assert link.mac is not None
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    try:
        # RFC 4861: hop limit 255 (receivers drop anything else); the kernel fills in the
        # ICMPv6 checksum of a raw ICMPv6 socket.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, link.index)
        sock.bind((str(addr.ip), 0, 0, 0))
        sock.sendto(na_packet(link.mac, addr.ip.packed), ("ff02::1", 0, 0, link.index))
    finally:
        sock.close()


def na_packet(mac: bytes, ip: bytes) -> bytes:
    """An unsolicited ICMPv6 neighbour advertisement (type 136, override flag) of ``ip`` at
    ``mac``, with the target link-layer address option; checksum left to the kernel."""
    override = 0x20000000
    return struct.pack("!BBHI", 136, 0, 0, override) + ip + bytes([2, 1]) + mac


def garp_frame(mac: bytes, ip: bytes, op: int) -> bytes:
    """A broadcast Ethernet frame holding a gratuitous ARP ``op`` (1 request, 2 reply) for
    ``ip`` at ``mac`` (sender and target address both ``ip``)."""
    broadcast = b"\xff" * 6
    header = broadcast + mac + struct.pack("!H", 0x0806)
    target_mac = b"\x00" * 6 if op == 1 else mac  # a reply is gratuitous only so (Linux)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac + ip + target_mac + ip
    return header + arp


# -- the process's TCP connections -----------------------------------------------------------

_LISTEN, _CLOSE = "0A", "07"  # /proc/net/tcp states that are not a connection


@dataclass(frozen=True)
class Connection:
    """A TCP connection a process holds: its local and remote ends."""

    local: ipaddress.IPv4Address | ipaddress.IPv6Address
    local_port: int
    remote: ipaddress.IPv4Address | ipaddress.IPv6Address
    remote_port: int

    def __str__(self) -> str:
        return f"{_end(self.local, self.local_port)} -> {_end(self.remote, self.remote_port)}"


def _end(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _proc_addr(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    hexaddr, hexport = text.split(":")
    raw = bytes.fromhex(hexaddr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1]), int(hexport, 16)
    # IPv6: four 32-bit words, each in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    ip6 = ipaddress.IPv6Address(words)
    return (ip6.ipv4_mapped or ip6), int(hexport, 16)


def connections(pid: int) -> list[Connection]:
    """The TCP connections (any state but listening or closed) held by ``pid`` or any of its
    descendants: the sockets of ``/proc/PID/net/tcp{,6}`` (its network namespace's) whose
    inode one of the tree's descriptors names."""
    from .._process._proc import descendants

    inodes: set[int] = set()
    for p in (pid, *descendants(pid)):
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link.endswith("]"):
                inodes.add(int(link[8:-1]))
    out = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}", encoding="ascii", errors="replace") as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) < 10 or cols[3] in (_LISTEN, _CLOSE) or not cols[9].isdigit():
                continue
            if int(cols[9]) not in inodes:
                continue
            try:
                (lip, lport), (rip, rport) = _proc_addr(cols[1]), _proc_addr(cols[2])
            except ValueError:
                continue
            out.append(Connection(lip, lport, rip, rport))
    return out


def unmoved(conns: Sequence[Connection], addresses: Sequence[IPAddr]) -> list[Connection]:
    """Those of ``conns`` whose local end is neither a service address in ``addresses`` nor
    a loopback one: they cannot survive the move (their address stays on this host)."""
    moving = {a.ip for a in addresses}
    return [c for c in conns if c.local not in moving and not c.local.is_loopback]
