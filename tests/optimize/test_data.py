"""Data sources, the shared preprocessing, and bad data or output paths."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, error_line, run_cli, run_main
from optimize.data import load_data, stratified_indices
from optimize.errors import DataError
from optimize.preprocess import fashion_mnist_preset, folder_preset, to_rgb


def test_stratified_subset_is_balanced_and_deterministic():
    labels = np.repeat(np.arange(10), [100, 90, 80, 70, 60, 50, 40, 30, 20, 5])
    pick = stratified_indices(labels, 100)
    assert len(pick) == 100 and len(set(pick)) == 100
    counts = np.bincount(labels[pick], minlength=10)
    # round-robin over classes: every class gets its share, the small class all it has (5)
    assert counts.tolist() == [11, 11, 11, 11, 11, 10, 10, 10, 10, 5]
    assert np.array_equal(pick, stratified_indices(labels, 100))
    assert np.array_equal(stratified_indices(labels, None), np.arange(len(labels)))
    with pytest.raises(DataError):
        stratified_indices(labels, 0)


def test_fashion_mnist_slice():
    splits = load_data("fashion-mnist", fashion_mnist_preset(image_size=32), train_limit=500, val_limit=100,
                       augment=False)
    assert len(splits.train) == 500 and len(splits.val) == 100
    assert np.bincount(splits.train.labels).tolist() == [50] * 10
    x, y = splits.val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    torch.testing.assert_close(x[0], x[1])  # grayscale replicated to 3 channels


def test_fashion_mnist_missing_offline_is_a_clear_error(tmp_path):
    env = {"EDGEOPT_FASHION_MNIST": str(tmp_path / "none"), "EDGEOPT_CACHE": str(tmp_path / "cache")}
    proc = run_cli("-q", "train", *TINY, "--out", tmp_path / "m.pth", env=env)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "apt-get install dataset-fashion-mnist" in line and "EDGEOPT_FASHION_MNIST" in line
    assert not (tmp_path / "m.pth").exists()


def test_every_image_mode_becomes_8bit_rgb():
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = np.asarray(Image.fromarray(gray, "L").convert("RGB"))
    for img in (Image.fromarray(gray, "L").convert("RGBA"), Image.fromarray(gray, "L").convert("P"),
                Image.fromarray(gray.astype(np.uint16) * 257)):
        out = to_rgb(img)
        assert out.mode == "RGB"
        assert np.abs(np.asarray(out, np.int16) - expected).max() <= 1, img.mode
    cmyk = to_rgb(Image.fromarray(gray, "L").convert("CMYK"))
    assert cmyk.mode == "RGB" and np.abs(np.asarray(cmyk, np.int16) - expected).max() <= 2


def test_preprocessing_round_trips_through_its_record():
    for pre in (fashion_mnist_preset(image_size=24), folder_preset(image_size=64)):
        assert type(pre).from_dict(json.loads(json.dumps(pre.to_dict()))) == pre


def test_image_folder_trains_and_evaluates(image_folder, tmp_path):
    out = tmp_path / "folder.pth"
    proc = run_cli("-q", "train", "--data", image_folder, "--arch", "resnet18", "--image-size", "32", "--epochs", "1",
                   "--batch-size", "32", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 unreadable image" in proc.stderr and "corrupt.png" in proc.stderr
    manifest = json.loads(out.with_name("folder.pth.json").read_text())
    assert manifest["class_names"] == ["sneaker", "trouser", "tshirt"]
    assert manifest["inputs"]["data"]["train_images"] == 3 * 40 + 3  # the CMYK, RGBA and 16-bit files count
    assert manifest["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    report = json.loads(run_cli("-q", "evaluate", "--model", out, "--data", image_folder, "--json",
                                check=True).stdout)
    assert report["count"] == 36 and report["class_names"] == ["sneaker", "trouser", "tshirt"]


def test_model_and_data_class_mismatch(trained, image_folder):
    proc = run_cli("-q", "evaluate", "--model", trained, "--data", image_folder)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "10 classes" in line and "3" in line and str(trained) in line


def test_bad_data_folders(image_folder, tmp_path):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    hollow = tmp_path / "hollow"
    shutil.copytree(image_folder, hollow)
    (hollow / "train" / "ghost").mkdir()
    (hollow / "val" / "ghost").mkdir()
    (hollow / "val" / "ghost" / "readme.txt").write_text("no images here")
    no_val = tmp_path / "noval"
    shutil.copytree(image_folder / "train", no_val / "train")
    for data, expect in ((empty, "no class folders"), (hollow, "ghost"), (no_val, "val"),
                         (tmp_path / "absent", "does not exist")):
        proc = run_main("-q", "train", "--data", data, "--arch", "resnet18", "--image-size", "16", "--epochs", "1",
                       "--out", tmp_path / "x.pth")
        assert proc.returncode == 2, data
        assert expect in error_line(proc), (data, proc.stderr)
    assert not (tmp_path / "x.pth").exists()


def test_bad_options_and_outputs(tmp_path):
    proc = run_cli("-q", "train", *TINY, "--epochs", "0", "--out", tmp_path / "e.pth")
    assert proc.returncode == 2 and "--epochs" in error_line(proc)

    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder is needed")
    proc = run_cli("-q", "train", *TINY, "--out", blocker / "m.pth")
    assert proc.returncode == 2 and str(blocker / "m.pth") in error_line(proc)

    if os.geteuid() != 0:  # root writes anywhere, so a read-only folder only stops ordinary users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        proc = run_cli("-q", "train", *TINY, "--out", locked / "m.pth")
        assert proc.returncode == 2 and "cannot write" in error_line(proc)

    nested = tmp_path / "new" / "deeper" / "m.pth"
    run_cli("-q", "train", *TINY, "--optimizer", "sgd", "--schedule", "step", "--step-size", "1", "--out", nested,
            check=True)
    assert nested.exists() and nested.with_name("m.pth.json").exists()
    assert sorted(p.name for p in nested.parent.iterdir()) == ["m.last.pth", "m.pth", "m.pth.json"]


def test_val_only_reads_no_training_images(image_folder, caplog):
    splits = load_data(str(image_folder), folder_preset(image_size=32), augment=False, val_only=True)
    assert len(splits.train) == 0 and len(splits.val) == 36
    assert splits.class_names == ["sneaker", "trouser", "tshirt"]  # still train/'s folders, in train/'s order
    assert "unreadable" not in caplog.text  # the corrupt file lies in train/, which was not scanned
    fm = load_data("fashion-mnist", fashion_mnist_preset(), val_limit=20, augment=False, val_only=True)
    assert len(fm.train) == 0 and len(fm.val) == 20
