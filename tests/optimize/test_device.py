"""The one device rule: every stage resolves ``--device`` alike and refuses a CUDA it cannot run with one error."""

from __future__ import annotations

import pytest
import torch

from conftest import error_line, run_cli
from optimize import device
from optimize.device import DeviceError, resolve_device
from optimize.errors import ConfigError


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine where PyTorch sees no CUDA device (whatever this one has)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_follows_pytorch_and_cpu_is_always_there(no_cuda, monkeypatch):
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda"
    assert device.torch_device("cuda", 1) == torch.device("cuda", 1)


def test_auto_is_cuda_only_where_every_backend_can_run_there(monkeypatch, exported_onnx):
    """PyTorch with CUDA but the CPU onnxruntime: auto keeps ONNX models (and a report listing one) on the CPU,
    an explicit cuda is refused, not softened."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device, "ort_has_cuda", lambda: False)
    assert device.resolve_for("auto", ["torch"]) == "cuda"
    assert device.resolve_for("auto", ["torch", "onnxruntime"]) == "cpu"
    assert device.resolve_for("cuda", ["onnxruntime"]) == "cuda"
    from optimize.runners import open_runner

    assert open_runner(exported_onnx, device="auto").device == "cpu"
    with pytest.raises(DeviceError, match="onnxruntime"):
        open_runner(exported_onnx, device="cuda")


def test_cuda_without_a_device_is_one_config_error_everywhere(no_cuda, trained, exported_onnx):
    """Training's device, the runners (infer, serve, benchmark) and evaluate raise the same error, same text."""
    from optimize.runners import open_runner

    with pytest.raises(DeviceError) as resolved:
        resolve_device("cuda")
    assert isinstance(resolved.value, ConfigError) and "sees no CUDA device" in str(resolved.value)
    for call in (lambda: device.torch_device("cuda"), lambda: open_runner(trained, device="cuda")):
        with pytest.raises(DeviceError) as raised:
            call()
        assert str(raised.value) == str(resolved.value)
    with pytest.raises(DeviceError, match="must be one of auto, cpu, cuda"):
        resolve_device("gpu")
    assert open_runner(exported_onnx, device="auto").device == "cpu"  # auto: the same rule as training


def test_onnx_on_cuda_without_the_cuda_provider_raises_not_falls_back(monkeypatch, exported_onnx, trained, tmp_path):
    """PyTorch has CUDA but ONNX Runtime does not: the runner and the benchmark refuse; no CPU row in a CUDA run."""
    from optimize.benchmark import measure
    from optimize.configs import BenchmarkConfig
    from optimize.runners import open_runner

    monkeypatch.setattr(device, "cuda_available", lambda: True)
    monkeypatch.setattr(device, "ort_has_cuda", lambda: False)
    monkeypatch.setattr(measure, "ort_has_cuda", lambda: False)
    with pytest.raises(DeviceError, match="ONNX Runtime") as from_runner:
        open_runner(exported_onnx, device="cuda")
    cfg = BenchmarkConfig(baseline=str(trained), models=(str(exported_onnx),), out=str(tmp_path), device="cuda")
    with pytest.raises(DeviceError) as from_benchmark:
        measure.entries(cfg)
    assert str(from_benchmark.value) == str(from_runner.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_cli_says_the_same_line_for_train_evaluate_and_benchmark(trained, exported_onnx, tmp_path):
    lines = {error_line(run_cli("-q", *args)) for args in (
        ("train", "--arch", "resnet18", "--epochs", "1", "--train-limit", "64", "--val-limit", "64",
         "--image-size", "16", "--device", "cuda", "--out", tmp_path / "t.pth"),
        ("evaluate", "--model", trained, "--val-limit", "64", "--device", "cuda"),
        ("benchmark", "--baseline", trained, "--models", exported_onnx, "--device", "cuda", "--out", tmp_path / "r"))}
    assert len(lines) == 1 and "--device cuda" in lines.pop()
