"""Opt-in: our TensorRT Q/DQ placement against NVIDIA Model Optimizer's own, on trained ResNet-18 and ResNet-50.

``make test-modelopt`` builds ``.venv-modelopt`` (Model Optimizer is no dependency of edgeopt: see
``benchmarks/modelopt_compare.py``) and runs this module with ``EDGEOPT_MODELOPT_PYTHON`` set; without it the
module is skipped, so ``make test`` never runs it. Each model is trained and exported through the CLI, then
quantized by our ``calibrate --target tensorrt`` and by Model Optimizer from the same FP32 ONNX and the same
calibration images. The placements must match, our INT8 model must agree with its FP32 model at least as often
as Model Optimizer's, and each INT8 model must stay within 0.3 point of its FP32 model.
"""

from __future__ import annotations

import os

import pytest

from conftest import run_cli

if not os.environ.get("EDGEOPT_MODELOPT_PYTHON"):
    pytest.skip("opt-in: needs NVIDIA Model Optimizer in its own venv (run 'make test-modelopt', which sets "
                "EDGEOPT_MODELOPT_PYTHON)", allow_module_level=True)

from benchmarks import modelopt_compare  # noqa: E402 - imported only when the module runs

# Trained enough for accuracy to mean something, in about 1 (ResNet-18) and 2.5 (ResNet-50) minutes on 2 quiet cores.
TRAIN = ["--image-size", "32", "--train-limit", "10000", "--val-limit", "1000", "--batch-size", "64", "--epochs", "3"]
# The whole val split (10k images, seconds on ONNX Runtime at 32 px): INT8 flips 1-4% of the predictions either
# way, so on 1000 images the top-1 difference alone would wander by about 0.5 point.
VAL_IMAGES = None
MAX_DROP_PT = 0.3


@pytest.fixture(scope="module", params=["resnet18", "resnet50"])
def comparison(request, tmp_path_factory) -> dict:
    """Train, export and quantize one architecture both ways; the result of ``modelopt_compare.compare``."""
    arch = request.param
    work = tmp_path_factory.mktemp(arch)
    ckpt, fp32 = work / f"{arch}.pth", work / f"{arch}.onnx"
    run_cli("-q", "train", "--arch", arch, *TRAIN, "--out", ckpt, check=True)
    run_cli("-q", "export", "--model", ckpt, "--out", fp32, check=True)
    result = modelopt_compare.compare(modelopt_compare.CompareConfig(
        onnx=str(fp32), work=str(work / "compare"), val_limit=VAL_IMAGES))
    print(f"\n{arch}:\n{modelopt_compare.summary(result)}")  # shown by make test-modelopt (pytest -s)
    return result


def test_same_quantized_activation_tensors_as_modelopt(comparison):
    assert comparison["ours"]["activation_pairs"] == comparison["modelopt"]["activation_pairs"], \
        modelopt_compare.summary(comparison)
    assert (comparison["ours_only"], comparison["modelopt_only"]) == ([], []), modelopt_compare.summary(comparison)


def test_same_quantized_consumer_inputs_as_modelopt(comparison):
    # stricter than the tensors: a tensor quantized for some of its consumers only (a residual Add's conv branch)
    assert (comparison["edges_ours_only"], comparison["edges_modelopt_only"]) == ([], []), \
        modelopt_compare.summary(comparison)


def test_int8_agrees_with_fp32_at_least_as_often_as_model_optimizers(comparison):
    """Ranges as good as NVIDIA's: on the same images our INT8 model changes no more FP32 answers than Model
    Optimizer's (one image of slack in 10k for ties)."""
    ours, theirs = (comparison[m]["agreement_with_fp32"] for m in ("ours", "modelopt"))
    assert ours >= theirs - 1e-4, modelopt_compare.summary(comparison)


@pytest.mark.parametrize("quantizer", ["ours", "modelopt"])
def test_int8_within_a_third_of_a_point_of_fp32(comparison, quantizer):
    assert comparison["val_images"] >= 10_000
    drop_pt = 100 * (comparison["fp32"]["top1"] - comparison[quantizer]["top1"])
    assert drop_pt <= MAX_DROP_PT + 1e-9, modelopt_compare.summary(comparison)
