"""Activation ranges for INT8: ONNX Runtime's calibrators, fed one batch at a time.

``quantize_static`` hands ONNX Runtime's calibrator every calibration batch at once: the entropy calibrator then
builds one histogram of 128 bins over the whole range and searches thresholds with 128 quantized bins, so the
only threshold it can try is the full range: "entropy" ranges come out as min/max ranges (up to 20x NVIDIA's on a
ResNet's last ReLUs). NVIDIA Model Optimizer patches ONNX Runtime to collect one batch at a time and merge the
histograms (``merge_histogram`` widens the first batch's bins to later outliers), which gives the search room.
:func:`collect` does that with ONNX Runtime's own calibrators (no patching), and takes the histogram sizes as
parameters: TensorRT's own entropy calibration uses 2048 bins against 128 quantized levels. The ranges are
written in ONNX Runtime's calibration cache format, which ``quantize_static(calibration_cache_path=...)`` reads.

Merged histograms grow past 128 bins, and ONNX Runtime's threshold search (``get_entropy_threshold``) walks each
candidate in Python loops: minutes for a ResNet-50. :func:`entropy_threshold` is the same search, candidate by
candidate, with the bin sums done by numpy (the same integer arithmetic and ONNX Runtime's own smoothing and KL
functions, so the same thresholds, checked against ONNX Runtime's in the tests).

Every float tensor of the model is calibrated (the quantizer picks those it needs), so one cache serves every
INT8 form (TensorRT's Q/DQ, the CPU's QOperator and QDQ).

Example::

    ranges = collect(prepared_onnx, batches, method="entropy", work=tmp)
    save(ranges, tmp / "ort-cache.json")   # then quantize_static(..., calibration_cache_path=that file)
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RangeOptions:
    """How a method's ranges are collected.

    Attributes:
        per_batch: histogram each batch and merge (Model Optimizer's way); False: all batches in one histogram
            (``quantize_static``'s way).
        num_bins: histogram bins (entropy, percentile); entropy searches thresholds from ``num_quantized_bins``
            bins around zero up to all of them.
        num_quantized_bins: the quantized levels the entropy search compares against (128: INT8's half range).
        percentile: the percentile method's cut.
    """

    per_batch: bool = True
    num_bins: int = 128
    num_quantized_bins: int = 128
    percentile: float = 99.999


# the default per method; benchmarks/calib_ranges.py measured them (docs/RESULTS.md, calibration-ranges)
DEFAULTS = {"entropy": RangeOptions(), "minmax": RangeOptions(), "percentile": RangeOptions(num_bins=2048)}


class _Batches:
    """ONNX Runtime's CalibrationDataReader face over an iterator of input dicts."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]]):
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def collect(model_path: str | Path, batches: Iterable[dict[str, np.ndarray]], *, method: str, work: Path,
            options: RangeOptions | None = None):
    """Calibrate every float tensor of ``model_path`` on ``batches`` (``{input name: float32 batch}``).

    Returns:
        ONNX Runtime's ``TensorsData`` (the ranges, with the method's ``CalibrationMethod``).
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, create_calibrator

    opts = options or DEFAULTS[method]
    calib_method = {"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
                    "percentile": CalibrationMethod.Percentile}[method]
    extra = {"num_bins": opts.num_bins, "num_quantized_bins": opts.num_quantized_bins,
             "percentile": opts.percentile, "symmetric": method == "percentile"}
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):  # the calibrators print() histogram sizes; stdout is cli.py's
        calibrator = create_calibrator(Path(model_path), None, augmented_model_path=str(work / "augmented.onnx"),
                                       calibrate_method=calib_method, extra_options=extra)
        if opts.per_batch:
            count = 0
            for batch in batches:
                calibrator.collect_data(_Batches([batch]))
                count += 1
            if not count:
                raise ValueError("no calibration batch")
        else:
            calibrator.collect_data(_Batches(batches))
        if method == "entropy":  # ONNX Runtime's compute_data, with the search of entropy_threshold
            found = {name: (*entropy_threshold(histogram, opts.num_quantized_bins), *histogram[:2])
                     for name, histogram in calibrator.collector.histogram_dict.items()}
            ranges = TensorsData(calib_method, found)
        else:
            ranges = calibrator.compute_data()
    logger.debug("onnxruntime calibration: %s", chatter.getvalue().strip()[-500:])
    return ranges


def entropy_threshold(histogram: tuple, num_quantized_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(low, high)`` range minimizing the KL divergence between a histogram and its quantized copy: ONNX
    Runtime's ``HistogramCollector.get_entropy_threshold``, its loops over bins done by numpy.

    Args:
        histogram: ``(counts, edges, min, max, ...)`` as ONNX Runtime's histogram collector keeps it.
        num_quantized_bins: quantized levels compared against (128).
    """
    from onnxruntime.quantization.calibrate import entropy
    from onnxruntime.quantization.quant_utils import smooth_distribution

    hist, edges = np.asarray(histogram[0]), histogram[1]
    num_bins = hist.size
    zero, half = num_bins // 2, num_quantized_bins // 2
    below = np.concatenate([[0], np.cumsum(hist)])  # below[k]: the count under bin k
    candidates = range(half, zero + 1)
    divergences = np.zeros(len(candidates))
    for k, i in enumerate(candidates):
        start, end = zero - i, min(zero + i + 1, num_bins)
        sliced = hist[start:end]
        p = sliced.copy()
        p[0] += below[start]  # outliers go to the edge bins
        p[-1] += below[-1] - below[end]
        merged = sliced.size // num_quantized_bins
        whole = num_quantized_bins * merged
        quantized = sliced[:whole].reshape(num_quantized_bins, merged).sum(axis=1)
        quantized[-1] += sliced[whole:].sum()
        norm = (p[:whole] != 0).reshape(num_quantized_bins, merged).sum(axis=1)
        q = np.zeros(p.size, dtype=np.int64)
        spread = np.divide(quantized, norm, out=np.zeros(num_quantized_bins), where=norm != 0)
        q[:whole] = np.repeat(spread, merged)  # truncated to integers, as ONNX Runtime's int64 array does
        p, q = smooth_distribution(p), smooth_distribution(q)
        divergences[k] = np.inf if p is None or q is None else entropy(p, q)
    best = int(np.argmin(divergences)) + half
    low, high = edges[zero - best], edges[min(zero + best + 1, num_bins)]
    if low < histogram[2]:
        low = histogram[2]
    if high > histogram[3]:
        high = histogram[3]
    return low, high


def save(ranges, path: Path) -> None:
    """Write ``ranges`` as ONNX Runtime's calibration cache (what ``quantize_static`` reads back)."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    save_tensors_data(ranges, path)
