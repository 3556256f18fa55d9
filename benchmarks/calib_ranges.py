"""How the calibration ranges are collected, measured: INT8 agreement with FP32 for each way, beside NVIDIA
Model Optimizer's INT8 model of the same FP32 ONNX, written to ``docs/RESULTS.md`` (section calibration-ranges).

Usage (after ``make test-modelopt``, whose trained ResNet-18 / ResNet-50 and Model Optimizer models it reuses)::

    python -m benchmarks.calib_ranges runs/test-modelopt/resnet180 runs/test-modelopt/resnet500

Each folder holds ``<arch>.onnx`` (FP32) and ``compare/modelopt.int8.onnx``. Every way of collecting ranges
(:data:`WAYS`) quantizes the same prepared FP32 graph with the same TensorRT placement (:mod:`calib.qdq`), from
the same calibration images as ``calibrate`` takes; each INT8 model is scored with ONNX Runtime on the CPU over
the whole val split: top-1 and agreement with the FP32 model's predictions (how often INT8 changes an answer).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization.shape_inference import quant_pre_process

from calib import ranges
from optimize import calibrate
from optimize.batcher import ImageBatcher
from optimize.data import load_data
from optimize.onnx_model import OnnxModel

from .modelopt_compare import qdq_report
from .results_doc import write_section

logger = logging.getLogger("benchmarks.calib_ranges")

# label -> (method, options)
WAYS = {
    "entropy, all batches in one 128-bin histogram (quantize_static)":
        ("entropy", ranges.RangeOptions(per_batch=False)),
    "entropy, 128 bins per batch, merged (Model Optimizer's)": ("entropy", ranges.RangeOptions()),
    "entropy, 2048 bins per batch, merged": ("entropy", ranges.RangeOptions(num_bins=2048)),
    "entropy, 2048 bins, all batches at once": ("entropy", ranges.RangeOptions(per_batch=False, num_bins=2048)),
    "percentile 99.999, 2048 bins per batch": ("percentile", ranges.RangeOptions(num_bins=2048)),
    "percentile 99.99, 2048 bins per batch": ("percentile", ranges.RangeOptions(num_bins=2048, percentile=99.99)),
    "minmax": ("minmax", ranges.RangeOptions()),
}


def measure(folder: Path, *, num_images: int = 512, batch_size: int = 32, val_limit: int | None = None) -> dict:
    """Top-1 and agreement with FP32 of each way's INT8 model and of Model Optimizer's, on one trained model."""
    fp32 = next(p for p in folder.glob("*.onnx"))
    model = OnnxModel.read(fp32)
    preprocessing, _ = model.preprocessing()
    splits = load_data("fashion-mnist", preprocessing, train_limit=num_images, val_limit=val_limit, augment=False)
    calib = ImageBatcher(splits.train, batch_size=batch_size, image_size=model.image_size, drop_last=True)
    val = ImageBatcher(splits.val, batch_size=batch_size, image_size=model.image_size)
    fp32_pred, labels = calibrate.predictions(fp32, val)
    rows = [{"way": "FP32", "top1": float((fp32_pred == labels).mean()), "agreement": 1.0, "scale_ratio": None}]
    theirs = folder / "compare" / "modelopt.int8.onnx"
    their_scales = qdq_report(theirs, fp32).scales if theirs.is_file() else {}

    def score(label: str, path: Path) -> None:
        pred, _ = calibrate.predictions(path, val)
        scales = qdq_report(path, fp32).scales
        shared = sorted(set(scales) & set(their_scales))
        ratio = float(np.median([scales[t] / their_scales[t] for t in shared])) if shared else None
        rows.append({"way": label, "top1": float((pred == labels).mean()),
                     "agreement": float((pred == fp32_pred).mean()), "scale_ratio": ratio})
        logger.info("%s %s: top-1 %.4f, agreement %.4f, scales %s x Model Optimizer's", fp32.name, label,
                    rows[-1]["top1"], rows[-1]["agreement"], ratio)

    if theirs.is_file():
        score("Model Optimizer 0.47 (its own calibration, same images)", theirs)
    with tempfile.TemporaryDirectory(prefix="edgeopt-ranges-") as tmp_dir:
        tmp = Path(tmp_dir)
        prepared = tmp / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        for label, (method, options) in WAYS.items():
            cache = tmp / "cache.json"
            cache.unlink(missing_ok=True)
            batches = ({model.input.name: batch} for batch, _ in calib)
            ranges.save(ranges.collect(prepared, batches, method=method, work=tmp, options=options), cache)
            src = tmp / "src.onnx"
            shutil.copyfile(prepared, src)
            calibrate._quantize(src, tmp / "int8.onnx", "qdq-tensorrt", method, cache)
            score(label, tmp / "int8.onnx")
    return {"model": fp32.name, "val_images": int(len(labels)), "calibration_images": calib.count, "rows": rows}


def section(results: list[dict], command: str) -> str:
    lines = ["## Calibration ranges against Model Optimizer's (`benchmarks/calib_ranges.py`)", "",
             f"Made by `{command}` on {dt.date.today().isoformat()}: the ResNet-18 and ResNet-50 that "
             "`make test-modelopt` trained (Fashion-MNIST, 32 px, 3 epochs on 10k images) and exported, quantized "
             "for TensorRT (the same Q/DQ placement each time) from the same calibration images; ONNX Runtime CPU "
             "scores each INT8 model on the whole val split. Agreement: the share of val images whose INT8 answer "
             "is the FP32 model's.", ""]
    for r in results:
        lines += [f"### {r['model']} ({r['calibration_images']} calibration images, {r['val_images']} val images)",
                  "", "| ranges | top-1 | agreement with FP32 | activation scales / Model Optimizer's (median) |",
                  "| --- | ---: | ---: | ---: |"]
        for row in r["rows"]:
            ratio = "" if row["scale_ratio"] is None else f"{row['scale_ratio']:.2f}x"
            lines.append(f"| {row['way']} | {100 * row['top1']:.2f}% | {100 * row['agreement']:.2f}% | {ratio} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="make test-modelopt's per-model folders")
    parser.add_argument("--doc", type=Path, default=Path("docs/RESULTS.md"))
    parser.add_argument("--val-limit", type=int, help="val images scored (default: the whole split)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = [measure(folder, val_limit=args.val_limit) for folder in args.folders]
    command = "python -m benchmarks.calib_ranges " + " ".join(map(str, args.folders))
    write_section(args.doc, "calibration-ranges", section(results, command))
    logger.info("\n%s", section(results, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
