"""Stage ``build-engine``: an inference engine for one backend, precision and batch profile.

- ``onnxruntime`` (CPU edge boxes; runs anywhere): the ONNX Runtime-optimized model (``fp32``, or ``int8``
  through :mod:`calib.calibrate` with the ``cpu`` target, which keeps the INT8 form measured fastest here).
  The optimized graph is not always faster (measured: an offline-optimized FP32 model slower than its input on
  a 2-core EPYC), so it is timed against its input on the spot, in interleaved rounds (:mod:`optimize.timing`),
  and the faster of the two by median is written; the manifest says which, with both figures.
- ``tensorrt`` (Jetson, NVIDIA servers; TensorRT 8.5 to 11): a serialized TensorRT engine
  (:mod:`optimize.tensorrt_backend`); ``int8`` needs a Q/DQ ONNX placed for TensorRT, made here through
  :mod:`calib.calibrate` with the ``tensorrt`` target when the given ONNX is not quantized yet. ONNX Runtime's
  QOperator models (QLinearConv) and CPU-target Q/DQ models are refused: TensorRT can't parse the first and
  runs the second slower than FP16. DLA (``dla_core``) takes a static batch (min = opt = max) and fp16/int8.

The manifest beside the engine records the backend and its version, the GPU and compute capability
(TensorRT), precision, profile, the ONNX's sha256 and every flag, which is what a runtime checks before
loading it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from calib import calibrate
from calib.batcher import onnx_input
from .artifacts import Artifact, atomic_path, check_not_input, prepare_output, read_manifest, sha256_file, \
    write_manifest
from .errors import ConfigError
from .runners import QUANT_OPS, onnx_precision
from .tensorrt_backend import EngineBuilder, Profile, device_facts, import_tensorrt, to_fp16_onnx
from .timing import Spread, compare, cpu_facts, images_per_second, interleaved, time_runs

logger = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")


def parse_size(text: str | int) -> int:
    """``2G`` / ``512M`` / ``1073741824`` -> bytes."""
    if isinstance(text, int):
        return text
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)
    except ValueError as e:
        raise ConfigError(f"cannot read size {text!r}; write e.g. 2G, 512M or a byte count") from e


@dataclass(frozen=True)
class BuildConfig:
    """Options of ``cli.py build-engine``.

    Attributes:
        onnx: FP32 ONNX from ``export`` (or an INT8 one from ``calibrate``).
        out: engine to write (``.engine`` for TensorRT, ``.onnx`` for ONNX Runtime).
        backend: ``onnxruntime`` or ``tensorrt``.
        precision: ``fp32``, ``fp16`` (TensorRT only) or ``int8``.
        calib_data / calib_cache / calib_method / num_images: for ``int8`` from an FP32 ONNX.
        calib_val_limit: val images for that calibration's INT8-vs-FP32 accuracy figures (None: the whole split).
        min_batch / opt_batch / max_batch: the optimization profile over the batch axis.
        workspace: TensorRT workspace pool limit (``2G``).
        timing_cache: TensorRT timing cache file to load and update.
        sparse_weights: let TensorRT use 2:4 sparse tensor cores (prune with ``--method 2:4`` first).
        dla_core: build for this DLA core (Jetson), falling back to the GPU layer by layer; needs a static batch
            (min = opt = max) and fp16 or int8. The manifest lists the layers that fell back.
        tf32: TensorRT fp32 only: allow TF32 tensor-core math (faster on Ampere and later, 10-bit mantissa);
            off by default so that fp32 means FP32.
        compare_rounds / compare_seconds: ONNX Runtime only: rounds and window length of the timing of the
            optimized model against its input at ``opt_batch`` (``compare_rounds`` 0: keep the optimized one
            unmeasured).
        threads: ONNX Runtime only: CPU threads for that timing (default: every core this process may use).
    """

    onnx: str
    out: str
    backend: str = "onnxruntime"
    precision: str = "fp32"
    calib_data: str | None = None
    calib_cache: str | None = None
    calib_method: str = "entropy"
    num_images: int = 512
    calib_val_limit: int | None = None
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    workspace: str = "2G"
    timing_cache: str | None = None
    sparse_weights: bool = False
    dla_core: int | None = None
    tf32: bool = False
    compare_rounds: int = 5
    compare_seconds: float = 0.3
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.backend == "onnxruntime" and self.precision == "fp16":
            raise ConfigError("--precision fp16 is not offered for --backend onnxruntime: its CPU kernels have no "
                              "FP16 speed-up; use fp32 or int8, or --backend tensorrt")
        if self.backend == "onnxruntime" and (self.sparse_weights or self.dla_core is not None or self.timing_cache
                                              or self.tf32):
            raise ConfigError("--sparse-weights, --dla-core, --timing-cache and --tf32 are TensorRT options; drop "
                              "them or use --backend tensorrt")
        if self.compare_rounds < 0 or self.compare_seconds <= 0 or (self.threads is not None and self.threads < 1):
            raise ConfigError("--compare-rounds must be >= 0, --compare-seconds > 0 and --threads >= 1")
        if self.tf32 and self.precision != "fp32":
            raise ConfigError(f"--tf32 applies to --precision fp32 only, not {self.precision}")
        profile = Profile(self.min_batch, self.opt_batch, self.max_batch)
        if self.dla_core is not None:
            if self.dla_core < 0:
                raise ConfigError("--dla-core must be 0 or more (a Jetson Orin/Xavier has cores 0 and 1)")
            if self.precision == "fp32":
                raise ConfigError("--dla-core needs --precision fp16 or int8: DLA has no FP32")
            if not profile.static:
                raise ConfigError(f"--dla-core needs a static batch: --min-batch, --opt-batch and --max-batch equal "
                                  f"(got {self.min_batch}/{self.opt_batch}/{self.max_batch}); DLA takes no dynamic "
                                  "shapes")
        parse_size(self.workspace)


def is_quantized(path: str | Path) -> bool:
    return onnx_precision(path) == "int8"


def check_tensorrt_input(path: Path) -> None:
    """Refuse INT8 ONNX files TensorRT would reject or build badly, before any work."""
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    qoperator = sorted(ops & (QUANT_OPS - {"QuantizeLinear", "DequantizeLinear"}))
    if qoperator:
        raise ConfigError(f"{path} is ONNX Runtime's QOperator INT8 form ({', '.join(qoperator)}), which TensorRT "
                          "cannot parse; give the FP32 ONNX, or one from 'cli.py calibrate --target tensorrt'")
    if "QuantizeLinear" not in ops:
        return
    form = ((read_manifest(path) or {}).get("metrics") or {}).get("form")
    if form is not None and form != "qdq-tensorrt":
        raise ConfigError(f"{path} was quantized for the CPU ({form}): its Q/DQ placement breaks TensorRT's "
                          "fusions; give the FP32 ONNX with --calib-data, or one from 'cli.py calibrate --target "
                          "tensorrt'")


def _int8_onnx(cfg: BuildConfig, target: str, work: Path) -> tuple[Path, dict[str, Any]]:
    """The INT8 ONNX to build from: the given one if quantized, else one calibrated here."""
    if is_quantized(cfg.onnx):
        return Path(cfg.onnx), {}
    if not cfg.calib_data and not cfg.calib_cache:
        raise ConfigError(f"--precision int8 needs --calib-data or --calib-cache ({cfg.onnx} is not quantized), or "
                          "an INT8 ONNX from 'cli.py calibrate'")
    if cfg.calib_cache and not Path(cfg.calib_cache).exists() and not cfg.calib_data:
        raise ConfigError(f"calibration cache {cfg.calib_cache} does not exist; pass --calib-data to make it")
    out = work / "model.int8.onnx"
    artifact = calibrate.run(calibrate.CalibConfig(onnx=cfg.onnx, out=str(out), data=cfg.calib_data,
                                                   num_images=cfg.num_images, method=cfg.calib_method, target=target,
                                                   val_limit=cfg.calib_val_limit,
                                                   cache=cfg.calib_cache or str(Path(cfg.out).with_suffix(".calib.json"))))
    return out, artifact.manifest.get("metrics", {})


def _build_onnxruntime(cfg: BuildConfig, src: Path, out: Path) -> dict[str, Any]:
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
        onnx.helper.set_model_props(optimized, calibrate.metadata_props(src))
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


def faster_form(optimized: Spread, original: Spread) -> dict[str, Any]:
    """Which of the optimized model and its input to keep: the higher median img/s (the optimized one on a tie).

    The comparison (ratio optimized / input, its range over the rounds, ``faster``/``slower``/``within noise``)
    goes into the manifest, so a reader sees when the choice was within noise.
    """
    c = compare(optimized, original)
    kept = "input" if original.median > optimized.median else "optimized"
    return {"kept": kept, **c, "optimized_img_per_s": optimized.to_dict(), "input_img_per_s": original.to_dict()}


def time_optimized_against_input(optimized: Path, original: Path, *, batch: int, rounds: int, seconds: float,
                                 threads: int | None) -> dict[str, Any]:
    """Both models on ONNX Runtime's CPU provider at ``batch``, interleaved rounds; :func:`faster_form` of them."""
    import numpy as np

    from .runners import OnnxRuntimeRunner

    windows = {}
    for name, path in (("optimized", optimized), ("input", original)):
        runner = OnnxRuntimeRunner(path, threads=threads)
        x = runner.prepare(np.random.default_rng(0).standard_normal(
            (batch, 3, runner.image_size, runner.image_size)).astype(np.float32))
        for _ in range(3):  # warm-up before the first round
            runner.run(x)

        def window(secs: float, r=runner, x=x) -> float:
            return images_per_second(time_runs(lambda: r.run(x), seconds=secs, warmup=1), batch)

        windows[name] = window
    figures = interleaved(windows, rounds=rounds, seconds=seconds)
    result = faster_form(Spread.of(figures["optimized"]), Spread.of(figures["input"]))
    result.update(batch=batch, rounds=rounds, seconds=seconds, machine=cpu_facts())
    return result


