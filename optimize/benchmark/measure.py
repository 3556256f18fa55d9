"""What ``benchmark`` measures: each artifact opened, timed, scored and described, figures only.

For every artifact and the baseline: file size and hash, params, MACs and sparsity (from the ONNX graph or the
PyTorch model), top-1 / top-5 / per-class metrics on the val split and agreement with the baseline, then speed:
every runner's timing windows (one per batch size, plus the end-to-end one through preprocessing) take turns in
interleaved rounds (:func:`optimize.timing.interleaved`, each window one :func:`optimize.timing.time_runs`), and
each figure is the median over the rounds with its spread. Manifests are followed back to the FP32 ONNX an
artifact came from, to add its sibling for the INT8 gate and to read what pruning recorded.

Nothing here decides or writes: the verdicts are :mod:`optimize.benchmark.gates`', the report :mod:`optimize.benchmark.render`'s.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import platform
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from optimize.artifacts import library_versions, read_manifest, sha256_file
from optimize.batcher import ImageBatcher
from optimize.data import DataSplits, default_preprocessing, load_data
from optimize.device import ort_cuda_missing, ort_has_cuda, require_ort_cuda
from optimize.errors import ConfigError, DataError, EdgeoptError
from optimize.metrics import classification_metrics, confusion_matrix
from optimize.onnx_model import OnnxModel
from optimize.openvino_backend import INSTALL_HINT, SUFFIX, available, weights_path
from optimize.peak import row_efficiency
from optimize.preprocess import Preprocessing
from optimize.prune import count_macs_params, prunable_layers, sparsity
from optimize.runners import Runner, backend_of, open_runner
from optimize.timing import (Spread, compare, cpu_facts, images_per_second, interleaved, isa_summary, time_runs,
                             time_throughput)

if TYPE_CHECKING:
    from optimize.configs import BenchmarkConfig

logger = logging.getLogger(__name__)


@dataclass
class Row:
    """One artifact run one way (e.g. ``teacher.pth`` as PyTorch FP16 on CUDA)."""

    name: str
    path: str
    role: str  # baseline | model | int8-sibling
    backend: str
    precision: str = "fp32"
    device: str = "cpu"
    runner: str = ""
    file_bytes: int = 0
    sha256: str = ""
    source_onnx_sha256: str | None = None
    params: int | None = None
    macs: int | None = None
    sparsity: float | None = None
    input_size: int | None = None
    top1: float | None = None
    top5: float | None = None
    agreement: float | None = None
    classification: dict[str, Any] | None = None  # per-class precision / recall / F1, macro averages
    val_images: int = 0
    latency_ms_b1: dict[str, float] = field(default_factory=dict)  # every run of every round at batch 1, pooled
    latency_ms: dict[str, float] = field(default_factory=dict)  # per batch size: median over rounds of the p50
    throughput: dict[str, float] = field(default_factory=dict)  # per batch size: median over the rounds
    throughput_spread: dict[str, dict[str, Any]] = field(default_factory=dict)  # median, low, high, rounds
    speedup: dict[str, float] = field(default_factory=dict)  # median against the baseline's median
    speedup_range: dict[str, list[float]] = field(default_factory=dict)  # lowest, highest the ranges allow
    speedup_verdict: dict[str, str] = field(default_factory=dict)  # faster | slower | within noise
    gmacs_per_s: dict[str, float] = field(default_factory=dict)  # per batch size: MACs per image x median img/s
    peak_fraction: dict[str, float | None] = field(default_factory=dict)  # that over the machine's peak for the row's
    #                                                                      arithmetic (optimize.peak)
    e2e_img_per_s: float | None = None
    e2e_spread: dict[str, Any] | None = None
    pareto: bool = False
    int8_gate: dict[str, Any] | None = None
    skipped: str | None = None


def artifact_bytes(path: str | Path) -> int:
    """The bytes a deployment copies: the file, and an OpenVINO IR's weights (.bin) beside its .xml."""
    path = Path(path)
    weights = weights_path(path)
    return path.stat().st_size + (weights.stat().st_size if path.suffix == SUFFIX and weights.is_file() else 0)


def percentiles_ms(times: list[float]) -> dict[str, float]:
    ms = np.asarray(times) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "runs": len(ms)}


