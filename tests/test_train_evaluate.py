"""The train and evaluate commands, run as a user runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
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
    assert trained.with_name("teacher.last.pth").exists()
    # our checkpoint is plain data: it loads without unpickling any code
    payload = torch.load(trained, weights_only=True)
    assert payload["format"] == "edgeopt-checkpoint" and payload["arch"] == "resnet18"
    assert payload["preprocessing"] == manifest["preprocessing"]


def test_evaluate_reports_the_figures_training_recorded(trained, tmp_path):
    plot = tmp_path / "cm.png"
    proc = run_cli("-q", "evaluate", "--model", trained, "--val-limit", "256", "--json", "--plot", plot, check=True)
    report = json.loads(proc.stdout)
    manifest = json.loads(trained.with_name("teacher.pth.json").read_text())
    assert report["count"] == 256
    assert abs(report["top1"] - manifest["metrics"]["val_top1"]) < 1e-9
    assert abs(report["top5"] - manifest["metrics"]["val_top5"]) < 1e-9
    confusion = report["confusion_matrix"]
    assert sum(map(sum, confusion)) == 256 and len(confusion) == 10
    assert abs(sum(confusion[i][i] for i in range(10)) / 256 - report["top1"]) < 1e-9
    assert report["top5"] >= report["top1"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    maps = tmp_path / "cm.conv1.png"
    assert report["feature_maps"] == str(maps) and maps.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # precision / recall / F1 agree with the confusion matrix the same report holds
    for i, name in enumerate(report["class_names"]):
        row, col = confusion[i], [r[i] for r in confusion]
        k = report["per_class"][name]
        assert k["support"] == sum(row)
        assert k["recall"] == (confusion[i][i] / sum(row) if sum(row) else 0.0)
        assert k["precision"] == (confusion[i][i] / sum(col) if sum(col) else 0.0)
    assert 0.0 <= report["macro_f1"] <= 1.0

    text = run_cli("-q", "evaluate", "--model", trained, "--val-limit", "256", check=True).stdout
    assert "top-1" in text and "precision" in text and "macro" in text and "Ankle boot" in text


def test_classification_metrics_match_a_hand_computation():
    import numpy as np

    from optimize.loop import EvalMetrics, classification_metrics

    # rows: true a, b, c; columns: predicted a, b, c. c is never predicted.
    confusion = [[5, 1, 0],
                 [2, 3, 0],
                 [1, 1, 0]]
    m = classification_metrics(confusion, ["a", "b", "c"])
    a, b, c = (m["per_class"][n] for n in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (5 / 8, 5 / 6, 6)
    assert (b["precision"], b["recall"], b["support"]) == (3 / 5, 3 / 5, 5)
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 2)  # zero division -> 0
    f1_a, f1_b = 2 * (5 / 8) * (5 / 6) / (5 / 8 + 5 / 6), 0.6
    assert a["f1"] == pytest.approx(f1_a) and b["f1"] == pytest.approx(f1_b)
    assert m["macro_precision"] == pytest.approx((5 / 8 + 3 / 5 + 0) / 3)
    assert m["macro_recall"] == pytest.approx((5 / 6 + 3 / 5 + 0) / 3)
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b) / 3)
    assert m["weighted_f1"] == pytest.approx((6 * f1_a + 5 * f1_b) / 13)
    assert m["weighted_recall"] == pytest.approx(8 / 13)  # top-1

    metrics = EvalMetrics(loss=1.0, top1=8 / 13, top5=1.0, count=13, confusion=np.array(confusion))
    assert metrics.classification(["a", "b", "c"]) == m
    # a class in neither the labels nor the predictions is left out of the macro averages
    absent = EvalMetrics(loss=1.0, top1=1.0, top5=1.0, count=5, confusion=np.array([[2, 0, 0], [0, 3, 0], [0, 0, 0]]))
    c = absent.classification()
    assert c["macro_precision"] == c["macro_recall"] == c["macro_f1"] == 1.0
    assert list(c["per_class"]) == ["0", "1", "2"]


def test_first_conv_feature_maps_of_torchscript_models(tmp_path, caplog):
    from optimize.evaluate import _traced_conv, plot_first_conv
    from optimize.models import build_resnet

    model = build_resnet("resnet18", 10, stem="cifar").eval()
    x = torch.randn(1, 3, 16, 16)
    torch.jit.trace(model, x).save(str(tmp_path / "traced.pt"))
    traced = torch.jit.load(str(tmp_path / "traced.pt"))
    # a traced conv1 cannot be called alone: it is redone from its graph, and gives the eager layer's output
    torch.testing.assert_close(_traced_conv(traced.conv1)(x), model.conv1(x))
    png = plot_first_conv(traced, x[0], tmp_path / "maps.png", "traced")
    assert png == tmp_path / "maps.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # freezing inlines conv1: no plot, a warning
    frozen = torch.jit.freeze(torch.jit.script(model))
    assert plot_first_conv(frozen, x[0], tmp_path / "frozen.png", "frozen") is None
    assert "no feature-map plot" in caplog.text and not (tmp_path / "frozen.png").exists()


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
    proc.send_signal(signal.SIGINT)  # Ctrl-C during epoch 2
    _, err = proc.communicate(timeout=120)
    if proc.returncode != 0:  # it was still training: Ctrl-C must leave a clean state and say how to go on
        assert proc.returncode == 130, err
        assert "--resume" in err and "Traceback" not in err
    assert out.exists() and last.exists()
    assert not list(tmp_path.glob(".*.tmp"))
    state = torch.load(last, weights_only=True)["train_state"]
    assert 1 <= state["epoch"] <= 3

    run_cli(*_train_cmd(out)[2:], "--resume", check=True)
    resumed = json.loads((tmp_path / "killed.pth.json").read_text())["metrics"]
    reference = json.loads((tmp_path / "straight.pth.json").read_text())["metrics"]
    assert resumed["epoch"] == reference["epoch"]
    assert abs(resumed["val_top1"] - reference["val_top1"]) < 1e-9
    assert abs(resumed["train_loss"] - reference["train_loss"]) < 1e-4


def test_resume_with_other_options_is_refused(trained, tmp_path):
    proc = run_cli("-q", "train", *TINY, "--lr", "0.3", "--out", trained, "--resume")
    assert proc.returncode == 2
    assert "lr" in error_line(proc) and "--resume" in error_line(proc)


def test_loop_options_run(tmp_path):
    out = tmp_path / "opts.pth"
    run_cli("-q", "train", *TINY, "--epochs", "2", "--accumulate", "2", "--schedule", "plateau", "--patience", "1",
            "--label-smoothing", "0.1", "--optimizer", "adamw", "--out", out, check=True)
    state = torch.load(out.with_name("opts.last.pth"), weights_only=True)["train_state"]
    assert [row["epoch"] for row in state["history"]] == [1, 2]
    # 512 images / batch 64 = 8 micro-batches an epoch; accumulating 2 makes 4 optimizer steps an epoch
    steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {8}


def test_ddp_training_with_torchrun_on_cpu(tmp_path):
    out = tmp_path / "ddp.pth"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = run_cli("-q", "train", *TINY, "--out", out, launcher=torchrun, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(out.with_name("ddp.pth.json").read_text())
    assert manifest["inputs"]["data"]["train_images"] == 512
    report = json.loads(run_cli("-q", "evaluate", "--model", out, "--val-limit", "256", "--json", check=True).stdout)
    assert report["count"] == 256
    assert abs(report["top1"] - manifest["metrics"]["val_top1"]) < 1e-9
