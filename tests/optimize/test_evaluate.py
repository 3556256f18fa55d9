"""The evaluate command (optimize/evaluate.py), run as a user runs it."""

from __future__ import annotations

import json

import torch

from conftest import run_cli


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
