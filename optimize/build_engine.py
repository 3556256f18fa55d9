"""Stage ``build-engine``: an inference engine for one backend, precision and batch profile.

- ``onnxruntime`` (CPU edge boxes; runs anywhere): the ONNX Runtime-optimized model (``fp32``, or ``int8``
  through :mod:`optimize.calibrate` with the ``cpu`` target, which keeps the INT8 form measured fastest here).
  The optimized graph is not always faster (measured: an offline-optimized FP32 model slower than its input on
  a 2-core EPYC), so it is timed against its input on the spot, in interleaved rounds (:mod:`optimize.timing`),
  and the faster of the two by median is written; the manifest says which, with both figures.
- ``tensorrt`` (Jetson, NVIDIA servers; TensorRT 8.5 to 11): a serialized TensorRT engine
  (:mod:`optimize.tensorrt_backend`); ``int8`` needs a Q/DQ ONNX placed for TensorRT, made here through
  :mod:`optimize.calibrate` with the ``tensorrt`` target when the given ONNX is not quantized yet. ONNX Runtime's
  QOperator models (QLinearConv) and CPU-target Q/DQ models are refused: TensorRT can't parse the first and
  runs the second slower than FP16. DLA (``dla_core``) takes a static batch (min = opt = max) and fp16/int8.

The manifest beside the engine records the backend and its version, the GPU and compute capability
(TensorRT), precision, profile, the ONNX's sha256 and every flag, which is what a runtime checks before
loading it.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from . import calibrate, openvino_backend as ovb
from .artifacts import Artifact, atomic_path, calibration_cache_path, check_not_input, prepare_output, read_manifest, \
    sha256_file, write_manifest
from .batcher import ImageBatcher
from .configs import BuildConfig, CalibConfig, parse_size
from .cuda_runtime import device_facts
from .data import load_data
from .errors import ConfigError
from .fp16 import to_fp16_onnx
from .onnx_model import OnnxModel
from .openvino_backend import SUFFIX, import_openvino
from .runners import OnnxRuntimeRunner, default_threads
from .tensorrt_backend import EngineBuilder, Profile, check_dla, import_tensorrt, trt_version
from .timing import Race, cpu_facts, race

logger = logging.getLogger(__name__)

def check_tensorrt_input(model: OnnxModel) -> None:
    """Refuse ONNX files TensorRT would reject (ONNX Runtime-only operators) or build badly (a CPU-placed Q/DQ
    model), before any work."""
    issue = model.tensorrt_issue()
    if issue:
        raise ConfigError(f"{model.path}: {issue}, which TensorRT cannot parse; give the FP32 ONNX, or one from "
                          "'cli.py calibrate --target tensorrt'")
    if not model.is_qdq:
        return
    form = ((read_manifest(model.path) or {}).get("metrics") or {}).get("form")
    if form is not None and form != "qdq-tensorrt":
        raise ConfigError(f"{model.path} was quantized for the CPU ({form}): its Q/DQ placement breaks TensorRT's "
                          "fusions; give the FP32 ONNX with --calib-data, or one from 'cli.py calibrate --target "
                          "tensorrt'")


def int8_step(cfg: CalibConfig) -> Artifact:
    """build-engine's INT8 step: calibrate an FP32 ONNX (:func:`optimize.calibrate.run`).

    The one door from ``optimize`` up to ``calib`` besides the pipeline: calibration is a stage of its own above
    the foundation modules, which build-engine orchestrates here and ``package`` reuses to re-make an engine's
    Q/DQ ONNX from its cache.
    """

    return calibrate.run(cfg)


def _int8_onnx(cfg: BuildConfig, source: OnnxModel, target: str, work: Path) -> tuple[Path, dict[str, Any]]:
    """The INT8 ONNX to build from: the given one if quantized, else one calibrated here."""
    if source.precision == "int8":
        return source.path, {}
    if not cfg.calib_data and not cfg.calib_cache:
        raise ConfigError(f"--precision int8 needs --calib-data or --calib-cache ({cfg.onnx} is not quantized), or "
                          "an INT8 ONNX from 'cli.py calibrate'")
    if cfg.calib_cache and not Path(cfg.calib_cache).exists() and not cfg.calib_data:
        raise ConfigError(f"calibration cache {cfg.calib_cache} does not exist; pass --calib-data to make it")
    out = work / "model.int8.onnx"
    artifact = int8_step(CalibConfig(onnx=cfg.onnx, out=str(out), data=cfg.calib_data, num_images=cfg.num_images,
                                     method=cfg.calib_method, target=target, val_limit=cfg.calib_val_limit,
                                     cache=cfg.calib_cache or str(calibration_cache_path(cfg.out))))
    return out, artifact.manifest.get("metrics", {})


def _build_onnxruntime(cfg: BuildConfig, src: Path, out: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # EXTENDED fusions stay portable across CPUs; ALL would bake in this CPU's blocked layouts
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    facts: dict[str, Any] = {"onnxruntime": ort.__version__, "optimization": "ORT_ENABLE_EXTENDED",
                             "provider": "CPUExecutionProvider", "kept": "optimized", "comparison": None}
    with atomic_path(out) as tmp:
        opts.optimized_model_filepath = str(tmp)
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(tmp))
        onnx.helper.set_model_props(optimized, dict(metadata))  # export's record, kept
        onnx.save(optimized, str(tmp))
        if cfg.compare_rounds:
            comparison = time_optimized_against_input(tmp, src, batch=cfg.opt_batch, rounds=cfg.compare_rounds,
                                                      seconds=cfg.compare_seconds, threads=cfg.threads)
            facts["comparison"] = comparison
            facts["kept"] = comparison["kept"]
            if comparison["kept"] == "input":
                logger.warning("the ONNX Runtime-optimized model ran %.2fx its input %s at batch %d (%s): keeping "
                               "the input's graph as %s", comparison["ratio"], src.name, cfg.opt_batch,
                               comparison["verdict"], out.name)
                shutil.copyfile(src, tmp)
                facts["optimization"] = "none (the optimized graph was slower here)"
    return facts


def kept_facts(timed: Race) -> dict[str, Any]:
    """The manifest's record of the race between the optimized model and its input: which one is kept (the higher
    median img/s), and the comparison (ratio optimized / input, its range over the rounds, ``faster`` / ``slower``
    / ``within noise``), so a reader sees when the choice was within noise."""
    return {"kept": timed.kept, **timed.comparison, "optimized_img_per_s": timed.spreads["optimized"].to_dict(),
            "input_img_per_s": timed.spreads["input"].to_dict()}


def time_optimized_against_input(optimized: Path, original: Path, *, batch: int, rounds: int, seconds: float,
                                 threads: int | None) -> dict[str, Any]:
    """Both models on ONNX Runtime's CPU provider at ``batch``, interleaved rounds; :func:`kept_facts` of them."""
    runs = {}
    for name, path in (("optimized", optimized), ("input", original)):
        runner = OnnxRuntimeRunner(path, threads=threads)
        x = runner.prepare(np.random.default_rng(0).standard_normal(
            (batch, 3, runner.image_size, runner.image_size)).astype(np.float32))
        runs[name] = functools.partial(runner.run, x)  # the CPU provider returns finished: nothing to synchronise
    result = kept_facts(race(runs, batch=batch, rounds=rounds, seconds=seconds))
    result.update(batch=batch, rounds=rounds, seconds=seconds, machine=cpu_facts())
    return result


