"""Tables show what comes from outside (command lines, names, paths) without letting it drive
the terminal."""

from __future__ import annotations

from torpor._cli._app import format_table


def test_control_characters_in_cells_are_shown_escaped() -> None:
    out = format_table(
        ["NAME", "COMMAND"], [["web", "sleep 1 \x1b[31mRED"], ["x\ty", "a\u2028b\n"]]
    )
    assert out.split("\n") == [
        "NAME  COMMAND",
        "web   sleep 1 \\x1b[31mRED",
        "x\\ty  a\\u2028b\\n",
    ]
    assert all(line.isprintable() for line in out.split("\n"))


def test_printable_cells_are_unchanged() -> None:
    assert format_table(["A", "B"], [["café", None], ["1", "2"]]).split("\n") == [
        "A     B",
        "café",
        "1     2",
    ]
