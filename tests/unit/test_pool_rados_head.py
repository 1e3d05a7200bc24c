"""The ``ceph`` driver's stripe manifest (the head object of a striped value) is hostile
input: anything but the fields a put writes, each of its type, is a corrupted manifest (one
:class:`PoolError`), never another exception. No cluster needed: the parser is pure."""

from __future__ import annotations

import pytest

from torpor._errors import PoolError
from torpor._pools._rados import _MAGIC, _Manifest

GOOD = {"size": 10 << 20, "part_size": 4 << 20, "parts": 3, "gen": "0123456789abcdef"}


def _head(body: str) -> bytes:
    return _MAGIC + body.encode()


def test_a_manifest_a_put_writes_is_read_back() -> None:
    m = _Manifest(10 << 20, 4 << 20, 3, "0123456789abcdef")
    assert _Manifest.decode(m.encode(), "k") == m
    assert _Manifest.decode(b"plain value", "k") is None


@pytest.mark.parametrize(
    "body",
    [
        "[" * 100_000,  # RecursionError in json
        '{"size": Infinity, "part_size": 4194304, "parts": 3, "gen": "ab"}',  # OverflowError
        '{"size": NaN, "part_size": 4194304, "parts": 3, "gen": "ab"}',
        '{"size": 10.5, "part_size": 4194304, "parts": 3, "gen": "ab"}',
        '{"size": "10", "part_size": 4194304, "parts": 3, "gen": "ab"}',
        '{"size": true, "part_size": 1, "parts": 1, "gen": "ab"}',
        '{"size": 1, "part_size": 4194304.0, "parts": 1, "gen": "ab"}',
        '{"size": 1, "part_size": 4194304, "parts": 1.0, "gen": "ab"}',
        '{"size": 1, "part_size": 4194304, "parts": 1, "gen": 7}',
        '{"size": 1, "part_size": 4194304, "parts": 1, "gen": "../x"}',
        '{"size": 1, "part_size": 4194304, "parts": 1}',
        "[1, 2]",
        "not json",
    ],
    ids=[
        "deep",
        "infinity",
        "nan",
        "float",
        "string",
        "bool",
        "float-part",
        "float-parts",
        "gen-int",
        "gen-path",
        "no-gen",
        "list",
        "text",
    ],
)
def test_a_hostile_head_is_a_corrupted_manifest(body: str) -> None:
    with pytest.raises(PoolError) as info:
        _Manifest.decode(_head(body), "packs/ab/x")
    assert str(info.value) == "key 'packs/ab/x' has a corrupted stripe manifest"
