"""Fuzzing the keeper's request protocol (``torpor._process._keeper_dump``): what a managed
child — possibly one that dropped to an unprivileged uid — sends its root keeper.

- Parsing: any packet is a self-dump or collect request whose every field passed its check,
  or a :class:`~torpor.UsageError`.
- Receiving: a packet carrying file descriptors is refused and every fd it carried is closed.
- Handling a connection (``Keeper._handle``, the dump itself replaced by a recorder): any
  packet, from a child or not, gets exactly one answer and never an exception; only a sound
  request from a child reaches the dump.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from torpor._process import _keeper, _keeper_dump
from torpor._process._keeper_dump import CollectRequest, DumpRequest
from torpor._process._registry import ManagedProcess
from torpor._safe import is_plain_name

from .support import DEEP_JSON, JSON_VALUES, bounded, dumps, mutated_json, verdict

DUMP = {
    "v": 1,
    "op": "self-dump",
    "staging": "/var/lib/torpor/images/.x.partial-1",
    "dest": "x",
    "name": "x",
    "labels": {"a": "b"},
    "leave_running": False,
    "tcp_established": False,
}
COLLECT = {"v": 1, "op": "collect"}

PACKETS = st.one_of(
    st.builds(dumps, mutated_json(DUMP) | mutated_json(COLLECT)),
    st.builds(dumps, JSON_VALUES),
    st.binary(max_size=200),
)
EXAMPLES = [
    dumps({**DUMP, "staging": "/a/../b"}),
    dumps({**DUMP, "staging": "/a/\ud800"}),
    dumps({**DUMP, "dest": "../x"}),
    dumps({**DUMP, "labels": {"k": 5}}),
    dumps({**DUMP, "leave_running": 1}),
    DEEP_JSON[1],
]


@given(PACKETS)
@example(EXAMPLES[0])
@example(EXAMPLES[1])
@example(EXAMPLES[2])
@example(EXAMPLES[3])
@example(EXAMPLES[4])
@example(EXAMPLES[5])
def test_parse_request(packet: bytes) -> None:
    with bounded():
        req = verdict(lambda: _keeper_dump.parse_request(packet))
    if isinstance(req, DumpRequest):
        assert os.path.isabs(req.staging) and os.path.normpath(req.staging) == req.staging
        assert is_plain_name(req.dest) and is_plain_name(req.name)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in req.labels.items())
    else:
        assert isinstance(req, CollectRequest | Exception)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@given(packet=PACKETS, nfds=st.integers(0, 5))
def test_receive_refuses_and_closes_fds(packet: bytes, nfds: int) -> None:
    before = _open_fds()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        sent = [os.open(os.devnull, os.O_RDONLY) for _ in range(nfds)]
        try:
            fds = b"".join(fd.to_bytes(4, "little") for fd in sent)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)] if sent else []
            ours.sendmsg([packet], anc)
        finally:
            for fd in sent:
                os.close(fd)
        with bounded():
            got = verdict(lambda: _keeper_dump.receive(theirs))
        if nfds:
            assert isinstance(got, _keeper.TorporError), f"{nfds} fds were taken: {got!r}"
        else:
            assert got == packet
    assert _open_fds() == before, "the fds a request carried were left open"


def handle(packet: bytes, *, child: bool) -> tuple[list[Any], list[Any]]:
    """One connection to a keeper whose child we are (or not); the answers it sent, and the
    requests that reached the dump or the collection (both replaced by recorders)."""
    keeper = _keeper.Keeper()
    reached: list[Any] = []
    if child:
        keeper.children[os.getpid()] = ManagedProcess(
            name="x", pid=os.getpid(), start_time=1, keeper_pid=keeper.pid, command=("x",),
            started="-",
        )  # fmt: skip

    def start_dump(conn: socket.socket, peer: Any, rec: Any, req: Any) -> None:
        reached.append(req)
        raise _keeper.TorporError("recorded; not dumped")

    def collect(conn: socket.socket, pid: int) -> None:
        reached.append(CollectRequest())
        conn.send(b'{"ok": true}')

    keeper._start_dump = start_dump  # type: ignore[method-assign,assignment]
    keeper._collect = collect  # type: ignore[method-assign]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    answers: list[Any] = []
    with ours:
        ours.send(packet)
        keeper._handle(theirs)
        ours.settimeout(1)
        with contextlib.suppress(OSError):
            while data := ours.recv(1 << 16):
                answers.append(json.loads(data))
    return answers, reached


@given(packet=PACKETS, child=st.booleans())
@example(packet=EXAMPLES[1], child=True)
@example(packet=EXAMPLES[5], child=True)
@example(packet=dumps(DUMP), child=False)
def test_handle_answers_every_packet_once(packet: bytes, child: bool) -> None:
    with bounded():
        answers, reached = handle(packet, child=child)
    assert len(answers) == 1 and isinstance(answers[0].get("ok"), bool), f"answers: {answers}"
    if not child:
        assert reached == [], "a request from a process that is not a child was acted on"
    for req in reached:
        assert isinstance(req, DumpRequest | CollectRequest)
