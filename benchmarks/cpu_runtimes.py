"""CPU runtimes side by side on a pipeline run's final model: ONNX Runtime and OpenVINO, ours and the peer's.

On the run folder's ``model.onnx`` (the pruned model exported) and ``model.int8.ort.onnx`` (the CPU INT8 final
artifact), this builds, with the same 512 class-stratified calibration images:

- ``model.ov.xml``: OpenVINO FP32 (``build-engine --backend openvino``);
- ``model.int8.ov.xml``: OpenVINO INT8 from NNCF, as ``build-engine --backend openvino --precision int8`` makes it
  (float math FP32, the hint measured);
- ``model.qdq.onnx`` + ``model.qdq.ov.xml``: our qdq-s8s8 file (``calibrate --form qdq-s8s8``), under ONNX
  Runtime and converted for OpenVINO;
- ``peer.nncf-defaults.ov.xml``: the peer as a user would run it: NNCF's ``quantize`` with its defaults, compiled
  with OpenVINO's defaults (only the thread count set; float math BF16 where the CPU has it).

Then one benchmark run at the model's size (top-1 on the val split) and one at 224 px (speed only), every
runtime in the same interleaved rounds, each row against the machine's peak, and a RESULTS section
(``cpu-runtimes``) with the table and the machine's instruction sets.

    python -m benchmarks.cpu_runtimes --run runs/demo [--val-limit N] [--rounds 5 --seconds 1.0]

Nothing else may run on the machine meanwhile (two cores: a second process halves every figure).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from optimize import build_engine, calibrate, openvino_backend as ovb
from optimize.artifacts import read_manifest, write_manifest
from optimize.batcher import ImageBatcher
from optimize.benchmark import report
from optimize.benchmark.measure import cpu_name
from optimize.configs import BenchmarkConfig, BuildConfig, CalibConfig
from optimize.data import load_data
from optimize.onnx_model import OnnxModel

from .results_doc import write_section

logger = logging.getLogger("benchmarks.cpu_runtimes")
ROOT = Path(__file__).resolve().parents[1]


def _peer(onnx: Path, out: Path, data: str, images: int) -> Path:
    """NNCF's defaults (``nncf.quantize(model, dataset)``, ``subset_size`` = the images given) on the same images;
    the manifest asks the runner for OpenVINO's default compile settings (hint null)."""

    import nncf

    source = OnnxModel.read(onnx)
    preprocessing, class_names = source.preprocessing()
    splits = load_data(data, preprocessing, train_limit=images, val_limit=1, augment=False)
    batches = [x for x, _ in ImageBatcher(splits.train, batch_size=1, image_size=source.image_size)]
    model = nncf.quantize(ovb.convert(onnx), nncf.Dataset(batches), subset_size=len(batches))
    ovb.save(model, out)
    write_manifest(out, stage="peer", config={"nncf.quantize": "defaults", "subset_size": len(batches)},
                   inputs={"onnx": {"path": str(onnx), "sha256": source.sha256}},
                   preprocessing=preprocessing.to_dict(), class_names=class_names,
                   extra={"engine": {"backend": "openvino", "precision": "int8", "hint": None,
                                     "inference_precision": "OpenVINO's default"}})
    return out