def _openvino_int8(cfg: BuildConfig, source: OnnxModel, preprocessing, class_names):
    """NNCF's INT8 of ``source`` on ``cfg.num_images`` class-stratified training images (calibrate's sample), and the
    figures against the FP32 conversion on the val split; an INT8 Q/DQ ONNX is converted as it is instead."""

    if source.precision == "int8":
        issue = source.tensorrt_issue()  # ONNX Runtime's own operators: OpenVINO reads standard ONNX only
        if issue or not source.is_qdq:
            raise ConfigError(f"{source.path}: {issue or 'it is not a Q/DQ model'}, which OpenVINO cannot read; give "
                              "the FP32 ONNX (NNCF quantizes it) or a Q/DQ one ('cli.py calibrate --form qdq-s8s8')")
        return ovb.convert(source.path), {"from": "the given Q/DQ ONNX"}, None
    if not cfg.calib_data:
        raise ConfigError(f"--backend openvino --precision int8 needs --calib-data ({source.path} is not quantized: "
                          "NNCF calibrates it), or a Q/DQ INT8 ONNX from 'cli.py calibrate --form qdq-s8s8'")
    size = source.image_size
    splits = load_data(cfg.calib_data, preprocessing, train_limit=cfg.num_images, val_limit=cfg.calib_val_limit,
                       augment=False)
    splits.check_model(source.path, class_names, source.num_classes)
    calib = ImageBatcher(splits.train, batch_size=1, image_size=size)  # NNCF counts samples: one image each
    if calib.count == 0:
        raise ConfigError(f"{splits.name} has no training images to calibrate on")
    fp32 = ovb.convert(source.path)  # the reference and NNCF's input: NNCF quantizes a copy, fp32 stays as it is
    int8 = ovb.quantize(fp32, (x for x, _ in calib), count=calib.count, preset=cfg.nncf_preset,
                        model_type=cfg.nncf_model_type)
    return int8, {"from": "NNCF post-training quantization", "num_images": calib.count, "preset": cfg.nncf_preset,
                  "model_type": cfg.nncf_model_type}, (fp32, ImageBatcher(splits.val, batch_size=64, image_size=size))


