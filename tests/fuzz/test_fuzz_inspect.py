"""Fuzzing ``torpor inspect``'s decoder of CRIU's own files, structure-aware: image
directories whose ``pstree.img``, ``core-*``, ``ids-*``, ``mm-*``, ``pagemap-*``,
``fdinfo-*``, ``files.img`` and ``tcp-stream-*`` carry the right magic and framing around
messages whose every field is drawn (values at the type bounds, repeated fields, nested
messages), or raw bytes, a lying entry length, a wrong magic.

Decoding, rendering the text report and the JSON one end with success or a
:class:`~torpor.TorporError`, in bounded time (a hostile image must not make inspect
quadratic or unbounded), reading only the directory.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from torpor._images._criu_images import criu_images_pb2 as pb
from torpor._images._inspect import inspect_image, render_text

from .support import Jail, bounded, verdict

IMG = 0x54564319  # criu/include/magic.h, written out so a wrong constant in torpor shows
MAGICS = {
    "pstree": 0x50273030,
    "core": 0x55053847,
    "ids": 0x54432030,
    "mm": 0x57492820,
    "pagemap": 0x56084025,
    "fdinfo": 0x56213732,
    "files": 0x56303138,
    "tcp-stream": 0x51465506,
}
U32 = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 5, 7, 0xFFFF, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)
)
U64 = st.one_of(
    st.sampled_from([0, 4096, 2**47, 2**63, 2**64 - 4096, 2**64 - 1]), st.integers(0, 2**64 - 1)
)
PIDS = st.sampled_from([1, 2, 4242, 2**32 - 1])


@st.composite
def message(draw: st.DrawFn, cls: type[Message], depth: int = 0) -> Message:
    """A ``cls`` with each field drawn by its type (set or left out)."""
    msg = cls()
    for f in cls.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        repeated = f.is_repeated
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2:
                continue
            sub = message(f.message_type._concrete_class, depth + 1)
            if repeated:
                getattr(msg, f.name).extend(draw(st.lists(sub, max_size=3)))
            else:
                getattr(msg, f.name).CopyFrom(draw(sub))
            continue
        value = {
            FieldDescriptor.TYPE_UINT32: U32,
            FieldDescriptor.TYPE_UINT64: U64,
            FieldDescriptor.TYPE_BOOL: st.booleans(),
            FieldDescriptor.TYPE_STRING: st.text(max_size=20),
            FieldDescriptor.TYPE_BYTES: st.sampled_from([b"\0abstract", b"\x80", b"\0\xff"])
            | st.binary(max_size=20),
        }[f.type]
        if repeated:
            getattr(msg, f.name).extend(draw(st.lists(value, max_size=5)))
        else:
            setattr(msg, f.name, draw(value))
    return msg


@st.composite
def crio_file(
    draw: st.DrawFn, kind: str, first: type[Message], rest: type[Message] | None
) -> bytes:
    """One CRIU file: header, then entries; mostly well framed messages (an image with one
    damaged file is refused there, so damage is rare enough for most images to decode)."""
    damaged = draw(st.integers(0, 19)) == 0
    magic = draw(st.sampled_from([MAGICS["core"], 0])) if damaged else MAGICS[kind]
    out = struct.pack("<II", IMG, magic)
    for i in range(draw(st.integers(1 if rest is None else 0, 4))):
        cls = first if i == 0 or rest is None else rest
        body = message(cls).map(lambda m: m.SerializeToString())
        data = draw(body | st.binary(max_size=30)) if damaged else draw(body)
        length = draw(st.sampled_from([len(data) + 5, 2**32 - 1])) if damaged else len(data)
        out += struct.pack("<I", length) + data
        if rest is None:
            break
    if kind == "tcp-stream":
        out += draw(st.binary(max_size=64))  # the queued data
    if damaged and draw(st.booleans()):
        out = out[: draw(st.integers(0, len(out)))]
    return out


@st.composite
def image_dirs(draw: st.DrawFn) -> dict[str, bytes]:
    pids = draw(st.lists(PIDS, min_size=1, max_size=3))
    files: dict[str, bytes] = {}
    pstree = b"".join(
        _framed(pb.PstreeEntry(pid=p, ppid=draw(PIDS), threads=draw(st.lists(PIDS, max_size=3))))
        for p in pids
    )
    files["pstree.img"] = draw(
        st.sampled_from([struct.pack("<II", IMG, MAGICS["pstree"]) + pstree])
        | crio_file("pstree", pb.PstreeEntry, pb.PstreeEntry)
    )
    for pid in pids:
        files[f"core-{pid}.img"] = draw(crio_file("core", pb.CoreEntry, None))
        if draw(st.booleans()):
            files[f"ids-{pid}.img"] = draw(crio_file("ids", pb.TaskKobjIdsEntry, None))
        files[f"mm-{pid}.img"] = draw(crio_file("mm", pb.MmEntry, None))
        files[f"pagemap-{pid}.img"] = draw(crio_file("pagemap", pb.PagemapHead, pb.PagemapEntry))
    for fid in [*draw(st.lists(U32, max_size=2)), 0]:
        files[f"fdinfo-{fid}.img"] = draw(crio_file("fdinfo", pb.FdinfoEntry, pb.FdinfoEntry))
    files["files.img"] = draw(crio_file("files", pb.FileEntry, pb.FileEntry))
    for ino in draw(st.lists(U32, max_size=2)):
        files[f"tcp-stream-{ino:x}.img"] = draw(crio_file("tcp-stream", pb.TcpStreamEntry, None))
    files["pages-1.img"] = b"\0" * draw(st.integers(0, 8192))
    return files


def _framed(msg: Message) -> bytes:
    body = msg.SerializeToString()
    return struct.pack("<I", len(body)) + body


def inspect(path: Path) -> Any:
    inspection = inspect_image(path)
    render_text(inspection)
    json.dumps(inspection.to_dict())  # what `torpor inspect --json` prints
    return inspection


def test_a_well_formed_image_inspects() -> None:
    jail = Jail()
    d = jail.home / "images" / "x"
    d.mkdir(parents=True, mode=0o700)
    (d / "pstree.img").write_bytes(
        struct.pack("<II", IMG, MAGICS["pstree"]) + _framed(pb.PstreeEntry(pid=7, ppid=0))
    )
    core = pb.CoreEntry(tc=pb.TaskCoreEntry(task_state=1, comm="app"))
    (d / "core-7.img").write_bytes(struct.pack("<II", IMG, MAGICS["core"]) + _framed(core))
    (d / "mm-7.img").write_bytes(struct.pack("<II", IMG, MAGICS["mm"]) + _framed(pb.MmEntry()))
    (d / "pagemap-7.img").write_bytes(
        struct.pack("<II", IMG, MAGICS["pagemap"]) + _framed(pb.PagemapHead())
    )
    (d / "fdinfo-0.img").write_bytes(struct.pack("<II", IMG, MAGICS["fdinfo"]))
    with jail:
        got = inspect(d)
    assert [t.pid for t in got.tasks] == [7] and got.tasks[0].comm == "app"


@given(image_dirs())
def test_inspect(files: dict[str, bytes]) -> None:
    jail = Jail()
    d = jail.home / "images" / "x"
    d.mkdir(parents=True, mode=0o700)
    for name, data in files.items():
        (d / name).write_bytes(data)
    with jail, bounded(5):
        verdict(lambda: inspect(d))