def onnx_graph_stats(path: str | Path) -> dict[str, int | float | None]:
    """Params, MACs per image and weight sparsity read from an ONNX graph (Conv, QLinearConv, Gemm, MatMul).

    MACs need every conv's output shape, which ONNX shape inference gives for standard ops only; a graph with
    fused contrib ops (an ONNX Runtime-optimized model) reports None for MACs.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if dims and dims[0].dim_param:
        dims[0].dim_value = 1  # MACs of one image
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # noqa: BLE001 - shape inference failing only costs the MAC count
        logger.debug("shape inference failed on %s: %s", path, e)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(model.graph.value_info) + list(model.graph.output)}
    weight_at = {"Conv": 1, "QLinearConv": 3, "ConvInteger": 1, "FusedConv": 1, "Gemm": 1, "MatMul": 1,
                 "QLinearMatMul": 3, "MatMulInteger": 1, "FusedGemm": 1, "QGemm": 3}
    bias_at = {"Conv": 2, "QLinearConv": 8, "FusedConv": 2, "Gemm": 2, "FusedGemm": 2, "QGemm": 6}
    params = zeros = weights = 0
    macs: int | None = 0
    for node in model.graph.node:
        if "Conv" in node.op_type and node.op_type not in weight_at:
            macs = None  # a conv this counter does not know (e.g. NHWC contrib ops): no MAC figure
        if node.op_type not in weight_at or len(node.input) <= weight_at[node.op_type]:
            continue
        w_name = node.input[weight_at[node.op_type]]
        if w_name not in inits:
            continue
        w = numpy_helper.to_array(inits[w_name])
        params += w.size
        weights += w.size
        zeros += int((w == 0).sum())
        b_at = bias_at.get(node.op_type)
        if b_at is not None and len(node.input) > b_at and node.input[b_at] in inits:
            params += int(np.prod(inits[node.input[b_at]].dims))
        if macs is None:
            continue
        if node.op_type in ("Gemm", "MatMul", "QLinearMatMul", "MatMulInteger", "FusedGemm", "QGemm"):
            macs += int(w.size)
            continue
        out_shape = shapes.get(node.output[0])
        if not out_shape or len(out_shape) != 4 or not all(out_shape[2:]):
            macs = None
            continue
        macs += int(w.size) * out_shape[2] * out_shape[3]
    return {"params": params or None, "macs": macs or None, "sparsity": zeros / weights if weights else None}


def torch_stats(runner: Runner, size: int) -> dict[str, int | float | None]:
    """Params and MACs (Torch-Pruning's counter) and conv/linear weight sparsity of a PyTorch model."""

    model = copy.deepcopy(runner.loaded.model).float().cpu()  # the runner's own may be FP16 on the GPU
    macs, params = count_macs_params(model, size)
    return {"params": params, "macs": macs, "sparsity": sparsity(prunable_layers(model))["overall"]}


def source_onnx(path: str | Path) -> tuple[Path | None, str | None]:
    """The FP32 ONNX an artifact was made from, following manifests' ``inputs.onnx`` back to the export.

    ``model.int8.ort.onnx`` (build-engine) <- ``model.int8.onnx`` (calibrate) <- ``model.onnx`` (export): the
    last one. (None, None) when the artifact records no ONNX source.
    """
    found: tuple[Path | None, str | None] = (None, None)
    seen: set[str] = set()
    current = Path(path)
    while True:
        onnx_in = ((read_manifest(current) or {}).get("inputs") or {}).get("onnx")
        if not isinstance(onnx_in, dict) or onnx_in.get("path") in seen:
            return found
        seen.add(onnx_in["path"])
        found = (Path(onnx_in["path"]), onnx_in.get("sha256"))
        current = found[0]


def resized_onnx(src: str | Path, size: int, work: Path) -> Path:
    """A copy of ``src`` whose input is ``[batch, 3, size, size]`` (shapes below are re-inferred by the runtime)."""
    import onnx

    model = onnx.load(str(src))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = size
    del model.graph.value_info[:]
    # the trained preprocessing names the trained size, which this copy no longer takes: random inputs need none
    kept = [(p.key, p.value) for p in model.metadata_props
            if p.key not in ("edgeopt.preprocessing", "edgeopt.image_size", "edgeopt.mean", "edgeopt.std")]
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, dict(kept))
    dst = work / f"{Path(src).stem}.{size}px.onnx"
    onnx.save(model, str(dst))
    return dst


