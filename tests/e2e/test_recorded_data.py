"""Stages that need data take the data the model's manifest records: a folder-trained model needs no --data."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import error_line, run_cli

FOLDER_TINY = ["--arch", "resnet18", "--image-size", "16", "--batch-size", "32", "--epochs", "1"]


@pytest.fixture(scope="module")
def folder_model(image_folder, tmp_path_factory):
    """A tiny model trained on a copy of the 3-class image folder (the copy can be removed by a test)."""
    root = tmp_path_factory.mktemp("recorded")
    data = root / "photos"
    shutil.copytree(image_folder, data)
    model = root / "model.pth"
    run_cli("-q", "train", *FOLDER_TINY, "--data", data, "--out", model, check=True)
    return data, model


def test_export_calibrate_benchmark_of_a_folder_model_need_no_data(folder_model, tmp_path):
    data, model = folder_model
    onnx_path = tmp_path / "model.onnx"
    proc = run_cli("export", "--model", model, "--out", onnx_path, check=True)
    assert f"data: {data}, as recorded in {model}.json" in proc.stderr  # says which data it took
    assert json.loads((tmp_path / "model.onnx.json").read_text())["config"]["data"] == str(data)
    int8 = tmp_path / "model.int8.onnx"
    proc = run_cli("-q", "calibrate", "--onnx", onnx_path, "--out", int8, "--target", "cpu", "--num-images", "32",
                   "--timing-seconds", "0.05", "--json", check=True)
    assert json.loads((tmp_path / "model.int8.onnx.json").read_text())["config"]["data"] == str(data)
    report = tmp_path / "report"
    run_cli("-q", "benchmark", "--baseline", model, "--models", onnx_path, int8, "--batch-sizes", "2", "--rounds",
            "2", "--seconds", "0.05", "--out", report, check=True)
    bench = json.loads((report / "report.json").read_text())
    assert bench["config"]["data"] == str(data)
    assert all(r["val_images"] == 36 for r in bench["rows"])  # the folder's 3 x 12 val images, not Fashion-MNIST's


def test_a_recorded_folder_that_is_gone_names_data(folder_model, tmp_path):
    data, model = folder_model
    moved = tmp_path / "elsewhere.pth"
    shutil.copyfile(model, moved)
    manifest = json.loads((model.parent / "model.pth.json").read_text())
    manifest["inputs"]["data"]["data"] = str(tmp_path / "gone")
    (tmp_path / "elsewhere.pth.json").write_text(json.dumps(manifest))
    out = tmp_path / "m.onnx"
    proc = run_cli("export", "--model", moved, "--out", out)
    line = error_line(proc)
    assert proc.returncode == 2 and "gone" in line and "--data" in line and "elsewhere.pth.json" in line
    assert not out.exists()
    # --data overrides the recorded folder
    run_cli("-q", "export", "--model", moved, "--data", data, "--out", out, check=True)
    assert out.is_file()
