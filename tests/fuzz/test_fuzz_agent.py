"""Fuzzing the agent protocol, both ends (``bin/torpor-py`` describes it).

- The worker's reading of a request packet with its fds (``_worker._request``): any packet
  is admitted as a :class:`~torpor._agent._worker.Request` or declined (``Declined``, which
  the worker answers with ``declined:REASON``), never another exception; an admitted request
  can be taken on (directory, cgroups, umask, rlimits, environment) or fails with the
  ``OSError``/``ValueError``/``Declined`` the worker turns into a decline — tried in a forked
  child, since it changes the process.
- What the launcher sends, the worker reads back exactly.
- The launcher against a fake agent sending hostile ``ready`` and reply packets: it returns
  an exit code or None (run the command here), never raises, in bounded time.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import socket
import sys
import threading
from pathlib import Path
from types import ModuleType

from hypothesis import example, given
from hypothesis import strategies as st

from torpor._agent import _admit, _worker
from torpor._agent._admit import Declined
from torpor._agent._worker import PROTOCOL, AgentContext, Request, decode_request

from .support import Jail, bounded, in_child, scaled

LAUNCHER_PATH = Path(__file__).resolve().parents[2] / "bin" / "torpor-py"


def _load_launcher() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("torpor_launcher_fuzz", str(LAUNCHER_PATH))
    spec = importlib.util.spec_from_loader("torpor_launcher_fuzz", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


launcher = _load_launcher()
INSTALL = os.fsencode(os.path.realpath("/usr/bin"))
CTX = AgentContext(install=INSTALL, criu_env=None)

NUMBERS = st.one_of(
    st.sampled_from([b"0", b"-1", b"-0", b"777", b"1000", b"0o22", b" 22", b"22 ", b"", b"x"]),
    st.sampled_from([b"9" * 5000, b"18446744073709551616", b"-9223372036854775809"]),
    st.integers().map(lambda n: b"%d" % n),
)
RLIMITS = st.one_of(
    st.lists(st.tuples(NUMBERS, NUMBERS, NUMBERS).map(lambda t: b":".join(t)), max_size=4).map(
        b",".join
    ),
    st.sampled_from([b"", b",", b"::", b"1:2", b"1:2:3:4", b"7:-1:-1", b"99:1:1", b"4:5:3"]),
    st.binary(max_size=20),
)
FIELD = st.binary(max_size=20).filter(lambda b: b"\0" not in b)


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    """Request packets: the right shape with hostile fields, or anything."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200))
    argv = draw(st.lists(FIELD, max_size=4))
    fields = [
        draw(st.sampled_from([PROTOCOL, b"torpor-agent/2", PROTOCOL + b" "])),
        draw(st.sampled_from([INSTALL, b"/nonexistent", b"", b"../../bin"]) | FIELD),
        draw(st.sampled_from([b"/", b"/nonexistent", b"", b"relative", b"/dev/zero"]) | FIELD),
        draw(NUMBERS),  # umask (octal)
        draw(RLIMITS),
        draw(st.sampled_from([b"%d" % len(argv)]) | NUMBERS),
        *argv,
        *draw(
            st.lists(
                st.sampled_from([b"=x", b"A=", b"TORPOR_CRIU=/bin/sh", b"PATH=/", b"X"]) | FIELD,
                max_size=4,
            )
        ),
    ]
    return b"\0".join(fields)


def admit(packet: bytes) -> Request | None:
    """The worker's reading of ``packet`` with a launcher's four fds (0, 1, 2 and a
    directory): the request, or None if declined."""
    cwd = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        return _worker._request(packet, [0, 1, 2, cwd], CTX)
    except Declined as exc:
        assert str(exc) and "\n" not in str(exc)
        return None
    finally:
        os.close(cwd)


