"""The keeper's fence deadline (_process/_keeper_fence): the children are killed when the
supervisor's word runs out, not before, not when a newer word came or it was cleared; only
this home's supervisor may give it; malformed words are refused."""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import replace

import pytest

from torpor import _paths
from torpor._errors import PermissionDeniedError, UsageError
from torpor._process import _keeper_fence, _peer


def _deadline() -> tuple[_keeper_fence.Deadline, threading.Event]:
    killed = threading.Event()
    return _keeper_fence.Deadline(killed.set, os.getpid()), killed


def test_the_children_are_killed_when_the_word_runs_out() -> None:
    deadline, killed = _deadline()
    start = time.monotonic()
    deadline.set(0.3)
    assert killed.wait(5)
    assert 0.29 <= time.monotonic() - start < 2.0
    assert deadline.until is None


def test_a_newer_word_or_a_clear_keeps_them() -> None:
    deadline, killed = _deadline()
    deadline.set(0.3)
    deadline.set(30.0)  # renewed before it ran out
    assert not killed.wait(0.8)
    deadline.set(None)  # let go of: runs on
    assert not killed.wait(0.3) and deadline.until is None
    deadline.set(0.1)  # fenced again later: the watcher still serves
    assert killed.wait(5)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"v": 1, "op": "fence", "for": 12.5}', 12.5),
        (b'{"v": 1, "op": "fence", "for": null}', None),
        (b'{"v": 1, "op": "self-dump"}', False),
        (b"not json", False),
    ],
)
def test_fence_requests_are_told_apart(data: bytes, expected: object) -> None:
    assert _keeper_fence.parse(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b'{"v": 1, "op": "fence", "for": -1}',
        b'{"v": 1, "op": "fence", "for": 1e9}',
        b'{"v": 1, "op": "fence", "for": NaN}',
        b'{"v": 1, "op": "fence", "for": true}',
        b'{"v": 1, "op": "fence", "for": "12"}',
        b'{"v": 2, "op": "fence", "for": 12}',
        b'{"v": 1, "op": "fence"}',
        b'{"v": 1, "op": "fence", "for": 1, "x": 0}',
    ],
)
def test_malformed_fence_requests_are_refused(data: bytes) -> None:
    with pytest.raises(UsageError):
        _keeper_fence.parse(data)


def test_only_this_homes_supervisor_may_set_it(torpor_home: object) -> None:
    me = _peer.Peer(pid=os.getpid(), uid=0, gid=0, groups=(), cap_prm=0)
    with pytest.raises(PermissionDeniedError):
        _keeper_fence.check_peer(me)  # root, but not holding the supervisor's socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(_paths.supervised_dir() / ".daemon.sock"))  # as the supervisor does
        _keeper_fence.check_peer(me)
        with pytest.raises(PermissionDeniedError):
            _keeper_fence.check_peer(replace(me, uid=1000))  # not root