def _build_openvino(cfg: BuildConfig, source: OnnxModel, out: Path, preprocessing,
                    class_names) -> tuple[dict[str, Any], dict[str, Any]]:
    """The OpenVINO IR (``out`` and its .bin) for ``cfg.precision``; (engine facts, calibration figures)."""

    figures: dict[str, Any] = {}
    threads = cfg.threads or default_threads()
    if cfg.precision == "int8":
        model, figures, check = _openvino_int8(cfg, source, preprocessing, class_names)
        if check is not None:
            fp32_model, val = check
            fp32_pred, labels = calibrate.predictions(ovb.infer_function(fp32_model, threads=threads), val)
            int8_pred, _ = calibrate.predictions(ovb.infer_function(model, threads=threads), val)
            figures.update(top1_fp32=float((fp32_pred == labels).mean()), top1_int8=float((int8_pred == labels).mean()),
                           agreement_with_fp32=float((int8_pred == fp32_pred).mean()), val_images=int(len(labels)))
            figures["top1_drop_pt"] = 100 * (figures["top1_fp32"] - figures["top1_int8"])
            logger.info("OpenVINO INT8 (NNCF): top-1 %.4f vs FP32 %.4f, agreement %.4f", figures["top1_int8"],
                        figures["top1_fp32"], figures["agreement_with_fp32"])
    else:
        model = ovb.convert(source.path)
    ovb.save(model, out)
    facts: dict[str, Any] = {**ovb.cpu_facts(), "weights": ovb.weights_path(out).name,
                             "weights_sha256": sha256_file(ovb.weights_path(out)), "threads": threads,
                             "inference_precision": "f32", "hint": "LATENCY", "hint_comparison": None}
    if cfg.compare_rounds:
        comparison = ovb.time_hints(out, batch=cfg.opt_batch, threads=threads, rounds=cfg.compare_rounds,
                                    seconds=cfg.compare_seconds, size=source.image_size)
        facts.update(hint=comparison["kept"], hint_comparison=comparison)
        logger.info("OpenVINO hint at batch %d: %s (THROUGHPUT/LATENCY %.2fx, %s)", cfg.opt_batch, comparison["kept"],
                    comparison["throughput_vs_latency"]["ratio"], comparison["throughput_vs_latency"]["verdict"])
    return facts, figures


