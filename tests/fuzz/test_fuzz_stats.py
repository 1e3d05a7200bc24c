"""Fuzzing CRIU's ``stats-dump`` parser (``_images._stats``): random bytes, and a real file with
bytes flipped, cut or inserted. Every input gives :class:`DumpStats` or None (the strict
parser: :class:`StatsError`), never another exception, in bounded time; what parses has
every value in its protobuf type's range."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from torpor._images._stats import DumpStats, StatsError, parse_dump_stats, parse_dump_stats_strict

from .support import bounded

REAL = bytes.fromhex(
    "4059105506330957290000000a2708c20110a2fe3418bbfe2b20b78c2728b2de04300038fbdd0440004800"
    "50085808600068007000"
)


def _check(data: bytes) -> None:
    with bounded():
        got = parse_dump_stats(data)
        try:
            strict: DumpStats | None = parse_dump_stats_strict(data)
        except StatsError:
            strict = None
    assert got == strict
    if got is not None:
        assert 0 <= got.frozen_us < 1 << 32 and 0 <= got.pages_written < 1 << 64


@given(st.binary(max_size=5000))
@example(REAL)
@example(b"")
def test_random_bytes(data: bytes) -> None:
    _check(data)


@given(
    st.lists(
        st.tuples(st.integers(0, len(REAL) - 1), st.integers(0, 255), st.sampled_from("fcid")),
        max_size=4,
    )
)
def test_a_real_file_mutated(edits: list[tuple[int, int, str]]) -> None:
    data = bytearray(REAL)
    for pos, byte, kind in edits:
        pos = min(pos, len(data) - 1) if data else 0
        if kind == "f" and data:
            data[pos] = byte
        elif kind == "c":
            del data[pos:]
        elif kind == "i":
            data.insert(pos, byte)
        elif data:
            del data[pos]
    _check(bytes(data))