def cpu_name() -> str:
    """``AMD EPYC (2 cores; avx2 fma avx512f avx512_vnni avx512_bf16, no avx_vnni, ...)``: a figure's machine."""
    facts = cpu_facts()
    return f"{facts['cpu']} ({facts['cpu_cores']} cores; {isa_summary(facts)})"


def environment(threads: int, device: str) -> dict[str, Any]:
    """Where the figures were measured: CPU, threads, GPU and driver, libraries, date."""
    facts = cpu_facts()
    env: dict[str, Any] = {"cpu": facts["cpu"], "cpu_cores": facts["cpu_cores"], "isa": facts["isa"],
                           "isa_missing": facts["isa_missing"], "threads": threads,
                           "thread_settings": {"onnxruntime": {"intra_op": threads, "inter_op": 1},
                                               "torch": {"intra_op": threads},
                                               "openvino": {"inference_num_threads": threads,
                                                            "inference_precision": "f32"}},
                           "platform": platform.platform(), "versions": library_versions(),
                           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "device": device, "gpu": None, "driver": None}
    try:
        import onnxruntime as ort

        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:  # pragma: no cover - a dependency
        pass

    env["openvino"] = available() or f"not installed ({INSTALL_HINT})"
    if device == "cuda":  # resolved (optimize.device): PyTorch sees the GPU
        import torch

        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        try:
            import tensorrt

            env["tensorrt"] = str(tensorrt.__version__)
        except ImportError:
            env["tensorrt"] = None
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return env


class _ValCache:
    """Val splits loaded once per preprocessing; the baseline's predictions for agreement."""

    def __init__(self, cfg: BenchmarkConfig):
        self.cfg = cfg
        self._splits: dict[str, DataSplits] = {}
        self.baseline_pred: np.ndarray | None = None

    def splits(self, preprocessing: Preprocessing) -> DataSplits:
        key = repr(sorted(preprocessing.to_dict().items()))
        if key not in self._splits:
            self._splits[key] = load_data(self.cfg.data, preprocessing, val_limit=self.cfg.val_limit, augment=False,
                                          val_only=True)
        return self._splits[key]


def _preprocessing_of(runner: Runner, cfg: BenchmarkConfig) -> Preprocessing:
    if runner.preprocessing is not None:
        return runner.preprocessing
    logger.warning("%s records no preprocessing: using %s's default at %d px", runner.path, cfg.data,
                   runner.image_size)
    return default_preprocessing(cfg.data, runner.image_size)


def _accuracy(row: Row, runner: Runner, cache: _ValCache, cfg: BenchmarkConfig) -> None:
    splits = cache.splits(_preprocessing_of(runner, cfg))
    splits.check_model(runner.path, runner.class_names)
    batch = min(64, runner.max_batch or 64)
    logits, labels = [], []
    for x, y in ImageBatcher(splits.val, batch_size=batch, image_size=runner.image_size):
        logits.append(np.asarray(runner.infer(x), dtype=np.float32))
        labels.append(y)
    if not logits:
        raise DataError(f"{splits.name}'s val split has no readable images")
    out, y = np.concatenate(logits), np.concatenate(labels)
    splits.check_model(runner.path, None, out.shape[1])
    top5 = np.argsort(-out, axis=1)[:, :min(5, out.shape[1])]
    pred = top5[:, 0]
    row.top1 = float((pred == y).mean())
    row.top5 = float((top5 == y[:, None]).any(axis=1).mean())
    row.val_images = int(len(y))
    confusion = confusion_matrix(y, pred, splits.num_classes)
    row.classification = classification_metrics(confusion, splits.class_names)
    if row.role == "baseline" and cache.baseline_pred is None:
        cache.baseline_pred = pred
    if cache.baseline_pred is not None and len(cache.baseline_pred) == len(pred):
        row.agreement = float((pred == cache.baseline_pred).mean())


