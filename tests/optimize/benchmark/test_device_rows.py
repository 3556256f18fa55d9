"""Rows measured on other machines (optimize/benchmark/device_rows.py): ``runner.py --check`` results joined to a
host report with ``benchmark --device-results``."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import error_line, run_cli


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


def test_device_results_join_the_host_report_with_their_machine(benchmark_report_dir, tmp_path):
    """benchmark --device-results without --models redraws the report in --out with the devices' rows."""
    copy = tmp_path / "report"
    shutil.copytree(benchmark_report_dir, copy)
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
