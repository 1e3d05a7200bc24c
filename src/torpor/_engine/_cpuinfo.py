"""CRIU's description of a CPU, for migration's pre-flight: ``CPUINFO_DUMP`` (RPC type 7) writes
this CPU's ``cpuinfo.img`` into a directory; ``CPUINFO_CHECK`` (type 8) compares an image's
``cpuinfo.img`` with the CPU it runs on.

The check uses CRIU's default capability set, FPU|INS (``cpu_cap`` left unset, as torpor's
restores leave it): the FPU and xsave features and sizes the image's process may rely on, and
the instruction sets CRIU tracks (SSE2, RDTSCP, ...); the destination may have more, not less.
torpor's restores do not ask CRIU to check the CPU (``cpu_cap`` has no ``IMAGE`` bit), so this
is the only place it is checked: a process restored on a CPU lacking an instruction it uses dies
with SIGILL later.

A ``cpuinfo.img`` that comes from another host is hostile input: :func:`parse` bounds it
(:data:`MAX_IMAGE` bytes) and walks its protobuf by hand, accepting only the fields of CRIU's
``cpuinfo_x86_entry`` (``images/cpuinfo.proto``) with their wire types, before CRIU reads it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import _safe
from .._errors import CriuError, TorporError
from .._proto import criu_rpc_pb2 as pb
from ._criu import find_criu
from ._failures import log_errors
from ._rpc import Connection, TransportError

CPUINFO_IMG = "cpuinfo.img"
MAX_IMAGE = 4096  # bytes; CRIU 4.2 writes ~200 on x86-64
IMG_COMMON_MAGIC = 0x54564319  # criu/include/magic.h
CPUINFO_MAGIC = 0x61404013
_HEAD = struct.Struct("<III")  # the two magics, then the one entry's length
_LOG = "cpuinfo.log"
_MAX_CAPS = 64  # capability words (CRIU 4.2 writes NCAPINTS_V2 = 22)
_MAX_MODEL_ID = 256
_VENDORS = {1: "Intel", 2: "AMD"}
# cpuinfo_x86_entry: field number -> wire type (0 varint, 2 length-delimited).
_X86_FIELDS = {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0, 7: 2, 8: 0, 9: 0, 10: 0}
_X86_REQUIRED = frozenset({1, 2, 3, 4, 5})


class CpuInfoError(TorporError):
    """A ``cpuinfo.img`` that is not one CRIU wrote for an x86-64 CPU."""


@dataclass(frozen=True)
class CpuInfo:
    """What a ``cpuinfo.img`` says of its CPU."""

    vendor: str
    family: int
    model: int
    stepping: int
    model_id: str
    capability: tuple[int, ...]
    xfeatures_mask: int | None

    def describe(self) -> str:
        """One phrase naming the CPU (its model string, else vendor, family and model)."""
        return self.model_id or f"{self.vendor} family {self.family} model {self.model}"


def dump() -> bytes:
    """This CPU's ``cpuinfo.img``, as CRIU writes it (CPUINFO_DUMP); :class:`CriuError` if
    CRIU fails."""
    with _scratch() as (path, dfd):
        _request(pb.CPUINFO_DUMP, path, dfd, what="cpuinfo dump")
        data = _safe.read_regular(dfd, CPUINFO_IMG, source=str(path), limit=MAX_IMAGE)
    parse(data)  # what we send must be what we would accept
    return data


def check(data: bytes) -> list[str]:
    """CRIU's verdict on restoring an image with ``cpuinfo.img`` ``data`` on this CPU
    (CPUINFO_CHECK, FPU|INS): empty if it fits, else the error lines of CRIU's log (at least
    one). ``data`` is parsed first (:class:`CpuInfoError`); CRIU failing to run raises
    :class:`CriuError`."""
    parse(data)
    with _scratch() as (path, dfd):
        fd = _safe.create_file(dfd, CPUINFO_IMG, source=str(path))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        ok = _request(pb.CPUINFO_CHECK, path, dfd, what="cpuinfo check", fail=False)
        if ok:
            return []
        return log_errors(path / _LOG) or ["CRIU's cpuinfo check failed without a log line"]


def this_cpu() -> str:
    """This host's CPU as /proc/cpuinfo names it (``model name``), or ``"unknown CPU"``."""
    with (
        contextlib.suppress(OSError),
        open("/proc/cpuinfo", encoding="ascii", errors="replace") as f,
    ):
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return " ".join(value.split())
    return "unknown CPU"


