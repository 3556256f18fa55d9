"""benchmark: a tiny checkpoint and its ONNX export on a val slice, through the CLI as a user runs it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from optimize.benchmark import gates
from optimize.benchmark.gates import Contender, fastest_within_budget
from optimize.benchmark.report import onnx_graph_stats, pareto_front
from conftest import error_line, run_cli
from optimize.timing import NOISE_FLOOR, Spread


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, trained, exported_onnx):
    out = tmp_path_factory.mktemp("bench") / "report"
    run_cli("-q", "benchmark", "--baseline", trained, "--models", exported_onnx, "--val-limit", "128",
            "--batch-sizes", "1", "4", "--rounds", "3", "--seconds", "0.05", "--warmup", "1", "--threads", "2",
            "--min-speedup", "0.5", "--out", out, check=True)
    return out


def test_report_holds_every_figure(report_dir, trained, exported_onnx):
    report = json.loads((report_dir / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    base, onnx_row = rows[trained.name], rows[exported_onnx.name]
    assert base["role"] == "baseline" and base["backend"] == "torch" and onnx_row["backend"] == "onnxruntime"
    for row in (base, onnx_row):
        assert row["precision"] == "fp32" and row["file_bytes"] > 0 and row["val_images"] == 128
        assert row["params"] > 1e6 and row["macs"] > 1e6 and 0 <= row["sparsity"] < 0.01
        assert 0 <= row["top1"] <= row["top5"] <= 1
        assert set(row["throughput"]) == {"1", "4"} and all(v > 0 for v in row["throughput"].values())
        for b, spread in row["throughput_spread"].items():  # the median of 3 rounds, inside their range
            assert len(spread["rounds"]) == 3 and spread["low"] <= row["throughput"][b] <= spread["high"]
            assert sorted(spread["rounds"])[1] == pytest.approx(row["throughput"][b])
        assert row["latency_ms_b1"]["p50"] <= row["latency_ms_b1"]["p90"] <= row["latency_ms_b1"]["p99"]
        assert row["e2e_img_per_s"] > 0
    assert base["speedup"]["4"] == pytest.approx(1.0)
    assert base["agreement"] == 1.0
    # the export was verified against PyTorch: the same predictions, the same counts (BN folded into the convs)
    assert onnx_row["agreement"] > 0.98 and abs(onnx_row["top1"] - base["top1"]) < 0.02
    assert onnx_row["macs"] == pytest.approx(base["macs"], rel=0.02)
    assert onnx_row["params"] == pytest.approx(base["params"], rel=0.02)
    env = report["environment"]
    assert env["threads"] == 2 and env["cpu"] and set(env["isa"]) | set(env["isa_missing"]) >= {"avx2", "avx512_vnni"}
    assert any(r["pareto"] for r in report["rows"])
    # the one candidate is the final artifact; the verdict reads the user's budgets
    assert report["final"]["artifact"] == exported_onnx.name
    verdict = report["verdicts"][0]
    assert verdict["artifact"] == exported_onnx.name and "0.5x" in verdict["verdict"] and "1 pt" in verdict["verdict"]
    assert verdict["met"] == (verdict["speedup"] >= 0.5 and verdict["drop_pt"] <= 1.0)


def test_report_markdown_and_plots_are_written(report_dir, exported_onnx):
    md = (report_dir / "report.md").read_text()
    assert exported_onnx.name in md and "| model |" in md and "## Environment" in md and "## Verdicts" in md
    assert "instruction sets: " in md and " ±" in md and "3 rounds" in md
    # the final CPU artifact's per-class figures, from the same predictions as its top-1
    report = json.loads((report_dir / "report.json").read_text())
    final = next(r for r in report["rows"] if r["name"] == exported_onnx.name)["classification"]
    supports = [k["support"] for k in final["per_class"].values()]
    recall = sum(k["recall"] * k["support"] for k in final["per_class"].values()) / sum(supports)
    assert sum(supports) == 128 and recall == pytest.approx(
        next(r for r in report["rows"] if r["name"] == exported_onnx.name)["top1"])
    assert f"## Per-class metrics of the final artifact ({exported_onnx.name})" in md
    assert "| Ankle boot |" in md and f"F1 {final['macro_f1']:.2%}" in md
    for png in ("accuracy_vs_throughput.png", "latency_vs_batch.png"):
        data = (report_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_speed_only_run_at_another_input_size(tmp_path, trained, exported_onnx):
    out = tmp_path / "r32"
    run_cli("-q", "benchmark", "--baseline", trained, "--models", exported_onnx, "--input-size", "32",
            "--batch-sizes", "2", "--rounds", "2", "--seconds", "0.05", "--warmup", "0", "--out", out, check=True)
    report = json.loads((out / "report.json").read_text())
    assert [r["input_size"] for r in report["rows"]] == [32, 32]
    assert all(r["top1"] is None and r["throughput"]["2"] > 0 for r in report["rows"])
    # MACs are counted at the new size: the resized ONNX graph agrees with Torch-Pruning's count at 32 px
    assert report["rows"][1]["macs"] == pytest.approx(report["rows"][0]["macs"], rel=0.02)
    assert report["rows"][1]["macs"] > 2 * onnx_graph_stats(exported_onnx)["macs"]
    assert "speed only" in (out / "report.md").read_text()


def test_missing_model_is_one_line_error(tmp_path, trained):
    proc = run_cli("benchmark", "--baseline", trained, "--models", tmp_path / "nope.onnx", "--out", tmp_path / "r")
    assert proc.returncode == 2 and "nope.onnx does not exist" in error_line(proc)
    assert not (tmp_path / "r" / "report.json").exists()


def test_pareto_front_marks_undominated_points():
    assert pareto_front([(1.0, 0.9), (2.0, 0.8), (0.5, 0.85), (2.0, 0.9)]) == [False, False, False, True]
    assert pareto_front([(1.0, 0.9), (2.0, 0.8)]) == [True, True]
    assert not np.any(pareto_front([(1.0, 0.5), (1.0, 0.6)])[:1])


def test_two_identical_models_are_within_noise(tmp_path, exported_onnx):
    """The same bytes under two names: the report does not rank them (their sessions may still differ by a percent or
    two in every round: within the noise floor), and says so."""
    twin = tmp_path / "twin.onnx"
    shutil.copyfile(exported_onnx, twin)
    out = tmp_path / "r"
    run_cli("-q", "benchmark", "--baseline", exported_onnx, "--models", twin, "--val-limit", "64", "--batch-sizes",
            "8", "--rounds", "7", "--seconds", "0.05", "--warmup", "1", "--out", out, check=True)
    report = json.loads((out / "report.json").read_text())
    row = next(r for r in report["rows"] if r["name"] == "twin.onnx")
    assert abs(row["speedup"]["8"] - 1.0) < NOISE_FLOOR and row["speedup_verdict"]["8"] == "within noise"
    assert "*within noise*" in (out / "report.md").read_text()


def test_verdicts_read_the_budgets_from_the_options(tmp_path):
    """The final artifact and the verdict move with --min-speedup and --max-accuracy-drop, nothing else."""
    from optimize.benchmark import gates
    from optimize.benchmark.measure import Row, add_speedups
    from optimize.configs import BenchmarkConfig

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



# -- "the fastest within the budget, ties within noise": one rule for the report's final artifact and search's trial

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
    from optimize.benchmark.measure import Row
    from optimize.configs import BenchmarkConfig

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

def _device_check(top1: float, passed: bool) -> dict:
    """What runner.py --check writes on a device (its format; figures of a Jetson-like run)."""
    return {"format": "edgeopt-device-check", "version": 1, "model": "model.plan", "backend": "tensorrt",
            "images": 256, "top1": top1, "host_top1": 0.35, "top1_drop_pt": 100 * (0.35 - top1),
            "agreement_with_host": 0.99, "verdict": {"passed": passed, "problems": [] if passed else ["lost 5 pt"]},
            "device": {"machine": "orin", "gpu": "Orin", "compute_capability": "8.7", "runtime": "tensorrt 10.3.0",
                       "precision": "fp16"},
            "speed": {"seconds": 1.0, "rounds": 3, "includes": "copies to and from the device",
                      "latency_ms_b1": {"p50": 0.8, "p99": 1.2, "runs": 900},
                      "throughput": {"1": {"median": 1200.0, "low": 1150.0, "high": 1250.0},
                                     "4": {"median": 4000.0, "low": 3900.0, "high": 4100.0}}}}


def test_device_results_join_the_host_report_with_their_machine(report_dir, tmp_path):
    """benchmark --device-results without --models redraws the report in --out with the devices' rows."""
    copy = tmp_path / "report"
    shutil.copytree(report_dir, copy)
    checks = []
    for name, top1, passed in (("orin.json", 0.35, True), ("bad.json", 0.30, False)):
        (tmp_path / name).write_text(json.dumps(_device_check(top1, passed)))
        checks.append(tmp_path / name)
    run_cli("-q", "benchmark", "--out", copy, "--device-results", *checks, check=True)
    report = json.loads((copy / "report.json").read_text())
    base = next(r for r in report["rows"] if r["role"] == "baseline")
    rows = report["device_rows"]
    assert [r["name"] for r in rows] == ["model.plan @ Orin", "model.plan @ Orin"]
    assert rows[0]["speedup_cross_machine"]["4"] == pytest.approx(4000.0 / base["throughput"]["4"])
    md = (copy / "report.md").read_text()
    assert "## Measured on other machines" in md and "cross-machine" in md
    table = md[md.index("| model @ machine"):].split("\n\n")[0].splitlines()
    assert len({row.count("|") for row in table}) == 1, table  # header, separator and rows: the same columns
    line = next(ln for ln in md.splitlines() if ln.startswith("| model.plan @ Orin") and "passed" in ln)
    assert "| tensorrt | fp16 | 256 | 35.00% | 35.00% | 99.00% | 0.80/1.20 | 1200 ±50 | 4000 ±100 |" in line
    assert any("FAILED: lost 5 pt" in ln for ln in md.splitlines())
    assert "## On the device" in md and "runner.py --check" in md  # where to run the check
    # the same file again replaces its row instead of adding one
    run_cli("-q", "benchmark", "--out", copy, "--device-results", checks[0], check=True)
    assert len(json.loads((copy / "report.json").read_text())["device_rows"]) == 2


def test_device_results_refused_with_the_reason(tmp_path):
    (tmp_path / "x.json").write_text('{"rows": []}')
    proc = run_cli("-q", "benchmark", "--out", tmp_path / "nothing", "--device-results", tmp_path / "x.json")
    assert proc.returncode == 2 and "is not readable" in error_line(proc)
