"""OpenVINO on the CPU: Intel's runtime, and NNCF's post-training INT8, beside ONNX Runtime (``edgeopt[openvino]``).

On x86 servers OpenVINO runs our own ResNets faster than ONNX Runtime does (measured in docs/RESULTS.md,
cpu-runtimes), so ``build-engine --backend openvino`` writes an OpenVINO model (IR: ``model.ov.xml`` and its
``model.ov.bin``) and the benchmark times it beside the ONNX Runtime artifacts; the final artifact is whichever
is fastest within the accuracy budget.

- ``fp32``: the FP32 ONNX converted (``openvino.convert_model``), weights kept FP32 (no FP16 compression).
- ``int8``: NNCF's post-training quantization of the FP32 model on the same class-stratified training images
  ``calibrate`` uses (``subset_size`` = their count; ``preset`` and ``model_type`` exposed), or, given an INT8 Q/DQ
  ONNX, that file converted as it is (OpenVINO reads Q/DQ pairs; ONNX Runtime's QOperator files are refused).
- Inference precision is pinned to FP32 for the float parts (``INFERENCE_PRECISION_HINT f32``): on a CPU with
  AMX or AVX-512 BF16, OpenVINO's default runs "FP32" models in BF16, which would make an fp32 row something else.
- The performance hint (``LATENCY`` or ``THROUGHPUT``) is measured at the build, not assumed: both are timed at
  the opt batch in interleaved rounds and the faster is recorded in the manifest, which the runner follows.

Everything OpenVINO-specific lives here; :class:`optimize.runners.OpenVINORunner` and the bundle's runner.py
use :func:`compile_config`'s keys.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .errors import ConfigError, RunnerError
from .timing import race

logger = logging.getLogger(__name__)

SUFFIX = ".xml"  # the IR's graph; its weights sit beside it with the same stem and .bin
INSTALL_HINT = "pip install 'edgeopt[openvino]' (openvino and nncf from PyPI)"


def import_openvino():
    """``openvino``, or a :class:`RunnerError` saying how to install it."""
    try:
        import openvino as ov
    except ImportError as e:
        raise RunnerError(f"OpenVINO is not installed: {INSTALL_HINT}") from e
    return ov


def available() -> str | None:
    """OpenVINO's version when it can be imported here, else None."""
    try:
        return import_openvino().get_version().split("-")[0]
    except RunnerError:
        return None


def weights_path(xml: str | os.PathLike) -> Path:
    """The ``.bin`` an IR ``.xml`` reads its weights from."""
    return Path(xml).with_suffix(".bin")


def compile_config(threads: int, hint: str | None = "LATENCY") -> dict[str, str]:
    """CPU plugin properties every edgeopt OpenVINO run uses: threads, the hint, and FP32 float math. ``hint`` None:
    OpenVINO's own defaults beside the threads (how a peer's model runs out of the box: its float math may be
    BF16), for side-by-side figures only (benchmarks/cpu_runtimes.py)."""
    if hint is None:
        return {"INFERENCE_NUM_THREADS": str(threads)}
    return {"INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": "f32"}


def cpu_facts() -> dict[str, Any]:
    """OpenVINO's version and its CPU plugin's view of the machine."""
    ov = import_openvino()
    core = ov.Core()
    facts: dict[str, Any] = {"openvino": ov.get_version(), "devices": list(core.available_devices)}
    try:
        facts["cpu"] = core.get_property("CPU", "FULL_DEVICE_NAME")
        facts["cpu_capabilities"] = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception as e:  # noqa: BLE001 - a property this version does not offer costs only the fact
        logger.debug("OpenVINO CPU properties: %s", e)
    return facts


def convert(onnx_path: str | Path):
    """The ONNX model as an OpenVINO model (dynamic batch kept), or a ConfigError naming what OpenVINO refused."""
    ov = import_openvino()
    try:
        return ov.convert_model(str(onnx_path))
    except Exception as e:  # noqa: BLE001 - OpenVINO's frontend raises its own untyped errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"OpenVINO cannot convert {onnx_path}: {first[:300]}; give the FP32 ONNX from 'cli.py "
                          "export' (or a Q/DQ INT8 one from 'cli.py calibrate --form qdq-s8s8')") from e


