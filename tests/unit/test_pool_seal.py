"""A manifest's ``stored_bytes`` counts the manifest itself (``PoolWriter._seal``), even when the
compressed encoding's length swings as the number changes (seen: one CI run stored 1862 bytes
for a record saying 1864)."""

from __future__ import annotations

from dataclasses import dataclass

from torpor._pools._write import PoolWriter


@dataclass(frozen=True)
class Swinging:
    """An encoding 100 bytes long for odd numbers and 101 for even ones, but 105 at 105: the
    plain iteration 0 -> 100 -> 101 -> 100 ... never settles."""

    stored_bytes: int = 0

    def encode(self) -> bytes:
        n = self.stored_bytes
        return b"x" * (105 if n == 105 else 100 if n % 2 else 101)


def test_a_swinging_length_still_finds_a_number_that_counts_itself() -> None:
    rec, blob = PoolWriter._seal(None, Swinging(), 0)  # type: ignore[arg-type]
    assert (rec.stored_bytes, len(blob)) == (105, 105)


def test_stored_bytes_adds_what_was_stored_before() -> None:
    @dataclass(frozen=True)
    class Plain:
        stored_bytes: int = 0

        def encode(self) -> bytes:
            return str(self.stored_bytes).encode().rjust(50, b"-")

    rec, blob = PoolWriter._seal(None, Plain(), 1000)  # type: ignore[arg-type]
    assert rec.stored_bytes == 1000 + len(blob) == 1050