def _e2e_window(runner: Runner, cache: _ValCache, cfg: BenchmarkConfig) -> Callable[[float], float] | None:
    """A timing window for images per second from decoded images through preprocessing and the model to top-1.

    The images are decoded once; each window transforms and runs ``e2e_batch`` of them at a time.
    """
    pre = _preprocessing_of(runner, cfg)
    raw = cache.splits(pre).val.without_transform()
    transform = pre.eval_transform()
    n = min(len(raw), max(cfg.e2e_batch * 4, 32))
    images = [img for img in (raw[i] for i in range(n)) if img is not None]
    batch = min(cfg.e2e_batch, runner.max_batch or cfg.e2e_batch, len(images))
    if getattr(runner, "fixed_batch", None):
        batch = runner.fixed_batch if runner.fixed_batch <= len(images) else 0
    if not images or not batch:
        return None
    position = [0]

    def one_batch() -> None:
        chunk = [images[(position[0] + i) % len(images)][0] for i in range(batch)]
        position[0] += batch
        x = np.stack([transform(img).numpy() for img in chunk])
        np.asarray(runner.infer(x)).argmax(1)

    def window(seconds: float) -> float:
        return time_throughput(one_batch, batch=batch, seconds=seconds, synchronize=runner.synchronize)

    return window


def entries(cfg: BenchmarkConfig) -> list[tuple[str, str]]:
    """(path, role) for the baseline, each model, and any INT8 model's FP32 sibling not listed.

    ``cfg.device`` must be resolved. An ONNX model listed for ``cuda`` where ONNX Runtime has no CUDA provider
    raises (:func:`optimize.device.require_ort_cuda`): a CUDA report gets no CPU row. A sibling the user did not
    list is only added where it can run.

    Raises:
        ConfigError: a listed file is missing. DeviceError: an ONNX model listed for a CUDA this ONNX Runtime lacks.
    """
    baseline = cfg.baseline or cfg.models[0]
    found = [(baseline, "baseline")] + [(m, "model") for m in cfg.models if m != baseline]
    for path, _ in found:
        if not Path(path).is_file():
            raise ConfigError(f"{path} does not exist; check the path (or run the stage that writes it)")
    ort_runs = cfg.device != "cuda" or ort_has_cuda()
    if not ort_runs and any(backend_of(p) == "onnxruntime" for p, _ in found):
        require_ort_cuda()
    listed = {str(Path(p).resolve()) for p, _ in found}
    for path, _ in list(found):
        if backend_of(path) == "onnxruntime" or backend_of(path) == "tensorrt":
            src, sha = source_onnx(path)
            if src and src.is_file() and str(src.resolve()) not in listed and (not sha or sha256_file(src) == sha):
                if not ort_runs:
                    logger.info("not adding %s, the FP32 sibling of %s: %s", src, path, ort_cuda_missing())
                    continue
                logger.info("adding %s: the FP32 sibling %s was made from, for the INT8 gate", src, path)
                found.append((str(src), "int8-sibling"))
                listed.add(str(src.resolve()))
    return found


def _variants(path: str, cfg: BenchmarkConfig) -> list[dict[str, Any]]:
    """How to run ``path`` on ``cfg.device``: open_runner keyword sets, one per row."""
    backend = backend_of(path)
    if backend == "torch" and cfg.device == "cuda":
        return [{"precision": "fp32"}, *([{"precision": "tf32"}] if cfg.tf32 else []),
                {"precision": "fp16", "channels_last": True}, {"precision": "bf16", "channels_last": True}]
    if backend == "onnxruntime" and cfg.device == "cuda" and cfg.tf32 and OnnxModel.read(path).precision == "fp32":
        return [{}, {"tf32": True}]  # TF32 is float32 math: INT8 and FP16 models have no such row
    return [{}]