def _build_tensorrt(cfg: BuildConfig, src: Path, out: Path, work: Path, input_name: str, size: int) -> dict[str, Any]:
    gpu = device_facts()  # before the build: no CUDA binding must mean no engine, not an engine without manifest
    builder = EngineBuilder()
    fp16_conversion = None
    if builder.strongly_typed and cfg.precision == "fp16":
        fp16_conversion = to_fp16_onnx(src, work / "model.fp16.onnx")  # strongly typed: precision lives in the ONNX
        src = work / "model.fp16.onnx"
    network, _parser = builder.create_network(src)
    plan, facts = builder.build(network, precision=cfg.precision,
                                profile=Profile(cfg.min_batch, cfg.opt_batch, cfg.max_batch), input_name=input_name,
                                input_chw=(3, size, size), workspace=parse_size(cfg.workspace),
                                timing_cache=Path(cfg.timing_cache) if cfg.timing_cache else None,
                                sparse_weights=cfg.sparse_weights, dla_core=cfg.dla_core, tf32=cfg.tf32)
    with atomic_path(out) as tmp:
        tmp.write_bytes(plan)
    return {"tensorrt": str(builder.trt.__version__), **gpu, **facts, "fp16_conversion": fp16_conversion,
            "unquantized_layers": "fp32" if cfg.precision == "int8" else None,
            "flags": {"sparse_weights": cfg.sparse_weights, "dla_core": cfg.dla_core, "tf32": cfg.tf32}}