def take_on(req: Request) -> None:
    """What the worker does with an admitted request before running it (in a child): this
    process is the client, held by a pidfd over a socket pair as a worker holds its own."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client = _admit.Client(ours)
    try:
        os.chdir("/")
        _worker._adopt_context(req, client, None)
    except (OSError, ValueError, Declined):
        pass  # declined by the worker: "cannot take on the client's context"
    finally:
        client.close()
        ours.close()
        theirs.close()


def pkt(*fields: bytes) -> bytes:
    """A packet of these fields after the protocol and install ones."""
    return b"\0".join((PROTOCOL, INSTALL, *fields))


@given(packets())
@example(pkt(b"/", b"22", b"0:1:1", b"9" * 5000))
@example(pkt(b"/", b"22", b"0:1:1", b"-1"))
@example(pkt(b"/", b"22", b"0:1:1", b"1"))
def test_admission(packet: bytes) -> None:
    with bounded():
        admit(packet)


@scaled(0.5)
@given(packets())
@example(pkt(b"/", b"22", b"4:18446744073709551616:-1", b"0"))
@example(pkt(b"/", b"22", b"18446744073709551616:1:1", b"0"))
def test_an_admitted_request_is_taken_on_or_declined(packet: bytes) -> None:
    with bounded():
        req = admit(packet)
    if req is not None:
        in_child(lambda: take_on(req), seconds=5)


ENV_KEYS = st.binary(min_size=1, max_size=10).filter(lambda b: b"\0" not in b and b"=" not in b)


@given(
    argv=st.lists(st.text(max_size=10).filter(lambda s: "\0" not in s), max_size=5),
    cwd=FIELD,
    umask=st.integers(0, 0o777),
    rlimits=st.lists(
        st.tuples(st.integers(0, 15), st.integers(-1, 2**63 - 1), st.integers(-1, 2**63 - 1)),
        max_size=4,
    ),
    environ=st.dictionaries(ENV_KEYS, FIELD, max_size=5),
)
def test_what_the_launcher_sends_the_worker_reads(
    argv: list[str],
    cwd: bytes,
    umask: int,
    rlimits: list[tuple[int, int, int]],
    environ: dict[bytes, bytes],
) -> None:
    try:
        packet = launcher.encode_request(INSTALL, argv, cwd, umask, rlimits, environ)
    except (ValueError, UnicodeEncodeError):
        return  # cannot be sent: the launcher runs the command itself
    assert decode_request(packet) == Request(
        INSTALL, tuple(argv), cwd, umask, tuple(rlimits), environ
    )


class FakeAgent:
    """One connection on ``agent.sock``: sends ``ready``, takes the request (closing the
    fds it carries), sends ``reply`` and hangs up."""

    def __init__(self, path: Path, ready: bytes, reply: bytes | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.ready, self.reply = ready, reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.sock.accept()
            with conn:
                conn.send(self.ready)
                _, anc, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(16 * 4))
                for level, kind, data in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        for i in range(0, len(data) - len(data) % 4, 4):
                            os.close(int.from_bytes(data[i : i + 4], sys.byteorder))
                if self.reply is not None:
                    conn.send(self.reply)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


REPLIES = st.one_of(
    st.sampled_from(
        [
            b"exit:0",
            b"exit:1",
            b"exit:",
            b"exit:x",
            b"exit:-1",
            b"exit:99999999999999999999",
            b"exit:1\n",
            b"exit: 3",
            b"declined:",
            b"declined:\xff",
            b"ready",
            b"",
            b"\0",
        ]
    ),
    st.binary(max_size=40),
    st.builds(lambda b: b"exit:" + b, st.binary(max_size=10)),
)


@scaled(0.5)
@given(
    ready=st.sampled_from([b"ready", b"ready!", b"", b"readyexit:0"]) | st.binary(max_size=8),
    reply=st.none() | REPLIES,
)
@example(ready=b"ready", reply=b"exit:x")
@example(ready=b"ready", reply=b"exit:")
def test_the_launcher_against_a_hostile_agent(ready: bytes, reply: bytes | None) -> None:
    with Jail() as jail:
        agent = FakeAgent(jail.home / "agent.sock", ready, reply)
        try:
            environ = {b"TORPOR_HOME": os.fsencode(jail.home), b"PATH": b"/usr/bin"}
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            with bounded(5):
                code = launcher._hand_over(
                    sock, os.fsencode(jail.home / "agent.sock"), ["ps"], environ
                )
            assert code is None or isinstance(code, int)
        finally:
            agent.close()
