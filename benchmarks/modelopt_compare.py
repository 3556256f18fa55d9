"""Our INT8 Q/DQ placement for TensorRT against NVIDIA Model Optimizer's, on the same FP32 ONNX and images.

Usage::

    EDGEOPT_MODELOPT_PYTHON=.venv-modelopt/bin/python \\
        python -m benchmarks.modelopt_compare --onnx runs/model.onnx --work runs/modelopt-compare

``make test-modelopt`` builds ``.venv-modelopt`` and runs ``tests/modelopt/``, which calls this module.

Model Optimizer (``nvidia-modelopt``) is not a dependency of edgeopt: its ONNX extra pins onnx and
onnxruntime-gpu versions of its own and pulls gigabytes of CUDA wheels, so it lives in a venv of its own and is
run as a subprocess (``python -m modelopt.onnx.quantization``) with that venv's interpreter
(``--modelopt-python`` or ``$EDGEOPT_MODELOPT_PYTHON``). It rewrites its input file in place (opset 19, shared
constants duplicated), so it always quantizes a copy of the FP32 model, in the work folder.

Both quantizers see the same FP32 ONNX and the same calibration images: :func:`calibration_images` takes them
the way ``optimize.calibrate.run`` does (``load_data(..., train_limit=num_images, augment=False)``, then
``ImageBatcher(..., drop_last=True)``) and saves them as ``calib.npy`` for Model Optimizer, which is told to
read them in the same batches (``--calibration_shapes``); both use entropy (or max) calibration and keep FP32 as
the high precision. Each INT8 model is then scored on the val split with
ONNX Runtime on the CPU: top-1 and top-1 agreement with the FP32 model.

How quantized tensors are matched across the two graphs. Tensor names could differ: our calibrate runs ONNX
Runtime's ``quant_pre_process`` (shape inference and basic graph optimizations, which may fold nodes), and Model
Optimizer converts to opset 19 and duplicates shared constants. What survives both is the *consumer nodes*:
Conv / Gemm / Add / pooling nodes keep their exporter names (``node_Conv_296``, ``node_linear``), and a fused BN's
output name moves to its Conv. So each activation Q/DQ pair is read as the quantized *edges* it feeds:
``(consumer node name, input slot)``, found by following ``QuantizeLinear -> DequantizeLinear -> consumers``;
the quantized FP32 tensor is whatever feeds that slot of that node in the FP32 graph. An edge whose consumer
node is not in the FP32 graph falls back to the quantized tensor's own name, and is marked ``?name`` when that
is not in the FP32 graph either (so it shows up in the differences instead of being dropped). On edgeopt
exports both names survive, and this key equals the name comparison; it also catches a tensor quantized for
one of its consumers only (a residual Add's conv-branch input), which a tensor-name set would not.

What is compared, for each model (``ours``, ``modelopt``): the number of activation Q/DQ pairs (QuantizeLinear
nodes whose input is not a constant), the quantized FP32 tensors and edges, counts per consumer op type and per
pattern (``producer op -> consumer op types`` in the FP32 graph), the weighted nodes (Conv / Gemm / MatMul) left
with a float input, how weights are stored (INT8 initializers behind a DequantizeLinear, or float initializers
behind a Q/DQ pair) and the activation scales; then the set differences ``ours_only`` / ``modelopt_only`` and
the ratio of our scales to Model Optimizer's on the tensors both quantize (its ONNX Runtime patches collect the
entropy histograms its own way, so the same method may not give the same ranges).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from optimize import calibrate
from optimize.batcher import ImageBatcher
from optimize.data import load_data
from optimize.errors import ConfigError, EdgeoptError
from optimize.onnx_model import OnnxModel

logger = logging.getLogger(__name__)

MODELOPT_VERSION = "0.47.0"  # the release whose placement calib/qdq.py follows; make test-modelopt pins it
ENV_PYTHON = "EDGEOPT_MODELOPT_PYTHON"
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
METHODS = {"entropy": "entropy", "minmax": "max"}  # ours -> Model Optimizer's --calibration_method


class ModeloptError(EdgeoptError):
    """Model Optimizer is missing, failed, or wrote something unreadable."""


@dataclass(frozen=True)
class CompareConfig:
    """Options of ``python -m benchmarks.modelopt_compare``.

    Attributes:
        onnx: FP32 ONNX model written by ``cli.py export`` (its metadata gives the preprocessing).
        work: folder for the calibration images, both INT8 models and Model Optimizer's log.
        modelopt_python: interpreter of the venv holding ``nvidia-modelopt``; None: ``$EDGEOPT_MODELOPT_PYTHON``.
        data: calibration images from its training split, accuracy on its val split.
        num_images: calibration images (class-stratified), as ``calibrate --num-images``.
        method: ``entropy`` or ``minmax`` (Model Optimizer's ``max``), for both quantizers.
        val_limit: val images scored (None: the whole split).
        batch_size: images per calibration / evaluation batch, as ``calibrate --batch-size``.
        timeout_s: how long Model Optimizer may run.
    """

    onnx: str
    work: str
    modelopt_python: str | None = None
    data: str = "fashion-mnist"
    num_images: int = 512
    method: str = "entropy"
    val_limit: int | None = None
    batch_size: int = 32
    timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)} for both quantizers (got {self.method!r})")


def modelopt_python(cfg: CompareConfig) -> str:
    """The Model Optimizer venv's interpreter: ``cfg.modelopt_python``, else ``$EDGEOPT_MODELOPT_PYTHON``."""
    python = cfg.modelopt_python or os.environ.get(ENV_PYTHON)
    if not python:
        raise ConfigError(f"no Model Optimizer interpreter: pass --modelopt-python or set {ENV_PYTHON} "
                          "(make test-modelopt builds .venv-modelopt)")
    if Path(python).is_file():
        return str(Path(python).absolute())  # Model Optimizer runs in the work folder: a relative path would break
    if shutil.which(python) is None:
        raise ModeloptError(f"Model Optimizer interpreter {python} does not exist; run 'make test-modelopt'")
    return python


def _clean_env() -> dict[str, str]:
    """Our environment without what would put this repo or our venv on the other interpreter's path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def modelopt_version(python: str) -> str:
    """``modelopt.__version__`` in the venv of ``python``, once its ONNX quantizer imports (fails early if not)."""
    code = "import modelopt, modelopt.onnx.quantization; print(modelopt.__version__)"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=_clean_env(), timeout=300)
    if proc.returncode != 0:
        raise ModeloptError(f"{python} cannot import modelopt.onnx.quantization: "
                            f"{(proc.stderr.strip().splitlines() or [''])[-1]}")
    return proc.stdout.strip()


def calibration_images(model: OnnxModel, data: str, *, num_images: int, batch_size: int,
                       val_limit: int | None) -> tuple[np.ndarray, Any]:
    """The calibration batch ``optimize.calibrate.run`` feeds ONNX Runtime, stacked, and the val split.

    Returns:
        ``(float32 [n, 3, S, S], val dataset)``: the training images in calibrate's order, full batches only.
    """
    preprocessing, _ = model.preprocessing()
    splits = load_data(data, preprocessing, train_limit=num_images, val_limit=val_limit, augment=False)
    batcher = ImageBatcher(splits.train, batch_size=batch_size, image_size=model.image_size, drop_last=True)
    if not batcher.count:
        raise ConfigError(f"{splits.name} gives no full calibration batch of {batch_size}; lower --batch-size")
    return np.concatenate([batch for batch, _ in batcher]), splits.val


def run_modelopt(python: str, model: OnnxModel, calib_npy: Path, out: Path, *, method: str, batch_size: int,
                 timeout_s: float) -> Path:
    """Quantize a copy of ``src`` to INT8 Q/DQ with Model Optimizer (CPU calibration, FP32 kept); returns ``out``.

    It calibrates in batches of ``batch_size``, as ours does: left to itself it would give a symbolic batch axis
    size 1, and then take every Gemm / MatMul for a GEMV (M = 1) and leave it in float, whatever its size.
    The copy and Model Optimizer's intermediate files stay in ``out``'s folder; its log is ``<out>.log``.
    """
    name, size = model.input.name, model.image_size
    copy = out.with_name(f"{out.stem}.input.onnx")
    shutil.copyfile(model.path, copy)
    log = out.with_name(f"{out.stem}.log")
    cmd = [python, "-m", "modelopt.onnx.quantization", "--onnx_path", copy.name, "--quantize_mode", "int8",
           "--calibration_method", METHODS[method], "--calibration_data_path", calib_npy.name,
           "--calibration_shapes", f"{name}:{batch_size}x3x{size}x{size}", "--calibration_eps", "cpu",
           "--high_precision_dtype", "fp32", "--output_path", out.name]
    logger.info("Model Optimizer: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, cwd=out.parent, env=_clean_env(), capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise ModeloptError(f"Model Optimizer ran over {timeout_s:.0f} s on {model.path}") from e
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ModeloptError(f"Model Optimizer failed on {copy} (exit {proc.returncode}; log {log}):\n{tail}")
    copy.unlink()
    return out


@dataclass
class QDQReport:
    """The Q/DQ placement of an INT8 ONNX, in the FP32 graph's terms (see the module docstring).

    Attributes:
        activation_pairs: QuantizeLinear nodes whose input is not a constant.
        tensors: quantized FP32 activation tensors.
        edges: quantized ``consumer node:input slot`` edges.
        by_consumer: quantized edges per consumer op type.
        by_pattern: quantized tensors per ``producer op -> consumer op types`` (FP32 graph; ``input``: graph input).
        float_weighted: Conv / Gemm / MatMul nodes of the FP32 graph with no quantized activation input.
        weights: how weights are stored: ``int8_initializer_dq`` (INT8 constant -> DequantizeLinear) and
            ``float_initializer_qdq`` (float constant -> QuantizeLinear -> DequantizeLinear).
        scales: each quantized tensor's activation scale (per-tensor), by FP32 tensor name.
    """

    activation_pairs: int
    tensors: list[str]
    edges: list[str]
    by_consumer: dict[str, int]
    by_pattern: dict[str, int]
    float_weighted: list[str]
    weights: dict[str, int]
    scales: dict[str, float]


class _Graph:
    """Producers, consumers and constants of an ONNX graph, by tensor name."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = {n.name: n for n in model.graph.node if n.name}
        self.producer = {out: n for n in model.graph.node for out in n.output}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for n in model.graph.node:
            for slot, name in enumerate(n.input):
                if name:
                    self.consumers[name].append((n, slot))
        self.initializers = {i.name: i for i in model.graph.initializer}
        self.constants = set(self.initializers)
        self.constants |= {out for n in model.graph.node if n.op_type == "Constant" for out in n.output}
        self.tensors = set(self.producer) | {i.name for i in model.graph.input}


def qdq_report(quantized_path: str | Path, fp32_path: str | Path) -> QDQReport:
    """Read where ``quantized_path`` puts its activation Q/DQ pairs, mapped onto the FP32 graph."""
    q, fp32 = _Graph(onnx.load(str(quantized_path))), _Graph(onnx.load(str(fp32_path)))
    pairs, edges, tensor_consumers, scales = 0, {}, defaultdict(list), {}
    weights = Counter()
    for node in q.producer.values():
        if node.op_type == "DequantizeLinear" and node.input[0] in q.constants:
            weights["int8_initializer_dq"] += 1
        if node.op_type != "QuantizeLinear":
            continue
        if node.input[0] in q.constants:
            weights["float_initializer_qdq"] += 1
            continue
        pairs += 1
        for dq, _ in q.consumers.get(node.output[0], []):
            for consumer, slot in q.consumers.get(dq.output[0], []) if dq.op_type == "DequantizeLinear" else []:
                if consumer.name in fp32.nodes and slot < len(fp32.nodes[consumer.name].input):
                    tensor = fp32.nodes[consumer.name].input[slot]
                else:
                    tensor = node.input[0] if node.input[0] in fp32.tensors else f"?{node.input[0]}"
                edges[f"{consumer.name}:{slot}"] = consumer.op_type
                tensor_consumers[tensor].append(consumer.op_type)
                if node.input[1] in q.initializers:
                    scales[tensor] = float(numpy_helper.to_array(q.initializers[node.input[1]]).max())
    by_consumer = Counter(edges.values())
    by_pattern = Counter()
    for tensor, ops in tensor_consumers.items():
        producer = fp32.producer.get(tensor)
        by_pattern[f"{producer.op_type if producer else 'input'} -> {'+'.join(sorted(ops))}"] += 1
    quantized_nodes = {e.rsplit(":", 1)[0] for e in edges}
    float_weighted = sorted(n.name for n in fp32.nodes.values()
                            if n.op_type in WEIGHTED_OPS and n.name not in quantized_nodes)
    return QDQReport(activation_pairs=pairs, tensors=sorted(tensor_consumers), edges=sorted(edges),
                     by_consumer=dict(sorted(by_consumer.items())), by_pattern=dict(sorted(by_pattern.items())),
                     float_weighted=float_weighted, weights=dict(sorted(weights.items())),
                     scales=dict(sorted(scales.items())))


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Quantize ``cfg.onnx`` with our calibrate and with Model Optimizer, and compare placements and accuracy.

    Returns:
        JSON-ready dict: ``fp32`` (top-1), ``ours`` and ``modelopt`` (a :class:`QDQReport` plus ``top1`` and
        ``agreement_with_fp32``), ``ours_only`` / ``modelopt_only`` (quantized tensors), ``edges_ours_only`` /
        ``edges_modelopt_only``, ``same_tensors``, ``same_edges`` and the run's settings.
    """
    src = Path(cfg.onnx)
    model = OnnxModel.read(src)
    python = modelopt_python(cfg)
    version = modelopt_version(python)
    if version != MODELOPT_VERSION:
        logger.warning("Model Optimizer %s, not %s: its placement may differ from the one calib/qdq.py follows",
                       version, MODELOPT_VERSION)
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)

    images, val_set = calibration_images(model, cfg.data, num_images=cfg.num_images, batch_size=cfg.batch_size,
                                         val_limit=cfg.val_limit)
    calib_npy = work / "calib.npy"
    np.save(calib_npy, images)
    logger.info("calibration images: %d, saved as %s", len(images), calib_npy)

    ours = calibrate.run(calibrate.CalibConfig(onnx=str(src), out=str(work / "ours.int8.onnx"), data=cfg.data,
                                               num_images=cfg.num_images, method=cfg.method, target="tensorrt",
                                               val_limit=cfg.val_limit, batch_size=cfg.batch_size))
    theirs = run_modelopt(python, model, calib_npy, work / "modelopt.int8.onnx", method=cfg.method,
                          batch_size=cfg.batch_size, timeout_s=cfg.timeout_s)

    val = ImageBatcher(val_set, batch_size=cfg.batch_size, image_size=model.image_size)
    fp32_pred, labels = calibrate.predictions(src, val)
    result: dict[str, Any] = {
        "onnx": str(src), "data": cfg.data, "method": cfg.method, "calibration_images": int(len(images)),
        "val_images": int(len(labels)), "modelopt_version": version,
        "fp32": {"top1": float((fp32_pred == labels).mean())},
    }
    # ours was scored by calibrate itself, on the same val images (the Q/DQ forms are slow on the CPU: once is enough)
    scored = ours.manifest["metrics"]
    if scored["val_images"] != len(labels) or scored["top1_fp32"] != result["fp32"]["top1"]:
        raise ModeloptError(f"calibrate scored FP32 {scored['top1_fp32']} on {scored['val_images']} val images, "
                            f"this comparison {result['fp32']['top1']} on {len(labels)}: not the same val split")
    result["ours"] = {"path": str(ours.path), **asdict(qdq_report(ours.path, src)), "top1": scored["top1_int8"],
                      "agreement_with_fp32": scored["agreement_with_fp32"]}
    pred, _ = calibrate.predictions(theirs, val)
    result["modelopt"] = {"path": str(theirs), **asdict(qdq_report(theirs, src)),
                          "top1": float((pred == labels).mean()),
                          "agreement_with_fp32": float((pred == fp32_pred).mean())}
    for key in ("tensors", "edges"):
        a, b = set(result["ours"][key]), set(result["modelopt"][key])
        prefix = "" if key == "tensors" else "edges_"
        result[f"{prefix}ours_only"], result[f"{prefix}modelopt_only"] = sorted(a - b), sorted(b - a)
        result[f"same_{key}"] = a == b
    shared = sorted(set(result["ours"]["scales"]) & set(result["modelopt"]["scales"]))
    ratios = np.array([result["ours"]["scales"][t] / result["modelopt"]["scales"][t] for t in shared])
    result["scale_ratio"] = {"tensors": len(shared), **({k: float(f(ratios)) for k, f in
                             (("min", np.min), ("median", np.median), ("max", np.max))} if shared else {})}
    return result


def summary(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`compare`'s result."""
    rows = [("", "ours", "Model Optimizer")]
    for label, key in (("activation Q/DQ pairs", "activation_pairs"), ("quantized tensors", "tensors"),
                       ("quantized edges", "edges")):
        rows.append((label, *(str(v if isinstance(v := result[m][key], int) else len(v))
                              for m in ("ours", "modelopt"))))
    for label, key in (("by consumer", "by_consumer"), ("weights", "weights")):
        rows.append((label, *(", ".join(f"{k} {v}" for k, v in result[m][key].items()) for m in ("ours", "modelopt"))))
    rows.append(("float Conv/Gemm", *(", ".join(result[m]["float_weighted"]) or "-" for m in ("ours", "modelopt"))))
    fp32 = result["fp32"]["top1"]
    rows.append(("top-1 (FP32 %.2f%%)" % (100 * fp32),
                 *(f"{100 * result[m]['top1']:.2f}% ({100 * (result[m]['top1'] - fp32):+.2f} pt)"
                   for m in ("ours", "modelopt"))))
    rows.append(("agreement with FP32",
                 *(f"{100 * result[m]['agreement_with_fp32']:.2f}%" for m in ("ours", "modelopt"))))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
    lines.append(f"patterns, ours: {result['ours']['by_pattern']}")
    lines.append(f"patterns, Model Optimizer: {result['modelopt']['by_pattern']}")
    ratio = result["scale_ratio"]
    if ratio["tensors"]:
        lines.append(f"activation scales, ours / Model Optimizer's, over {ratio['tensors']} shared tensors: median "
                     f"{ratio['median']:.2f}x (min {ratio['min']:.2f}x, max {ratio['max']:.2f}x)")
    lines.append(f"same quantized tensors: {result['same_tensors']}; same quantized edges: {result['same_edges']}")
    for key in ("ours_only", "modelopt_only", "edges_ours_only", "edges_modelopt_only"):
        if result[key]:
            lines.append(f"{key}: {', '.join(result[key])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", required=True, help="FP32 ONNX written by 'cli.py export'")
    parser.add_argument("--work", default="runs/modelopt-compare", help="folder for calib.npy and both INT8 models")
    parser.add_argument("--modelopt-python", help=f"the Model Optimizer venv's python (default: ${ENV_PYTHON})")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--num-images", type=int, default=512, help="calibration images")
    parser.add_argument("--method", default="entropy", choices=sorted(METHODS))
    parser.add_argument("--val-limit", type=int, help="val images scored (default: the whole split)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = CompareConfig(onnx=args.onnx, work=args.work, modelopt_python=args.modelopt_python, data=args.data,
                        num_images=args.num_images, method=args.method, val_limit=args.val_limit,
                        batch_size=args.batch_size)
    try:
        result = compare(cfg)
    except EdgeoptError as e:
        logger.error("error: %s", e)
        return e.exit_code
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    logger.info("\n%s", summary(result))  # scripts in benchmarks/ log, like the stages; only cli.py prints
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