def parse(data: bytes) -> CpuInfo:
    """The CPU a ``cpuinfo.img`` describes; :class:`CpuInfoError` unless ``data`` is one
    x86 entry CRIU could have written (at most :data:`MAX_IMAGE` bytes, known fields only)."""
    if len(data) > MAX_IMAGE:
        raise CpuInfoError(f"the cpuinfo image is {len(data)} bytes, over {MAX_IMAGE}")
    if len(data) < _HEAD.size:
        raise CpuInfoError("the cpuinfo image is truncated")
    magic, kind, size = _HEAD.unpack_from(data)
    if (magic, kind) != (IMG_COMMON_MAGIC, CPUINFO_MAGIC):
        raise CpuInfoError("the cpuinfo image does not start with CRIU's cpuinfo magic")
    if size != len(data) - _HEAD.size:
        raise CpuInfoError("the cpuinfo image's entry length does not match its size")
    top = _fields(data[_HEAD.size :])
    if [(n, w) for n, w, _ in top] != [(1, 2)]:
        raise CpuInfoError("the cpuinfo image does not hold exactly one x86 CPU entry")
    entry = top[0][2]
    assert isinstance(entry, bytes)
    values: dict[int, int | bytes] = {}
    caps: list[int] = []
    for number, wire, value in _fields(entry):
        if _X86_FIELDS.get(number) != wire:
            raise CpuInfoError(f"the cpuinfo image has an unknown field {number} (wire {wire})")
        if number == 6:
            assert isinstance(value, int)
            caps.append(value)
        elif number in values:
            raise CpuInfoError(f"the cpuinfo image repeats field {number}")
        else:
            values[number] = value
    missing = _X86_REQUIRED - set(values)
    if missing:
        raise CpuInfoError(f"the cpuinfo image lacks fields {sorted(missing)}")
    ints = {n: v for n, v in values.items() if isinstance(v, int)}
    if ints[1] not in _VENDORS:
        raise CpuInfoError(f"the cpuinfo image names an unknown CPU vendor {ints[1]}")
    if len(caps) > _MAX_CAPS or any(c >= 1 << 32 for c in caps):
        raise CpuInfoError("the cpuinfo image's capability words are out of range")
    if any(ints[n] >= 1 << 32 for n in (2, 3, 4, 5, 9, 10) if n in ints):
        raise CpuInfoError("the cpuinfo image has a field out of range")
    raw_id = values.get(7, b"")
    assert isinstance(raw_id, bytes)
    try:
        model_id = raw_id.decode("ascii")
    except UnicodeDecodeError:
        raise CpuInfoError("the cpuinfo image's model name is not ASCII") from None
    if len(raw_id) > _MAX_MODEL_ID or not model_id.isprintable():
        raise CpuInfoError("the cpuinfo image's model name is not a printable line")
    return CpuInfo(
        vendor=_VENDORS[ints[1]],
        family=ints[2],
        model=ints[3],
        stepping=ints[4],
        model_id=" ".join(model_id.split()),
        capability=tuple(caps),
        xfeatures_mask=ints.get(8),
    )


def _fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """The (number, wire type, value) of each field of a protobuf message: varints as ints,
    length-delimited fields as bytes; any other wire type, or a field running past the end,
    raises :class:`CpuInfoError`."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise CpuInfoError("the cpuinfo image has a field numbered 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
            out.append((number, wire, value))
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if length > len(buf) - pos:
                raise CpuInfoError("the cpuinfo image has a field running past its end")
            out.append((number, wire, buf[pos : pos + length]))
            pos += length
        else:
            raise CpuInfoError(f"the cpuinfo image has a field of wire type {wire}")
    return out


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(pos + 10, len(buf))):
        value |= (buf[i] & 0x7F) << shift
        if not buf[i] & 0x80:
            return value, i + 1
        shift += 7
    raise CpuInfoError("the cpuinfo image has a truncated or overlong number")


@contextlib.contextmanager
def _scratch() -> Iterator[tuple[Path, int]]:
    """A new private directory (0700, removed afterwards) and an fd of it for CRIU."""
    path = Path(tempfile.mkdtemp(prefix="torpor-cpuinfo-"))
    try:
        dfd = _safe.open_dir(path)
        try:
            yield path, dfd
        finally:
            os.close(dfd)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _request(kind: pb.ReqType, path: Path, dfd: int, *, what: str, fail: bool = True) -> bool:
    """Run one cpuinfo request on the directory ``dfd`` (its log there); whether CRIU said
    success. A refusal raises :class:`CriuError` with the log's lines if ``fail``."""
    opts = pb.Opts(images_dir_fd=dfd, log_file=_LOG, log_level=4)
    binary = find_criu()
    try:
        with Connection.spawn(binary, (dfd,)) as conn:
            resp = conn.call(pb.Req(type=kind, opts=opts))
    except (OSError, TransportError) as exc:
        raise CriuError(f"CRIU's {what} could not run: {exc}") from exc
    if resp.success or not fail:
        return bool(resp.success)
    lines = log_errors(path / _LOG)
    raise CriuError(
        f"CRIU's {what} failed: {lines[0] if lines else 'no detail in its log'}",
        log_lines=lines,
    )
