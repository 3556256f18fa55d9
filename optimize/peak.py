"""The machine's own limit: achievable multiply-accumulates per second, and what each benchmark row achieves.

A row's images/s says nothing about how close it is to what the machine can do. Here a large matrix product,
run through the same libraries the rows use, gives the achievable peak once per run (a few seconds):

- CPU: ONNX Runtime's ``MatMul`` (FP32) and ``MatMulInteger`` (u8 x s8 -> s32, the kernels its INT8 models
  use, VNNI/AMX where the CPU has them), with the benchmark's thread count.
- CUDA: PyTorch's FP32 (TF32 off), TF32, FP16 and BF16 ``matmul`` and ``torch._int_mm`` (INT8), timed with
  CUDA events.

A model's multiply-accumulates per image come from its ONNX graph (:func:`onnx_macs`: Conv, ConvInteger,
QLinearConv, Gemm, MatMul and their integer forms, with the batch axis set to 1 and the spatial size given), so a
row's achieved MAC/s is ``images/s x MACs per image`` and its fraction of peak is that over the peak of its
arithmetic (an INT8 row against the INT8 peak, FP32 against FP32, FP16 against FP16).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

logger = logging.getLogger(__name__)

# which peak a row's arithmetic is measured against
PEAK_FOR_PRECISION = {"fp32": "fp32", "tf32": "tf32", "fp16": "fp16", "bf16": "bf16", "int8": "int8",
                      "best": "int8"}


@dataclass(frozen=True)
class Peak:
    """Achievable multiply-accumulates per second by arithmetic, on one device, as measured."""

    device: str  # "cpu" or "cuda"
    macs_per_s: dict[str, float]  # "fp32" / "int8" (CPU); "fp32" / "tf32" / "fp16" / "bf16" / "int8" (CUDA)
    shape: tuple[int, int, int]  # M, K, N of the product timed
    threads: int | None = None
    library: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "macs_per_s": {k: round(v) for k, v in self.macs_per_s.items()},
                "gmacs_per_s": {k: round(v / 1e9, 1) for k, v in self.macs_per_s.items()},
                "shape_mkn": list(self.shape), "threads": self.threads, "library": self.library}

    def fraction(self, macs_per_s: float, precision: str) -> float | None:
        """``macs_per_s`` over the peak of ``precision``'s arithmetic, or None where it was not measured."""
        peak = self.macs_per_s.get(PEAK_FOR_PRECISION.get(precision, precision))
        return macs_per_s / peak if peak else None


