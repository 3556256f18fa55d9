"""runners: the backend picked from the file, the same face for each, and the arithmetic each row is labelled with.

Tiny artifacts made in-process (a ResNet-18 checkpoint at 8 px, the ``tiny_onnx`` export): what is checked is
which runner answers and that it answers what the model computes, not accuracy.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import FIXED_BATCH, TINY_CLASSES, TINY_SIDE
from optimize.checkpoint import save_checkpoint
from optimize.errors import RunnerError
from optimize.models import build_resnet
from optimize.preprocess import fashion_mnist_preset
from optimize.runners import (OnnxRuntimeRunner, TorchRunner, backend_of, default_threads, float32_math,
                              open_runner, ort_cuda_providers)

CLASSES = [f"c{i}" for i in range(3)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained ResNet-18 checkpoint (3 classes, 8 px) and the module it holds."""
    torch.manual_seed(0)
    model = build_resnet("resnet18", len(CLASSES)).eval()
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pth", model, arch="resnet18", stem="imagenet",
                           class_names=CLASSES, preprocessing=fashion_mnist_preset(image_size=8))
    return path, model


def _batch(n: int, side: int = TINY_SIDE) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 3, side, side)).astype(np.float32)


@pytest.mark.parametrize("name, backend", [("m.pth", "torch"), ("m.PT", "torch"), ("m.ckpt", "torch"),
                                           ("m.onnx", "onnxruntime"), ("m.ort.onnx", "onnxruntime"),
                                           ("m.xml", "openvino"), ("m.engine", "tensorrt"), ("m.plan", "tensorrt"),
                                           ("m.trt", "tensorrt")])
def test_the_backend_is_read_from_the_file_name(name, backend):
    assert backend_of(name) == backend


def test_an_unknown_format_or_a_missing_file_is_one_error(tmp_path):
    with pytest.raises(RunnerError, match=r"cannot tell the model format from '\.h5'"):
        open_runner(tmp_path / "model.h5")
    with pytest.raises(RunnerError, match=r"model .*absent\.onnx does not exist; check the path"):
        open_runner(tmp_path / "absent.onnx")


def test_the_torch_runner_answers_what_the_checkpoint_computes(checkpoint):
    path, model = checkpoint
    runner = open_runner(path, threads=1)
    assert isinstance(runner, TorchRunner) and runner.label == "torch fp32 cpu"
    assert (runner.image_size, runner.class_names, runner.threads, runner.fixed_batch) == (8, CLASSES, 1, None)
    assert runner.preprocessing == fashion_mnist_preset(image_size=8) and runner.manifest == {}
    x = _batch(3, 8)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runner.infer(x), expected, rtol=1e-5, atol=1e-5)
    assert open_runner(path, channels_last=True, threads=1).label == "torch fp32 cpu channels_last"


def test_a_state_dict_without_preprocessing_needs_the_image_size(checkpoint, tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(checkpoint[1].state_dict(), path)
    with pytest.raises(RunnerError, match="records no preprocessing, so its input size is unknown: give --image-size"):
        open_runner(path)
    runner = open_runner(path, image_size=16)
    assert runner.image_size == 16 and runner.preprocessing is None and runner.infer(_batch(2, 16)).shape == (2, 3)


def test_the_onnx_runner_answers_what_the_exported_model_computes(tiny_onnx):
    runner = open_runner(tiny_onnx.path, threads=1)
    assert isinstance(runner, OnnxRuntimeRunner) and runner.label == "onnxruntime fp32 cpu"
    assert (runner.image_size, runner.fixed_batch, runner.max_batch, runner.threads) == (TINY_SIDE, None, None, 1)
    assert (runner.preprocessing, runner.class_names) == (tiny_onnx.preprocessing, tiny_onnx.class_names)
    x = _batch(5)
    out = runner.infer(x)
    assert out.shape == (5, TINY_CLASSES) and out.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(out), tiny_onnx.model(torch.from_numpy(x)).detach(), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(runner.run(runner.prepare(x)), out)


def test_a_fixed_batch_model_runs_other_batches_split_and_padded(tiny_onnx):
    """infer() takes any batch (chunks of the fixed size, the last zero-padded); run() takes exactly that size."""
    runner = open_runner(tiny_onnx.fixed_path, threads=1)
    assert runner.fixed_batch == runner.max_batch == FIXED_BATCH and runner.preprocessing is None
    for n in (1, FIXED_BATCH, 5):
        x = _batch(n)
        torch.testing.assert_close(torch.from_numpy(runner.infer(x)), tiny_onnx.model(torch.from_numpy(x)).detach(),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(RunnerError, match=rf"fixed batch of {FIXED_BATCH}: it runs batches of exactly "
                                          rf"{FIXED_BATCH}, not 3 \(infer\(\) splits and pads\)"):
        runner.prepare(_batch(3))


def test_a_precision_is_for_checkpoints_only(tiny_onnx):
    with pytest.raises(RunnerError, match="an ONNX model's or engine's precision is in the file"):
        open_runner(tiny_onnx.path, precision="fp16")


def test_tf32_is_a_cuda_mode(checkpoint, tiny_onnx, tmp_path):
    with pytest.raises(RunnerError, match="only offered on CUDA"):
        open_runner(checkpoint[0], precision="tf32")
    with pytest.raises(RunnerError, match="TF32 is a CUDA mode"):
        open_runner(tiny_onnx.path, tf32=True)
    (tmp_path / "m.xml").write_text("<net/>")
    with pytest.raises(RunnerError, match="TF32 is a CUDA mode; OpenVINO runs on the CPU"):
        open_runner(tmp_path / "m.xml", tf32=True)


def test_each_gpu_only_or_cpu_only_format_refuses_the_other_device(tmp_path):
    (tmp_path / "m.xml").write_text("<net/>")
    with pytest.raises(RunnerError, match="is an OpenVINO model: edgeopt runs it on the CPU"):
        open_runner(tmp_path / "m.xml", device="cuda")
    (tmp_path / "m.engine").write_bytes(b"serialized")
    with pytest.raises(RunnerError, match=r"has no build-engine manifest \(m\.engine\.json\)"):
        open_runner(tmp_path / "m.engine", device="cuda")


def test_an_fp32_torch_row_runs_ieee_fp32_whatever_was_set_before(checkpoint):
    """cuDNN convolutions default to TF32 on CUDA: an fp32 runner switches it off before every execution (rows
    of several runners take turns, and the flag is process-wide)."""
    runner = open_runner(checkpoint[0], threads=1)
    float32_math(torch, tf32=True)  # what cuDNN's default, or a tf32 row timed just before, leaves
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    runner.run(runner.prepare(np.zeros((2, 3, runner.image_size, runner.image_size), np.float32)))
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.rnn.fp32_precision == "ieee"


def test_onnx_runtime_cuda_gets_tf32_off_unless_asked():
    """ONNX Runtime's CUDA provider defaults use_tf32 to 1: an fp32 row must say 0."""
    assert ort_cuda_providers(tf32=False)[0] == ("CUDAExecutionProvider", {"use_tf32": "0"})
    assert ort_cuda_providers(tf32=True)[0] == ("CUDAExecutionProvider", {"use_tf32": "1"})
    assert ort_cuda_providers(tf32=False)[-1] == "CPUExecutionProvider"


def test_default_threads_are_the_cores_this_process_may_use(tiny_onnx):
    assert default_threads() == len(os.sched_getaffinity(0))
    assert open_runner(tiny_onnx.path).threads == default_threads()