def run(cfg: BuildConfig) -> Artifact:
    """Build the engine ``cfg`` describes and write it with its manifest."""
    src = Path(cfg.onnx)
    calibrate.check_onnx_file(src)
    input_name, size, dynamic = onnx_input(str(src))
    if not dynamic:
        raise ConfigError(f"{src} has a fixed batch size, so no batch profile fits it; export it with "
                          "'cli.py export' (symbolic batch axis)")
    if is_quantized(src) and cfg.precision != "int8":
        raise ConfigError(f"{src} is an INT8 model; build it with --precision int8, or give the FP32 ONNX for "
                          f"--precision {cfg.precision}")
    if cfg.backend == "tensorrt":
        check_tensorrt_input(src)
        import_tensorrt()  # fail before any long work (calibration) when it is absent or too old
    check_not_input(cfg.out, {"--onnx": cfg.onnx, "--calib-cache": cfg.calib_cache,
                              "--timing-cache": cfg.timing_cache})
    out = prepare_output(cfg.out)
    preprocessing, class_names = calibrate.model_preprocessing(src)
    with tempfile.TemporaryDirectory(prefix="edgeopt-engine-") as tmp_dir:
        work = Path(tmp_dir)
        model, calib_metrics = src, {}
        if cfg.precision == "int8":
            model, calib_metrics = _int8_onnx(cfg, "cpu" if cfg.backend == "onnxruntime" else "tensorrt", work)
        if cfg.backend == "onnxruntime":
            engine = _build_onnxruntime(cfg, model, out)
        else:
            engine = _build_tensorrt(cfg, model, out, work, input_name, size)
    engine.update(backend=cfg.backend, precision=cfg.precision,
                  profile={"min_batch": cfg.min_batch, "opt_batch": cfg.opt_batch, "max_batch": cfg.max_batch},
                  input={"name": input_name, "shape": ["batch", 3, size, size]})
    write_manifest(out, stage="build-engine", config=cfg,
                   inputs={"onnx": {"path": str(src), "sha256": sha256_file(src)}},
                   preprocessing=preprocessing.to_dict(), class_names=class_names,
                   metrics={"calibration": calib_metrics} if calib_metrics else {}, extra={"engine": engine})
    return Artifact.of(out)