def _best_rate(run: Callable[[], Any], macs: int, seconds: float, sync: Callable[[], Any] | None = None) -> float:
    """MAC/s of the fastest third of ``run``'s calls over ``seconds`` (a peak: the best the machine sustains)."""
    from .timing import time_runs

    times = sorted(time_runs(run, seconds=seconds, warmup=2, min_runs=5, synchronize=sync))
    return macs / statistics.median(times[: max(1, len(times) // 3)])


def cpu_peak(threads: int, *, size: int = 1024, seconds: float = 1.0) -> Peak:
    """FP32 and INT8 matrix products through ONNX Runtime on the CPU (``threads`` intra-op threads)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    m = k = n = size

    def session(graph: onnx.GraphProto) -> ort.InferenceSession:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    fp32 = session(helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])], "fp32",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "b")]))
    int8 = session(helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "az", "bz"], ["y"])], "int8",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
        [numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "b"),
         numpy_helper.from_array(np.array(128, np.uint8), "az"), numpy_helper.from_array(np.array(0, np.int8), "bz")]))
    a32 = {"a": rng.standard_normal((m, k)).astype(np.float32)}
    a8 = {"a": rng.integers(0, 256, (m, k), dtype=np.uint8)}
    macs = m * k * n
    rates = {"fp32": _best_rate(lambda: fp32.run(None, a32), macs, seconds),
             "int8": _best_rate(lambda: int8.run(None, a8), macs, seconds)}
    logger.info("CPU peak (%d threads, %dx%dx%d): FP32 %.1f, INT8 %.1f GMAC/s", threads, m, k, n,
                rates["fp32"] / 1e9, rates["int8"] / 1e9)
    return Peak("cpu", rates, (m, k, n), threads, f"onnxruntime {ort.__version__}")


def cuda_peak(*, size: int = 8192, seconds: float = 0.5) -> Peak:
    """FP32 (TF32 off), TF32, FP16, BF16 and INT8 matrix products through PyTorch on the current CUDA device."""
    import torch

    m = k = n = size
    macs = m * k * n
    sync = torch.cuda.synchronize
    rates: dict[str, float] = {}
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                                  ("fp16", torch.float16, False), ("bf16", torch.bfloat16, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(m, k, device="cuda", dtype=dtype)
            b = torch.randn(k, n, device="cuda", dtype=dtype)
            rates[name] = _best_rate(lambda: torch.matmul(a, b), macs, seconds, sync)
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    try:
        a8 = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        b8 = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8).t()  # column-major, as cuBLASLt wants
        rates["int8"] = _best_rate(lambda: torch._int_mm(a8, b8), macs, seconds, sync)
    except (RuntimeError, AttributeError) as e:  # no INT8 GEMM in this build or on this GPU
        logger.warning("INT8 GEMM not measured: %s", e)
    logger.info("CUDA peak (%dx%dx%d): %s", m, k, n,
                ", ".join(f"{k} {v / 1e12:.1f} TMAC/s" for k, v in rates.items()))
    return Peak("cuda", rates, (m, k, n), None, f"torch {torch.__version__} on {torch.cuda.get_device_name()}")


# -- a model's multiply-accumulates --------------------------------------------------------------------------

def onnx_macs(path: str | Path, image_size: int | None = None) -> int:
    """Multiply-accumulates of one image through the ONNX model at ``path`` (at ``image_size`` when given).

    Counts convolutions (``Conv``, ``ConvInteger``, ``QLinearConv``: output elements x input channels per group
    x kernel area) and matrix products (``Gemm``, ``QGemm``, ``MatMul``, ``MatMulInteger``, ``QLinearMatMul``);
    the rest (ReLU, Add, pooling) is a rounding error next to them in a ResNet. Shapes are propagated here rather
    than by ONNX's shape inference, which stops at ONNX Runtime's own operators (``QLinearAdd``), so every form
    of a model (FP32, QOperator, Q/DQ) counts the same.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    shapes: dict[str, list[int]] = {t.name: list(t.dims) for t in model.graph.initializer}
    graph_input = [i for i in model.graph.input if i.name not in shapes][0]
    dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ValueError(f"{path}: expected an image input [batch, channels, height, width], got {len(dims)} axes")
    size = image_size or dims[2]
    shapes[graph_input.name] = [1, dims[1], size, image_size or dims[3]]

    def ints(node: onnx.NodeProto, name: str, default: list[int]) -> list[int]:
        return next((list(a.ints) for a in node.attribute if a.name == name), default)

    def window(node: onnx.NodeProto, x: list[int], kernel: list[int]) -> list[int]:
        strides = ints(node, "strides", [1] * len(kernel))
        dilations = ints(node, "dilations", [1] * len(kernel))
        pads = ints(node, "pads", [0] * 2 * len(kernel))
        auto = next((a.s.decode() for a in node.attribute if a.name == "auto_pad"), "NOTSET")
        ceil = next((a.i for a in node.attribute if a.name == "ceil_mode"), 0)
        out = []
        for i, (n, k, s, d) in enumerate(zip(x[2:], kernel, strides, dilations)):
            if auto in ("SAME_UPPER", "SAME_LOWER"):
                out.append(-(-n // s))
                continue
            span = n + pads[i] + pads[i + len(kernel)] - d * (k - 1) - 1
            out.append((-(-span // s) if ceil else span // s) + 1)
        return out

    total = 0
    for node in model.graph.node:
        op = node.op_type
        x = shapes.get(node.input[0]) if node.input else None
        if x is None:
            continue
        if op in ("Conv", "ConvInteger", "QLinearConv"):
            w = shapes.get(node.input[3 if op == "QLinearConv" else 1])
            if not w or len(x) != 4:
                continue
            spatial = window(node, x, w[2:])
            total += w[0] * int(np.prod(spatial)) * int(np.prod(w[1:]))
            shapes[node.output[0]] = [x[0], w[0], *spatial]
        elif op in ("MaxPool", "AveragePool", "QLinearAveragePool"):
            shapes[node.output[0]] = [*x[:2], *window(node, x, ints(node, "kernel_shape", [1, 1]))]
        elif op in ("GlobalAveragePool", "GlobalMaxPool", "QLinearGlobalAveragePool"):
            shapes[node.output[0]] = [*x[:2], *([1] * (len(x) - 2))]
        elif op in ("Flatten", "Reshape"):
            shapes[node.output[0]] = [x[0], int(np.prod(x[1:]))]
        elif op in ("Gemm", "QGemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
            w = shapes.get(node.input[3 if op in ("QLinearMatMul", "QGemm") else 1])
            if not w or len(w) != 2:
                continue
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            inner, outer = (w[1], w[0]) if trans_b else (w[0], w[1])
            rows = int(np.prod(x[:-1]))
            total += rows * inner * outer
            shapes[node.output[0]] = [*x[:-1], outer]
        else:  # element-wise (ReLU, Add, QLinearAdd, Quantize/DequantizeLinear...): the first input's shape
            for out in node.output:
                shapes[out] = x
    return total


def row_efficiency(images_per_s: float, macs_per_image: int, precision: str, peak: Peak | None) -> dict[str, Any]:
    """A row's achieved MAC/s and its fraction of ``peak`` for its arithmetic (None where unmeasured)."""
    achieved = images_per_s * macs_per_image
    fraction = peak.fraction(achieved, precision) if peak else None
    return {"gmacs_per_s": round(achieved / 1e9, 3), "peak_fraction": None if fraction is None else round(fraction, 5)}


def measure_peak(device: str, threads: int | None = None, seconds: float = 1.0) -> Peak | None:
    """The peak for ``device`` ("cpu" or "cuda"; ``seconds`` per arithmetic), or None (logged) where it cannot be
    measured here."""
    start = time.perf_counter()
    try:
        if device == "cuda":
            return cuda_peak(seconds=seconds)
        import os

        return cpu_peak(threads or os.cpu_count() or 1, seconds=seconds)
    except Exception as e:  # noqa: BLE001 - a missing peak leaves the fractions empty, never the report
        logger.warning("%s peak not measured: %s", device, e)
        return None
    finally:
        logger.debug("peak for %s measured in %.1f s", device, time.perf_counter() - start)
