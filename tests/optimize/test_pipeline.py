"""pipeline: the whole chain end to end on a tiny recipe over the quick preset; a second run skips every stage."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import error_line, run_cli

# quick preset, shrunk: a ResNet-18 "teacher" at 16 px on 256 images, every stage still runs for real
TINY_RECIPE = {
    "train_limit": 256, "val_limit": 128, "image_size": 16,
    "stages": {
        "teacher": {"arch": "resnet18", "epochs": 1, "batch_size": 64},
        "distill": {"epochs": 1, "batch_size": 64},
        "prune": {"finetune_epochs": 1, "batch_size": 64},
        "calibrate": {"num_images": 64, "batch_size": 32, "timing_seconds": 0.05},
        "build-engine": {"max_batch": 16, "compare_seconds": 0.05},
        "benchmark": {"batch_sizes": [1, 4], "seconds": 0.05, "warmup": 1, "input_sizes": [32]},
    },
}


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    out = root / "runs"
    first = run_cli("-q", "pipeline", "--preset", "quick", "--config", recipe, "--out", out, check=True)
    second = run_cli("-q", "pipeline", "--preset", "quick", "--config", recipe, "--out", out, check=True)
    return recipe, out, first, second


def test_pipeline_runs_every_stage(pipeline_runs):
    _, out, first, _ = pipeline_runs
    for name in ("teacher.pth", "student.pth", "pruned.pth", "model.onnx", "model.int8.onnx", "model.ort.onnx",
                 "model.int8.ort.onnx", "report/report.md", "report/report.json", "report-32/report.json"):
        assert (out / name).is_file(), name
    assert "[1/9] teacher ..." in first.stdout and "unchanged" not in first.stdout
    report = json.loads((out / "report" / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["teacher.pth", "student.pth", "pruned.pth", "model.onnx", "model.int8.onnx", "model.ort.onnx",
                     "model.int8.ort.onnx"]
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["pruned.pth"]["macs"] < 0.6 * rows["student.pth"]["macs"]
    gate = rows["model.int8.onnx"]["int8_gate"]
    assert gate["sibling"] == "model.onnx" and gate["speedup"] > 0 and isinstance(gate["flags"], list)
    # the final artifact is the fastest by median within the accuracy budget, and the verdict is about it
    budget = report["config"]["max_accuracy_drop"]
    ref = str(report["reference_batch"])
    within = [r for r in report["rows"] if r["role"] != "baseline" and r["throughput"].get(ref)
              and 100 * (rows["teacher.pth"]["top1"] - r["top1"]) <= budget]
    candidates = [r for r in report["rows"] if r["role"] != "baseline" and r["throughput"].get(ref)]
    expected = (max(within, key=lambda r: r["throughput"][ref]) if within
                else max(candidates, key=lambda r: r["top1"]))  # none within budget: the most accurate, NOT MET
    assert report["final"]["artifact"] == expected["name"]
    assert report["verdicts"][0]["artifact"] == report["final"]["artifact"]
    state = json.loads((out / "pipeline.json").read_text())
    assert all(s["status"] == "done" for s in state["steps"].values())


def test_second_run_skips_every_stage(pipeline_runs):
    _, out, _, second = pipeline_runs
    lines = [ln for ln in second.stdout.splitlines() if ln.startswith("[")]
    assert len(lines) == 9 and all("unchanged, skipped" in ln for ln in lines), second.stdout
    assert "0 step(s) ran, 9 skipped" in second.stdout


def test_changed_stage_reruns_only_itself_and_what_follows(pipeline_runs, tmp_path):
    recipe, out, _, _ = pipeline_runs
    changed = yaml.safe_load(recipe.read_text())
    changed["stages"]["benchmark"]["batch_sizes"] = [2]
    edited = tmp_path / "recipe.yaml"
    edited.write_text(yaml.safe_dump(changed))
    proc = run_cli("-q", "pipeline", "--preset", "quick", "--config", edited, "--out", out, check=True)
    ran = [ln for ln in proc.stdout.splitlines() if ln.startswith("[") and "done in" in ln]
    assert [ln.split("] ")[1].split(":")[0] for ln in ran] == ["benchmark", "benchmark-32"], proc.stdout


def test_dry_run_prints_the_resolved_recipe(tmp_path):
    proc = run_cli("pipeline", "--preset", "standard", "--train-limit", "300", "--dry-run", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    recipe = yaml.safe_load(proc.stdout)
    assert recipe["train_limit"] == 300 and recipe["stages"]["teacher"]["arch"] == "resnet50"
    assert not list(tmp_path.iterdir())


def test_unknown_recipe_option_names_stage_and_choices(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  prune: {method: l1-channel, amout: 0.5}\n")
    proc = run_cli("pipeline", "--config", bad, "--dry-run", "--out", tmp_path / "runs")
    line = error_line(proc)
    assert proc.returncode == 2 and "'prune'" in line and "amout" in line and "amount" in line


def test_second_pipeline_in_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    from optimize.lock import process_record

    (out / ".pipeline.lock").write_text(json.dumps(process_record()))  # this test process: alive, so the lock holds
    proc = run_cli("pipeline", "--preset", "quick", "--out", out)
    assert proc.returncode == 2 and f"another pipeline (pid {os.getpid()})" in error_line(proc)
    assert not (out / "pipeline.json").exists() and (out / ".pipeline.lock").exists()
