"""CRIU's ``stats-dump`` (``_images._stats``): decoded from a file CRIU 4.2.1 wrote (a 300 MiB
leave-running dump), from hand-encoded variants, and refused (None, or :class:`StatsError`
from the strict parser) when it is anything else. Plus the manifest's ``supervision`` field:
optional, bounded, validated at parse, absent from a manifest without it."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from torpor._errors import ImageError
from torpor._images._manifest import FileEntry, Manifest
from torpor._images._stats import (
    IMG_SERVICE_MAGIC,
    MAX_STATS,
    STATS_MAGIC,
    DumpStats,
    StatsError,
    parse_dump_stats,
    parse_dump_stats_strict,
    read_dump_stats_at,
)

# A real stats-dump (CRIU 4.2.1, this machine): frozen 868130 us, 77563 pages written.
REAL = bytes.fromhex(
    "4059105506330957290000000a2708c20110a2fe3418bbfe2b20b78c2728b2de04300038fbdd0440004800"
    "50085808600068007000"
)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _file(dump: bytes, *, head: int = IMG_SERVICE_MAGIC, magic: int = STATS_MAGIC) -> bytes:
    entry = _varint(1 << 3 | 2) + _varint(len(dump)) + dump
    return struct.pack("<III", head, magic, len(entry)) + entry


def _dump(**override: int) -> bytes:
    values = {1: 10, 2: 2500, 3: 30, 4: 40, 5: 50, 6: 0, 7: 70, 9: 0} | {
        int(k[1:]): v for k, v in override.items()
    }
    return b"".join(_field(n, v) for n, v in values.items())


def test_a_real_stats_dump() -> None:
    stats = parse_dump_stats_strict(REAL)
    assert stats == DumpStats(
        freezing_us=194,
        frozen_us=868130,
        memdump_us=720699,
        memwrite_us=640567,
        pages_scanned=77618,
        pages_skipped_parent=0,
        pages_written=77563,
        pages_lazy=0,
        irmap_resolve_us=0,
        page_pipes=8,
        page_pipe_bufs=8,
        shpages_scanned=0,
        shpages_skipped_parent=0,
        shpages_written=0,
    )
    assert stats.frozen_ms == 868.13


def test_hand_encoded_with_an_unknown_newer_field() -> None:
    stats = parse_dump_stats_strict(_file(_dump() + _field(99, 7)))
    assert (stats.frozen_us, stats.pages_written, stats.page_pipes) == (2500, 70, None)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "shorter than its header"),
        (REAL[:11], "shorter than its header"),
        (REAL[:-1], "entry of 41 bytes in 40"),
        (REAL + b"\0", "entry of 41 bytes in 42"),
        (_file(_dump(), head=0x54564319), "is not a stats file's"),
        (_file(_dump(), magic=0x58313116), "is not a stats file's"),
        (_file(b"".join(_field(n, 1) for n in (1, 3, 4, 5, 6, 7, 9))), "required field 2"),
        (_file(_dump(f2=1 << 32)), "field 2 out of range"),
        (_file(_dump() + _varint(2 << 3 | 2) + b"\x05ab"), "length past the end"),
        (_file(_dump() + b"\x80" * 11), "varint longer than 10 bytes"),
        (_file(_dump() + _varint(3 << 3 | 3)), "wire type 3"),
        (_file(_dump() + _varint(1 << 3 | 2) + b"\x00"), "field 1 is not a varint"),
        (struct.pack("<III", IMG_SERVICE_MAGIC, STATS_MAGIC, 2) + _field(2, 1), "no dump"),
        (b"\0" * (MAX_STATS + 1), "more than"),
    ],
)
def test_anything_else_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(StatsError, match=why):
        parse_dump_stats_strict(data)
    assert parse_dump_stats(data) is None


def test_read_from_an_image_directory(tmp_path: Path) -> None:
    (tmp_path / "stats-dump").write_bytes(REAL)
    stats = read_dump_stats_at(tmp_path)
    assert stats is not None and stats.frozen_us == 868130
    assert read_dump_stats_at(tmp_path / "missing") is None


def test_a_symlink_or_fifo_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(REAL)
    link = tmp_path / "link"
    link.mkdir()
    (link / "stats-dump").symlink_to(tmp_path / "real")
    assert read_dump_stats_at(link) is None
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "stats-dump")
    assert read_dump_stats_at(fifo) is None  # never hangs on it


# -- the manifest's supervision field ---------------------------------------------------------

_BASE = Manifest(
    id="0123456789abcdef0123456789abcdef",
    name="web.s000001",
    created="2026-01-01T00:00:00.000000+00:00",
    host="vm",
    kernel="6.1",
    criu_version="4.2.1",
    cpu_flags=(),
    cmdline=("python3", "app.py"),
    pid=42,
    rss_bytes=8192,
    files=(FileEntry("pages-1.img", 8192, "a" * 64),),
)
_SPEC = {"name": "web", "command": ["python3", "app.py"], "keep": 3, "interval": 1.0}


def test_a_manifest_without_supervision_reads_and_writes_as_before() -> None:
    text = _BASE.to_json()
    assert "supervision" not in json.loads(text)
    assert Manifest.from_json(text).supervision is None


def test_supervision_round_trips() -> None:
    m = _BASE.evolve(supervision=_SPEC)
    back = Manifest.from_json(m.to_json())
    assert back.supervision == _SPEC
    assert back.to_json() == m.to_json()


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("web", "supervision is not an object"),
        ([_SPEC], "supervision is not an object"),
        ({"a": [[[1]]]}, "nested too deep"),
        ({"command": ["x" * 17000]}, "over 16384 bytes"),
    ],
)
def test_bad_supervision_is_refused_at_parse(value: object, why: str) -> None:
    doc = json.loads(_BASE.to_json())
    doc["supervision"] = value
    with pytest.raises(ImageError, match=why):
        Manifest.from_json(json.dumps(doc))
