"""benchmark's stage (optimize/benchmark/report.py): a tiny checkpoint and its ONNX export on a val slice, through
the CLI as a user runs it."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import error_line, run_cli
from optimize.benchmark.measure import onnx_graph_stats
from optimize.timing import NOISE_FLOOR


def test_report_holds_every_figure(benchmark_report_dir, trained, exported_onnx):
    report = json.loads((benchmark_report_dir / "report.json").read_text())
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


def test_report_markdown_and_plots_are_written(benchmark_report_dir, exported_onnx):
    md = (benchmark_report_dir / "report.md").read_text()
    assert exported_onnx.name in md and "| model |" in md and "## Environment" in md and "## Verdicts" in md
    assert "instruction sets: " in md and " ±" in md and "3 rounds" in md
    # the final CPU artifact's per-class figures, from the same predictions as its top-1
    report = json.loads((benchmark_report_dir / "report.json").read_text())
    final = next(r for r in report["rows"] if r["name"] == exported_onnx.name)["classification"]
    supports = [k["support"] for k in final["per_class"].values()]
    recall = sum(k["recall"] * k["support"] for k in final["per_class"].values()) / sum(supports)
    assert sum(supports) == 128 and recall == pytest.approx(
        next(r for r in report["rows"] if r["name"] == exported_onnx.name)["top1"])
    assert f"## Per-class metrics of the final artifact ({exported_onnx.name})" in md
    assert "| Ankle boot |" in md and f"F1 {final['macro_f1']:.2%}" in md
    for png in ("accuracy_vs_throughput.png", "latency_vs_batch.png"):
        data = (benchmark_report_dir / png).read_bytes()
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
