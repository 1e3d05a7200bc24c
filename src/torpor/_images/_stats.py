"""CRIU's ``stats-dump``: how long a dump froze the process, and how much it wrote.

After a successful dump CRIU writes ``stats-dump`` into its work dir (torpor's is the image
dir, see ``_engine._criu``). Its layout (CRIU 4.2, ``criu/image.c``, ``criu/stats.c``,
``images/stats.proto``): the service-file magic ``IMG_SERVICE_MAGIC``, the ``STATS_MAGIC``,
then one entry — a 4-byte little-endian length and a ``stats_entry`` protobuf message whose
field 1 is a ``dump_stats_entry``: ``freezing_time``, ``frozen_time``, ``memdump_time``,
``memwrite_time`` (microseconds, uint32) and page counts (uint64).

The message is decoded by hand here, a varint reader of a dozen lines: it is two flat
messages of integers, and compiling ``stats.proto`` would add a generated module (and its
protobuf runtime import, ~30 ms) to every checkpoint for fields we read four of. The file is
outside input (a shared image, a planted file): reading is bounded (:data:`MAX_STATS`), and any
malformation gives None, never an exception other than :class:`StatsError` from
:func:`parse_dump_stats_strict`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from .._errors import ImageCorruptedError, TorporError
from .._safe import read_regular

STATS_DUMP = "stats-dump"
IMG_SERVICE_MAGIC = 0x55105940
STATS_MAGIC = 0x57093306
# CRIU's entry is under 100 bytes; anything much bigger is not one.
MAX_STATS = 4096

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
# dump_stats_entry: field number -> (attribute, maximum). Fields 1-4 are uint32 times.
_DUMP_FIELDS: dict[int, tuple[str, int]] = {
    1: ("freezing_us", _U32),
    2: ("frozen_us", _U32),
    3: ("memdump_us", _U32),
    4: ("memwrite_us", _U32),
    5: ("pages_scanned", _U64),
    6: ("pages_skipped_parent", _U64),
    7: ("pages_written", _U64),
    8: ("irmap_resolve_us", _U32),
    9: ("pages_lazy", _U64),
    10: ("page_pipes", _U64),
    11: ("page_pipe_bufs", _U64),
    12: ("shpages_scanned", _U64),
    13: ("shpages_skipped_parent", _U64),
    14: ("shpages_written", _U64),
}
_REQUIRED = frozenset((1, 2, 3, 4, 5, 6, 7, 9))


class StatsError(ImageCorruptedError):
    """A ``stats-dump`` that is not one CRIU wrote."""


@dataclass(frozen=True)
class DumpStats:
    """What CRIU measured of one dump (times in microseconds)."""

    freezing_us: int
    frozen_us: int
    memdump_us: int
    memwrite_us: int
    pages_scanned: int
    pages_skipped_parent: int
    pages_written: int
    pages_lazy: int
    irmap_resolve_us: int | None = None
    page_pipes: int | None = None
    page_pipe_bufs: int | None = None
    shpages_scanned: int | None = None
    shpages_skipped_parent: int | None = None
    shpages_written: int | None = None

    @property
    def frozen_ms(self) -> float:
        """How long the process was frozen, in milliseconds."""
        return self.frozen_us / 1000.0


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(10):  # a 64-bit varint is at most 10 bytes
        if pos + i >= len(buf):
            raise StatsError("truncated varint")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value > _U64:
                raise StatsError("varint over 64 bits")
            return value, pos + i + 1
        shift += 7
    raise StatsError("varint longer than 10 bytes")


def _fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """``(field number, wire type, value)`` of each field of a protobuf message."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise StatsError("field number 0")
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1 or wire == 5:
            width = 8 if wire == 1 else 4
            if pos + width > len(buf):
                raise StatsError("truncated fixed field")
            value = int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if length > len(buf) - pos:
                raise StatsError("length past the end")
            value = buf[pos : pos + length]
            pos += length
        else:  # groups (3, 4) and reserved wire types: CRIU writes none
            raise StatsError(f"wire type {wire}")
        out.append((number, wire, value))
    return out


def parse_dump_stats_strict(data: bytes) -> DumpStats:
    """Decode a whole ``stats-dump`` file; :class:`StatsError` if it is not one."""
    if len(data) > MAX_STATS:
        raise StatsError(f"{len(data)} bytes, more than {MAX_STATS}")
    if len(data) < 12:
        raise StatsError("shorter than its header")
    head, magic, size = struct.unpack_from("<III", data)
    if head != IMG_SERVICE_MAGIC or magic != STATS_MAGIC:
        raise StatsError(f"magic {head:#x} {magic:#x} is not a stats file's")
    if size != len(data) - 12:
        raise StatsError(f"entry of {size} bytes in {len(data) - 12}")
    dump: bytes | None = None
    for number, wire, value in _fields(data[12:]):
        if number == 1:
            if wire != 2 or not isinstance(value, bytes):
                raise StatsError("dump entry is not a message")
            dump = value  # protobuf: the last one wins
    if dump is None:
        raise StatsError("no dump entry (a restore's stats?)")
    found: dict[str, int] = {}
    seen: set[int] = set()
    for number, wire, value in _fields(dump):
        known = _DUMP_FIELDS.get(number)
        if known is None:
            continue  # a newer CRIU's field
        attr, limit = known
        if wire != 0 or not isinstance(value, int):
            raise StatsError(f"field {number} is not a varint")
        if value > limit:
            raise StatsError(f"field {number} out of range")
        found[attr] = value
        seen.add(number)
    missing = sorted(_REQUIRED - seen)
    if missing:
        raise StatsError(f"required field {missing[0]} missing")
    return DumpStats(**found)


def parse_dump_stats(data: bytes) -> DumpStats | None:
    """:func:`parse_dump_stats_strict`, None instead of its error."""
    try:
        return parse_dump_stats_strict(data)
    except StatsError:
        return None


def read_dump_stats(dir_fd: int, *, source: str) -> DumpStats | None:
    """The stats of the dump in image directory ``dir_fd`` (at ``source``), None if there are
    none or they cannot be read (``O_NOFOLLOW``, regular files only, bounded)."""
    try:
        data = read_regular(dir_fd, STATS_DUMP, source=source, limit=MAX_STATS)
    except (OSError, TorporError):
        return None
    return parse_dump_stats(data)


def read_dump_stats_at(path: str | os.PathLike[str]) -> DumpStats | None:
    """:func:`read_dump_stats` of the image directory at ``path`` (opened ``O_NOFOLLOW``)."""
    from .._safe import open_dir

    try:
        fd = open_dir(path)
    except (OSError, TorporError):
        return None
    try:
        return read_dump_stats(fd, source=str(path))
    finally:
        os.close(fd)
