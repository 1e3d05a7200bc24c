"""Live migration between hosts (issue 9). Its first piece: the mutually authenticated TLS
channel between two torpor homes (:mod:`torpor._migrate._channel`), over which the networked
agent will serve migrations and relay CRIU's page traffic.
"""

from __future__ import annotations

from ._channel import ChannelError as ChannelError
from ._channel import Conn as Conn
from ._channel import Listener as Listener
from ._channel import PeerRefusedError as PeerRefusedError
from ._channel import connect as connect
from ._channel import listen as listen
from ._relay import RelayStats as RelayStats
from ._relay import relay as relay
from ._relay import start_relay as start_relay

__all__ = [
    "ChannelError",
    "Conn",
    "Listener",
    "PeerRefusedError",
    "RelayStats",
    "connect",
    "listen",
    "relay",
    "start_relay",
]
