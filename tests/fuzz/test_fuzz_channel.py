"""Fuzzing the coordinated-checkpoint channel (``torpor._coord._channel``), both ends.

- In the process: any packet a client sends gets exactly one JSON answer and never an
  exception out of the listener; only a request that passed every check is run (with an
  absolute ``dest`` and a ``torpor-reply/`` address).
- In ``torpor checkpoint PID`` (root, talking to a process that may be anyone's): whatever
  the process answers, at the handshake or in its result, the client returns an outcome or
  raises a :class:`~torpor.TorporError`, within its timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from torpor import TorporError
from torpor._coord import _channel
from torpor._process._proc import host_pid

from .support import DEEP_JSON, JSON_VALUES, Jail, bounded, dumps, mutated_json, scaled, verdict

VALID_REQUEST = {
    "v": 1,
    "op": "checkpoint",
    "dest": "/var/lib/torpor/images/x",
    "leave_running": True,
    "tcp_established": False,
    "name": "x",
    "reply": "torpor-reply/1/abcdef",
}

PACKETS = st.one_of(
    st.builds(dumps, mutated_json(VALID_REQUEST)),
    st.builds(dumps, JSON_VALUES),
    st.binary(max_size=200),
)


@given(mutated_json(VALID_REQUEST) | JSON_VALUES)
@example({**VALID_REQUEST, "reply": "torpor-reply/\ud800"})
@example({**VALID_REQUEST, "dest": "/x\0y"})
@example({**VALID_REQUEST, "name": "\ud800"})
def test_parse_request(message: Any) -> None:
    if not isinstance(message, dict):
        return  # _recv refuses what is not an object before parsing
    with bounded():
        got = verdict(lambda: _channel._parse_request(message, (1, 0)))
    if isinstance(got, _channel._Request):
        assert got.dest.is_absolute() and got.reply.startswith(b"\0torpor-reply/")


def serve_once(packet: bytes) -> tuple[list[dict[str, Any]], list[Any]]:
    """Hand ``packet`` to a listener's per-connection code over a socketpair; the answers it
    sent, and the requests it would have run (``_run`` is replaced: nothing is dumped)."""
    listener = _channel.Listener()
    ran: list[Any] = []
    listener._run = ran.append  # type: ignore[method-assign]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        ours.send(packet)
        listener._serve(theirs)  # closes theirs
        answers = []
        ours.settimeout(1)
        with contextlib.suppress(OSError):
            while data := ours.recv(1 << 16):
                answers.append(json.loads(data))
    return answers, ran


@given(PACKETS)
@example(DEEP_JSON[0])
@example(dumps({**VALID_REQUEST, "reply": "torpor-reply/\ud800"}))
@example(b"")
def test_the_listener_answers_every_packet(packet: bytes) -> None:
    with bounded():
        answers, ran = serve_once(packet)
    assert len(answers) == 1, f"answers: {answers}"
    answer = answers[0]
    assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool)
    assert len(ran) == (1 if answer["ok"] else 0)
    if ran:
        assert ran[0].dest.is_absolute() and ran[0].reply.startswith(b"\0torpor-reply/")


# -- the client ---------------------------------------------------------------------------------

ACK = {"ok": True, "pid": 1}
RESULT = {"ok": True, "image": "/var/lib/torpor/images/x", "warnings": []}
FAILURE = {"ok": False, "kind": "DumpError", "error": "no", "details": ["a"]}

ANSWERS = st.one_of(
    st.builds(dumps, mutated_json(ACK) | mutated_json(FAILURE) | JSON_VALUES),
    st.binary(max_size=100),
    st.just(dumps(ACK)),
)
RESULTS = st.one_of(
    st.builds(dumps, mutated_json(RESULT) | mutated_json(FAILURE) | JSON_VALUES),
    st.binary(max_size=100),
    st.none(),
)


class FakeProcess:
    """Listens where process ``host_pid()`` would; answers one request with ``ack``, then
    (unless ``result`` is None) connects to the request's reply address and sends ``result``.
    """

    def __init__(self, ack: bytes, result: bytes | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(_channel.listener_address(host_pid()))
        self.sock.listen(1)
        self.ack, self.result = ack, result
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            conn, _ = self.sock.accept()
            with conn:
                request = json.loads(conn.recv(1 << 16))
                conn.send(self.ack)
            if self.result is not None:
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                    s.connect(b"\0" + request["reply"].encode())
                    s.send(self.result)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


@scaled(0.5)
@given(ack=ANSWERS, result=RESULTS)
@example(ack=dumps({"ok": False, "details": 5}), result=None)
@example(ack=dumps({"ok": False, "details": None}), result=None)
@example(ack=dumps(ACK), result=dumps({"ok": True, "warnings": 5}))
@example(ack=dumps(ACK), result=dumps({"ok": False, "details": {"a": 1}}))
def test_the_client_against_a_hostile_process(ack: bytes, result: bytes | None) -> None:
    with Jail() as jail:
        process = FakeProcess(ack, result)
        try:
            started = time.monotonic()
            with bounded(10):
                got = verdict(
                    lambda: _channel.request_checkpoint(
                        os.getpid(),
                        jail.home / "images" / "x",
                        leave_running=True,
                        tcp_established=False,
                        name="x",
                        timeout=0.5,
                    )
                )
            assert time.monotonic() - started < 5, "the client ran well past its timeout"
            if not isinstance(got, TorporError):
                assert isinstance(got, _channel.ExternalOutcome)
                assert isinstance(got.image, Path)
                assert all(isinstance(w, str) for w in got.warnings)
        finally:
            process.close()