def build(run: Path, work: Path, data: str, images: int) -> dict[str, Path]:
    """Every model of the table (built once; an existing one is reused)."""

    work.mkdir(parents=True, exist_ok=True)
    onnx = run / "model.onnx"
    models = {"ort_fp32": onnx, "ort_int8": run / "model.int8.ort.onnx", "ov_fp32": work / "model.ov.xml",
              "ov_int8": work / "model.int8.ov.xml", "qdq": work / "model.qdq.onnx",
              "ov_qdq": work / "model.qdq.ov.xml", "peer": work / "peer.nncf-defaults.ov.xml"}
    built = BuildConfig(onnx=str(onnx), out="", backend="openvino", calib_data=data, num_images=images,
                        calib_val_limit=1000)
    if not models["ov_fp32"].is_file():
        build_engine.run(replace(built, out=str(models["ov_fp32"])))
    if not models["ov_int8"].is_file():
        build_engine.run(replace(built, out=str(models["ov_int8"]), precision="int8"))
    if not models["qdq"].is_file():
        cache = run / "model.int8.calib.json"
        calibrate.run(CalibConfig(onnx=str(onnx), out=str(models["qdq"]), data=data, num_images=images,
                                  form="qdq-s8s8", target="cpu", val_limit=1000,
                                  cache=str(cache) if cache.is_file() else None))
    if not models["ov_qdq"].is_file():
        build_engine.run(replace(built, onnx=str(models["qdq"]), out=str(models["ov_qdq"]), precision="int8"))
    if not models["peer"].is_file():
        _peer(onnx, models["peer"], data, images)
    missing = [str(p) for p in models.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (run the pipeline on --run first)")
    return models


LABELS = {
    "ort_fp32": "ONNX Runtime FP32 (model.onnx)",
    "ort_int8": "ONNX Runtime INT8, the final artifact before OpenVINO (model.int8.ort.onnx)",
    "ov_fp32": "OpenVINO FP32, ours (model.ov.xml)",
    "qdq": "ONNX Runtime running our qdq-s8s8 file",
    "ov_qdq": "OpenVINO running our qdq-s8s8 file",
    "ov_int8": "OpenVINO + NNCF INT8, ours (model.int8.ov.xml: FP32 float math, hint measured)",
    "peer": "peer: OpenVINO + NNCF INT8 with their defaults",
}


def table(models: dict[str, Path], at_32: dict[str, Any], at_224: dict[str, Any]) -> list[str]:
    by_32 = {r["path"]: r for r in at_32["rows"]}
    by_224 = {r["path"]: r for r in at_224["rows"]}
    size = next(iter(by_32.values()))["input_size"]
    lines = [f"| runtime / model | top-1 | img/s b1 @{size} | b8 @{size} | b32 @{size} | b1 @224 | b8 @224 | "
             f"of peak b8 @{size} | of peak b8 @224 |", "| --- |" + " ---: |" * 8]
    for key, label in LABELS.items():
        a, b = by_32.get(str(models[key])), by_224.get(str(models[key]))
        if a is None or b is None:
            continue

        def img(r, batch):
            v = r["throughput"].get(batch)
            return f"{v:,.0f}" if v else "—"

        def frac(r):
            f = (r.get("peak_fraction") or {}).get("8")
            return f"{f:.1%}" if f is not None else "—"

        lines.append(f"| {label} | {a['top1']:.2%} | {img(a, '1')} | {img(a, '8')} | {img(a, '32')} | "
                     f"{img(b, '1')} | {img(b, '8')} | {frac(a)} | {frac(b)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a pipeline run folder")
    parser.add_argument("--data", default=None, help="default: what the run's model records")
    parser.add_argument("--images", type=int, default=512, help="calibration images (every INT8 model)")
    parser.add_argument("--val-limit", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: RUN/cpu-runtimes")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = args.out or args.run / "cpu-runtimes"
    data = args.data or (read_manifest(args.run / "model.onnx") or {}).get("config", {}).get("data") or "fashion-mnist"
    models = build(args.run, out / "models", data, args.images)
    listed = tuple(str(models[k]) for k in LABELS if k != "ort_fp32")
    common = dict(baseline=str(models["ort_fp32"]), models=listed, data=data, rounds=args.rounds,
                  seconds=args.seconds, threads=args.threads, progress=False)
    folder_32, folder_224 = report.report_folder(out), report.report_folder(out, 224)
    at_32 = report.run(BenchmarkConfig(**common, out=str(folder_32), val_limit=args.val_limit,
                                       batch_sizes=(1, 8, 32))).manifest
    at_224 = report.run(BenchmarkConfig(**common, out=str(folder_224), input_size=224,
                                        batch_sizes=(1, 8))).manifest
    env = at_32["environment"]
    peak = env.get("peak") or {}
    rates = ", ".join(f"{k.upper()} {v:,.1f}" for k, v in (peak.get("gmacs_per_s") or {}).items())
    final = at_32.get("final") or {}
    body = "\n".join([
        "## CPU runtimes side by side (`benchmarks/cpu_runtimes.py`)", "",
        f"Run folder: `{args.run}`; machine: {cpu_name()}; {env['threads']} threads for every runtime; "
        f"{args.rounds} interleaved rounds x {args.seconds:g} s, medians; top-1 on "
        f"{at_32['rows'][0]['val_images']} val images; every INT8 model from the same {args.images} "
        f"class-stratified calibration images. Peak (this machine, this run): {rates} GMAC/s "
        f"({peak.get('library', '?')}); fractions are of the peak of the row's arithmetic.", "",
        *table(models, at_32, at_224), "",
        f"Final artifact by the benchmark's rule among these: **{final.get('artifact')}** ({final.get('why')}).",
        f"Libraries: {', '.join(f'{k} {v}' for k, v in env['versions'].items())}.",
    ]) + "\n"
    write_section(args.doc, "cpu-runtimes", body)
    (out / "cpu_runtimes.json").write_text(json.dumps({"models": {k: str(v) for k, v in models.items()},
                                                       "report": str(folder_32),
                                                       "report_224": str(folder_224)}, indent=2) + "\n")
    logger.info("wrote section 'cpu-runtimes' of %s:\n%s", args.doc, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