def _open(path: str, role: str, variant: dict[str, Any], cfg: BenchmarkConfig, cache: _ValCache, threads: int,
          work: Path) -> tuple[Row, Runner | None]:
    """The row of ``path`` run one way, with every figure but speed; the runner to time (None: skipped)."""
    backend = backend_of(path)
    name = Path(path).name
    tag = "tf32" if variant.get("tf32") else variant.get("precision", "fp32")
    if tag != "fp32":
        name += f" [{tag}{' cl' if variant.get('channels_last') else ''}]"
    row = Row(name=name, path=str(path), role=role, backend=backend, device=cfg.device,
              file_bytes=artifact_bytes(path), sha256=sha256_file(path))
    if backend == "onnxruntime":
        row.source_onnx_sha256 = source_onnx(path)[1] or row.sha256
    elif backend in ("tensorrt", "openvino"):
        row.source_onnx_sha256 = source_onnx(path)[1]
    speed_path = path
    if cfg.input_size and backend == "onnxruntime":
        speed_path = str(resized_onnx(path, cfg.input_size, work))
    if cfg.input_size and backend == "tensorrt":
        row.skipped = f"a TensorRT engine is fixed at its built input size; rebuild it at {cfg.input_size} px"
        return row, None
    try:
        runner = open_runner(speed_path, device=cfg.device, threads=threads, trust=cfg.trust_checkpoint,
                             image_size=cfg.input_size if backend in ("torch", "openvino") else None, **variant)
    except EdgeoptError as e:
        if backend != "tensorrt":
            raise
        row.skipped = str(e)  # TensorRT absent, or an engine built for another GPU or TensorRT version
        return row, None
    row.precision, row.device, row.runner = runner.precision, runner.device, runner.label
    size = cfg.input_size or runner.image_size
    row.input_size = size
    if backend == "torch":
        row.__dict__.update(torch_stats(runner, size))
    else:
        src, _ = source_onnx(path)
        stats = onnx_graph_stats(speed_path) if backend == "onnxruntime" else {}
        if stats.get("macs") is None and src is not None and src.is_file():
            src_stats = onnx_graph_stats(resized_onnx(src, size, work) if cfg.input_size else src)
            stats = {k: stats.get(k) if stats.get(k) is not None else src_stats[k] for k in src_stats}
        row.__dict__.update(stats)
    if not cfg.input_size:
        _accuracy(row, runner, cache, cfg)
    return row, runner


def _timed_batches(row: Row, runner: Runner, cfg: BenchmarkConfig) -> list[int]:
    """The batch sizes ``runner`` can be timed at (an engine's profile, a fixed-batch ONNX graph)."""
    sizes = []
    for b in sorted(cfg.batch_sizes):
        fixed = getattr(runner, "fixed_batch", None)
        if fixed and b != fixed:
            logger.warning("%s: its graph takes batch %d only; batch %d not timed", row.path, fixed, b)
        elif runner.max_batch and b > runner.max_batch:
            logger.warning("%s: batch %d is above its max batch %d; not timed", row.path, b, runner.max_batch)
        elif b < getattr(runner, "min_batch", 1):
            logger.warning("%s: batch %d is below its min batch %d; not timed", row.path, b, runner.min_batch)
        else:
            sizes.append(b)
    return sizes


def _windows(index: int, row: Row, runner: Runner, cfg: BenchmarkConfig,
             cache: _ValCache) -> dict[tuple[int, str], Callable[[float], Any]]:
    """One timing window per batch size (returns the runs' seconds) and the end-to-end one (returns img/s)."""
    size = row.input_size or runner.image_size
    rng = np.random.default_rng(0)
    windows: dict[tuple[int, str], Callable[[float], Any]] = {}
    for b in _timed_batches(row, runner, cfg):
        state: dict[str, Any] = {}

        def window(seconds: float, b: int = b, state: dict[str, Any] = state) -> list[float]:
            warmup = 1
            if "x" not in state:  # the input is prepared (and the backend warmed up) in the first round only
                state["x"] = runner.prepare(rng.standard_normal((b, 3, size, size)).astype(np.float32))
                warmup = cfg.warmup
            return time_runs(lambda: runner.run(state["x"]), seconds=seconds, warmup=warmup,
                             synchronize=runner.synchronize)

        windows[(index, str(b))] = window
    if not cfg.input_size:
        e2e = _e2e_window(runner, cache, cfg)
        if e2e is not None:
            windows[(index, "e2e")] = e2e
    return windows


def _apply_timings(rows: list[Row], results: dict[tuple[int, str], list[Any]]) -> None:
    """Medians and spreads of every row from the rounds' results."""
    for (index, what), rounds in results.items():
        row = rows[index]
        if what == "e2e":
            spread = Spread.of(rounds)
            row.e2e_img_per_s, row.e2e_spread = spread.median, spread.to_dict()
            continue
        b = int(what)
        spread = Spread.of([images_per_second(times, b) for times in rounds])
        row.throughput[what] = spread.median
        row.throughput_spread[what] = spread.to_dict()
        row.latency_ms[what] = float(np.median([percentiles_ms(times)["p50"] for times in rounds]))
        if b == 1:
            row.latency_ms_b1 = percentiles_ms([t for times in rounds for t in times])


