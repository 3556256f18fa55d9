"""Stage ``calibrate``: an FP32 ONNX model to INT8, calibrated on a class-stratified sample of training images.

Targets:
    ``tensorrt``: explicit quantization as TensorRT wants it (form ``qdq-tensorrt``): symmetric INT8 activations
        and weights, per-channel weights, zero points 0, biases left in float, Q/DQ pairs on the inputs of Conv /
        large Gemm / residual Add (shortcut side only) / pooling next to them and nowhere else, placed as NVIDIA
        Model Optimizer places them (:mod:`calib.qdq`; ONNX Runtime's ``quantize_static`` does the arithmetic).
    ``cpu``: whichever INT8 form runs fastest on this CPU under ONNX Runtime, *measured*: U8S8 in QOperator form
        (reduce_range, as ONNX Runtime advises for AVX2 without VNNI) against S8S8 in QDQ form. Both are
        written and timed against the FP32 model (``configs.CALIB_TIMED_BATCHES``); the faster at batch 8
        (``configs.CALIB_CHOOSING_BATCH``) becomes ``out``. INT8 is not assumed to be faster: the manifest says
        which form won and by how much.

The ranges come from :mod:`calib.ranges` (ONNX Runtime's calibrators fed one batch at a time, histograms merged,
as NVIDIA Model Optimizer collects them; ``quantize_static``'s all-at-once histogram turned entropy into min/max).
The calibration cache (``<out stem>.calib.json``, or ``cache``) holds ONNX Runtime's per-tensor ranges with the
method, image count, the FP32 ONNX's sha256 and the preprocessing, so another machine (a Jetson) can
re-quantize without the data; a cache made for another ONNX file or preprocessing is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from .artifacts import (Artifact, atomic_path, calibration_cache_path, check_not_input, prepare_output,
                                resolve_data, write_json, write_manifest)
from .batcher import ImageBatcher
from .configs import (CALIB_CHOOSING_BATCH, CALIB_TIMED_BATCHES, CPU_FORMS, FASHION_MNIST,
                      CalibConfig, available_cores)
from .data import DataSplits, load_data
from .errors import CalibrationError, DataError
from .onnx_model import OnnxModel
from .preprocess import Preprocessing
from .timing import time_throughput

from calib import qdq, ranges

logger = logging.getLogger(__name__)

CACHE_FORMAT = "edgeopt-calibration-cache"


def _ort():
    import onnxruntime as ort

    return ort


def session(path: str | Path):
    """An ONNX Runtime CPU session using every core this process may use (the same threads for every model compared)."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = available_cores()
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def throughput(path: str | Path, image_size: int, *, batch: int = 8, seconds: float = 2.0) -> float:
    """Images per second of ``path`` on ONNX Runtime CPU at ``batch`` (input preallocated, after warm-up)."""
    sess = session(path)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
    return time_throughput(lambda: sess.run(None, {name: x}), batch=batch, seconds=seconds, warmup=3)


