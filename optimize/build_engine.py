"""Stage ``build-engine``: an inference engine for one backend, precision and batch profile.

- ``onnxruntime`` (CPU edge boxes; runs anywhere): the ONNX Runtime-optimized model (``fp32``, or ``int8``
  through :mod:`calib.calibrate` with the ``cpu`` target, which keeps the INT8 form measured fastest here).
- ``tensorrt`` (Jetson, NVIDIA servers): a serialized TensorRT engine (:mod:`optimize.tensorrt_backend`);
  ``int8`` needs a Q/DQ ONNX, made here through :mod:`calib.calibrate` with the ``tensorrt`` target when the
  given ONNX is not quantized yet.

The manifest beside the engine records the backend and its version, the GPU and compute capability
(TensorRT), precision, profile, the ONNX's sha256 and every flag, which is what a runtime checks before
loading it.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from calib import calibrate
from calib.batcher import onnx_input
from .artifacts import Artifact, atomic_path, prepare_output, sha256_file, write_manifest
from .errors import ConfigError
from .runners import onnx_precision
from .tensorrt_backend import EngineBuilder, Profile, device_facts, import_tensorrt, to_fp16_onnx

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
        min_batch / opt_batch / max_batch: the optimization profile over the batch axis.
        workspace: TensorRT workspace pool limit (``2G``).
        timing_cache: TensorRT timing cache file to load and update.
        sparse_weights: let TensorRT use 2:4 sparse tensor cores (prune with ``--method 2:4`` first).
        dla_core: build for this DLA core (Jetson), falling back to the GPU.
    """

    onnx: str
    out: str
    backend: str = "onnxruntime"
    precision: str = "fp32"
    calib_data: str | None = None
    calib_cache: str | None = None
    calib_method: str = "entropy"
    num_images: int = 512
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    workspace: str = "2G"
    timing_cache: str | None = None
    sparse_weights: bool = False
    dla_core: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.backend == "onnxruntime" and self.precision == "fp16":
            raise ConfigError("--precision fp16 is not offered for --backend onnxruntime: its CPU kernels have no "
                              "FP16 speed-up; use fp32 or int8, or --backend tensorrt")
        if self.backend == "onnxruntime" and (self.sparse_weights or self.dla_core is not None or self.timing_cache):
            raise ConfigError("--sparse-weights, --dla-core and --timing-cache are TensorRT options; drop them or "
                              "use --backend tensorrt")
        Profile(self.min_batch, self.opt_batch, self.max_batch)
        parse_size(self.workspace)


def is_quantized(path: str | Path) -> bool:
    return onnx_precision(path) == "int8"


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
                                                   cache=cfg.calib_cache or str(Path(cfg.out).with_suffix(".calib.json"))))
    return out, artifact.manifest.get("metrics", {})


def _build_onnxruntime(cfg: BuildConfig, src: Path, out: Path) -> dict[str, Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # EXTENDED fusions stay portable across CPUs; ALL would bake in this CPU's blocked layouts
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with atomic_path(out) as tmp:
        opts.optimized_model_filepath = str(tmp)
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(tmp))
        onnx.helper.set_model_props(optimized, calibrate.metadata_props(src))
        onnx.save(optimized, str(tmp))
    return {"onnxruntime": ort.__version__, "optimization": "ORT_ENABLE_EXTENDED", "provider": "CPUExecutionProvider"}


def _build_tensorrt(cfg: BuildConfig, src: Path, out: Path, work: Path, input_name: str, size: int) -> dict[str, Any]:
    builder = EngineBuilder()
    if builder.major >= 11 and cfg.precision == "fp16":
        src = to_fp16_onnx(src, work / "model.fp16.onnx")  # strongly typed: precision lives in the ONNX
    network, _parser = builder.create_network(src)
    plan = builder.build(network, precision=cfg.precision, profile=Profile(cfg.min_batch, cfg.opt_batch, cfg.max_batch),
                         input_name=input_name, input_chw=(3, size, size), workspace=parse_size(cfg.workspace),
                         timing_cache=Path(cfg.timing_cache) if cfg.timing_cache else None,
                         sparse_weights=cfg.sparse_weights, dla_core=cfg.dla_core)
    with atomic_path(out) as tmp:
        tmp.write_bytes(plan)
    return {"tensorrt": str(builder.trt.__version__), **device_facts(),
            "strongly_typed": builder.major >= 11, "flags": {"sparse_weights": cfg.sparse_weights,
                                                             "dla_core": cfg.dla_core}}


def run(cfg: BuildConfig) -> Artifact:
    """Build the engine ``cfg`` describes and write it with its manifest."""
    if cfg.backend == "tensorrt":
        import_tensorrt()  # fail before any work when it is absent
    src = Path(cfg.onnx)
    calibrate.check_onnx_file(src)
    input_name, size, dynamic = onnx_input(str(src))
    if not dynamic:
        raise ConfigError(f"{src} has a fixed batch size, so no batch profile fits it; export it with "
                          "'cli.py export' (symbolic batch axis)")
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
