"""Hostile data, recipes and interruptions: each ends in data that loads or one line naming the file and the fix."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, TINY, error_line, fashion_arrays, run_cli, run_main

# a ResNet-18 at 16 px on a few images: enough to go through data loading, training and the manifests
FOLDER_TINY = ["--arch", "resnet18", "--image-size", "16", "--batch-size", "16", "--epochs", "1"]


def _make_folder(root: Path, classes: dict, *, train: int = 6, val: int = 3) -> Path:
    """``root/{train,val}/<class>/NNN.png`` from Fashion-MNIST; class names may be bytes (not UTF-8)."""
    images, labels = fashion_arrays("train")
    for split, (start, count) in {"train": (0, train), "val": (train, val)}.items():
        for label, name in classes.items():
            folder = os.path.join(os.fsencode(root), os.fsencode(split), os.fsencode(name))
            os.makedirs(folder)
            for k, idx in enumerate(np.flatnonzero(labels == label)[start:start + count]):
                Image.fromarray(images[idx], "L").save(os.fsdecode(os.path.join(folder, b"%03d.png" % k)))
    return root


def _garbled_png(src: Path, dst: Path) -> None:
    """``src`` with its IDAT data replaced by junk under valid chunk CRCs: verify() passes, decoding fails."""
    raw = src.read_bytes()
    out, pos = bytearray(raw[:8]), 8
    while pos < len(raw):
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        data = raw[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            data = zlib.compress(b"\x00" * 3)[:2] + bytes((37 * i + 7) % 256 for i in range(len(data) - 2))
        out += struct.pack(">I4s", len(data), kind) + data + struct.pack(">I", zlib.crc32(kind + data))
        pos += 12 + length
    dst.write_bytes(bytes(out))


# -- 1. names that are not UTF-8 --------------------------------------------------------------------------------

def test_train_on_folder_with_non_utf8_names(tmp_path):
    data = _make_folder(tmp_path / "data", {0: b"caf\xe9", 1: "trouser"})
    # a file name that is not UTF-8 either, in a UTF-8-named class
    extra = os.path.join(os.fsencode(data / "train" / "trouser"), b"img\xff.png")
    shutil.copy(data / "train" / "trouser" / "000.png", os.fsdecode(extra))
    out = tmp_path / "m.pth"
    proc = run_cli("train", *FOLDER_TINY, "--data", data, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    manifest = json.loads((tmp_path / "m.pth.json").read_text(encoding="utf-8"))
    assert "caf\\xe9" in manifest["class_names"], manifest["class_names"]
    assert manifest["inputs"]["data"]["train_images"] == 13


# -- 2. images that pass verify() but do not decode ---------------------------------------------------------------

@pytest.fixture(scope="module")
def folder_model(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("folder-model") / "folder.pth"
    run_cli("-q", "train", *FOLDER_TINY, "--data", image_folder, "--train-limit", "30", "--val-limit", "12",
            "--out", out, check=True)
    return out


def test_export_skips_val_image_that_fails_to_decode(folder_model, image_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    bad = data / "val" / "tshirt" / "000.png"
    for other in (data / "val" / "tshirt").glob("*.png"):
        if other != bad:
            other.unlink()  # tshirt's one val image is the bad one: whatever subset is drawn holds it
    _garbled_png(image_folder / "val" / "tshirt" / "000.png", bad)
    with Image.open(bad) as img:
        img.verify()  # the point of the test: the header and the CRCs are fine
    proc = run_cli("export", "--model", folder_model, "--data", data, "--out", tmp_path / "m.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "m.onnx").is_file()
    warnings = [ln for ln in proc.stderr.splitlines() if "000.png" in ln]
    assert len(warnings) == 1 and "tshirt" in warnings[0], proc.stderr


# -- 3. recipes of the wrong encoding or types ---------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("stages:\n  teacher: {epochs: \"three\"}\n", ["'epochs'", "int", "three"]),
    ("teacher: 5\n", ["'teacher'", "str", "5"]),
    ("stages:\n  distill: {alpha: [1, 2]}\n", ["'alpha'", "float"]),
    ("stages:\n  benchmark: {batch_sizes: [1, x]}\n", ["'batch_sizes'", "int"]),
    ("stages:\n  teacher: 5\n", ["'teacher'", "mapping"]),
])
def test_recipe_with_wrong_types_is_one_line(tmp_path, text, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    proc = run_main("pipeline", "--config", recipe, "--out", tmp_path / "runs", "--dry-run")
    assert proc.returncode == 2
    line = error_line(proc)
    assert str(recipe) in line
    for word in expected:
        assert word in line, line


def test_recipe_not_utf8_is_one_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes("# r\xe9glages\nstages:\n  teacher: {epochs: 1}\n".encode("latin-1"))
    proc = run_main("pipeline", "--config", recipe, "--out", tmp_path / "runs", "--dry-run")
    assert proc.returncode == 2
    line = error_line(proc)
    assert str(recipe) in line and "UTF-8" in line, line


# -- 4. messages that name the real problem ----------------------------------------------------------------

def test_one_class_folder_says_two_classes_needed(tmp_path):
    data = _make_folder(tmp_path / "data", {0: "tshirt"})
    proc = run_main("train", *FOLDER_TINY, "--data", data, "--out", tmp_path / "m.pth")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "at least 2 classes" in line and str(data) in line, line


def test_data_that_is_a_file_says_so(tmp_path):
    data = tmp_path / "images.zip"
    data.write_bytes(b"PK")
    proc = run_main("train", *FOLDER_TINY, "--data", data, "--out", tmp_path / "m.pth")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "is a file" in line and "does not exist" not in line, line


def _interrupt_train(tmp_path: Path, wait_for: str, epochs: int, settle: float = 0.0,
                     written: Path | None = None) -> tuple[int, str]:
    """Train, send SIGINT once ``wait_for`` is logged (and ``written`` exists, when given), plus ``settle`` s."""
    args = [*TINY[:-1], str(epochs), "--train-limit", "1024", "--out", str(tmp_path / "m.pth")]
    env = {**os.environ, "EDGEOPT_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        seen.append(line)
        if wait_for in line or time.monotonic() > deadline:
            break
    while written is not None and not written.exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # a loaded machine writes the checkpoint seconds after the epoch's line
    time.sleep(settle)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    return proc.wait(timeout=120), "".join(seen) + rest


def test_ctrl_c_in_first_epoch_does_not_promise_a_checkpoint(tmp_path):
    rc, stderr = _interrupt_train(tmp_path, "training in", epochs=1)
    assert rc == 130, stderr
    assert "Traceback" not in stderr
    last = [ln for ln in stderr.splitlines() if ln.startswith("interrupted")]
    assert len(last) == 1, stderr
    assert "with --resume" not in last[0] and "no checkpoint" in last[0], last[0]
    assert not (tmp_path / "m.last.pth").exists()


def test_ctrl_c_after_an_epoch_names_the_checkpoint(tmp_path):
    rc, stderr = _interrupt_train(tmp_path, "epoch 1/3: train loss", epochs=3, settle=0.5,
                                  written=tmp_path / "m.last.pth")
    assert rc == 130, stderr
    last = [ln for ln in stderr.splitlines() if ln.startswith("interrupted")]
    assert len(last) == 1, stderr
    assert "m.last.pth" in last[0] and "--resume" in last[0], last[0]
