"""The ONNX opsets edgeopt writes: the default, and what the installed exporter and onnx can write.

Its own module, below both ``configs`` (whose ExportConfig checks ``--opset`` up front) and ``export`` (which
writes it), so that neither imports the other.
"""

from __future__ import annotations

from .errors import ConfigError

DEFAULT_OPSET = 17  # suits TensorRT 8.6 and later, and ONNX Runtime
# the lowest opset torch's dynamo exporter writes natively (its torchlib); lower ones are converted down after its
# optimizer ran (asked for directly, torch converts before optimizing, fails on ResNets and keeps 18)
DYNAMO_OPSET = 18


def opset_range() -> tuple[int, int]:
    """The opsets both exporters can write (the TorchScript one bounds it: it is the fallback) and onnx knows."""
    import onnx

    try:
        from torch.onnx import _constants  # private: the exporter's own limits, with fallbacks if it moves
    except ImportError:
        _constants = None
    low = getattr(_constants, "ONNX_MIN_OPSET", 7)
    high = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", getattr(_constants, "ONNX_MAX_OPSET", 17))
    return low, min(high, onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> None:
    """ExportConfig's check: an opset the exporter writes and the installed onnx knows."""
    import torch

    low, high = opset_range()
    if not low <= opset <= high:
        raise ConfigError(f"--opset {opset}: torch {torch.__version__}'s ONNX exporter writes opsets {low} to {high}; "
                          f"give one of those ({DEFAULT_OPSET} suits TensorRT 8.6 and later, and ONNX Runtime)")