def _build_tensorrt(cfg: BuildConfig, src: Path, out: Path, work: Path, input_name: str, size: int) -> dict[str, Any]:
    gpu = device_facts()  # before the build: no CUDA binding must mean no engine, not an engine without manifest
    builder = EngineBuilder()
    fp16_conversion = None
    fp16_layers = cfg.precision == "fp16" or (cfg.precision == "int8" and cfg.int8_high_precision == "fp16")
    if builder.strongly_typed and fp16_layers:  # strongly typed: the precision lives in the ONNX
        fp16_conversion = to_fp16_onnx(src, work / "model.fp16.onnx")
        src = work / "model.fp16.onnx"
    network, _parser = builder.create_network(src)
    plan, facts = builder.build(network, precision=cfg.precision,
                                profile=Profile(cfg.min_batch, cfg.opt_batch, cfg.max_batch), input_name=input_name,
                                input_chw=(3, size, size), workspace=parse_size(cfg.workspace),
                                timing_cache=Path(cfg.timing_cache) if cfg.timing_cache else None,
                                sparse_weights=cfg.sparse_weights, dla_core=cfg.dla_core, tf32=cfg.tf32,
                                int8_high_precision=cfg.int8_high_precision)
    with atomic_path(out) as tmp:
        tmp.write_bytes(plan)
    return {"tensorrt": str(builder.trt.__version__), **gpu, **facts, "fp16_conversion": fp16_conversion,
            "unquantized_layers": cfg.int8_high_precision if cfg.precision == "int8" else None,
            "flags": {"sparse_weights": cfg.sparse_weights, "dla_core": cfg.dla_core, "tf32": cfg.tf32,
                      "int8_high_precision": cfg.int8_high_precision if cfg.precision == "int8" else None}}


def run(cfg: BuildConfig) -> Artifact:
    """Build the engine ``cfg`` describes and write it with its manifest."""
    src = Path(cfg.onnx)
    source = OnnxModel.read(src)
    source.require_dynamic_batch()
    input_name, size = source.input.name, source.image_size
    if source.precision == "int8" and cfg.precision != "int8":
        raise ConfigError(f"{src} is an INT8 model; build it with --precision int8, or give the FP32 ONNX for "
                          f"--precision {cfg.precision}")
    if cfg.backend == "openvino":

        import_openvino()  # before any work
        if Path(cfg.out).suffix != SUFFIX:
            raise ConfigError(f"--out {cfg.out}: an OpenVINO model is an .xml (its weights go in the .bin beside it); "
                              "name it like runs/model.ov.xml")
    if cfg.backend == "tensorrt":
        check_tensorrt_input(source)
        trt = import_tensorrt()  # fail before any long work (calibration) when it is absent or too old
        check_dla(trt_version(trt), cfg.precision, cfg.dla_core, cfg.int8_high_precision)
    check_not_input(cfg.out, {"--onnx": cfg.onnx, "--calib-cache": cfg.calib_cache,
                              "--timing-cache": cfg.timing_cache})
    out = prepare_output(cfg.out)
    preprocessing, class_names = source.preprocessing()
    if cfg.backend == "openvino":
        check_not_input(str(ovb.weights_path(cfg.out)), {"--onnx": cfg.onnx})
        engine, calib_metrics = _build_openvino(cfg, source, out, preprocessing, class_names)
    else:
        with tempfile.TemporaryDirectory(prefix="edgeopt-engine-") as tmp_dir:
            work = Path(tmp_dir)
            model, calib_metrics = src, {}
            if cfg.precision == "int8":
                model, calib_metrics = _int8_onnx(cfg, source, "cpu" if cfg.backend == "onnxruntime" else "tensorrt",
                                                  work)
            if cfg.backend == "onnxruntime":
                engine = _build_onnxruntime(cfg, model, out, source.metadata)
            else:
                engine = _build_tensorrt(cfg, model, out, work, input_name, size)
    engine.update(backend=cfg.backend, precision=cfg.precision,
                  profile={"min_batch": cfg.min_batch, "opt_batch": cfg.opt_batch, "max_batch": cfg.max_batch},
                  input={"name": input_name, "shape": ["batch", 3, size, size]})
    write_manifest(out, stage="build-engine", config=cfg,
                   inputs={"onnx": {"path": str(src), "sha256": source.sha256}},
                   preprocessing=preprocessing.to_dict(), class_names=class_names,
                   metrics={"calibration": calib_metrics} if calib_metrics else {}, extra={"engine": engine})
    return Artifact.of(out)
