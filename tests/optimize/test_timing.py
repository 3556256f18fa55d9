"""optimize.timing: the one timing loop, interleaved rounds, and how a Spread of rounds ranks two figures.

Synthetic samples throughout: what is asserted is the arithmetic and the order of calls, never a measured time.
"""

from __future__ import annotations

import time

import pytest

from optimize.timing import Spread, compare, cpu_facts, images_per_second, interleaved, isa_summary, time_runs


def test_spread_and_compare_rank_only_what_the_rounds_separate():
    fast, slow = Spread.of([10.0, 11.0, 12.0]), Spread.of([5.0, 6.0, 7.0])
    assert fast.median == 11.0 and fast.half_range == 1.0
    assert compare(fast, slow)["verdict"] == "faster" and compare(slow, fast)["verdict"] == "slower"
    ratio = compare(fast, slow)
    assert ratio["ratio"] == pytest.approx(11 / 6) and ratio["ratio_low"] == pytest.approx(10 / 7)
    assert ratio["ratio_high"] == pytest.approx(12 / 5)
    assert compare(Spread.of([10.0, 13.0]), Spread.of([12.0, 12.5]))["verdict"] == "within noise"


def test_ranges_that_only_touch_are_within_noise():
    """One round of each equal: neither beat the other in every round, so the run cannot rank them."""
    a, b = Spread.of([5.0, 6.0, 7.0]), Spread.of([7.0, 8.0, 9.0])
    assert a.overlaps(b) and b.overlaps(a)
    assert compare(b, a)["verdict"] == "within noise"
    assert not a.overlaps(Spread.of([7.3, 8.0]))  # 4% above a's best round
    assert a.overlaps(Spread.of([7.2, 8.0]))  # 3% above it: within the noise floor


def test_a_spread_is_median_low_high_of_its_rounds_and_round_trips():
    spread = Spread.of([3, 1, 2, 10])  # an even count: the median is the mean of the middle two
    assert (spread.median, spread.low, spread.high, spread.rounds) == (2.5, 1.0, 10.0, (3.0, 1.0, 2.0, 10.0))
    assert Spread.from_dict(spread.to_dict()) == spread
    with pytest.raises(ValueError, match="at least one value"):
        Spread.of([])


def test_a_ratio_against_a_zero_round_is_unbounded_not_an_error():
    ratio, low, high = Spread.of([2.0, 4.0]).ratio(Spread.of([0.0, 1.0]))
    assert ratio == pytest.approx(3.0 / 0.5) and low == pytest.approx(2.0) and high == float("inf")


def test_interleaved_rotates_the_order_each_round():
    calls = []
    interleaved({k: (lambda s, k=k: calls.append(k) or s) for k in "abc"}, rounds=3, seconds=0.01)
    assert calls == list("abc" + "bca" + "cab")


def test_interleaved_returns_each_keys_figures_in_round_order_and_reports_each_window():
    counter = iter(range(100))
    told = []
    figures = interleaved({"x": lambda s: (next(counter), s), "y": lambda s: (next(counter), s)}, rounds=3,
                          seconds=0.25, on_window=told.append)
    # round 0: x, y; round 1: y, x; round 2: x, y
    assert figures == {"x": [(0, 0.25), (3, 0.25), (4, 0.25)], "y": [(1, 0.25), (2, 0.25), (5, 0.25)]}
    assert told == ["x", "y", "y", "x", "x", "y"]


@pytest.mark.parametrize("rounds, seconds", [(0, 1.0), (3, 0.0), (3, -1.0)])
def test_interleaved_refuses_empty_measurements(rounds, seconds):
    with pytest.raises(ValueError, match="rounds must be >= 1 and seconds > 0"):
        interleaved({"a": lambda s: s}, rounds=rounds, seconds=seconds)


def test_time_runs_stops_the_clock_after_synchronize():
    """A run that only queues work (a CUDA stream) is timed until ``synchronize`` says the work is done."""
    calls = []
    times = time_runs(lambda: calls.append("run"), seconds=0.0, warmup=1, min_runs=3,
                      synchronize=lambda: calls.append("sync") or time.sleep(0.01))
    assert calls == ["run", "sync"] * 4 and len(times) == 3 and min(times) >= 0.01


def test_time_runs_times_at_least_min_runs_after_untimed_warmup():
    calls = []
    times = time_runs(lambda: calls.append(1), seconds=0.0, warmup=4, min_runs=5)
    assert len(times) == 5 and len(calls) == 9 and all(t >= 0 for t in times)


def test_images_per_second_counts_every_image_of_every_run():
    assert images_per_second([0.5, 0.25, 0.25], batch=8) == pytest.approx(24.0)


def test_isa_flags_are_read_for_x86_and_arm():
    x86 = cpu_facts("model name : Some CPU\nflags : fpu avx2 fma avx512f avx512_vnni\n", "x86_64")
    assert x86["cpu"] == "Some CPU" and x86["isa"] == ["avx2", "fma", "avx512f", "avx512_vnni"]
    assert "amx_int8" in x86["isa_missing"] and "(no avx_vnni" in isa_summary(x86)
    arm = cpu_facts("Features : fp asimd asimddp\n", "aarch64")
    assert arm["isa"] == ["asimd", "asimddp"] and "i8mm" in arm["isa_missing"]


def test_isa_summary_without_flags_says_what_is_missing():
    assert isa_summary(cpu_facts("model name : Old CPU\n", "x86_64")).startswith("none of avx2, fma")
    assert isa_summary({}) == "unknown"
