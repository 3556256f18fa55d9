"""A bundle's acceptance set (optimize/acceptance.py), written for the tiny ONNX model on a tiny image folder: the
files and reference.json say what the module promises. The bundle around it (package's 256 images, the device's
check against it) is tests/optimize/test_package.py's; the default image count is tests/optimize/test_options.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from optimize.acceptance import ACCEPTANCE_FORMAT, PARITY_IMAGES, parity_tolerance, write_acceptance_set
from optimize.configs import SMALL_IMAGE
from optimize.errors import DataError
from optimize.preprocess import load_image

PER_CLASS = 3  # val images per class


@pytest.fixture(scope="module")
def tiny_folder(tiny_onnx, tmp_path_factory) -> Path:
    """train/ and val/ with the tiny model's classes, 8-px RGB images of random pixels (seeded)."""
    root = tmp_path_factory.mktemp("tiny-folder")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in tiny_onnx.class_names:
            (root / split / name).mkdir(parents=True)
            for i in range(PER_CLASS):
                pixels = rng.integers(0, 256, (tiny_onnx.preprocessing.image_size,) * 2 + (3,), dtype=np.uint8)
                Image.fromarray(pixels, "RGB").save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def written(tiny_onnx, tiny_folder, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    summary = write_acceptance_set(work, tiny_onnx.path, data=str(tiny_folder), count=100, max_accuracy_drop=5.0,
                                   batch_sizes=(8, 1, 8, 4))
    return work / "check", summary


def test_the_reference_records_the_host_answers_and_the_budget(tiny_onnx, written):
    folder, summary = written
    reference = json.loads((folder / "reference.json").read_text())
    n = PER_CLASS * len(tiny_onnx.class_names)
    assert reference["format"] == ACCEPTANCE_FORMAT and reference["version"] == 1
    assert reference["class_names"] == tiny_onnx.class_names and len(reference["images"]) == n
    classes = range(len(tiny_onnx.class_names))
    assert sorted(e["label"] for e in reference["images"]) == sorted([*classes] * PER_CLASS)  # every class, evenly
    # images of up to 64 px stay lossless PNG, numbered in order
    assert reference["encoding"] == "png"
    assert [e["file"] for e in reference["images"]] == [f"images/{i:04d}.png" for i in range(n)]
    assert all((folder / e["file"]).is_file() for e in reference["images"])
    # the budget: the user's top-1 points, and an agreement of at most 98 %, 2 points lower per point of budget
    assert reference["budget"] == {"max_accuracy_drop_pt": 5.0, "min_agreement": 0.9}
    assert reference["batch_sizes"] == [1, 4, 8]  # sorted, each once
    host = reference["host"]
    assert host["model"] == tiny_onnx.path.name and host["precision"] == "fp32" and reference["fp32"] is None
    assert host["runtime"].startswith(f"onnxruntime {ort.__version__} CPUExecutionProvider")
    labels = np.asarray([e["label"] for e in reference["images"]])
    assert host["top1"] == pytest.approx(float((np.asarray(host["predictions"]) == labels).mean()))
    assert summary == {"images": n, "bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
                       "encoding": "png", "host_top1": host["top1"], "budget": reference["budget"]}


def test_logits_and_tensors_are_the_hosts_on_the_written_files(tiny_onnx, written):
    """The reference is computed from the files as written (what the device decodes), by the bundled model."""
    folder, _ = written
    reference = json.loads((folder / "reference.json").read_text())
    transform = tiny_onnx.preprocessing.eval_transform()
    x = np.stack([transform(load_image(folder / e["file"])).numpy() for e in reference["images"]]).astype(np.float32)
    session = ort.InferenceSession(str(tiny_onnx.path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    logits = np.load(folder / "logits.npy")
    assert logits.dtype == np.float32 and logits.shape == (len(x), len(tiny_onnx.class_names))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert reference["host"]["predictions"] == logits.argmax(1).tolist()
    # the first few preprocessed tensors, against which the device's preprocessing is compared
    tensors = np.load(folder / "tensors.npy")
    assert len(tensors) == PARITY_IMAGES[True] == reference["parity"]["images"]
    np.testing.assert_array_equal(tensors, x[:len(tensors)])
    assert reference["parity"]["tolerance"] == pytest.approx(parity_tolerance(tiny_onnx.preprocessing.std))
    assert parity_tolerance((0.5,)) == pytest.approx(4 / 255)  # two grey levels after normalization


def test_a_model_of_other_classes_is_refused_before_anything_is_written(tiny_onnx, tmp_path):
    with pytest.raises(DataError, match="class"):
        write_acceptance_set(tmp_path, tiny_onnx.path, data="fashion-mnist", count=8, max_accuracy_drop=1.0,
                             batch_sizes=(1,))
    assert not (tmp_path / "check").exists()


def test_large_photos_for_a_small_model_are_labelled_as_the_jpeg_files_they_are(tiny_onnx, tmp_path):
    """Each image's own side picks its encoding: a small model fed photos above SMALL_IMAGE gets JPEG files, and
    reference.json says JPEG (it used to say PNG, reading the model's input side instead)."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(1)
    for name in tiny_onnx.class_names:
        (root / "val" / name).mkdir(parents=True)
        (root / "train" / name).mkdir(parents=True)
        pixels = rng.integers(0, 256, (SMALL_IMAGE + 16, SMALL_IMAGE + 16, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(root / "val" / name / "0.png")
        Image.fromarray(pixels, "RGB").save(root / "train" / name / "0.png")
    summary = write_acceptance_set(tmp_path / "work", tiny_onnx.path, data=str(root), count=100,
                                   max_accuracy_drop=5.0, batch_sizes=(1,))
    reference = json.loads((tmp_path / "work" / "check" / "reference.json").read_text())
    assert all(e["file"].endswith(".jpg") for e in reference["images"])
    assert reference["encoding"] == summary["encoding"] == "jpeg quality 95"
