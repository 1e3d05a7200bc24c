"""The pure parts of ``bench/bench_migrate.py``: what its published figures are computed from."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_migrate as bm
import migrate_report as mr

A, B = "10.231.7.1", "10.231.7.2"


def beats(start: float, stop: float, sender: str, every: float = 0.001) -> list[tuple[float, str]]:
    n = round((stop - start) / every)
    return [(start + i * every, sender) for i in range(n)]


def test_downtime_is_the_longest_gap_across_the_move_and_total_ends_at_bs_first_sign() -> None:
    t0 = 100.0
    arrivals = beats(99.5, 100.2, A) + beats(100.6, 101.0, B)
    s = mr.seen(arrivals, t0, A, B)
    assert s.downtime == pytest.approx(0.401, abs=1e-6)  # from a's last beat to b's first
    assert s.gap_at == pytest.approx(0.199, abs=1e-6)
    assert s.total == pytest.approx(0.6, abs=1e-6)
    assert s.baseline_gap == pytest.approx(0.001, abs=1e-6)
    assert s.from_source_after == 0


def test_a_gap_before_the_move_is_noise_not_downtime() -> None:
    arrivals = beats(99.0, 99.4, A) + beats(99.5, 100.05, A) + beats(100.1, 100.5, B)
    s = mr.seen(arrivals, 100.0, A, B)
    assert s.baseline_gap == pytest.approx(0.101, abs=1e-6)  # 99.399 -> 99.5
    assert s.downtime == pytest.approx(0.051, abs=1e-6)  # 100.049 -> 100.1


def test_the_source_answering_after_the_target_is_counted() -> None:
    arrivals = [*beats(99.5, 100.0, A), (100.3, B), (100.31, A), (100.32, B)]
    assert mr.seen(arrivals, 100.0, A, B).from_source_after == 1


def test_no_sign_of_life_from_the_target_is_an_error() -> None:
    with pytest.raises(RuntimeError, match=r"0 from 10\.231\.7\.2 after it"):
        mr.seen(beats(99.5, 101.0, A), 100.0, A, B)


def sample(variant: str, rnd: int, downtime: float, total: float, size: int = 1 << 30) -> mr.Sample:
    return mr.Sample(variant, size, rnd, downtime, total, total, 0.002, 0.0)


def test_ratios_pair_each_run_with_the_bare_run_of_its_own_round() -> None:
    samples = [
        sample("criu copy", 0, 1.0, 2.0),
        sample("torpor copy", 0, 1.2, 3.0),
        sample("torpor copy", 1, 5.0, 5.0),  # round 1's bare run failed: no pair
        sample("criu copy", 2, 2.0, 4.0),
        sample("torpor copy", 2, 2.0, 4.4),
    ]
    assert mr.ratios(samples, "torpor copy", "downtime") == pytest.approx([1.2, 1.0])
    assert mr.ratios(samples, "torpor copy", "total") == pytest.approx([1.5, 1.1])


def test_targets_say_met_or_not_met() -> None:
    samples = [
        sample("criu copy", 0, 1.0, 2.0),
        sample("torpor copy", 0, 1.05, 2.4),
        sample("torpor lazy", 0, 0.2, 0.5),
    ]
    text = mr.targets(samples, [1 << 30])
    lines = text.splitlines()
    assert "- lazy downtime ≤ 150 ms at 1024 MiB, client's gap: 200 ms (1 runs) — **NOT met**" in (
        lines
    )
    assert any(x.startswith("- copy ≤ 1.1x bare CRIU, downtime, 1024 MiB: 1.05x") for x in lines)
    assert any(x.endswith("— **met**") and ", downtime," in x for x in lines)
    assert any(x.endswith("— **NOT met**") and ", total," in x for x in lines)


def test_a_variant_that_is_not_built_gets_a_row_saying_so() -> None:
    samples = [sample("criu copy", 0, 1.0, 2.0)]
    text = mr.table(1 << 30, samples, {"torpor lazy": "torpor: error: --mode lazy is not built"})
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows["| torpor lazy"].startswith(
        "| torpor lazy | 0 | not built: `torpor: error: --mode lazy is not built`"
    )
    assert rows["| torpor pool"].startswith("| torpor pool | 0 | not run")
    assert rows["| criu copy"].startswith(
        "| criu copy | 1 | 1000 [1000, 1000] | — | 2.00 [2.00, 2.00]"
    )


def test_rounds_per_size_and_quick_mode() -> None:
    args = bm.parse_args(["--sizes", "100M,1G", "--rounds", "5,3"])
    assert (args.size_list, args.reps) == ([100 << 20, 1 << 30], [5, 3])
    assert bm.parse_args(["--rounds", "2"]).reps == [2, 2]
    quick = bm.parse_args(["--quick"])
    assert (quick.size_list, quick.reps, quick.no_warmup) == ([64 << 20], [1], True)
    with pytest.raises(SystemExit):
        bm.parse_args(["--variants", "torpor copy,criu teleport"])


def test_where_the_time_went_uses_each_sides_own_steps() -> None:
    bare = sample("criu lazy", 0, 0.3, 0.5)
    bare.steps = {"send_start": 10.0, "send_dumped": 10.2, "recv_received": 10.25,
                  "recv_restored": 10.4, "recv_resident": 13.0}  # fmt: skip
    mine = sample("torpor copy", 0, 2.0, 3.0)
    mine.summary = {"transfer_ms": 1500.0, "restore_ms": 400.0}
    rows = {
        line.split(" | ")[0]: line
        for line in mr.breakdown(1 << 30, [bare, mine]).splitlines()
        if line.startswith("| ")
    }
    assert rows["| criu lazy"] == "| criu lazy | 0.200 | 0.250 | 0.150 | 3.000 |"
    assert rows["| torpor copy"] == "| torpor copy | — | 1.500 | 0.400 | — |"
