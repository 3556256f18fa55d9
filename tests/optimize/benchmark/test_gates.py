"""The benchmark's rules (optimize/benchmark/gates.py), on rows made by hand: the Pareto front, the final artifact,
the verdicts against the user's budgets, and "the fastest within the budget, ties within noise" (one rule for the
report's final artifact and search's trial)."""

from __future__ import annotations

import numpy as np
import pytest

from optimize.benchmark import gates
from optimize.benchmark.gates import Contender, fastest_within_budget, pareto_front
from optimize.benchmark.measure import Row, add_speedups
from optimize.configs import BenchmarkConfig
from optimize.timing import Spread


def test_pareto_front_marks_undominated_points():
    assert pareto_front([(1.0, 0.9), (2.0, 0.8), (0.5, 0.85), (2.0, 0.9)]) == [False, False, False, True]
    assert pareto_front([(1.0, 0.9), (2.0, 0.8)]) == [True, True]
    assert not np.any(pareto_front([(1.0, 0.5), (1.0, 0.6)])[:1])


def test_verdicts_read_the_budgets_from_the_options(tmp_path):
    """The final artifact and the verdict move with --min-speedup and --max-accuracy-drop, nothing else."""

    def row(name, role, top1, img_s):
        r = Row(name=name, path=name, role=role, backend="onnxruntime", top1=top1)
        r.throughput["8"] = img_s
        r.throughput_spread["8"] = Spread.of([img_s * 0.99, img_s, img_s * 1.01]).to_dict()
        return r

    def judge(**budgets):
        rows = [row("base", "baseline", 0.90, 100.0), row("fast", "model", 0.88, 1000.0),
                row("ok", "model", 0.895, 500.0)]
        add_speedups(rows, rows[0])
        cfg = BenchmarkConfig(models=("fast", "ok"), baseline="base", out=str(tmp_path), batch_sizes=(8,), **budgets)
        return gates.judge(rows, rows[0], cfg)

    loose = judge(max_accuracy_drop=3.0, min_speedup=20.0)
    assert loose["final"]["artifact"] == "fast" and loose["verdicts"][0]["met"] is False  # 10x < 20x
    assert "20x" in loose["verdicts"][0]["verdict"]
    strict = judge(max_accuracy_drop=1.0, min_speedup=4.0)
    assert strict["final"]["artifact"] == "ok" and strict["verdicts"][0]["met"] is True  # 5x, 0.5 pt


def _contender(name: str, top1: float | None, img_s: float) -> Contender:
    """``img_s`` give or take 1 % over three rounds: ranges of two contenders 1 % apart overlap."""
    return Contender(name, top1, img_s, Spread.of([img_s * 0.99, img_s, img_s * 1.01]))


def _picks(contenders: list[Contender], base_top1: float = 0.90, budget: float = 1.0) -> dict[str, str]:
    """What each tie-break chooses (baseline at 90 %, a 1-pt budget unless told)."""
    return {ties: fastest_within_budget(contenders, base_top1, budget, ties=ties).chosen.item
            for ties in ("fastest", "accurate-within-noise", "accurate")}


def test_the_fastest_over_the_budget_is_passed_over():
    over, edge, slow = _contender("over", 0.885, 2000.0), _contender("edge", 0.89, 1000.0), _contender(
        "slow", 0.899, 500.0)
    pick = fastest_within_budget([over, edge, slow], 0.90, 1.0, ties="fastest")
    # 1.5 pt lost: out, however fast; exactly 1.00 pt lost (89 of 100 against 90): within
    assert pick.within and pick.ranked == [edge, slow] and pick.fastest is edge
    assert _picks([over, edge, slow]) == {"fastest": "edge", "accurate-within-noise": "edge", "accurate": "slow"}
    assert _picks([over, edge, slow], budget=2.0)["fastest"] == "over"  # the budget is the user's, nothing else


def test_a_lead_within_noise_goes_to_the_more_accurate_only_when_asked():
    lead, close, far = _contender("lead", 0.892, 1000.0), _contender("close", 0.898, 995.0), _contender(
        "far", 0.899, 800.0)
    assert _picks([lead, close, far]) == {"fastest": "lead", "accurate-within-noise": "close", "accurate": "far"}
    apart = _contender("apart", 0.898, 900.0)  # 891-909 img/s against 990-1010: the rounds tell them apart
    assert _picks([lead, apart])["accurate-within-noise"] == "lead"
    # the callers' order decides nothing but exact ties
    assert _picks([far, close, lead]) == _picks([lead, close, far])


def test_none_within_the_budget_names_the_most_accurate():
    fast, accurate = _contender("fast", 0.85, 2000.0), _contender("accurate", 0.87, 500.0)
    for ties in ("fastest", "accurate-within-noise", "accurate"):
        pick = fastest_within_budget([fast, accurate], 0.90, 1.0, ties=ties)
        assert not pick.within and pick.chosen is accurate and pick.ranked == [] and pick.fastest is None
    assert fastest_within_budget([], 0.90, 1.0) is None
    # no accuracy figure (a speed-only run) is never over the budget
    assert _picks([_contender("random-inputs", None, 10.0), fast])["fastest"] == "random-inputs"
    with pytest.raises(ValueError, match="ties"):
        fastest_within_budget([fast], 0.90, 1.0, ties="slowest")


def test_final_artifact_is_the_fastest_even_when_a_more_accurate_one_is_within_noise(tmp_path):
    """The report keeps the median's winner and says the runner-up is within noise (search would take the other)."""

    def row(name, role, top1, img_s, device="cpu"):
        r = Row(name=name, path=name, role=role, backend="onnxruntime", top1=top1, device=device)
        r.throughput["8"] = img_s
        r.throughput_spread["8"] = Spread.of([img_s * 0.99, img_s, img_s * 1.01]).to_dict()
        return r

    base = row("base", "baseline", 0.90, 100.0)
    rows = [base, row("over", "model", 0.885, 2000.0), row("lead", "model", 0.892, 1000.0),
            row("close", "model", 0.898, 995.0), row("gpu", "model", 0.9, 9000.0, device="cuda")]
    cfg = BenchmarkConfig(models=("over", "lead", "close"), baseline="base", out=str(tmp_path), batch_sizes=(8,))
    final = gates.final_artifact(rows, base, cfg)
    assert final["artifact"] == "lead" and final["runner_up"] == "close"  # "over" is out, "gpu" another device
    assert final["vs_runner_up_verdict"] == "within noise" and final["vs_runner_up"] == pytest.approx(1000 / 995)
    assert final["why"] == "the fastest at batch 8 within 1 pt of base's top-1"
    none = gates.final_artifact([base, row("over", "model", 0.885, 2000.0), row("worse", "model", 0.86, 3000.0)],
                                base, cfg)
    assert none == {"artifact": "over", "why": "none keeps within 1 pt of base: the most accurate",
                    "runner_up": None}
