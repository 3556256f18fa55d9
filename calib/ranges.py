"""Activation ranges for INT8: ONNX Runtime's calibrators, fed one batch at a time.

``quantize_static`` hands ONNX Runtime's calibrator every calibration batch at once: the entropy calibrator then
builds one histogram of 128 bins over the whole range and searches thresholds with 128 quantized bins, so the
only threshold it can try is the full range: "entropy" ranges come out as min/max ranges (up to 20x NVIDIA's on a
ResNet's last ReLUs). NVIDIA Model Optimizer patches ONNX Runtime to collect one batch at a time and merge the
histograms (``merge_histogram`` widens the first batch's bins to later outliers), which gives the search room.
:func:`collect` does that with ONNX Runtime's own calibrators (no patching), and takes the histogram sizes as
parameters: TensorRT's own entropy calibration uses 2048 bins against 128 quantized levels. The ranges are
written in ONNX Runtime's calibration cache format, which ``quantize_static(calibration_cache_path=...)`` reads.

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
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

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
        ranges = calibrator.compute_data()
    logger.debug("onnxruntime calibration: %s", chatter.getvalue().strip()[-500:])
    return ranges


def save(ranges, path: Path) -> None:
    """Write ``ranges`` as ONNX Runtime's calibration cache (what ``quantize_static`` reads back)."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    save_tensors_data(ranges, path)