def predictions(model: str | Path | Callable[[np.ndarray], np.ndarray],
                batcher: ImageBatcher) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 predictions of ``model`` over ``batcher`` and the labels.

    Args:
        model: an ONNX file (run by ONNX Runtime, :func:`session`), or any inference: a callable from a float32
            batch to its logits (e.g. :func:`optimize.openvino_backend.infer_function`), so that every backend's
            accuracy figures come from this one loop.
        batcher: the images and their labels.
    """
    if isinstance(model, (str, Path)):
        sess = session(model)
        name = sess.get_inputs()[0].name
        model = lambda batch: sess.run(None, {name: batch})[0]  # noqa: E731 - the ONNX file's inference
    preds, labels = [], []
    for batch, y in batcher:
        preds.append(model(batch).argmax(1))
        labels.append(y)
    return np.concatenate(preds), np.concatenate(labels)


def _read_cache(path: Path, onnx_sha: str, preprocessing: Preprocessing, method: str) -> dict[str, Any]:
    rebuild = "delete it and run calibrate with --data to rebuild it, or pass another --cache"
    try:
        cache = json.loads(path.read_bytes())
    except OSError as e:
        raise CalibrationError(f"calibration cache {path} is unreadable ({e.strerror or e}); {rebuild}") from e
    except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for binary garbage
        raise CalibrationError(f"calibration cache {path} is not JSON ({type(e).__name__}); {rebuild}") from e
    if not isinstance(cache, dict) or cache.get("format") != CACHE_FORMAT:
        raise CalibrationError(f"{path} is not an edgeopt calibration cache; {rebuild}")
    if not isinstance(cache.get("ort"), dict) or not isinstance(cache.get("num_images"), int):
        raise CalibrationError(f"calibration cache {path} is damaged (no ranges or image count); {rebuild}")
    if cache.get("onnx_sha256") != onnx_sha:
        raise CalibrationError(f"calibration cache {path} was made for another ONNX file (sha256 "
                               f"{str(cache.get('onnx_sha256'))[:12]}...); recalibrate with --data, or give the "
                               "matching model")
    if cache.get("preprocessing") != preprocessing.to_dict():
        raise CalibrationError(f"calibration cache {path} was made with other preprocessing; recalibrate with --data")
    if cache.get("method") != method:
        raise CalibrationError(f"calibration cache {path} holds {cache.get('method')} ranges, not --method {method}")
    return cache


def _quantize(src: Path, dst: Path, form: str, method: str, ort_cache: Path) -> qdq.Placement | None:
    """Write ``dst`` in ``form`` with the ranges of ``ort_cache``; for ``qdq-tensorrt`` also return where its Q/DQ
    pairs ended up."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calib = {"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
             "percentile": CalibrationMethod.Percentile}[method]
    placement = None
    if form == "qdq-tensorrt":
        model = onnx.load(str(src))
        placement = qdq.plan(model)  # names unnamed nodes: the quantizer selects nodes by name
        onnx.save(model, str(src))
        kwargs = dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                      per_channel=True, reduce_range=False, op_types_to_quantize=placement.op_types,
                      nodes_to_quantize=placement.nodes, extra_options=qdq.quantizer_options(model))
        if placement.excluded:
            logger.info("left in float for TensorRT: %s", placement.excluded)
    elif form == "qdq-s8s8":
        kwargs = dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                      per_channel=True, reduce_range=False,
                      extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    else:  # qoperator-u8s8
        kwargs = dict(quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8,
                      weight_type=QuantType.QInt8, per_channel=True, reduce_range=True, extra_options={})
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):  # ORT's calibrators print() histogram sizes; keep stdout for us
        quantize_static(str(src), str(dst), None, calibrate_method=calib, calibration_cache_path=str(ort_cache),
                        **kwargs)
    if chatter.getvalue().strip():
        logger.debug("onnxruntime.quantization: %s", chatter.getvalue().strip())
    if placement is None:
        return None
    model = onnx.load(str(dst))
    qdq.finish(model, placement.residual)
    onnx.save(model, str(dst))
    return qdq.placement(model)


@dataclass(frozen=True)
class _Inputs:
    """What the stage works from, resolved and checked before any quantizing starts.

    Attributes:
        cfg: the stage's options, ``data`` filled in from what the model records when not given.
        src: the FP32 ONNX file.
        model: ``src`` read: its input, image size, metadata and sha256.
        out: the INT8 model to write (prepared: no stale manifest beside it).
        preprocessing: what ``export`` recorded; calibration and validation images go through it.
        class_names: what ``export`` recorded, or None.
        cache_path: the calibration cache read from (``--cache``) or written (beside ``out``).
        cache: the cache reused instead of calibrating from data, or None.
        splits: the calibration and validation images; None when quantizing from the cache alone.
        val: the validation batches accuracy is measured on, or None (no data).
    """

    cfg: CalibConfig
    src: Path
    model: OnnxModel
    out: Path
    preprocessing: Preprocessing
    class_names: list[str] | None
    cache_path: Path
    cache: dict[str, Any] | None
    splits: DataSplits | None
    val: ImageBatcher | None


def _resolve_inputs(cfg: CalibConfig) -> _Inputs:
    """Read and check the FP32 model, the cache and the data, every refusal before any long work (in the order
    that decides which error a user sees first)."""
    src = Path(cfg.onnx)
    model = OnnxModel.read(src)
    check_not_input(cfg.out, {"--onnx": cfg.onnx, "--cache": cfg.cache})
    out = prepare_output(cfg.out)
    model.require_dynamic_batch()
    if model.precision != "fp32":
        raise CalibrationError(f"{src} is already {model.precision.upper()}: calibrate the FP32 ONNX 'cli.py export' "
                               "wrote")
    preprocessing, class_names = model.preprocessing()
    cache_path = Path(cfg.cache) if cfg.cache else calibration_cache_path(out)
    cache = (_read_cache(cache_path, model.sha256, preprocessing, cfg.method) if cfg.cache and cache_path.exists()
             else None)
    if cfg.data is None:  # the data the model records; with a cache, a recorded folder that is gone is not needed
        try:
            cfg = replace(cfg, data=resolve_data(None, src, default=None if cache else FASHION_MNIST))
        except DataError:
            if not cache:
                raise
            logger.warning("%s's recorded data is not here: quantizing from the cache %s alone, no accuracy figures",
                           src, cache_path)
    if cfg.data is None and not cache:
        raise CalibrationError("INT8 needs calibration data or an existing calibration cache; pass --calib-data "
                               "(or --data) or --calib-cache")
    splits = val = None
    if cfg.data is not None:
        splits = _load_images(cfg, src, model, preprocessing, class_names, calibrating=cache is None)
        val = ImageBatcher(splits.val, batch_size=cfg.batch_size, image_size=model.image_size)
    return _Inputs(cfg, src, model, out, preprocessing, class_names, cache_path, cache, splits, val)


