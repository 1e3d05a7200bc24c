"""The pieces of ``torpor migrate --mode lazy`` that need no CRIU: the RPC config file that
hands CRIU its page server socket, the source's guard between CRIU and the relay, and the
target's listener that hands the lazy-pages daemon's connection, and only its, to the relay."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from torpor._migrate import _lazy_dump
from torpor._migrate._closehold import DAEMON_OK
from torpor._migrate._lazy_dump import Guard
from torpor._migrate._lazy_target import RelayedPages
from torpor._migrate._relay import CLOSE_COMMANDS, receive_socket
from torpor._proto import criu_rpc_pb2 as pb

PSI = struct.Struct("<I4xQQQ")
GET = PSI.pack(7, 1, 0x7F0000000000, 1)  # a PS_IOV_GET of one page
CLOSE = PSI.pack(0x1023, 0, 0, 0)


def test_config_file_rides_in_opts_as_field_51() -> None:
    opts = pb.Opts(images_dir_fd=5, lazy_pages=True)
    wire = _lazy_dump._with_config_file(opts, "/h/migrate/lazy-1.conf").SerializeToString()
    # Field 51, length-delimited (tag 51 << 3 | 2 = 410: varint 0x9a 0x03), then the path.
    assert wire.endswith(b"\x9a\x03\x16/h/migrate/lazy-1.conf")
    again = pb.Opts.FromString(wire)
    assert (again.images_dir_fd, again.lazy_pages) == (5, True)
    # Kept as an unknown field through a request too.
    req = pb.Req(type=pb.DUMP, opts=again).SerializeToString()
    assert req.endswith(b"\x9a\x03\x16/h/migrate/lazy-1.conf")


def test_varint_of_long_paths() -> None:
    assert _lazy_dump._varint(300) == b"\xac\x02"
    assert _lazy_dump._varint(5) == b"\x05"


def test_config_file_is_private_names_the_socket_and_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORPOR_HOME", str(tmp_path / "h"))
    (tmp_path / "h").mkdir(mode=0o700)
    with _lazy_dump._config(17) as path:
        assert path.read_text() == "ps-socket 17\n"
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent == tmp_path / "h" / "migrate"
    assert not path.exists()


def test_fail_command_is_unknown_to_criu() -> None:
    cmd = PSI.unpack(_lazy_dump.FAIL_COMMAND)[0]
    # CRIU 4.2's commands: ADD=1, HOLE=2, OPEN=3, OPEN2=4, PARENT=5, ADD_F=6, GET=7, CLOSE,
    # FORCE_CLOSE: none is 0.
    assert cmd & 0xFFFF not in (1, 2, 3, 4, 5, 6, 7, *CLOSE_COMMANDS)
    assert len(_lazy_dump.FAIL_COMMAND) == _lazy_dump.PSI_SIZE == 32


def test_guard_passes_only_whole_requests_to_criu() -> None:
    criu, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    guard = Guard(ours)
    guard.take(GET[:20])
    assert guard.out == b""  # a part of a request is held back
    guard.take(GET[20:] + GET[:5])
    assert guard.out == GET
    assert not guard.closed_by_target
    guard.close()
    criu.close()


def test_guard_fails_criu_once_when_asked() -> None:
    criu, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    guard = Guard(ours)
    guard.fail_criu()
    guard.fail_criu()  # once only
    guard.close()
    got = b""
    while chunk := criu.recv(100):
        got += chunk
    assert got == _lazy_dump.FAIL_COMMAND


def test_guard_after_the_daemons_close_leaves_criu_alone() -> None:
    criu, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    guard = Guard(ours)
    guard.take(GET + CLOSE[:10])
    assert not guard.closed_by_target
    guard.take(CLOSE[10:])
    assert guard.closed_by_target
    guard.fail_criu()  # every page is there: nothing to fail
    guard.close()
    assert criu.recv(100) == b""
    assert guard.passed_pages(4) and guard.pages == 4


# -- the target's page server ---------------------------------------------------------------------


class FakeImage:
    path = Path("/nonexistent/image")


def relayed(daemon_pid: int) -> tuple[RelayedPages, socket.socket, list[object]]:
    """A started RelayedPages serving ``daemon_pid``; the server relay's end of its local
    socket; the errors it reported."""
    source, ps = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    errors: list[object] = []
    pages = RelayedPages(FakeImage(), lambda: daemon_pid, errors.append, ps.fileno(), "a")  # type: ignore[arg-type]
    ps.close()
    pages.start()
    source.settimeout(3)
    return pages, source, errors


def wait_for_errors(errors: list[object]) -> None:
    deadline = time.monotonic() + 5
    while not errors and time.monotonic() < deadline:
        time.sleep(0.02)


def test_relayed_pages_hand_the_daemons_connection_over_and_a_good_end_is_no_error() -> None:
    pages, source, errors = relayed(os.getpid())  # this process holds the client socket
    try:
        with socket.create_connection(("127.0.0.1", pages.port), timeout=3) as daemon:
            relay_end = receive_socket(source)  # the server's relay speaks to the daemon
            assert relay_end is not None
            daemon.sendall(GET)
            assert relay_end.recv(32) == GET
            relay_end.sendall(b"P" * 4096)
            got = b""
            while len(got) < 4096:
                got += daemon.recv(8192)
            relay_end.close()  # the relay's own descriptor: the connection stays open
            daemon.settimeout(0.3)
            with pytest.raises(TimeoutError):
                daemon.recv(10)
            source.sendall(b"K")  # the relay ended well
            source.close()
            time.sleep(0.1)
        assert pages.error is None and errors == []
    finally:
        pages.close()
        source.close()


@pytest.mark.parametrize(
    ("said", "why"),
    [
        (b"", "the migration server's relay ended without a word"),
        (b"Fthe link broke", "the link broke"),
    ],
)
def test_relayed_pages_end_without_a_good_verdict_is_an_error_then_the_connection_goes(
    said: bytes, why: str
) -> None:
    pages, source, errors = relayed(os.getpid())
    try:
        with socket.create_connection(("127.0.0.1", pages.port), timeout=3) as daemon:
            relay_end = receive_socket(source)
            assert relay_end is not None
            relay_end.close()
            source.sendall(said)
            source.close()  # the server's relay went away with pages due
            wait_for_errors(errors)
            assert pages.error is not None
            assert str(pages.error) == (
                f"lazy migration from a: {why}; the pages not yet here cannot arrive"
            )
            assert errors == [pages.error]
            # Only once the copy is killed (on_error returned) is the connection shut down.
            assert daemon.recv(10) == b""
    finally:
        pages.close()


@pytest.mark.parametrize(
    ("verdict", "error"), [(b"K", None), (b"Fthe link broke", "the link broke")]
)
def test_a_daemon_that_exited_0_is_judged_only_after_the_relays_verdict(
    verdict: bytes, error: str | None
) -> None:
    """``daemon_ended(True)``: the relay is told (it then passes the daemon's close to the
    source, whose CRIU kills the original), and the watch waits for the relay's verdict
    before it calls the copy resident: a failure (the close never reached the source, which
    keeps its original) is the server's error, so the copy is killed, not made resident."""
    pages, source, errors = relayed(os.getpid())
    try:
        with socket.create_connection(("127.0.0.1", pages.port), timeout=3):
            relay_end = receive_socket(source)
            assert relay_end is not None
            relay_end.close()
            ended = threading.Thread(target=pages.daemon_ended, args=(True,))
            ended.start()
            assert source.recv(1) == DAEMON_OK  # the relay's word
            ended.join(0.3)
            assert ended.is_alive()  # waiting for the verdict
            source.sendall(verdict)
            source.close()
            ended.join(5)
            assert not ended.is_alive()
            if error is None:
                assert pages.error is None and errors == []
            else:
                assert pages.error is not None and errors == [pages.error]
                assert str(pages.error) == (
                    f"lazy migration from a: {error}; the pages not yet here cannot arrive"
                )
    finally:
        pages.close()


def test_relayed_pages_reset_anyone_but_the_daemon() -> None:
    other = subprocess.Popen(["sleep", "30"])  # the "daemon": it holds no socket of ours
    try:
        pages, source, errors = relayed(other.pid)
        try:
            # The stranger may be reset at any step (connect, send, receive): not a byte back.
            got = b"unset"
            try:
                with socket.create_connection(("127.0.0.1", pages.port), timeout=3) as stranger:
                    stranger.settimeout(3)
                    stranger.sendall(GET)
                    got = stranger.recv(100)
            except (ConnectionResetError, BrokenPipeError):
                got = b""
            assert got == b""
            source.settimeout(0.3)
            with pytest.raises(TimeoutError):
                source.recv(32)  # nothing of the stranger reached the source
            assert errors == []
        finally:
            pages.close()
            source.close()
    finally:
        other.kill()
        other.wait()


def test_relayed_pages_has_no_warm_set() -> None:
    pages, source, _ = relayed(os.getpid())
    try:
        assert pages.warm_set() == []
        pages.prefetch([("pages-1.img", 0, 4096)])
    finally:
        pages.close()
        source.close()
