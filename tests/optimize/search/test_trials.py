"""A trial is a pipeline run (optimize/search/trials.py): a training-space trial runs through distill, and the
chosen trial's figures and recipe are its own."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import run_main
from search_cli import FAST


def test_a_training_space_trial_runs_through_distill(trained, tmp_path):
    out = tmp_path / "train-space"
    proc = run_main("-q", "search", "--teacher", trained, "--out", out, "--trials", "1", "--space", "training", *FAST)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "search.json").read_text())
    (trial,) = report["trials"]
    assert trial["state"] == "COMPLETE" and set(trial["params"]) == {"lr", "batch_size", "weight_decay",
                                                                      "label_smoothing"}
    assert (Path(trial["folder"]) / "student.pth").is_file()
    # the chosen trial's figures and recipe are the trial's own, not a default or another run's
    chosen, recipe = report["chosen"], yaml.safe_load((out / "best.yaml").read_text())
    assert chosen["within"] and (chosen["top1"], chosen["speed"]) == (trial["top1"], trial["speed"])
    assert recipe["stages"]["distill"]["lr"] == trial["params"]["lr"]
    assert recipe["stages"]["distill"]["label_smoothing"] == trial["params"]["label_smoothing"]
