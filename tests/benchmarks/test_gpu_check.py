"""gpu-check on a machine without a GPU: it says what is missing in one line instead of reporting nothing.

The GPU paths themselves run only where there is a GPU (``make gpu-check``; figures in docs/RESULTS.md)."""

from __future__ import annotations

import os
import shutil

import pytest

from benchmarks import gpu_check
from conftest import error_line, run_cli


def test_without_nvidia_smi_it_says_a_gpu_is_needed(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    proc = run_cli("-q", "gpu-check", "--runs", tmp_path)
    assert proc.returncode == 2 and "nvidia-smi is not on PATH" in error_line(proc)


def test_with_a_driver_but_no_cuda_build_it_names_what_is_missing(trained, exported_onnx, tmp_path):
    """A stand-in nvidia-smi (a driver without a usable GPU for this PyTorch): first the missing run is named,
    then, given a run, PyTorch's missing CUDA device."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 570.86, 81559 MiB, 9.0'\n")
    smi.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = run_cli("-q", "gpu-check", "--runs", tmp_path / "none", env=env)
    assert proc.returncode == 2 and "teacher.pth is missing" in error_line(proc) and "make demo" in error_line(proc)
    runs = tmp_path / "run"
    runs.mkdir()
    (runs / "teacher.pth").symlink_to(trained)
    (runs / "model.onnx").symlink_to(exported_onnx)
    proc = run_cli("-q", "gpu-check", "--runs", runs, env=env)
    assert proc.returncode == 2 and "sees no CUDA device" in error_line(proc)


def test_backends_give_a_reason_for_each_absent_one():
    found = gpu_check.backends()
    assert set(found) == {"torch", "onnxruntime", "tensorrt", "cuda_binding"}
    for name, b in found.items():
        assert b["available"] or b["reason"], name
    if not found["tensorrt"]["available"]:
        assert "pip install" in found["tensorrt"]["reason"]
