"""What the benchmark makes of its timings (optimize/benchmark/measure.py): latency percentiles and speedups against
the baseline, on figures made by hand. The timing itself runs in test_report.py's CLI runs."""

from __future__ import annotations

import pytest

from optimize.benchmark.measure import Row, add_speedups, percentiles_ms
from optimize.timing import Spread


def _row(name: str, role: str, **img_s: float) -> Row:
    """A row timed at each ``b<N>=img/s`` batch size, give or take 1 % over three rounds."""
    r = Row(name=name, path=name, role=role, backend="onnxruntime")
    for batch, value in img_s.items():
        r.throughput[batch[1:]] = value
        r.throughput_spread[batch[1:]] = Spread.of([value * 0.99, value, value * 1.01]).to_dict()
    return r


def test_percentiles_are_milliseconds_over_every_run():
    times = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms
    p = percentiles_ms(times)
    assert p["runs"] == 100 and p["mean"] == pytest.approx(50.5)
    assert p["p50"] == pytest.approx(50.5) and p["p90"] == pytest.approx(90.1) and p["p99"] == pytest.approx(99.01)


def test_speedups_are_against_the_baseline_at_the_same_batch_with_a_verdict():
    base = _row("base", "baseline", b1=100.0, b8=400.0)
    fast, twin = _row("fast", "model", b1=1000.0, b8=4000.0), _row("twin", "model", b1=101.0)
    lone = _row("lone", "model", b32=50.0)  # a batch size the baseline was not timed at
    add_speedups([base, fast, twin, lone], base)
    assert base.speedup == {"1": pytest.approx(1.0), "8": pytest.approx(1.0)}
    assert base.speedup_verdict == {"1": "baseline", "8": "baseline"}
    assert fast.speedup["8"] == pytest.approx(10.0) and fast.speedup_verdict == {"1": "faster", "8": "faster"}
    low, high = fast.speedup_range["8"]
    assert low < 10.0 < high  # the ratio's range over the rounds holds the median ratio
    assert twin.speedup_verdict == {"1": "within noise"}  # 1 % apart, ranges overlapping
    assert lone.speedup == {} and lone.speedup_verdict == {}
