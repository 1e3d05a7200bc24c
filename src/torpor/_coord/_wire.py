"""The wire of the external trigger channel (see :mod:`._channel` for the protocol): the
listener's address, the peer's credentials, and one JSON object per ``SOCK_SEQPACKET`` packet.
Both ends use these, and nothing else of each other.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

PROTOCOL = 1
MAX_PACKET = 1 << 16
_CRED = struct.Struct("3i")
HANDSHAKE_TIMEOUT = 5.0


def listener_address(pid: int) -> bytes:
    """The abstract socket address the process with host pid ``pid`` listens on."""
    return f"\0torpor/{pid}".encode()


def peercred(sock: socket.socket) -> tuple[int, int, int]:
    """The ``(pid, uid, gid)`` of the process at the other end of ``sock`` (``SO_PEERCRED``):
    the uid and gid are the kernel's, taken at ``connect()``/``listen()``; the pid is a number
    another process may have by now, so nothing read from ``/proc/PID`` by it alone is that
    process's (``_process._pidfd_peer`` holds the process itself)."""
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return pid, uid, gid


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    """Send ``message`` as one packet of JSON."""
    sock.sendall(json.dumps(message).encode())


def recv(sock: socket.socket) -> dict[str, Any]:
    """One packet as a JSON object: ``ValueError`` if it is not one, ``ConnectionResetError``
    if the other end closed."""
    data = sock.recv(MAX_PACKET)
    if not data:
        raise ConnectionResetError("the other end closed the connection")
    try:
        message = json.loads(data)
    except RecursionError as exc:  # nesting deeper than the parser goes: malformed like the rest
        raise ValueError("nested too deeply") from exc
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    return message