def _load_images(cfg: CalibConfig, src: Path, model: OnnxModel, preprocessing: Preprocessing,
                 class_names: list[str] | None, *, calibrating: bool) -> DataSplits:
    """The validation images and, when ``calibrating`` (no cache), ``cfg.num_images`` training images."""
    splits = load_data(cfg.data, preprocessing, train_limit=cfg.num_images, val_limit=cfg.val_limit,
                       augment=False, val_only=not calibrating)
    splits.check_model(src, class_names, model.num_classes)
    if calibrating and len(splits.train) < cfg.num_images:
        if len(splits.train) < cfg.batch_size:
            raise CalibrationError(f"{splits.name} has {len(splits.train)} training images, less than one batch "
                                   f"of {cfg.batch_size}; add images or lower --batch-size")
        logger.warning("%s has only %d training images: calibrating on those (in full batches of %d), not %d",
                       splits.name, len(splits.train), cfg.batch_size, cfg.num_images)
    return splits


def _calibrate(inputs: _Inputs, prepared: Path, work: Path) -> tuple[Path, int | None]:
    """ONNX Runtime's range file for ``prepared``: the reused cache's, or collected from the training images.

    Returns the file and the number of images calibrated on (None when the cache was reused).
    """
    cfg, ort_cache = inputs.cfg, work / "ort-cache.json"
    if inputs.cache:
        ort_cache.write_text(json.dumps(inputs.cache["ort"]))
        logger.info("reusing calibration cache %s (%d images, %s)", inputs.cache_path, inputs.cache["num_images"],
                    cfg.method)
        return ort_cache, None
    batcher = ImageBatcher(inputs.splits.train, batch_size=cfg.batch_size, image_size=inputs.model.image_size,
                           drop_last=True)
    if not batcher.count:
        raise CalibrationError(f"--num-images {cfg.num_images} gives no full batch of --batch-size "
                               f"{cfg.batch_size}; calibrate on more images or lower --batch-size")
    options = ranges.DEFAULTS[cfg.method]  # its percentile is --help's (configs.CALIB_PERCENTILE; a test ties them)
    logger.info("calibrating on %d training images (%s, %s)", batcher.count, cfg.method, options)
    feeds = ({inputs.model.input.name: batch} for batch, _ in batcher)
    ranges.save(ranges.collect(prepared, feeds, method=cfg.method, work=work, options=options), ort_cache)
    return ort_cache, batcher.count


def _quantize_forms(cfg: CalibConfig, prepared: Path, ort_cache: Path, work: Path) -> dict[str, dict[str, Any]]:
    """Every INT8 form the target asks for, from the same ranges: form -> {"path": its file in ``work``, and for
    ``qdq-tensorrt`` where its Q/DQ pairs are}."""
    forms = ["qdq-tensorrt"] if cfg.target == "tensorrt" else [cfg.form] if cfg.form else list(CPU_FORMS)
    candidates: dict[str, dict[str, Any]] = {}
    for form in forms:
        dst = work / f"{form}.onnx"
        placed = _quantize(prepared, dst, form, cfg.method, ort_cache)
        candidates[form] = {"path": dst}
        if placed is not None:
            candidates[form]["qdq"] = {"activation_pairs": placed.pairs, "by_consumer": placed.by_consumer}
    return candidates


