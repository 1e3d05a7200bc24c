"""The pure parts of ``bench/bench_supervise.py``: what its published figures are computed from."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_supervise as bs


def test_losses_are_paired_with_the_same_rounds_unsupervised_window() -> None:
    tp = {
        bs.UNSUPERVISED: [bs.Window(1000.0, 0, []), bs.Window(500.0, 0, [])],
        "10s": [bs.Window(950.0, 6, [80.0]), bs.Window(490.0, 6, [81.0])],
    }
    assert bs.losses(tp, "10s") == pytest.approx([0.05, 0.02])


def test_ci_is_the_median_with_an_interval_around_it() -> None:
    m, lo, hi = bs.ci([3.0, 1.0, 2.0, 5.0, 4.0])
    assert m == 3.0
    assert 1.0 <= lo <= m <= hi <= 5.0
    assert bs.fmt_ci([0.05], scale=100.0, unit=" %") == "5.0 % [5.0, 5.0]"


def test_event_times_and_monotonic_readings_compare_on_one_clock() -> None:
    now_mono = time.monotonic()
    iso = bs.iso_utc(now_mono)
    assert len(iso) == 23  # the first 23 characters of an event's time: ms, no zone
    assert bs.event_wall({"time": iso + "Z"}) == pytest.approx(time.time(), abs=0.05)


def test_staging_dir_is_the_one_torpor_stages_in(
    torpor_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torpor import _paths
    from torpor._process import _topool

    monkeypatch.setattr(_topool, "_mem_available", lambda: 1 << 40)
    made = _topool.memory_staging(1 << 20, root=tmp_path)
    assert made is not None
    assert made.name == bs.staging_dir(_paths.home()).name
