"""The keeper's socket name: where a managed process asks its keeper for a self-dump.

A leaf, so that what checks a keeper (``_registry``: is a process's parent a torpor keeper?)
and what talks to one (``_selfdump``) need not import the keeper, which imports them.
"""

from __future__ import annotations


def address(keeper_pid: int) -> bytes:
    """The abstract socket name of the keeper with host pid ``keeper_pid``."""
    return b"\0torpor-keeper-%d" % keeper_pid
