"""runners: what each backend's runner sets for the arithmetic its row is labelled with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optimize.errors import RunnerError
from optimize.runners import float32_math, open_runner, ort_cuda_providers


def test_an_fp32_torch_row_runs_ieee_fp32_whatever_was_set_before(trained):
    """cuDNN convolutions default to TF32 on CUDA: an fp32 runner switches it off before every execution (rows
    of several runners take turns, and the flag is process-wide)."""
    runner = open_runner(trained)
    float32_math(torch, tf32=True)  # what cuDNN's default, or a tf32 row timed just before, leaves
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    runner.run(runner.prepare(np.zeros((2, 3, runner.image_size, runner.image_size), np.float32)))
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.rnn.fp32_precision == "ieee"


def test_tf32_is_a_cuda_mode(trained, exported_onnx):
    with pytest.raises(RunnerError, match="only offered on CUDA"):
        open_runner(trained, precision="tf32")
    with pytest.raises(RunnerError, match="TF32 is a CUDA mode"):
        open_runner(exported_onnx, tf32=True)


def test_onnx_runtime_cuda_gets_tf32_off_unless_asked():
    """ONNX Runtime's CUDA provider defaults use_tf32 to 1: an fp32 row must say 0."""
    assert ort_cuda_providers(tf32=False)[0] == ("CUDAExecutionProvider", {"use_tf32": "0"})
    assert ort_cuda_providers(tf32=True)[0] == ("CUDAExecutionProvider", {"use_tf32": "1"})
    assert ort_cuda_providers(tf32=False)[-1] == "CPUExecutionProvider"