def throughput_spread(row: Row, batch: str) -> Spread | None:
    """``row``'s throughput at ``batch`` over the rounds (None when it was not timed there)."""
    s = row.throughput_spread.get(batch)
    return Spread.from_dict(s) if s else None


def direct_input(row: Row) -> str | None:
    """The ONNX file an artifact was made from, as its manifest records it (one step back, resolved)."""
    onnx_in = ((read_manifest(row.path) or {}).get("inputs") or {}).get("onnx")
    if not isinstance(onnx_in, dict) or not onnx_in.get("path"):
        return None
    return str(Path(onnx_in["path"]).resolve())


def pruning_records(jobs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """What each pruned checkpoint's manifest says about its pruning: top-1 at every point, MACs before/after."""
    found = []
    for path, _ in jobs:
        manifest = read_manifest(path) or {}
        m = manifest.get("metrics") or {}
        if manifest.get("stage") != "prune" or "top1_pruned" not in m:
            continue
        found.append({"model": Path(path).name, "method": m.get("method"), "amount": m.get("amount"),
                      "macs_ratio": m["macs_before"] / m["macs_after"] if m.get("macs_after") else None,
                      **{k: m.get(k) for k in ("top1_before", "top1_pruned", "top1_before_finetune", "top1_after")}})
    return found


def measure(cfg: BenchmarkConfig, jobs: list[tuple[str, str]], threads: int) -> list[Row]:
    """Every (path, role) of ``jobs`` opened each way :func:`_variants` gives, scored, then timed in rounds.

    ``cfg.device`` must be resolved (``cpu`` or ``cuda``). Every runner stays open until the last round: the rounds
    take turns over all of them. Skipped rows (an engine TensorRT cannot load here) say why.
    """
    from tqdm import tqdm

    cache = _ValCache(cfg)
    rows: list[Row] = []
    windows: dict[tuple[int, str], Callable[[float], Any]] = {}
    runs = [(path, role, v) for path, role in jobs for v in _variants(path, cfg)]
    with tempfile.TemporaryDirectory(prefix="edgeopt-bench-") as tmp:
        bar = tqdm(runs, desc="benchmark: accuracy", unit="model", disable=not cfg.progress)
        for path, role, variant in bar:
            bar.set_postfix_str(Path(path).name)
            row, runner = _open(path, role, variant, cfg, cache, threads, Path(tmp))
            rows.append(row)
            if row.skipped:
                logger.warning("skipped %s: %s", row.name, row.skipped)
            else:
                windows.update(_windows(len(rows) - 1, row, runner, cfg, cache))
        bar.close()
        # the ONNX copies in tmp stay until the last round too
        with tqdm(total=cfg.rounds * len(windows), desc=f"benchmark: timing, {cfg.rounds} rounds", unit="window",
                  disable=not cfg.progress) as tbar:
            results = interleaved(windows, rounds=cfg.rounds, seconds=cfg.seconds,
                                  on_window=lambda _k: tbar.update())
    _apply_timings(rows, results)
    return rows


def add_efficiency(rows: list[Row], peak) -> None:
    """Each timed row's achieved multiply-accumulates per second and its fraction of ``peak`` (an
    :class:`optimize.peak.Peak`, or None: no fractions), per batch size."""

    for row in rows:
        if not row.macs:
            continue
        for b, img_per_s in row.throughput.items():
            e = row_efficiency(img_per_s, row.macs, row.precision, peak)
            row.gmacs_per_s[b], row.peak_fraction[b] = e["gmacs_per_s"], e["peak_fraction"]


def add_speedups(rows: list[Row], base: Row) -> None:
    """Each row's throughput against ``base``'s at the same batch size: median ratio, its range, the verdict."""
    for row in rows:
        for b in row.throughput:
            mine, theirs = throughput_spread(row, b), throughput_spread(base, b)
            if theirs is None:
                continue
            c = compare(mine, theirs)
            row.speedup[b], row.speedup_range[b], row.speedup_verdict[b] = (
                c["ratio"], [c["ratio_low"], c["ratio_high"]], "baseline" if row is base else c["verdict"])
