"""One device rule: ``auto`` / ``cpu`` / ``cuda`` resolved in one place, one error when the device cannot run.

Training (:mod:`optimize.loop`), ``evaluate``, the runners (``infer``, ``serve``, ``benchmark``) and the pipeline
resolve ``--device`` here, so ``auto`` means the same everywhere (CUDA when PyTorch sees a device, else the CPU)
and a ``cuda`` this machine cannot honour fails the same way everywhere: :class:`DeviceError`, naming what is
missing and the fix. ONNX Runtime's CUDA provider comes from another package (onnxruntime-gpu) than PyTorch's
CUDA, so it has its own check, :func:`require_ort_cuda`; nothing falls back to the CPU without being told to.

torch and onnxruntime are imported inside the functions: configs and ``cli.py --help`` stay light.

Example::

    device = resolve_device(cfg.device)    # "cpu" or "cuda"; DeviceError when cuda is asked for and absent
    if device == "cuda" and backend == "onnxruntime":
        require_ort_cuda()                 # DeviceError naming the package to install
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .configs import DEVICES
from .errors import DeviceError

if TYPE_CHECKING:
    import torch


def cuda_available() -> bool:
    """Whether PyTorch sees a CUDA device (the test behind ``auto``)."""
    import torch

    return torch.cuda.is_available()


def resolve_device(name: str) -> str:
    """``cpu`` or ``cuda`` for ``--device name``: ``auto`` is CUDA when PyTorch sees a device, else the CPU.

    Raises:
        DeviceError: ``cuda`` asked for where PyTorch sees no CUDA device, or a name outside :data:`DEVICES`.
    """
    if name not in DEVICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICES)}, not {name!r}")
    if name == "auto":
        return "cuda" if cuda_available() else "cpu"
    if name == "cuda" and not cuda_available():
        raise DeviceError(f"--device cuda: {torch_cuda_missing()}; or use --device cpu (or auto)")
    return name


def resolve_for(name: str, backends) -> str:
    """:func:`resolve_device` for artifacts of these backends (``torch``, ``onnxruntime``, ``tensorrt``): ``auto`` is
    CUDA only when every one of them can run there (ONNX Runtime's CUDA comes from onnxruntime-gpu, not from
    PyTorch), else the CPU; an explicit ``cuda`` is not softened (the runner raises where it cannot run)."""
    device = resolve_device(name)
    if name == "auto" and device == "cuda" and "openvino" in set(backends):
        return "cpu"  # edgeopt runs OpenVINO on its CPU plugin
    if name == "auto" and device == "cuda" and "onnxruntime" in set(backends) and not ort_has_cuda():
        return "cpu"
    return device


def torch_device(name: str, local_rank: int = 0) -> "torch.device":
    """:func:`resolve_device` as a ``torch.device`` (``cuda:local_rank`` for a torchrun worker)."""
    import torch

    return torch.device("cuda", local_rank) if resolve_device(name) == "cuda" else torch.device("cpu")


def torch_cuda_missing() -> str:
    """Why ``cuda`` cannot run here, as :func:`resolve_device` and ``gpu-check`` say it."""
    import torch

    if torch.version.cuda is None:
        return f"PyTorch {torch.__version__} is a CPU-only build and sees no CUDA device; install a CUDA build"
    return (f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device: no GPU here, or its "
            "driver is missing or too old")


def ort_has_cuda() -> bool:
    """Whether this ONNX Runtime offers its CUDA execution provider."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def ort_cuda_missing() -> str:
    """Why ONNX Runtime has no CUDA provider here, and the fix (read the installed packages)."""
    from importlib import metadata

    installed = set()
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(name)
            installed.add(name)
        except metadata.PackageNotFoundError:
            pass
    if installed == {"onnxruntime", "onnxruntime-gpu"}:
        return ("onnxruntime and onnxruntime-gpu are both installed and the CPU one shadows the CUDA provider: "
                "'pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu'")
    if "onnxruntime-gpu" in installed:
        return ("onnxruntime-gpu is installed but its CUDA provider did not load (CUDA or cuDNN libraries missing "
                "or of another major version)")
    return "ONNX Runtime has no CUDA provider here: swap onnxruntime for onnxruntime-gpu (see the README's GPU notes)"


def require_ort_cuda() -> None:
    """Raise :class:`DeviceError` unless ONNX Runtime can run on CUDA: a CUDA run never drops to the CPU unasked."""
    if not ort_has_cuda():
        raise DeviceError(f"--device cuda for an ONNX model: {ort_cuda_missing()}; or use --device cpu")
