"""The train command (optimize/train.py), run as a user runs it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT, TINY, error_line, run_cli


def test_train_writes_checkpoint_manifest_and_resumable_state(trained):
    manifest = json.loads(trained.with_name("teacher.pth.json").read_text())
    assert manifest["stage"] == "train"
    assert manifest["config"]["arch"] == "resnet18" and manifest["config"]["loop"]["epochs"] == 1
    assert manifest["inputs"]["data"]["train_images"] == 512 and manifest["inputs"]["data"]["val_images"] == 256
    assert len(manifest["inputs"]["data"]["sha256"]) == 64
    assert manifest["preprocessing"]["image_size"] == 16 and manifest["preprocessing"]["channels"] == 3
    assert manifest["class_names"][0] == "T-shirt/top" and len(manifest["class_names"]) == 10
    assert {"torch", "torchvision", "python"} <= set(manifest["versions"])
    assert 0.0 <= manifest["metrics"]["val_top1"] <= 1.0
    assert "early_stop" not in manifest  # only a run that --patience ended says so
    assert trained.with_name("teacher.last.pth").exists()
    # our checkpoint is plain data: it loads without unpickling any code
    payload = torch.load(trained, weights_only=True)
    assert payload["format"] == "edgeopt-checkpoint" and payload["arch"] == "resnet18"
    assert payload["preprocessing"] == manifest["preprocessing"]


def test_training_learns(tmp_path):
    """Three epochs on the slice must beat chance (10%) clearly: the loop really optimizes."""
    out = tmp_path / "m.pth"
    args = [a if a != "1" else "3" for a in TINY]  # --epochs 3
    proc = run_cli("-q", "train", *args, "--optimizer", "adamw", "--json", "--out", out, check=True)
    assert json.loads(proc.stdout)["metrics"]["val_top1"] > 0.4


def _train_cmd(out):
    args = [a if a != "1" else "3" for a in TINY]
    return [sys.executable, str(ROOT / "cli.py"), "-q", "train", *args, "--out", str(out)]


def test_resume_after_interrupt_matches_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight.pth"
    run_cli(*_train_cmd(straight)[2:], check=True)

    out = tmp_path / "killed.pth"
    proc = subprocess.Popen(_train_cmd(out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "EDGEOPT_OFFLINE": "1"})
    last = tmp_path / "killed.last.pth"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before its first checkpoint was seen: nothing was interrupted"
    proc.send_signal(signal.SIGINT)  # Ctrl-C during epoch 2
    _, err = proc.communicate(timeout=120)
    # the interrupt landed: Ctrl-C's exit code, the resume hint, and a kept state short of the 3 epochs asked for
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert out.exists() and last.exists()
    assert not list(tmp_path.glob(".*.tmp"))
    state = torch.load(last, weights_only=True)["train_state"]
    assert 1 <= state["epoch"] < 3 and len(state["history"]) == state["epoch"], state["epoch"]
    assert f"checkpoint of epoch {state['epoch']}" in err, err

    # not -q: the log must show the run continuing from the kept epoch (a fresh start would match the figures too)
    resumed_run = run_cli(*_train_cmd(out)[3:], "--resume", check=True)
    assert f"resuming after epoch {state['epoch']} of 3" in resumed_run.stderr, resumed_run.stderr
    resumed = json.loads((tmp_path / "killed.pth.json").read_text())["metrics"]
    reference = json.loads((tmp_path / "straight.pth.json").read_text())["metrics"]
    assert resumed["epoch"] == reference["epoch"]
    assert abs(resumed["val_top1"] - reference["val_top1"]) < 1e-9
    assert abs(resumed["train_loss"] - reference["train_loss"]) < 1e-4
    history = torch.load(last, weights_only=True)["train_state"]["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]  # the resumed run added the epochs the interrupt cut


def test_resume_with_other_options_is_refused(trained, tmp_path):
    proc = run_cli("-q", "train", *TINY, "--lr", "0.3", "--out", trained, "--resume")
    assert proc.returncode == 2
    assert "lr" in error_line(proc) and "--resume" in error_line(proc)
