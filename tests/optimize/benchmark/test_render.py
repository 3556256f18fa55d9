"""The report as Markdown (optimize/benchmark/render.py), from a small report dictionary made by hand: each section
shows what it must, and a section with nothing to show is left out. test_report.py checks the same on a measured
report; here every figure is known, so the cells are checked as written."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from optimize.benchmark.measure import Row
from optimize.benchmark.render import render_markdown


def _report(**config: Any) -> dict[str, Any]:
    """A baseline and two ONNX models at batch 1 and 8; ``fast.onnx`` is the final artifact, ``int8.onnx`` flagged."""
    spread = {"median": 400.0, "low": 390.0, "high": 410.0, "rounds": [390.0, 400.0, 410.0]}
    base = Row(name="teacher.pth", path="teacher.pth", role="baseline", backend="torch", file_bytes=2_000_000,
               params=11_000_000, macs=36_000_000, sparsity=0.0, top1=0.9, top5=0.99, agreement=1.0,
               latency_ms_b1={"p50": 1.0, "p90": 1.5, "p99": 2.0}, throughput={"1": 100.0, "8": 400.0},
               throughput_spread={"8": spread}, speedup={"8": 1.0}, speedup_verdict={"8": "baseline"})
    fast = replace(base, name="fast.onnx", path="fast.onnx", role="model", backend="onnxruntime", top1=0.895,
                   throughput={"1": 300.0, "8": 1200.0}, throughput_spread={}, speedup={"8": 3.0},
                   speedup_verdict={"8": "faster"}, pareto=True)
    int8 = replace(fast, name="int8.onnx", path="int8.onnx", precision="int8", speedup={"8": 1.01},
                   speedup_verdict={"8": "within noise"}, pareto=False,
                   int8_gate={"sibling": "fast.onnx", "speedup": 1.01, "speedup_range": [0.98, 1.04],
                              "speed_verdict": "within noise", "drop_pt": 0.2, "flags": ["no faster than fast.onnx"]})
    missing = Row(name="gone.xml", path="gone.xml", role="model", backend="openvino", skipped="openvino is missing")
    cfg = {"batch_sizes": [1, 8], "input_size": None, "rounds": 3, "seconds": 0.5, "warmup": 2,
           "max_accuracy_drop": 1.0, "min_speedup": 2.0, **config}
    return {"config": cfg, "reference_batch": 8, "baseline": "teacher.pth",
            "rows": [asdict(r) for r in (base, fast, int8, missing)],
            "environment": {"cpu": "Test CPU", "cpu_cores": 2, "threads": 2, "gpu": None, "versions": {"onnx": "1.0"},
                            "date": "2026-01-01", "platform": "Linux"},
            "final": {"artifact": "fast.onnx", "why": "the fastest at batch 8 within 1 pt of teacher.pth's top-1",
                      "runner_up": "int8.onnx", "vs_runner_up": 1.0, "vs_runner_up_verdict": "within noise"},
            "verdicts": [{"artifact": "fast.onnx", "verdict": "at least 2x faster, at most 1 pt less top-1",
                          "met": True, "speedup": 3.0, "speedup_range": [2.9, 3.1], "drop_pt": 0.5}]}


def test_each_section_shows_its_figures():
    md = render_markdown(_report())
    # the title says how the run measured
    assert md.startswith("# edgeopt benchmark on the val split\n")
    assert "Baseline: **teacher.pth**" in md and "3 rounds" in md and "0.5 s window" in md and "2 warm-up" in md
    # the table: one row per measured artifact, medians ± half the rounds' range, the verdict beside the speedup
    assert "| model | backend | precision |" in md and "| img/s b1 | img/s b8 | speedup b8 |" in md
    assert "| teacher.pth (baseline) | torch | fp32 | 2.00 | 11.00 | 36.0 | 0.0% | 90.00% | 99.00% | 100.0% |" in md
    assert "| 1.00/1.50/2.00 | 100 | 400 ±10 | 1.00x |" in md
    assert "| fast.onnx | onnxruntime |" in md and "| 3.00x |" in md and "| yes |" in md
    assert "1.01x *within noise* ⚠" in md  # the INT8 row: within noise of the baseline, and flagged
    assert "Not measured:\n- gone.xml: openvino is missing" in md
    # the INT8 gate names the sibling and why it is flagged
    assert "## INT8 gate" in md
    assert ("- int8.onnx vs fast.onnx: 1.01x (0.98-1.04 over the rounds, within noise), top-1 -0.20 pt: FLAGGED: "
            "no faster than fast.onnx") in md
    # the final artifact, why, and a runner-up within noise said so
    assert "## Final artifact\n\n**fast.onnx**: the fastest at batch 8 within 1 pt of teacher.pth's top-1." in md
    assert "Against the runner-up int8.onnx: 1.00x, *within noise*" in md
    # the verdicts read the budgets
    assert "## Verdicts (budgets: --min-speedup 2, --max-accuracy-drop 1)" in md
    assert "- at least 2x faster, at most 1 pt less top-1: **MET** (fast.onnx: 3.00x, 2.90-3.10 over the rounds, " \
           "top-1 -0.50 pt)" in md
    # the machine, and how to prove the final artifact on the device
    assert "## Environment" in md and "- CPU: Test CPU (2 cores); instruction sets: not recorded" in md
    assert "- threads: 2 for every CPU backend" in md and "- GPU: none" in md and "- libraries: onnx 1.0" in md
    assert "## On the device" in md and "cli.py package --model fast.onnx" in md


def test_sections_with_nothing_to_show_are_left_out():
    md = render_markdown(_report())
    for absent in ("## Against this machine's peak", "## Pruning of", "## Measured on other machines",
                   "## Per-class metrics", "Plots: "):
        assert absent not in md, absent


def test_a_speed_only_report_has_no_accuracy_columns_nor_device_step():
    md = render_markdown(_report(input_size=32))
    assert md.startswith("# edgeopt benchmark at 32x32 (speed only, random inputs)\n")
    assert "top-1 |" not in md.split("\n\n")[2] and "Pareto" not in md and "e2e img/s" not in md
    assert "## On the device" not in md
