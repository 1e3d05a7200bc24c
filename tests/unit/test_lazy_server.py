"""The page server speaking CRIU 4.2's page protocol to a fake lazy-pages daemon over loopback
(exact bytes), the peer check, errors, and the pagemap decoding it stands on."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from torpor._errors import ImageCorruptedError
from torpor._images._criu_images import criu_images_pb2 as pb
from torpor._lazy._pagemap import (
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    Extent,
    load_pagemaps,
    parse_pagemap,
)
from torpor._lazy._server import PageServer
from torpor._lazy._source import LazyPageError, Range

PAGE = 4096
PID = 4242
LAZY = PE_LAZY | PE_PRESENT


def entry_bytes(msg: pb.PagemapHead | pb.PagemapEntry) -> bytes:
    raw = msg.SerializeToString()
    return struct.pack("<I", len(raw)) + raw


def pagemap_bytes(pages_id: int, entries: Iterable[tuple[int, int, int | None]]) -> bytes:
    """A ``pagemap-N.img``: the magics, the head, then ``(vaddr, nr_pages, flags)`` entries
    (flags None: an old-style entry with only ``compat_nr_pages``)."""
    out = struct.pack("<II", 0x54564319, 0x56084025)
    out += entry_bytes(pb.PagemapHead(pages_id=pages_id))
    for vaddr, nr, flags in entries:
        if flags is None:
            out += entry_bytes(pb.PagemapEntry(vaddr=vaddr, compat_nr_pages=nr))
        else:
            out += entry_bytes(
                pb.PagemapEntry(vaddr=vaddr, compat_nr_pages=nr, nr_pages=nr, flags=flags)
            )
    return out


# A task: 2 eager pages (the stack), 4 lazy pages, a hole, 3 lazy pages. File offsets: the
# eager pages at 0, the first lazy extent at 2 pages, the second at 6 pages.
ENTRIES = [(0x10000, 2, PE_PRESENT), (0x20000, 4, LAZY), (0x40000, 3, LAZY)]


def pages_data() -> bytes:
    return b"".join(bytes([i + 1]) * PAGE for i in range(9))


class FakeSource:
    """A page source over bytes, optionally failing on one offset."""

    def __init__(self, files: dict[str, bytes], *, bad_offset: int | None = None) -> None:
        self.files = files
        self.bad_offset = bad_offset
        self.reads: list[Range] = []

    def read(self, file: str, offset: int, length: int) -> bytes:
        self.reads.append((file, offset, length))
        if self.bad_offset is not None and offset <= self.bad_offset < offset + length:
            raise LazyPageError("chunk 7 is bad", image="img", file=file, chunk="7 (sha256 ab)")
        return self.files[file][offset : offset + length]

    def prefetch(self, ranges: Iterable[Range]) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    d = tmp_path / "img"
    d.mkdir(mode=0o700)
    (d / f"pagemap-{PID}.img").write_bytes(pagemap_bytes(1, ENTRIES))
    (d / "pages-1.img").write_bytes(pages_data())
    return d


def psi(cmd: int, nr: int, vaddr: int, dst: int) -> bytes:
    return struct.pack("<I4xQQQ", cmd, nr, vaddr, dst)


def recv_n(sk: socket.socket, n: int, timeout: float = 5) -> bytes:
    sk.settimeout(timeout)
    buf = b""
    while len(buf) < n:
        part = sk.recv(n - len(buf))
        if not part:
            break
        buf += part
    return buf


@pytest.fixture
def served(image_dir: Path) -> Iterator[tuple[PageServer, FakeSource]]:
    source = FakeSource({"pages-1.img": pages_data()})
    server = PageServer(image_dir, source, allowed_pid=os.getpid)
    server.start()
    yield server, source
    server.close()


def test_answers_gets_with_exact_bytes_and_closes_cleanly(
    served: tuple[PageServer, FakeSource],
) -> None:
    server, source = served
    with socket.create_connection(("127.0.0.1", server.port)) as sk:
        # A fault: one page of the first lazy extent (its 2nd page: file page 3, byte 4).
        sk.sendall(psi(7, 1, 0x21000, PID))
        assert recv_n(sk, 32 + PAGE) == psi(0x40006, 1, 0x21000, PID) + bytes([4]) * PAGE
        # Two requests in flight, answered in order; the second asks past its extent's end
        # and gets only the 3 pages the extent has.
        sk.sendall(psi(7, 2, 0x22000, PID) + psi(7, 8, 0x40000, PID))
        want = psi(0x40006, 2, 0x22000, PID) + bytes([5]) * PAGE + bytes([6]) * PAGE
        want += psi(0x40006, 3, 0x40000, PID) + b"".join(bytes([i]) * PAGE for i in (7, 8, 9))
        assert recv_n(sk, len(want)) == want
        sk.sendall(psi(0x1023, 0, 0, 0))
        assert recv_n(sk, 4) == b"\0\0\0\0"
    assert server.wait(5)
    assert server.error is None and server.clean
    assert server.faults == [(0x21000, 1), (0x22000, 2), (0x40000, 8)]
    assert source.reads == [
        ("pages-1.img", 3 * PAGE, PAGE),
        ("pages-1.img", 4 * PAGE, 2 * PAGE),
        ("pages-1.img", 6 * PAGE, 3 * PAGE),
    ]
    assert server.warm_set() == [("pages-1.img", 3 * PAGE, PAGE)]
    assert server.first_answer is not None and server.refused == 0


def test_a_foreign_connection_gets_nothing_and_the_daemon_is_still_served(
    image_dir: Path,
) -> None:
    source = FakeSource({"pages-1.img": pages_data()})
    sleeper = subprocess.Popen(["sleep", "30"])
    allowed = [sleeper.pid]
    server = PageServer(image_dir, source, allowed_pid=lambda: allowed[0])
    server.start()
    try:
        # The server may reset the stranger at any step (its connect, send or receive):
        # all that matters is that not a byte came back.
        got = b"unset"
        try:
            with socket.create_connection(("127.0.0.1", server.port)) as foreign:
                foreign.sendall(psi(7, 1, 0x20000, PID))
                got = recv_n(foreign, 32 + PAGE)
        except (ConnectionResetError, BrokenPipeError):
            got = b""
        assert got == b""
        assert server.refused == 1 and source.reads == []
        allowed[0] = os.getpid()  # now this process is "the daemon"
        with socket.create_connection(("127.0.0.1", server.port)) as sk:
            sk.sendall(psi(7, 1, 0x20000, PID))
            assert recv_n(sk, 32 + PAGE) == psi(0x40006, 1, 0x20000, PID) + bytes([3]) * PAGE
    finally:
        server.close()
        sleeper.kill()
        sleeper.wait()


def test_no_daemon_yet_means_nobody_is_served(image_dir: Path) -> None:
    source = FakeSource({"pages-1.img": pages_data()})
    server = PageServer(image_dir, source, allowed_pid=lambda: None)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sk:
            sk.sendall(psi(7, 1, 0x20000, PID))
            try:
                got = recv_n(sk, 32)
            except ConnectionResetError:
                got = b""
            assert got == b""
        assert server.refused == 1 and source.reads == []
    finally:
        server.close()


def test_a_bad_chunk_sends_nothing_and_kills_before_closing(image_dir: Path) -> None:
    source = FakeSource({"pages-1.img": pages_data()}, bad_offset=7 * PAGE)
    seen: list[tuple[LazyPageError, bool]] = []
    conns: list[socket.socket] = []

    def on_error(err: LazyPageError) -> None:
        # The connection is still open here, nothing sent (the orchestrator kills the tree
        # first): not readable, neither data nor EOF.
        time.sleep(0.1)
        readable = bool(select.select([conns[0]], [], [], 0)[0])
        seen.append((err, readable))

    server = PageServer(image_dir, source, allowed_pid=os.getpid, on_error=on_error)
    server.start()
    try:
        sk = socket.create_connection(("127.0.0.1", server.port))
        conns.append(sk)
        sk.sendall(psi(7, 1, 0x20000, PID))
        assert recv_n(sk, 32 + PAGE) == psi(0x40006, 1, 0x20000, PID) + bytes([3]) * PAGE
        sk.sendall(psi(7, 3, 0x40000, PID))  # file pages 6..8: page 7 is bad
        assert server.wait(5)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert recv_n(sk, 32 + PAGE) == b""  # not a byte of the bad request, then EOF
        sk.close()
    finally:
        server.close()
    assert server.error is not None and server.error.chunk == "7 (sha256 ab)"
    assert [(e.file, readable) for e, readable in seen] == [("pages-1.img", False)]
    assert server.faults == [(0x20000, 1)] and not server.clean


def test_without_on_error_the_connection_is_held_until_close(image_dir: Path) -> None:
    source = FakeSource({"pages-1.img": pages_data()}, bad_offset=2 * PAGE)
    server = PageServer(image_dir, source, allowed_pid=os.getpid)
    server.start()
    with socket.create_connection(("127.0.0.1", server.port)) as sk:
        sk.sendall(psi(7, 1, 0x20000, PID))
        assert server.wait(5) and server.error is not None
        time.sleep(0.3)
        sk.setblocking(False)
        with pytest.raises(BlockingIOError):
            sk.recv(1)  # nothing sent, not closed: the fault waits
        server.close()
        assert recv_n(sk, 1) == b""


@pytest.mark.parametrize(
    ("vaddr", "nr", "dst"),
    [
        (0x10000, 1, PID),  # present but not lazy: restore reads it itself
        (0x30000, 1, PID),  # in no extent
        (0x20800, 1, PID),  # not page-aligned
        (0x20000, 0, PID),  # no pages
        (0x20000, 1, PID + 1),  # another task
        (0x20000, 1, 1 << 40),  # no such task
    ],
)
def test_requests_outside_the_lazy_pages_are_refused(
    served: tuple[PageServer, FakeSource], vaddr: int, nr: int, dst: int
) -> None:
    server, source = served
    with socket.create_connection(("127.0.0.1", server.port)) as sk:
        sk.sendall(psi(7, nr, vaddr, dst))
        assert server.wait(5)
        server.close()
        assert recv_n(sk, 32) == b""
    assert server.error is not None and "no lazy pagemap entry" in server.error.msg
    assert source.reads == []


def test_other_commands_are_refused(served: tuple[PageServer, FakeSource]) -> None:
    server, _ = served
    with socket.create_connection(("127.0.0.1", server.port)) as sk:
        sk.sendall(psi(4, 0, 0, PID << 8 | 1))  # PS_IOV_OPEN2: a dump's page server command
        assert server.wait(5)
        server.close()
        assert recv_n(sk, 32) == b""
    assert server.error is not None and "PS_IOV_GET" in server.error.msg


# -- pagemaps ----------------------------------------------------------------------------


def test_pagemap_offsets_follow_present_entries_only() -> None:
    data = pagemap_bytes(
        3, [(0x1000, 1, None), (0x2000, 2, PE_PARENT), (0x8000, 2, LAZY), (0xA000, 1, PE_LAZY)]
    )
    pm = parse_pagemap(data, pid=7, image="i")
    assert pm.pages_file == "pages-3.img"
    assert pm.extents == (
        Extent(0x1000, 1, PE_PRESENT, 0),
        Extent(0x2000, 2, PE_PARENT, PAGE),
        Extent(0x8000, 2, LAZY, PAGE),
        Extent(0xA000, 1, PE_LAZY, 3 * PAGE),
    )
    assert pm.lookup(0x9000, 5) == (2 * PAGE, 1)
    assert pm.lookup(0xA000, 1) is None  # lazy but not in the file
    assert pm.lookup(0x1000, 1) is None  # present but not lazy
    assert pm.ranges(lazy=True) == [(PAGE, 2 * PAGE)]
    assert pm.ranges(lazy=False) == [(0, PAGE)]


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"", "magic"),
        (struct.pack("<II", 0x54564319, 0x56084026), "magic"),
        (struct.pack("<II", 0x54564319, 0x56084025), "no pagemap_head"),
        (pagemap_bytes(1, [])[:-1], "truncated"),
        (pagemap_bytes(1, [(0x1001, 1, LAZY)]), "out of range"),
        (pagemap_bytes(1, [(0x1000, 0, LAZY)]), "out of range"),
        (pagemap_bytes(1, [(1 << 57, 1, LAZY)]), "out of range"),
        (pagemap_bytes(1, [(0x4000, 2, LAZY), (0x5000, 1, LAZY)]), "overlaps"),
    ],
)
def test_malformed_pagemaps_are_refused(data: bytes, what: str) -> None:
    with pytest.raises(ImageCorruptedError) as info:
        parse_pagemap(data, pid=1, image="i")
    assert what in str(info.value)


def test_a_pagemap_claiming_more_than_its_pages_file_is_refused(image_dir: Path) -> None:
    (image_dir / "pages-1.img").write_bytes(bytes(8 * PAGE))  # 9 pages are claimed
    with pytest.raises(ImageCorruptedError) as info:
        load_pagemaps(image_dir)
    assert info.value.file == f"pagemap-{PID}.img"
    assert "claims 36864 bytes of pages, pages-1.img has 32768" in str(info.value)


def test_a_pagemap_naming_a_missing_pages_file_is_refused(image_dir: Path) -> None:
    (image_dir / "pages-1.img").unlink()
    with pytest.raises(ImageCorruptedError, match=r"names pages-1\.img, which is missing"):
        load_pagemaps(image_dir)
