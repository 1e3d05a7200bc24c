"""``torpor inspect``'s decoder on small image directories built here, entry by entry.

The magic numbers are written out as CRIU defines them (criu/include/magic.h) rather than taken
from the module under test, so a wrong constant there fails here.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError, Message

from torpor._errors import ImageCorruptedError, ImageError, ImageNotFoundError
from torpor._images import _manifest
from torpor._images._criu_images import criu_images_pb2 as pb
from torpor._images._image import write_manifest
from torpor._images._inspect import inspect_image, render_text

IMG = 0x54564319
PSTREE = 0x50273030
CORE = 0x55053847
IDS = 0x54432030
MM = 0x57492820
PAGEMAP = 0x56084025
FDINFO = 0x56213732
FILES = 0x56303138
TCP_STREAM = 0x51465506

PAGE = 4096
PE_LAZY, PE_PRESENT, PE_PARENT = 2, 4, 1
PID = 4242
FILES_ID = 7
LISTEN_INO = 0x1F00
CONN_INO = 0x1F01


def frame(*messages: Message | bytes) -> bytes:
    """Entries as CRIU writes them: a little-endian u32 length, then the bytes; raw ``bytes``
    items are appended as they are (the data some entries carry after them)."""
    out = b""
    for m in messages:
        if isinstance(m, bytes):
            out += m
        else:
            body = m.SerializeToString()
            out += struct.pack("<I", len(body)) + body
    return out


def write(path: Path, magic: int, *messages: Message | bytes) -> None:
    path.write_bytes(struct.pack("<II", IMG, magic) + frame(*messages))


def ip_words(family: int, text: str) -> list[int]:
    raw = socket.inet_pton(family, text)
    return list(struct.unpack(f"<{len(raw) // 4}I", raw))


def fdinfo(fd: int, file_id: int, fd_type: int, *, cloexec: bool = False) -> pb.FdinfoEntry:
    return pb.FdinfoEntry(id=file_id, flags=1 if cloexec else 0, type=fd_type, fd=fd)


def build_image(root: Path) -> Path:
    """A one-process image: a python task with a file, a listening and a connected TCP socket,
    a unix socket, a pipe, and three memory areas."""
    d = root / "img"
    d.mkdir()
    write(
        d / "pstree.img",
        PSTREE,
        pb.PstreeEntry(pid=PID, ppid=1, pgid=PID, sid=PID, threads=[PID, PID + 1]),
    )
    write(
        d / "core-4242.img",
        CORE,
        pb.CoreEntry(mtype=1, tc=pb.TaskCoreEntry(task_state=1, comm="python3")),
    )
    write(d / "ids-4242.img", IDS, pb.TaskKobjIdsEntry(files_id=FILES_ID))
    base = 0x7F0000000000
    vmas = [
        # a private file mapping of the executable, an anon area right after it, the stack
        pb.VmaEntry(start=base, end=base + 4 * PAGE, prot=5, flags=0x2, status=1 | 1 << 6, shmid=1),
        pb.VmaEntry(
            start=base + 4 * PAGE, end=base + 12 * PAGE, prot=3, flags=0x22, status=1 | 1 << 9
        ),
        pb.VmaEntry(
            start=0x7FFF0000, end=0x7FFF0000 + 2 * PAGE, prot=3, flags=0x122, status=1 | 1 << 9
        ),
    ]
    write(d / "mm-4242.img", MM, pb.MmEntry(exe_file_id=1, vmas=vmas))
    pagemap = [
        # 2 pages at the end of the file mapping and 3 into the anon area: one entry, two areas
        (PE_LAZY | PE_PRESENT, pb.PagemapEntry(vaddr=base + 2 * PAGE, nr_pages=5)),
        (PE_LAZY, pb.PagemapEntry(vaddr=base + 8 * PAGE, nr_pages=2)),
        (PE_PARENT, pb.PagemapEntry(vaddr=base + 10 * PAGE, nr_pages=1)),
        (PE_PRESENT, pb.PagemapEntry(vaddr=0x7FFF0000, nr_pages=1)),
    ]
    for flags, e in pagemap:
        e.flags = flags
    write(d / "pagemap-4242.img", PAGEMAP, pb.PagemapHead(pages_id=1), *(e for _, e in pagemap))
    (d / "pages-1.img").write_bytes(b"\0" * 6 * PAGE)
    write(
        d / f"fdinfo-{FILES_ID}.img",
        FDINFO,
        fdinfo(3, 10, 1),
        fdinfo(0, 11, 1),
        fdinfo(4, 12, 4, cloexec=True),
        fdinfo(5, 13, 4),
        fdinfo(6, 14, 5),
        fdinfo(7, 15, 2),
        fdinfo(8, 16, 6),
    )
    write(
        d / "files.img",
        FILES,
        pb.FileEntry(type=1, id=1, reg=pb.RegFileEntry(id=1, name="/usr/bin/python3", flags=0)),
        pb.FileEntry(
            type=1,
            id=10,
            reg=pb.RegFileEntry(id=10, name="/data/state.db", flags=0o2002, pos=17, size=4096),
        ),
        pb.FileEntry(type=1, id=11, reg=pb.RegFileEntry(id=11, name="/dev/null", flags=0)),
        pb.FileEntry(
            type=4,
            id=12,
            isk=pb.InetSkEntry(
                id=12,
                ino=LISTEN_INO,
                family=2,
                type=1,
                proto=6,
                state=10,
                src_port=8080,
                backlog=128,
                src_addr=ip_words(socket.AF_INET, "127.0.0.1"),
                dst_addr=ip_words(socket.AF_INET, "0.0.0.0"),
            ),
        ),
        pb.FileEntry(
            type=4,
            id=13,
            isk=pb.InetSkEntry(
                id=13,
                ino=CONN_INO,
                family=10,
                type=1,
                proto=6,
                state=1,
                src_port=8080,
                dst_port=51000,
                src_addr=ip_words(socket.AF_INET6, "fd00::1"),
                dst_addr=ip_words(socket.AF_INET6, "fd00::2"),
            ),
        ),
        pb.FileEntry(
            type=5,
            id=14,
            usk=pb.UnixSkEntry(id=14, ino=900, type=2, state=7, name=b"\0torpor-test", peer=0),
        ),
        pb.FileEntry(type=2, id=15, pipe=pb.PipeEntry(id=15, pipe_id=777, flags=1)),
        # an eventfd: shown by its type only
        pb.FileEntry(type=6, id=16),
    )
    write(
        d / f"tcp-stream-{CONN_INO:x}.img",
        TCP_STREAM,
        pb.TcpStreamEntry(inq_len=3, inq_seq=100, outq_len=2, outq_seq=200),
        b"abc" + b"de",
    )
    return d


def test_decodes_tasks_memory_files_and_sockets(tmp_path: Path) -> None:
    insp = inspect_image(build_image(tmp_path))

    (task,) = insp.tasks
    assert (task.pid, task.ppid, task.pgid, task.sid) == (PID, 1, PID, PID)
    assert task.threads == (PID, PID + 1)
    assert (task.comm, task.state, task.exe) == ("python3", "alive", "/usr/bin/python3")

    exe, anon, stack = task.vmas
    assert (exe.kind, exe.path, exe.perms, exe.file_backed) == (
        "file",
        "/usr/bin/python3",
        "r-xp",
        True,
    )
    assert (anon.kind, anon.path, anon.perms, anon.file_backed) == ("anon", None, "rw-p", False)
    assert stack.kind == "stack"
    assert (exe.pages_dumped, anon.pages_dumped, stack.pages_dumped) == (2, 3, 1)
    assert task.memory.pages_dumped == 6
    assert task.memory.bytes_dumped == 6 * PAGE
    assert (task.memory.pages_lazy, task.memory.pages_in_parent) == (2, 1)
    assert task.memory.vmas == 3
    assert task.memory.mapped_bytes == 14 * PAGE
    assert insp.memory == task.memory
    assert insp.pages_file_bytes == 6 * PAGE

    fds = {f.fd: f for f in task.files}
    assert [f.fd for f in task.files] == sorted(fds)
    data = fds[3]
    assert (data.type, data.path, data.pos, data.size) == ("file", "/data/state.db", 17, 4096)
    assert data.summary == "/data/state.db, rw+append, pos 17, size 4096"
    assert fds[0].path == "/dev/null"
    assert fds[7].type == "pipe" and fds[7].pipe_id == 777
    assert fds[8].type == "eventfd" and fds[8].summary == ""

    listen = fds[4].socket
    assert fds[4].cloexec and not fds[5].cloexec
    assert listen is not None
    assert (listen.family, listen.type, listen.protocol, listen.state) == (
        "inet",
        "stream",
        "tcp",
        "LISTEN",
    )
    assert (listen.src_addr, listen.src_port, listen.backlog) == ("127.0.0.1", 8080, 128)
    assert (listen.local, listen.remote) == ("127.0.0.1:8080", "")
    assert listen.tcp_stream is None

    conn = fds[5].socket
    assert conn is not None
    assert (conn.family, conn.state, conn.local, conn.remote) == (
        "inet6",
        "ESTABLISHED",
        "[fd00::1]:8080",
        "[fd00::2]:51000",
    )
    assert conn.tcp_stream is not None
    assert (conn.tcp_stream.inq_len, conn.tcp_stream.outq_seq) == (3, 200)

    unix = fds[6].socket
    assert unix is not None
    assert (unix.family, unix.type, unix.name, unix.peer) == ("unix", "dgram", "@torpor-test", None)

    assert {s.file_id for s in insp.sockets} == {12, 13, 14}
    assert insp.holders(12) == ((PID, 4),)
    assert insp.manifest is None


def test_to_dict_is_json_and_text_shows_everything(tmp_path: Path) -> None:
    insp = inspect_image(build_image(tmp_path))
    data = json.loads(json.dumps(insp.to_dict()))
    assert data["tasks"][0]["comm"] == "python3"
    assert data["tasks"][0]["vmas"][0]["path"] == "/usr/bin/python3"
    assert data["memory"]["pages_dumped"] == 6
    listen = next(s for s in data["sockets"] if s["state"] == "LISTEN")
    assert listen["src_port"] == 8080 and listen["holders"] == [[PID, 4]]

    text = render_text(insp)
    for needed in (
        "python3",
        "/data/state.db",
        "127.0.0.1:8080",
        "[fd00::2]:51000",
        "@torpor-test",
        "pipe:[777]",
        "6 pages dumped",
        "in 3, out 2",
        "no torpor manifest",
    ):
        assert needed in text


def test_manifest_is_included(tmp_path: Path) -> None:
    d = build_image(tmp_path)
    m = _manifest.build(
        name="web", pid=PID, files=[], criu_version="4.2.1", cmdline=["python3"], rss_bytes=1
    )
    write_manifest(d, m)
    insp = inspect_image(d)
    assert insp.manifest == m
    assert insp.to_dict()["manifest"]["name"] == "web"
    assert "name 'web'" in render_text(insp)


def test_old_pagemap_without_flags_and_nr_pages(tmp_path: Path) -> None:
    # Images from before the flags/nr_pages fields: compat_nr_pages, and in_parent for holes.
    old = [
        pb.PagemapEntry(vaddr=0x7F0000000000, compat_nr_pages=3),
        pb.PagemapEntry(vaddr=0x7F0000000000 + 5 * PAGE, compat_nr_pages=2, in_parent=True),
    ]
    d = build_image(tmp_path)
    write(d / "pagemap-4242.img", PAGEMAP, pb.PagemapHead(pages_id=1), *old)
    memory = inspect_image(d).tasks[0].memory
    assert (memory.pages_dumped, memory.pages_in_parent, memory.pages_lazy) == (3, 2, 0)


def test_bad_magic_names_the_file(tmp_path: Path) -> None:
    d = build_image(tmp_path)
    data = (d / "mm-4242.img").read_bytes()
    (d / "mm-4242.img").write_bytes(struct.pack("<II", IMG, CORE) + data[8:])
    with pytest.raises(ImageError, match=r"mm-4242\.img has magic") as info:
        inspect_image(d)
    assert isinstance(info.value, ImageCorruptedError)
    assert info.value.file == "mm-4242.img"
    assert info.value.image == str(d)


def test_missing_common_magic(tmp_path: Path) -> None:
    d = build_image(tmp_path)
    (d / "pstree.img").write_bytes(struct.pack("<I", PSTREE) + frame(pb.PstreeEntry(pid=1)))
    with pytest.raises(ImageError, match=r"pstree\.img has magic"):
        inspect_image(d)


@pytest.mark.parametrize("cut", [1, 3, 6])
def test_truncated_entry_names_the_file(tmp_path: Path, cut: int) -> None:
    d = build_image(tmp_path)
    path = d / f"fdinfo-{FILES_ID}.img"
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(ImageError, match=rf"fdinfo-{FILES_ID}\.img is truncated") as info:
        inspect_image(d)
    assert isinstance(info.value, ImageCorruptedError)
    assert info.value.file == f"fdinfo-{FILES_ID}.img"


def test_partial_length_prefix(tmp_path: Path) -> None:
    d = build_image(tmp_path)
    path = d / "files.img"
    path.write_bytes(path.read_bytes() + b"\x05\x00")
    with pytest.raises(ImageError, match=r"files\.img is truncated: partial entry length"):
        inspect_image(d)


def test_header_shorter_than_magic(tmp_path: Path) -> None:
    d = build_image(tmp_path)
    (d / "core-4242.img").write_bytes(b"\x19\x43")
    with pytest.raises(ImageError, match=r"core-4242\.img is truncated"):
        inspect_image(d)


def test_truncated_data_after_tcp_stream_entry(tmp_path: Path) -> None:
    d = build_image(tmp_path)
    path = d / f"tcp-stream-{CONN_INO:x}.img"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ImageError, match=rf"tcp-stream-{CONN_INO:x}\.img is truncated"):
        inspect_image(d)


def test_undecodable_entry_keeps_the_cause(tmp_path: Path) -> None:
    d = build_image(tmp_path)
    # A field header announcing a 100-byte string inside a 3-byte entry.
    bad = b"\x32\x64ab"
    (d / "core-4242.img").write_bytes(struct.pack("<III", IMG, CORE, len(bad)) + bad)
    with pytest.raises(ImageError, match=r"core-4242\.img has an undecodable entry") as info:
        inspect_image(d)
    assert isinstance(info.value.__cause__, DecodeError)


def test_empty_core_file(tmp_path: Path) -> None:
    d = build_image(tmp_path)
    write(d / "core-4242.img", CORE)
    with pytest.raises(ImageError, match=r"core-4242\.img has no entries"):
        inspect_image(d)


def test_missing_mm_of_a_live_task(tmp_path: Path) -> None:
    d = build_image(tmp_path)
    (d / "mm-4242.img").unlink()
    with pytest.raises(ImageCorruptedError, match=r"mm-4242\.img is missing"):
        inspect_image(d)


def test_zombie_has_no_memory_or_files(tmp_path: Path) -> None:
    d = build_image(tmp_path)
    write(
        d / "pstree.img",
        PSTREE,
        pb.PstreeEntry(pid=PID, ppid=1, pgid=PID, sid=PID, threads=[PID]),
        pb.PstreeEntry(pid=PID + 5, ppid=PID, pgid=PID, sid=PID),
    )
    write(
        d / f"core-{PID + 5}.img",
        CORE,
        pb.CoreEntry(mtype=1, tc=pb.TaskCoreEntry(task_state=6, comm="worker", exit_code=3)),
    )
    _, zombie = inspect_image(d).tasks
    assert (zombie.state, zombie.comm, zombie.vmas, zombie.files) == ("zombie", "worker", (), ())
    assert zombie.memory.pages_dumped == 0
    assert "  worker" in render_text(inspect_image(d))


def test_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"no pstree\.img"):
        inspect_image(tmp_path)
    with pytest.raises(ImageNotFoundError):
        inspect_image(tmp_path / "absent")
