"""The device check's wiring, on the CPU: its dry run plans every step a lent GPU machine would run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_the_dry_run_plans_every_step(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", ROOT / "benchmarks" / "device_check.sh", "--dry-run", "--out", tmp_path],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["dry_run"] and report["passed"] and list(report["steps"]) == [
        "pipeline", "cuda-runtime", "gpu-check", "cuda-peak", "full-epoch"]
    steps = report["steps"]
    assert steps["pipeline"]["planned"].startswith("# 9 steps: teacher, distill, prune")  # the quick preset, planned
    assert "--allow-no-tensorrt" in steps["gpu-check"]["command"] and steps["gpu-check"]["tf32_rows"]
    assert steps["full-epoch"]["config"] == {"arch": "resnet18", "augment": "crop-flip", "optimizer": "sgd",
                                             "lr": 0.1, "epochs": 1}
    assert steps["full-epoch"]["projected_epochs"] == 48  # the full preset's distill 40 + fine-tune 8
    recipe = (tmp_path / "device-check-recipe.yaml").read_text()
    assert "device: auto" in recipe  # the CPU onnxruntime there: the report's rows on auto, training on CUDA
    assert "Dry run: passed" in (tmp_path / "device_check.md").read_text()