def quantize(model, batches: Iterable[np.ndarray], *, count: int, preset: str = "performance",
             model_type: str = "cnn", fast_bias_correction: bool = True):
    """NNCF's post-training INT8 of ``model`` over ``batches`` (float32 ``[n, 3, S, S]``; ``count`` images)."""
    try:
        import nncf
    except ImportError as e:
        raise RunnerError(f"NNCF is not installed (OpenVINO's INT8 comes from it): {INSTALL_HINT}") from e
    batches = list(batches)
    dataset = nncf.Dataset(batches)
    kwargs: dict[str, Any] = {"subset_size": count,
                              "preset": {"performance": nncf.QuantizationPreset.PERFORMANCE,
                                         "mixed": nncf.QuantizationPreset.MIXED}[preset],
                              "fast_bias_correction": fast_bias_correction}
    if model_type == "transformer":
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    logger.info("NNCF post-training INT8 on %d images (%s preset)", count, preset)
    return nncf.quantize(model, dataset, **kwargs)


def save(model, out: Path) -> None:
    """Write ``model`` as ``out`` (.xml) and its .bin, both or neither: saved in a hidden folder beside, then moved
    (weights first, so a reader never finds a graph without its weights)."""
    ov = import_openvino()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.p{os.getpid()}.") as tmp:
        staged = Path(tmp) / out.name
        ov.save_model(model, str(staged), compress_to_fp16=False)
        os.replace(weights_path(staged), weights_path(out))
        os.replace(staged, out)


def compile_model(xml: str | Path, *, threads: int, hint: str | None = "LATENCY", image_size: int | None = None):
    """The compiled CPU model of ``xml`` (reshaped to ``image_size`` when given) and its input's side."""
    ov = import_openvino()
    xml = Path(xml)
    if not xml.is_file() or not weights_path(xml).is_file():
        missing = xml if not xml.is_file() else weights_path(xml)
        raise RunnerError(f"OpenVINO model {xml}: {missing} does not exist (an IR is the .xml and the .bin beside it)")
    core = ov.Core()
    try:
        model = core.read_model(str(xml))
    except Exception as e:  # noqa: BLE001
        raise RunnerError(f"OpenVINO cannot read {xml}: {str(e).strip().splitlines()[0][:300]}") from e
    shape = model.input(0).get_partial_shape()
    if image_size is not None:
        model.reshape({model.input(0).get_any_name(): ov.PartialShape([-1, 3, image_size, image_size])})
    side = image_size or (shape[3].get_length() if shape.rank.get_length() == 4 and shape[3].is_static else None)
    return core.compile_model(model, "CPU", compile_config(threads, hint)), side


def infer_function(model, *, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """An in-memory OpenVINO model (one not saved yet, e.g. NNCF's) compiled for the CPU with
    :func:`compile_config`'s properties, as a function from a float32 batch to its logits."""
    compiled = import_openvino().Core().compile_model(model, "CPU", compile_config(threads))
    return lambda batch: np.asarray(compiled(batch)[0])


def precision_of(xml: str | Path) -> str:
    """``int8`` when the IR holds quantization (NNCF's FakeQuantize, or INT8 weights from a Q/DQ ONNX), else
    ``fp32``: what a runner reports when the IR has no build-engine manifest."""
    ov = import_openvino()
    for op in ov.Core().read_model(str(xml)).get_ops():
        if op.get_type_name() == "FakeQuantize" or (op.get_type_name() == "Constant" and
                                                    op.get_output_element_type(0).get_type_name() in ("i8", "u8")):
            return "int8"
    return "fp32"


def time_hints(xml: Path, *, batch: int, threads: int, rounds: int, seconds: float, size: int) -> dict[str, Any]:
    """LATENCY against THROUGHPUT for one request at a time at ``batch``: interleaved rounds, the faster kept
    (:func:`optimize.timing.race`; LATENCY, the default, on a tie)."""
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    runs = {}
    for hint in ("THROUGHPUT", "LATENCY"):  # THROUGHPUT first: the manifest's ratio is THROUGHPUT / LATENCY
        request = compile_model(xml, threads=threads, hint=hint)[0].create_infer_request()
        runs[hint] = functools.partial(request.infer, {0: x})
    timed = race(runs, batch=batch, rounds=rounds, seconds=seconds, ties="LATENCY")
    return {"kept": timed.kept, "throughput_vs_latency": timed.comparison,
            "LATENCY_img_per_s": timed.spreads["LATENCY"].to_dict(),
            "THROUGHPUT_img_per_s": timed.spreads["THROUGHPUT"].to_dict(), "batch": batch, "rounds": rounds,
            "seconds": seconds}


def copy_ir(src: str | Path, dst: str | Path) -> None:
    """Copy an IR (.xml and .bin) to ``dst`` (an .xml path)."""
    shutil.copyfile(weights_path(src), weights_path(dst))
    shutil.copyfile(src, dst)
