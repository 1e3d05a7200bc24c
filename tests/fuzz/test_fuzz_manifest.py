"""Fuzzing the image manifest parser (``torpor.json``): random bytes, random JSON, a valid
manifest with hostile values, nesting past the recursion limit. Every input gives a
:class:`~torpor.Manifest` or a :class:`~torpor.TorporError`, in bounded time; a manifest that
parses is one torpor can use (it serialises again to itself, its sizes add up)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from torpor._images._manifest import FileEntry, Manifest

from .support import DEEP_JSON, JSON_VALUES, bounded, dumps, mutated_json, verdict


def valid_manifest() -> dict[str, Any]:
    """A manifest as torpor writes it, as a JSON document."""
    m = Manifest(
        id="0123456789abcdef0123456789abcdef",
        name="web",
        created="2026-01-01T00:00:00.000000+00:00",
        host="vm",
        kernel="6.1",
        criu_version="4.2.1",
        cpu_flags=("sse2",),
        cmdline=("python3", "app.py"),
        pid=4242,
        rss_bytes=8192,
        files=(
            FileEntry("core-1.img", 1200, "b" * 64),
            FileEntry("pages-1.img", 8192, "a" * 64),
        ),
        labels={"team": "x"},
    )
    doc: dict[str, Any] = json.loads(m.to_json())
    return doc


VALID = valid_manifest()


def check_parsed(text: bytes) -> None:
    with bounded():
        got = verdict(lambda: Manifest.from_json(text, source="fuzz/torpor.json"))
    if isinstance(got, Manifest):
        # What torpor does with every manifest it reads: show it, sum it, write it again.
        assert isinstance(got.total_bytes, int)
        again = Manifest.from_json(got.to_json())
        assert again == got


def test_the_valid_manifest_parses() -> None:
    m = Manifest.from_json(dumps(VALID))
    assert m.name == "web" and [f.name for f in m.files] == ["core-1.img", "pages-1.img"]


@pytest.mark.parametrize("text", DEEP_JSON, ids=["array", "object"])
def test_nesting_deeper_than_the_recursion_limit(text: bytes) -> None:
    check_parsed(text)


@given(st.binary(max_size=512))
@example(b"\xff\xfe")
@example(b'"\\ud800"')
def test_random_bytes(text: bytes) -> None:
    check_parsed(text)


@given(JSON_VALUES)
def test_random_json(doc: Any) -> None:
    check_parsed(dumps(doc))


@given(mutated_json(VALID))
@example({**VALID, "files": []})
@example({**VALID, "files": [{"name": "../x", "size": 1, "sha256": "a" * 64}]})
@example({**VALID, "files": [{"name": "x", "size": "1", "sha256": "a" * 64}]})
@example({**VALID, "files": [{"name": "x", "size": -1, "sha256": "a" * 64}]})
@example({**VALID, "files": [{"name": 5, "size": 1, "sha256": None}]})
@example({**VALID, "files": {"name": "x"}})
@example({**VALID, "labels": ["a"]})
@example({**VALID, "cmdline": "rm -rf /"})
@example({**VALID, "format": 1e400})
@example({**VALID, "format": "NaN"})
@example({**VALID, "id": "../../x"})
@example({**VALID, "pid": "1"})
@example({**VALID, "unknown": 1})
def test_a_valid_manifest_with_hostile_values(doc: Any) -> None:
    check_parsed(dumps(doc))
