"""The machine's own limit: achievable multiply-accumulates per second, and what each benchmark row achieves.

A row's images/s says nothing about how close it is to what the machine can do. Here a large matrix product,
run through the same libraries the rows use, gives the achievable peak once per run (a few seconds):

- CPU: ONNX Runtime's ``MatMul`` (FP32) and ``MatMulInteger`` (u8 x s8 -> s32, the kernels its INT8 models
  use, VNNI/AMX where the CPU has them), with the benchmark's thread count.
- CUDA: PyTorch's FP32 (TF32 off), TF32, FP16 and BF16 ``matmul`` and ``torch._int_mm`` (INT8), timed with
  CUDA events.

A row's multiply-accumulates per image are the benchmark's own figure (``optimize.benchmark.measure.onnx_graph_stats``
for ONNX models, Torch-Pruning's counter for checkpoints), so its achieved MAC/s is ``images/s x MACs per image``
and its fraction of peak is that over the peak of its arithmetic (an INT8 row against the INT8 peak, FP32 against
FP32, FP16 against FP16).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from .configs import available_cores
from .timing import time_runs

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
        return cpu_peak(threads or available_cores(), seconds=seconds)
    except Exception as e:  # noqa: BLE001 - a missing peak leaves the fractions empty, never the report
        logger.warning("%s peak not measured: %s", device, e)
        return None
    finally:
        logger.debug("peak for %s measured in %.1f s", device, time.perf_counter() - start)
