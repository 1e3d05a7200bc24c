"""Copy mode's page stream (:mod:`torpor._migrate._pagestream`) without CRIU: the target's
hashing of files as a page server writes them, the pump between the relay and the page
server, and the source's checks of how the target says the stream ended."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from torpor._migrate import _pagestream
from torpor._migrate._channel import ChannelError
from torpor._migrate._relay import RelayStats


def test_files_are_hashed_whole_while_they_grow(tmp_path: Path) -> None:
    """A writer appends to two files in small steps with pauses (as a page server does);
    the follower, started before the first byte, ends with every byte of both hashed."""
    data = {"pagemap-1.img": os.urandom(50_000), "pages-1.img": os.urandom(3_000_000)}
    follower = _pagestream._Follower(tmp_path)

    def write() -> None:
        fds = {n: os.open(tmp_path / n, os.O_WRONLY | os.O_CREAT, 0o600) for n in data}
        for at in range(0, 3_000_000, 65_536):
            for n, body in data.items():
                os.write(fds[n], body[at : at + 65_536])
            time.sleep(0.001)
        for fd in fds.values():
            os.close(fd)

    writer = threading.Thread(target=write)
    writer.start()
    writer.join()
    follower.finish()
    assert follower.error is None
    assert {n: (e.size, e.sha256) for n, e in follower.files.items()} == {
        n: (len(b), hashlib.sha256(b).hexdigest()) for n, b in data.items()
    }


def test_a_file_that_is_not_regular_is_refused(tmp_path: Path) -> None:
    os.symlink("/etc/passwd", tmp_path / "pages-1.img")
    follower = _pagestream._Follower(tmp_path)
    follower.finish()
    assert follower.error is not None
    assert "symlink" in str(follower.error)


def test_the_pump_passes_the_stream_and_its_answers() -> None:
    server, theirs = socket.socketpair()
    pump = _pagestream._Pump(server)
    stream = os.urandom(5 << 20)
    got = bytearray()

    def page_server() -> None:
        while data := theirs.recv(1 << 20):
            got.extend(data)
        theirs.sendall(b"\0\0\0\0")  # its status, once the stream ended
        theirs.close()

    t = threading.Thread(target=page_server)
    t.start()
    pump.relay_end.sendall(stream)
    pump.relay_end.shutdown(socket.SHUT_WR)
    answer = b""
    while data := pump.relay_end.recv(16):
        answer += data
    t.join()
    pump.relay_end.close()
    pump.join(5)
    assert bytes(got) == stream
    assert answer == b"\0\0\0\0"


def test_the_pump_drops_the_rest_once_the_page_server_is_gone() -> None:
    """A page server that ends mid-stream (its disk full): the relay's end still takes the
    whole stream, and sees the end of the answers, so the relay can end cleanly both ways."""
    server, theirs = socket.socketpair()
    pump = _pagestream._Pump(server)

    def gone() -> None:
        theirs.recv(4096)  # some of it, then it ends
        theirs.close()

    threading.Thread(target=gone).start()
    pump.relay_end.sendall(os.urandom(8 << 20))  # would block for ever if not drained
    pump.relay_end.shutdown(socket.SHUT_WR)
    assert pump.relay_end.recv(16) == b""
    pump.relay_end.close()
    pump.join(5)


class _Conn:
    def __init__(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        self.timeouts: list[float | None] = []

    def recv(self) -> dict[str, Any]:
        return self.reply

    def settimeout(self, seconds: float | None) -> None:
        self.timeouts.append(seconds)

    def _who(self) -> str:
        return "b"


class _Handle:
    def __init__(self, sent: int) -> None:
        self.sent = sent

    def wait(self, timeout: float | None = None) -> RelayStats:
        return RelayStats(sent=self.sent, received=4)


def _end(reply: dict[str, Any], sent: int = 100) -> _pagestream.StreamEnd:
    conn = _Conn(reply)
    end = _pagestream.stream_result(conn, _Handle(sent), timeout=7.0)  # type: ignore[arg-type]
    assert conn.timeouts == [7.0]  # the relay leaves the socket without one
    return end


def test_the_targets_account_of_the_stream_is_checked() -> None:
    files = {"pagemap-1.img": 10, "pages-1.img": 80}
    assert _end({"type": "pages-in", "bytes": 100, "files": files}).files == files
    failed = _end({"type": "failed", "error": "the disk of b failed", "cause": "disk"})
    assert (failed.error, failed.disk) == ("the disk of b failed", True)
    bad: list[dict[str, Any]] = [
        {"type": "pages-in", "bytes": 99, "files": files},  # not what was sent
        {"type": "pages-in", "bytes": 100, "files": {"core-1.img": 3}},  # not a pages file
        {"type": "pages-in", "bytes": 100, "files": {"pages-1.img": -1}},
        {"type": "pages-in", "bytes": 100, "files": {"pages-1.img": True}},
        {"type": "pages-in", "bytes": 100, "files": ["pages-1.img"]},
        {"type": "running"},
    ]
    for reply in bad:
        with pytest.raises(ChannelError):
            _end(reply)


def test_a_full_disk_is_named_as_such(tmp_path: Path) -> None:
    log = tmp_path / "ps.log"
    log.write_text("(00.1) Error (criu/page-xfer.c:1): Can't splice: No space left on device\n")
    written = tmp_path / "staging"
    written.mkdir()
    follower = _pagestream._Follower(written)
    follower.finish()
    why = _pagestream._why(1, log, follower, tmp_path / "staging", "b:7070")
    assert why == f"the disk of b:7070 failed while the pages were received: {tmp_path}: " + (
        os.strerror(28)
    )
    assert _pagestream._why(0, tmp_path / "none.log", follower, written, "b") is None
    failed = _pagestream._why(1, tmp_path / "none.log", follower, written, "b")
    assert failed is not None and failed.startswith("its page server failed (exit 1")
    (written / "core-1.img").write_bytes(b"x")  # a page server writes pagemaps and pages only
    follower = _pagestream._Follower(written)
    follower.finish()
    odd = _pagestream._why(0, tmp_path / "none.log", follower, written, "b")
    assert odd == "its page server wrote core-1.img, not a pages file"


def test_a_migration_without_a_base_does_not_load_the_pools() -> None:
    """The source's start, before its freeze: the pools' package (every backend) is loaded
    only for a process that has a base to offer."""
    code = (
        "import sys, torpor._migrate._copy\n"
        "print(any(m.startswith('torpor._pools') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
