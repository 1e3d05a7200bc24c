"""Small socket helpers of the channel (:mod:`._channel`): the source a connection counts
against, a shutdown that keeps the fd, the channel's socket options, a handshake's reason."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import ssl


def _source(host: str) -> str:
    """The source a connection from ``host`` counts against (:data:`._channel.MAX_PER_SOURCE`): the
    address itself, or for IPv6 (not an IPv4-mapped one) its /64."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _shut(fd: int) -> None:
    """Shut the socket ``fd`` down (its handshake then fails at once), without closing it:
    its thread does, and only after this (both under the listener's lock)."""
    with contextlib.suppress(OSError):
        dup = socket.socket(fileno=os.dup(fd))
        try:
            dup.shutdown(socket.SHUT_RDWR)
        finally:
            dup.close()


def _tune(sock: socket.socket) -> None:
    """No Nagle delay on the channel: every write is a whole frame already, and a page
    fault's 37-byte request must not wait for the ACK of the one before (40 ms)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
