"""The demo's lazy row against real CRIU: one copy restored with post-copy memory answers with
the original's state, becomes fully resident, and the demo leaves no lazy record behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from torpor._demo import _runner

pytestmark = pytest.mark.criu


def test_lazy_row_answers_with_the_original_state(torpor_home: Path) -> None:
    result = _runner.run_demo(rows=100_000)

    assert result.lazy_carries_on is True
    assert result.lazy_seconds is not None and result.lazy_seconds > 0
    # Fully resident is measured from the same start, and comes after the first answer's
    # restore began; it is recorded by the keeper once every page has moved.
    assert result.lazy_resident_seconds is not None
    assert result.lazy_resident_seconds > 0
    assert result.state_continued
    assert list((torpor_home / "lazy").glob("*.json")) == []
    assert result.to_json()["lazy_speedup"] == round(result.cold_seconds / result.lazy_seconds, 2)


def test_no_lazy_row_when_not_asked(torpor_home: Path) -> None:
    result = _runner.run_demo(rows=100_000, lazy=False)

    assert (result.lazy_seconds, result.lazy_resident_seconds, result.lazy_carries_on) == (
        None,
        None,
        None,
    )
    assert "lazy_speedup" not in result.to_json()
    assert result.state_continued