def _measure(inputs: _Inputs, candidates: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """Top-1 and agreement on the validation images (when there are any) and, for the CPU target, speed at
    each of ``CALIB_TIMED_BATCHES``, of the FP32 model and each candidate (whose figures are added to its dict).

    Returns the FP32 model's figures and the number of validation images.
    """
    cfg, val, size = inputs.cfg, inputs.val, inputs.model.image_size
    fp32: dict[str, Any] = {"top1": None}
    labels = np.zeros(0)
    if val is not None:
        fp32_pred, labels = predictions(inputs.src, val)
        fp32["top1"] = float((fp32_pred == labels).mean())
    if cfg.target == "cpu":
        for b in CALIB_TIMED_BATCHES:
            fp32[f"img_per_s_b{b}"] = throughput(inputs.src, size, batch=b, seconds=cfg.timing_seconds)
    for c in candidates.values():
        c.update(top1=None, agreement_with_fp32=None)
        if val is not None:
            pred, _ = predictions(c["path"], val)
            c.update(top1=float((pred == labels).mean()), agreement_with_fp32=float((pred == fp32_pred).mean()))
        if cfg.target == "cpu":
            for b in CALIB_TIMED_BATCHES:
                c[f"img_per_s_b{b}"] = throughput(c["path"], size, batch=b, seconds=cfg.timing_seconds)
            for b in CALIB_TIMED_BATCHES:  # after the timings: the manifest's keys keep their order
                speedup = c[f"img_per_s_b{b}"] / fp32[f"img_per_s_b{b}"]
                c["speedup_vs_fp32" if b == CALIB_CHOOSING_BATCH else f"speedup_vs_fp32_b{b}"] = speedup
    return fp32, int(len(labels))


def _write_int8(inputs: _Inputs, candidates: dict[str, dict[str, Any]], ort_cache: Path,
                num_images: int | None) -> str:
    """Save the fastest candidate (the only one for TensorRT) as ``out`` with the FP32 model's metadata, and the
    calibration cache when this run calibrated; returns the form chosen. The candidates lose their paths."""
    chosen = max(candidates, key=lambda f: candidates[f].get(f"img_per_s_b{CALIB_CHOOSING_BATCH}", 0.0))
    chosen_model = onnx.load(str(candidates[chosen]["path"]))
    onnx.helper.set_model_props(chosen_model, dict(inputs.model.metadata))
    with atomic_path(inputs.out) as final:
        onnx.save(chosen_model, str(final))
    if num_images is not None:
        method = inputs.cfg.method
        write_json(inputs.cache_path, {"format": CACHE_FORMAT, "version": 1, "method": method,
                                       "collection": dataclasses.asdict(ranges.DEFAULTS[method]),
                                       "num_images": num_images, "onnx": inputs.src.name,
                                       "onnx_sha256": inputs.model.sha256,
                                       "preprocessing": inputs.preprocessing.to_dict(),
                                       "ort": json.loads(ort_cache.read_text())})
    for c in candidates.values():
        c.pop("path")
    return chosen


def _metrics(cfg: CalibConfig, chosen: str, candidates: dict[str, dict[str, Any]], fp32: dict[str, Any],
             val_images: int) -> dict[str, Any]:
    """The manifest's figures for the form chosen, logging how it compares with FP32."""
    best = candidates[chosen]
    if cfg.target == "cpu" and best["speedup_vs_fp32"] < 1.0:
        logger.warning("no INT8 form beats FP32 on this CPU (best: %s at %.2fx); keep the FP32 model for speed",
                       chosen, best["speedup_vs_fp32"])
    measured = best["top1"] is not None
    metrics = {"target": cfg.target, "form": chosen, "top1_fp32": fp32["top1"], "top1_int8": best["top1"],
               "top1_drop_pt": 100 * (fp32["top1"] - best["top1"]) if measured else None,
               "agreement_with_fp32": best["agreement_with_fp32"], "val_images": val_images,
               "candidates": candidates, "fp32": fp32, "threads": available_cores()}
    if cfg.target == "cpu":
        metrics["int8_faster_than_fp32"] = best["speedup_vs_fp32"] > 1.0
    if measured:
        logger.info("INT8 (%s, %s): top-1 %.4f vs FP32 %.4f, agreement %.4f", cfg.target, chosen, best["top1"],
                    fp32["top1"], best["agreement_with_fp32"])
    return metrics


def run(cfg: CalibConfig) -> Artifact:
    """Calibrate and quantize ``cfg.onnx``; returns the INT8 model written, with figures in its manifest.

    Resolve the inputs (every check before any work), collect the ranges (or reuse the cache), quantize each form
    the target asks for from them, measure, then write the chosen form, the cache and the manifest.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    inputs = _resolve_inputs(cfg)
    with tempfile.TemporaryDirectory(prefix="edgeopt-calib-") as tmp_dir:
        work = Path(tmp_dir)
        prepared = work / "prepared.onnx"
        quant_pre_process(str(inputs.src), str(prepared))
        ort_cache, num_images = _calibrate(inputs, prepared, work)
        candidates = _quantize_forms(inputs.cfg, prepared, ort_cache, work)
        fp32, val_images = _measure(inputs, candidates)
        chosen = _write_int8(inputs, candidates, ort_cache, num_images)
    metrics = _metrics(inputs.cfg, chosen, candidates, fp32, val_images)
    write_manifest(inputs.out, stage="calibrate", config=inputs.cfg,
                   inputs={"onnx": {"path": str(inputs.src), "sha256": inputs.model.sha256},
                           "cache": str(inputs.cache_path)},
                   preprocessing=inputs.preprocessing.to_dict(), class_names=inputs.class_names, metrics=metrics,
                   extra={"calibration_cache": inputs.cache_path.name, "input": inputs.model.input.name})
    return Artifact.of(inputs.out)
