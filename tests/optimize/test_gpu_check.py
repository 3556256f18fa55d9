"""gpu-check on a machine without a GPU: it says what is missing in one line instead of reporting nothing.

The GPU paths themselves run only where there is a GPU (``make gpu-check``; figures in docs/RESULTS.md)."""

from __future__ import annotations

import os
import shutil

import pytest

from optimize import gpu_check
from conftest import error_line, run_cli


def test_without_nvidia_smi_it_says_a_gpu_is_needed(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    proc = run_cli("-q", "gpu-check", "--runs", tmp_path)
    assert proc.returncode == 2 and "nvidia-smi is not on PATH" in error_line(proc)


def test_with_a_driver_but_no_cuda_build_it_names_what_is_missing(trained, exported_onnx, tmp_path):
    """A stand-in nvidia-smi (a driver without a usable GPU for this PyTorch): first the missing run is named,
    then, given a run, the missing TensorRT (a check that skipped it must not pass), then, when the person allows
    that, PyTorch's missing CUDA device."""
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
    line = error_line(proc)
    assert proc.returncode == 2 and "would skip TensorRT" in line and "tensorrt:" in line, line
    assert "--allow-no-tensorrt" in line and "ALLOW_NO_TENSORRT=1" in line
    proc = run_cli("-q", "gpu-check", "--runs", runs, "--allow-no-tensorrt", env=env)
    assert proc.returncode == 2 and "sees no CUDA device" in error_line(proc)
    assert not (runs / "gpu-check" / "gpu_check.json").exists()


def test_gpu_check_names_the_extra_for_the_drivers_cuda(fake_gpu, monkeypatch):
    """TensorRT importable but cuda-python built for a newer CUDA than the driver: the check says which to install."""
    fake_gpu(driver=12040, runtime=13000)
    monkeypatch.setattr(gpu_check, "driver_cuda_version", lambda: 12040)  # what libcuda says on that machine
    found = gpu_check.backends()
    assert found["tensorrt"]["available"] and not found["cuda_binding"]["available"]
    why = gpu_check.tensorrt_missing(found)
    assert "cuda_binding" in why and "edgeopt[tensorrt-cu12]" in why and "CUDA 12.4" in why


def test_backends_give_a_reason_for_each_absent_one():
    found = gpu_check.backends()
    assert set(found) == {"torch", "onnxruntime", "tensorrt", "cuda_binding"}
    for name, b in found.items():
        assert b["available"] or b["reason"], name
    if not found["tensorrt"]["available"]:
        assert "pip install" in found["tensorrt"]["reason"]


def test_the_report_says_what_was_not_checked_and_the_clocks():
    figures = {"gpu": {"name": "NVIDIA H200", "driver_version": "580.159.03", "memory.total": "143771 MiB",
                       "compute_cap": "9.0"},
               "gpu_state": {"before": {"clocks.sm": "345 MHz", "power.draw": "75.1 W"},
                             "after": {"clocks.sm": "1980 MHz", "power.draw": "402.3 W"}},
               "backends": {"tensorrt": {"available": False, "reason": "TensorRT is not installed"}},
               "tensorrt_checked": False, "tensorrt_missing": "tensorrt: TensorRT is not installed",
               "engine_failures": {}, "context_check": {"ok": True, "teacher_logits_max_abs_diff": 0.0,
                                                        "primary_context_current": True},
               "rows": [], "timing": {"seconds": 2.0, "rounds": 3},
               "verdict": {"passed": True, "problems": []}, "benchmark": "b/report.md"}
    text = gpu_check.render_markdown(figures)
    assert "Verdict: passed (TensorRT NOT checked" in text and "TensorRT not checked: tensorrt:" in text
    assert "GPU before the benchmark: clocks.sm 345 MHz" in text and "GPU after the benchmark: clocks.sm 1980" in text
    assert "3 rounds of 2 s windows" in text
