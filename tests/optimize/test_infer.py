"""infer: top-k classes per image from a checkpoint or an ONNX model, with the preprocessing each records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from conftest import fashion_arrays, run_cli
from optimize import infer
from optimize.data import FASHION_MNIST_CLASSES
from optimize.errors import DataError
from optimize.runners import RunnerError


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """12 Fashion-MNIST val images as PNGs, a third of them in a subfolder, and one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    pixels, _ = fashion_arrays("val")
    for i in range(12):
        Image.fromarray(pixels[i], "L").save(root / ("sub" if i % 3 == 0 else "") / f"{i:02d}.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return root


def test_onnx_and_checkpoint_agree(trained, exported_onnx, images):
    proc = run_cli("-q", "infer", "--model", exported_onnx, images, "--top-k", "3", "--batch-size", "5", "--json")
    assert proc.returncode == 1, proc.stderr  # one unreadable image: reported, not fatal
    results = json.loads(proc.stdout)
    assert len(results) == 13
    errors = {Path(r["image"]).name: r["error"] for r in results if r["error"]}
    assert list(errors) == ["corrupt.png"] and errors["corrupt.png"].startswith("cannot read image")
    classified = [r for r in results if not r["error"]]
    for r in classified:
        probs = [c["probability"] for c in r["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
        assert all(c["class"] == FASHION_MNIST_CLASSES[c["index"]] for c in r["top_k"])

    from_torch = infer.run(infer.InferConfig(model=str(trained), images=(str(images),), top_k=3))
    assert [r.image for r in from_torch] == [r["image"] for r in results]
    for ours, onnx in zip([r for r in from_torch if not r.error], classified):
        assert ours.top_k[0].index == onnx["top_k"][0]["index"]
        np.testing.assert_allclose([c.probability for c in ours.top_k],
                                   [c["probability"] for c in onnx["top_k"]], atol=1e-5)


def test_batches_are_capped_by_the_models_max_batch(exported_onnx, images, monkeypatch):
    sizes = []
    open_runner = infer.open_runner

    def capped(*args, **kwargs):
        runner = open_runner(*args, **kwargs)
        runner.max_batch = 4  # as a TensorRT engine built with --max-batch 4 reports
        run_batch = runner.infer
        runner.infer = lambda batch: sizes.append(len(batch)) or run_batch(batch)
        return runner

    monkeypatch.setattr(infer, "open_runner", capped)
    results = infer.run(infer.InferConfig(model=str(exported_onnx), images=(str(images),), batch_size=32))
    assert max(sizes) == 4 and sum(sizes) == 12
    assert sum(r.error is None for r in results) == 12


def test_missing_inputs_are_one_line_errors(exported_onnx, images, tmp_path, capsys):
    with pytest.raises(DataError, match="does not exist"):
        infer.run(infer.InferConfig(model=str(exported_onnx), images=(str(tmp_path / "nope.png"),)))
    with pytest.raises(DataError, match="no image files"):
        infer.run(infer.InferConfig(model=str(exported_onnx), images=(str(tmp_path),)))
    with pytest.raises(RunnerError, match="does not exist"):
        infer.run(infer.InferConfig(model=str(tmp_path / "missing.onnx"), images=(str(images),)))
    assert cli.main(["-q", "infer", "--model", str(tmp_path / "missing.onnx"), str(images)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: model ")
