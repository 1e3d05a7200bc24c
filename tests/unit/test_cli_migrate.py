"""``torpor migrate``'s human summary line: what it says of a copy-mode move, with and without
a base image on the target (``bytes_sent`` and ``bytes_from_base`` of the ``--json`` summary)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from torpor._cli import main
from torpor._cli._migrate import summary_line
from torpor._migrate import _copy
from torpor._migrate._copy import Summary

PLAIN = Summary(
    name="web",
    mode="copy",
    source_pid=26045,
    target="10.0.0.3:7070",
    target_pid=26249,
    downtime_ms=220.4,
    frozen_ms=226.0,
    transfer_ms=62.0,
    restore_ms=154.0,
    bytes=9434653,
    files=13,
    total_ms=480.0,
    addresses=("10.0.0.100/24",),
    tcp_connections=1,
    fenced=True,
    bytes_sent=9434653,
    bytes_from_base=0,
)
# The 100 MiB app of docs/migration.md, restored from an image the target holds.
BASED = dataclasses.replace(
    PLAIN, bytes=108_036_096, bytes_sent=36_864, bytes_from_base=108_000_000, addresses=()
)


def test_without_a_base_the_line_is_unchanged() -> None:
    assert summary_line(PLAIN) == (
        "migrated web to 10.0.0.3:7070: pid 26045 -> 26249 there; downtime 220 ms, CRIU frozen "
        "226 ms (transfer 62 ms, restore 154 ms); 9434653 bytes in 13 files; total 480 ms; "
        "1 TCP connection(s) kept; moved 10.0.0.100/24"
    )


def test_with_a_base_it_says_what_crossed_and_what_the_target_copied() -> None:
    assert summary_line(BASED) == (
        "migrated web to 10.0.0.3:7070: pid 26045 -> 26249 there; downtime 220 ms, CRIU frozen "
        "226 ms (transfer 62 ms, restore 154 ms); 108036096 bytes in 13 files (36.0 KiB sent, "
        "103.0 MiB from a base image on the target); total 480 ms; 1 TCP connection(s) kept"
    )


@pytest.mark.parametrize(
    "counts",
    [{"bytes_sent": None, "bytes_from_base": None}, {"bytes_sent": 5, "bytes_from_base": 0}],
    ids=["a mode that does not count", "copy mode, nothing from a base"],
)
def test_no_base_part_when_nothing_came_from_one(counts: dict[str, Any]) -> None:
    line = summary_line(dataclasses.replace(BASED, **counts))
    assert "base" not in line and "sent" not in line
    assert "108036096 bytes in 13 files; total 480 ms" in line


@pytest.fixture
def fake_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """``torpor migrate`` run through ``main`` against a copy mode that returns ``BASED``."""
    monkeypatch.setenv("TORPOR_HOME", str(tmp_path / "home"))
    calls: list[tuple[Any, ...]] = []

    def migrate_copy(name: str, host: str, port: int, **kw: Any) -> Summary:
        calls.append((name, host, port))
        return BASED

    monkeypatch.setattr(_copy, "migrate_copy", migrate_copy)
    return calls


def test_the_command_prints_the_line(
    fake_copy: list[tuple[Any, ...]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "web", "--to", "10.0.0.3:7070"]) == 0
    out, _ = capsys.readouterr()
    assert out == summary_line(BASED) + "\n"
    assert fake_copy == [("web", "10.0.0.3", 7070)]


def test_json_keeps_the_counts(
    fake_copy: list[tuple[Any, ...]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "web", "--to", "10.0.0.3:7070", "--json"]) == 0
    out, _ = capsys.readouterr()
    data = json.loads(out)
    assert (data["bytes_sent"], data["bytes_from_base"]) == (36_864, 108_000_000)


def test_a_targets_words_cannot_drive_the_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A target's refusal reaches the operator's terminal escaped: an escape sequence in it
    (erase the line, fake a success) is printed as text, on the one error line."""
    monkeypatch.setenv("TORPOR_HOME", str(tmp_path / "home"))
    forged = "\x1b[2K\r\x1b[1A\x1b[2Kmigrated web to b:7070 in 85 ms\x1b[8m"

    class FakeConn:
        def send(self, msg: dict[str, Any]) -> None:
            pass

        def recv(self) -> dict[str, Any]:
            return {"type": "refused", "problems": [forged]}

    def migrate_copy(name: str, host: str, port: int, **kw: Any) -> Summary:
        _copy.preflight(FakeConn(), {}, name=name, where=f"{host}:{port}", pid=1)  # type: ignore[arg-type]
        raise AssertionError("the refusal was not raised")

    monkeypatch.setattr(_copy, "migrate_copy", migrate_copy)
    assert main(["migrate", "web", "--to", "10.0.0.3:7070"]) != 0
    _, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) >= 1 and all(c == "\n" or c.isprintable() for c in err)
    assert "\\x1b[2K\\r\\x1b[1A\\x1b[2Kmigrated web to b:7070 in 85 ms\\x1b[8m" in lines[0]
