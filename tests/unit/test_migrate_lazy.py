"""The pieces of ``torpor migrate --mode lazy`` that need no CRIU: the RPC config file that
hands CRIU its page server socket, the source's guard between CRIU and the relay, and the
target's page server that relays for the lazy-pages daemon alone."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from torpor._migrate import _lazy_dump
from torpor._migrate._lazy_dump import Guard
from torpor._migrate._lazy_target import RelayedPages
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
    assert cmd & 0xFFFF not in (1, 2, 3, 4, 5, 6, 7, *_lazy_dump.CLOSE_COMMANDS)
    assert len(_lazy_dump.FAIL_COMMAND) == _lazy_dump.PSI_SIZE == 32


class GuardRig:
    """A :class:`Guard` between a fake CRIU (``criu``) and a fake relay (``relay``)."""

    def __init__(self) -> None:
        self.criu, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.guard = Guard(ours)
        self.relay = self.guard.relay_sock
        self.guard.start()
        self.criu.settimeout(2)
        self.relay.settimeout(2)

    def criu_got(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            data += self.criu.recv(n - len(data))
        return data

    def criu_idle(self, seconds: float = 0.3) -> bool:
        self.criu.settimeout(seconds)
        try:
            return self.criu.recv(100, socket.MSG_PEEK) == b"never"
        except TimeoutError:
            return True
        finally:
            self.criu.settimeout(2)

    def close(self) -> None:
        self.guard.close()
        self.criu.close()


def test_guard_passes_only_whole_requests_to_criu() -> None:
    rig = GuardRig()
    try:
        rig.relay.sendall(GET[:20])
        assert rig.criu_idle()  # a part of a request is held back
        rig.relay.sendall(GET[20:] + GET[:5])
        assert rig.criu_got(32) == GET
        assert rig.criu_idle()
        assert not rig.guard.closed_by_target
    finally:
        rig.close()


def test_guard_never_lets_an_early_end_reach_criu_and_fails_it_when_asked() -> None:
    rig = GuardRig()
    try:
        rig.relay.sendall(GET)
        assert rig.criu_got(32) == GET
        rig.relay.shutdown(socket.SHUT_WR)  # the relay ended: no close from the daemon
        assert rig.relay.recv(10) == b""  # the relay's side ends, so the relay can end
        assert rig.criu_idle()  # CRIU sees no EOF: it would take it for a good end
        rig.guard.fail_criu()
        rig.guard.fail_criu()  # once only
        assert rig.criu_got(32) == _lazy_dump.FAIL_COMMAND
        assert rig.criu_idle()
    finally:
        rig.close()


def test_guard_after_the_daemons_close_leaves_criu_alone() -> None:
    rig = GuardRig()
    try:
        rig.relay.sendall(GET + CLOSE)
        assert rig.criu_got(64) == GET + CLOSE
        time.sleep(0.05)
        assert rig.guard.closed_by_target
        rig.guard.fail_criu()  # every page is there: nothing to fail
        assert rig.criu_idle()
        rig.criu.sendall(b"\0" * 4)  # CRIU's status, then it ends
        rig.criu.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := rig.relay.recv(100):
            got += chunk
        assert got == b"\0" * 4
        assert rig.guard.pages == 4
    finally:
        rig.close()


# -- the target's page server ---------------------------------------------------------------------


class FakeImage:
    path = Path("/nonexistent/image")


def relayed(daemon_pid: int) -> tuple[RelayedPages, socket.socket, list[object]]:
    """A started RelayedPages serving ``daemon_pid``; the source's end of its relay; the
    errors it reported."""
    source, ps = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    errors: list[object] = []
    pages = RelayedPages(FakeImage(), lambda: daemon_pid, errors.append, ps.fileno(), "a")  # type: ignore[arg-type]
    ps.close()
    pages.start()
    source.settimeout(3)
    return pages, source, errors


def test_relayed_pages_serve_the_daemon_and_a_good_end_is_no_error() -> None:
    pages, source, errors = relayed(os.getpid())  # this process holds the client socket
    try:
        with socket.create_connection(("127.0.0.1", pages.port), timeout=3) as daemon:
            daemon.sendall(GET)
            assert source.recv(32) == GET
            source.sendall(b"P" * 4096)
            got = b""
            while len(got) < 4096:
                got += daemon.recv(8192)
            daemon.sendall(CLOSE)
            assert source.recv(32) == CLOSE
            source.sendall(b"\0" * 4)
            source.shutdown(socket.SHUT_WR)  # the source's CRIU ended after the close
            assert daemon.recv(10) == b"\0" * 4
            time.sleep(0.1)
        assert pages.error is None and errors == []
        assert pages.moved == 4100
    finally:
        pages.close()
        source.close()


def test_relayed_pages_end_before_the_close_is_an_error_reported_once() -> None:
    pages, source, errors = relayed(os.getpid())
    try:
        with socket.create_connection(("127.0.0.1", pages.port), timeout=3) as daemon:
            daemon.sendall(GET)
            assert source.recv(32) == GET
            source.close()  # the source went away with a page asked for
            deadline = time.monotonic() + 5
            while not errors and time.monotonic() < deadline:
                time.sleep(0.02)
            assert pages.error is not None
            assert str(pages.error).startswith(
                "lazy migration from a: the source ended the transfer before the last page"
            )
            assert errors == [pages.error]
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
