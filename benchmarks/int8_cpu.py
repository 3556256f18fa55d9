"""ONNX Runtime FP32 against INT8 (both calibrate targets) on this CPU, written to ``docs/RESULTS.md``.

Usage::

    python -m benchmarks.int8_cpu --model runs/bench-distill-prune/distilled_r18.pth

Two models: the given checkpoint at its own resolution (accuracy on the full val split, and speed), and a
ResNet-18 with random weights at 224x224 (speed only). Each is exported, calibrated for ``tensorrt``
(S8S8 Q/DQ) and for ``cpu`` (U8S8 QOperator against S8S8 QDQ), and every model is timed at batch 1 and 8
in the same run, with the same threads; figures are ratios to that run's FP32.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
from pathlib import Path

import torch

from optimize import calibrate, export
from optimize.checkpoint import save_checkpoint
from optimize.data import FASHION_MNIST_CLASSES
from optimize.models import build_resnet
from optimize.onnx_model import OnnxModel
from optimize.preprocess import fashion_mnist_preset

from .results_doc import write_section
from optimize.benchmark.report import cpu_name

logger = logging.getLogger("benchmarks.int8_cpu")


def _measure(name: str, ckpt: Path, work: Path, *, val_limit: int | None, num_images: int, seconds: float) -> dict:
    fp32 = work / f"{name}.onnx"
    export.run(export.ExportConfig(model=str(ckpt), out=str(fp32)))
    size = OnnxModel.read(fp32).image_size
    results = {"name": name, "size": size, "rows": []}
    trt = calibrate.run(calibrate.CalibConfig(onnx=str(fp32), out=str(work / f"{name}.trt.int8.onnx"),
                                              target="tensorrt", num_images=num_images, val_limit=val_limit))
    cpu = calibrate.run(calibrate.CalibConfig(onnx=str(fp32), out=str(work / f"{name}.cpu.int8.onnx"), target="cpu",
                                              num_images=num_images, val_limit=val_limit, timing_seconds=seconds))
    cm = cpu.manifest["metrics"]
    rows = [{"model": "FP32", "top1": cm["top1_fp32"], "b1": cm["fp32"]["img_per_s_b1"],
             "b8": cm["fp32"]["img_per_s_b8"]}]
    for form, c in sorted(cm["candidates"].items(), key=lambda fc: fc[0] != cm["form"]):
        rows.append({"model": f"INT8 cpu target, {form}" + (" (chosen)" if form == cm["form"] else ""),
                     "top1": c["top1"], "b1": c["img_per_s_b1"], "b8": c["img_per_s_b8"]})
    # the TensorRT form (float biases, residual placement) is timed here, as calibrate does not time it
    rows.append({"model": "INT8 tensorrt target, S8S8 Q/DQ", "top1": trt.manifest["metrics"]["top1_int8"],
                 **{f"b{b}": calibrate.throughput(trt.path, size, batch=b, seconds=seconds) for b in (1, 8)}})
    results["rows"] = rows
    base = results["rows"][0]
    for row in results["rows"]:
        for b in (1, 8):
            row[f"x{b}"] = row[f"b{b}"] / base[f"b{b}"]
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/bench-distill-prune/distilled_r18.pth",
                        help="checkpoint measured at its own resolution, with accuracy")
    parser.add_argument("--num-images", type=int, default=512, help="calibration images")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per model and batch size")
    parser.add_argument("--min-speedup", type=float, default=1.8,
                        help="goal: the chosen CPU INT8 form's throughput at batch 8, in multiples of FP32's")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.5, help="goal: top-1 points INT8 may lose")
    parser.add_argument("--work", default="runs/bench-int8")
    parser.add_argument("--doc", default="docs/RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    random224 = work / "resnet18_224_random.pth"
    torch.manual_seed(0)
    save_checkpoint(random224, build_resnet("resnet18", 10).eval(), arch="resnet18", stem="imagenet",
                    class_names=list(FASHION_MNIST_CLASSES), preprocessing=fashion_mnist_preset(image_size=224))
    tables = [_measure("distilled", Path(args.model), work, val_limit=None, num_images=args.num_images,
                       seconds=args.seconds),
              _measure("resnet18_224", random224, work, val_limit=256, num_images=64, seconds=args.seconds)]

    lines = ["## ONNX Runtime INT8 on this CPU (`benchmarks/int8_cpu.py`)", "",
             f"Made on {dt.date.today().isoformat()} with `python -m benchmarks.int8_cpu --model {args.model}`; "
             f"{cpu_name()}, {os.cpu_count()} threads for every model; img/s with inputs preallocated, "
             f"{args.seconds:g} s per figure after warm-up; ratios are to FP32 in the same run.", ""]
    verdicts = []
    for t in tables:
        accuracy = t["name"] == "distilled"
        what = ", top-1 on the full val split" if accuracy else ", random weights: speed only"
        lines += [f"### {t['name']} ({t['size']}x{t['size']}{what})", "",
                  "| model | top-1 | img/s b1 | × FP32 b1 | img/s b8 | × FP32 b8 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in t["rows"]:
            top1 = f"{r['top1']:.2%}" if accuracy and r["top1"] is not None else "—"
            lines.append(f"| {r['model']} | {top1} | {r['b1']:.0f} | {r['x1']:.2f} | {r['b8']:.0f} | {r['x8']:.2f} |")
        lines.append("")
        chosen = t["rows"][1]
        fast = chosen["x8"] >= args.min_speedup
        line = f"- {t['name']}: CPU INT8 at batch 8 is {chosen['x8']:.2f}× FP32 (goal ≥ {args.min_speedup:g}×: " \
               f"**{'met' if fast else 'missed'}**)"
        if accuracy:
            drop = 100 * (t["rows"][0]["top1"] - chosen["top1"])
            kept = drop <= args.max_accuracy_drop
            line += (f"; top-1 drop {drop:+.2f} pt (goal ≤ {args.max_accuracy_drop:g} pt: "
                     f"**{'met' if kept else 'missed'}**)")
        verdicts.append(line + ".")
    lines += ["Goals:", *verdicts]
    write_section(Path(args.doc), "int8-cpu", "\n".join(lines))
    logger.info("wrote %s:\n%s", args.doc, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
