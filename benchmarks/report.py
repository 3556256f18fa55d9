"""Stage ``benchmark``: what each artifact bought against the baseline, measured in one run.

For every artifact (and the baseline, usually the teacher checkpoint) on the device asked for: backend, precision,
file size, params, MACs, sparsity, top-1 / top-5 on the val split, agreement with the baseline's predictions,
latency p50/p90/p99 at batch 1, throughput at each batch size, speedup against the baseline at the same batch
size, and an end-to-end figure that includes preprocessing. The runners (:mod:`optimize.runners`) share one
face, so every backend is timed by the same loop: the input is prepared once (device memory on CUDA, where each
run is synchronised), a few warm-up runs, then ``rounds`` rounds in which every artifact takes its turn for one
window per batch size (:mod:`optimize.timing`). Each speed figure is the median over the rounds with the
slowest and fastest round beside it; a speedup whose two ranges overlap is "within noise". The final artifact
and every "A beats B" statement (INT8 gate, verdicts) are read from those medians, against the user's budgets
(``max_accuracy_drop``, ``min_speedup``).

``input_size`` benchmarks speed only at another resolution (224 for photos): PyTorch models run as they are (a
ResNet's global pooling takes any size) and ONNX models get their input dims rewritten in a temporary copy;
the weights are the trained ones but the inputs are random, so no accuracy is reported. TensorRT engines are
fixed at their built size and are skipped there.

Output (``out`` folder): ``report.json`` (every raw figure), ``report.md`` (tables that read in a terminal too),
``accuracy_vs_throughput.png`` (Pareto front marked) and ``latency_vs_batch.png``.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import math
import platform
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from calib.batcher import ImageBatcher
from optimize.artifacts import (Artifact, atomic_path, library_versions, prepare_output, read_manifest,
                                resolve_data, sha256_file, write_json)
from optimize.data import DataSplits, default_preprocessing, load_data
from optimize.errors import ConfigError, DataError, EdgeoptError
from optimize.loop import classification_metrics
from optimize.preprocess import Preprocessing
from optimize.runners import Runner, RunnerError, backend_of, default_threads, open_runner, ort_cuda_missing
from optimize.timing import Spread, compare, cpu_facts, images_per_second, interleaved, isa_summary, time_runs

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")
REPORT_JSON, REPORT_MD = "report.json", "report.md"
PLOT_PARETO, PLOT_LATENCY = "accuracy_vs_throughput.png", "latency_vs_batch.png"


@dataclass(frozen=True)
class BenchmarkConfig:
    """Options of ``cli.py benchmark``.

    Attributes:
        models: artifacts to compare (``.pth``, ``.onnx``, ``.engine``), in pipeline order. The final artifact the
            verdicts speak of is the fastest of them (median at the reference batch) within the accuracy budget.
        out: folder for report.json, report.md and the plots.
        baseline: the reference (the original teacher checkpoint); None: the first of ``models``.
        data: val split for the accuracy figures (``fashion-mnist`` or a folder); None: the data the baseline's
            manifests record (fashion-mnist when none does).
        batch_sizes: throughput is measured at each; latency percentiles at batch 1.
        device: ``cpu`` or ``cuda`` (PyTorch adds FP16 and BF16 channels_last rows there; ONNX models run on
            ONNX Runtime's CUDA provider when onnxruntime-gpu is installed; engines need TensorRT).
        threads: CPU threads for every CPU backend alike (default: all cores this process may use).
        rounds: timing rounds; in each, every artifact gets one window per batch size, the artifacts taking turns
            (rotated each round) so the machine's drift hits all alike. A figure is the median over the rounds,
            its spread the slowest and fastest round (:mod:`optimize.timing`).
        seconds: length of one timing window (per artifact, batch size and round), after ``warmup`` runs.
        warmup: untimed runs before the first window of each artifact and batch size.
        val_limit: class-stratified subset of the val split (None: all of it).
        input_size: speed-only run at this input side (random inputs; no accuracy).
        max_accuracy_drop: the user's accuracy budget, in top-1 points: the final artifact may lose this much
            against the baseline, an INT8 artifact this much against its FP32/FP16 sibling.
        min_speedup: the user's speed budget: the final artifact's throughput at the reference batch, in multiples
            of the baseline's (median over the rounds).
        e2e_batch: batch size of the end-to-end figure (decoded image -> preprocessing -> model -> top-1).
        trust_checkpoint: allow pickled whole-module checkpoints.
        progress: show a progress bar over the artifacts.
    """

    models: tuple[str, ...]
    out: str
    baseline: str | None = None
    data: str | None = None
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    device: str = "cpu"
    threads: int | None = None
    rounds: int = 5
    seconds: float = 0.4
    warmup: int = 3
    val_limit: int | None = None
    input_size: int | None = None
    max_accuracy_drop: float = 1.0
    min_speedup: float = 1.0
    e2e_batch: int = 8
    trust_checkpoint: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.models and not self.baseline:
            raise ConfigError("give at least one model to benchmark (--models) or a --baseline")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError("--batch-sizes must be positive integers")
        if self.seconds <= 0 or self.warmup < 0 or self.e2e_batch < 1 or self.rounds < 1:
            raise ConfigError("--seconds must be > 0, --rounds >= 1, --warmup >= 0 and --e2e-batch >= 1")
        if self.max_accuracy_drop < 0 or self.min_speedup <= 0:
            raise ConfigError("--max-accuracy-drop must be >= 0 and --min-speedup > 0")
        if self.input_size is not None and self.input_size < 8:
            raise ConfigError("--input-size must be at least 8 pixels")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("--threads must be at least 1")

    @property
    def reference_batch(self) -> int:
        """The batch size speedups and goals are read at: 8 when measured, else the largest."""
        return 8 if 8 in self.batch_sizes else max(self.batch_sizes)


# -- what is measured ---------------------------------------------------------------------------------------

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
    e2e_img_per_s: float | None = None
    e2e_spread: dict[str, Any] | None = None
    pareto: bool = False
    int8_gate: dict[str, Any] | None = None
    skipped: str | None = None


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
    from optimize.prune import count_macs_params, prunable_layers, sparsity

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


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which (speed, accuracy) points no other point beats on both (ties kept)."""
    front = []
    for i, (s, a) in enumerate(points):
        dominated = any(s2 >= s and a2 >= a and (s2 > s or a2 > a) for j, (s2, a2) in enumerate(points) if j != i)
        front.append(not dominated)
    return front


# -- environment ----------------------------------------------------------------------------------------------

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
                                               "torch": {"intra_op": threads}},
                           "platform": platform.platform(), "versions": library_versions(),
                           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "device": device, "gpu": None, "driver": None}
    try:
        import onnxruntime as ort

        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:  # pragma: no cover - a dependency
        pass
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
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


# -- the run ----------------------------------------------------------------------------------------------------

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
    if runner.class_names and runner.class_names != splits.class_names:
        raise DataError(f"{runner.path} predicts classes {runner.class_names[:3]}... but {splits.name} has "
                        f"{splits.class_names[:3]}...; benchmark on the data the model was trained for")
    batch = min(64, runner.max_batch or 64)
    logits, labels = [], []
    for x, y in ImageBatcher(splits.val, batch_size=batch, image_size=runner.image_size):
        logits.append(np.asarray(runner.infer(x), dtype=np.float32))
        labels.append(y)
    if not logits:
        raise DataError(f"{splits.name}'s val split has no readable images")
    out, y = np.concatenate(logits), np.concatenate(labels)
    if out.shape[1] != splits.num_classes:
        raise DataError(f"{runner.path} has {out.shape[1]} outputs but {splits.name} has {splits.num_classes} classes")
    top5 = np.argsort(-out, axis=1)[:, :min(5, out.shape[1])]
    pred = top5[:, 0]
    row.top1 = float((pred == y).mean())
    row.top5 = float((top5 == y[:, None]).any(axis=1).mean())
    row.val_images = int(len(y))
    k = splits.num_classes
    confusion = np.bincount(y.astype(np.int64) * k + pred, minlength=k * k).reshape(k, k)
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
        return images_per_second(time_runs(one_batch, seconds=seconds, warmup=1), batch)

    return window


def _entries(cfg: BenchmarkConfig) -> list[tuple[str, str]]:
    """(path, role) for the baseline, each model, and any INT8 model's FP32 sibling not listed."""
    baseline = cfg.baseline or cfg.models[0]
    entries = [(baseline, "baseline")] + [(m, "model") for m in cfg.models if m != baseline]
    for path, _ in entries:
        if not Path(path).is_file():
            raise ConfigError(f"{path} does not exist; check the path (or run the stage that writes it)")
    listed = {str(Path(p).resolve()) for p, _ in entries}
    for path, _ in list(entries):
        if backend_of(path) == "onnxruntime" or backend_of(path) == "tensorrt":
            src, sha = source_onnx(path)
            if src and src.is_file() and str(src.resolve()) not in listed and (not sha or sha256_file(src) == sha):
                logger.info("adding %s: the FP32 sibling %s was made from, for the INT8 gate", src, path)
                entries.append((str(src), "int8-sibling"))
                listed.add(str(src.resolve()))
    return entries


def _variants(path: str, cfg: BenchmarkConfig) -> list[dict[str, Any]]:
    """How to run ``path`` on ``cfg.device``: open_runner keyword sets, one per row."""
    backend = backend_of(path)
    if backend == "torch" and cfg.device == "cuda":
        return [{"precision": "fp32"}, {"precision": "fp16", "channels_last": True},
                {"precision": "bf16", "channels_last": True}]
    return [{}]


def _open(path: str, role: str, variant: dict[str, Any], cfg: BenchmarkConfig, cache: _ValCache, threads: int,
          work: Path) -> tuple[Row, Runner | None]:
    """The row of ``path`` run one way, with every figure but speed; the runner to time (None: skipped)."""
    backend = backend_of(path)
    name = Path(path).name
    if variant.get("precision", "fp32") != "fp32":
        name += f" [{variant['precision']}{' cl' if variant.get('channels_last') else ''}]"
    row = Row(name=name, path=str(path), role=role, backend=backend, device=cfg.device,
              file_bytes=Path(path).stat().st_size, sha256=sha256_file(path))
    if backend == "onnxruntime":
        row.source_onnx_sha256 = source_onnx(path)[1] or row.sha256
    elif backend == "tensorrt":
        row.source_onnx_sha256 = source_onnx(path)[1]
    speed_path = path
    if cfg.input_size and backend == "onnxruntime":
        speed_path = str(resized_onnx(path, cfg.input_size, work))
    if cfg.input_size and backend == "tensorrt":
        row.skipped = f"a TensorRT engine is fixed at its built input size; rebuild it at {cfg.input_size} px"
        return row, None
    device = cfg.device
    if backend == "onnxruntime" and device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            row.skipped = ort_cuda_missing()  # no silent CPU row in a CUDA report
            return row, None
    try:
        runner = open_runner(speed_path, device=device, threads=threads, trust=cfg.trust_checkpoint,
                             image_size=cfg.input_size if backend == "torch" else None, **variant)
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
            return time_runs(lambda: runner.run(state["x"]), seconds=seconds, warmup=warmup)

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


def _spread(row: Row, batch: str) -> Spread | None:
    s = row.throughput_spread.get(batch)
    return Spread.from_dict(s) if s else None


def _direct_input(row: Row) -> str | None:
    """The ONNX file an artifact was made from, as its manifest records it (one step back, resolved)."""
    onnx_in = ((read_manifest(row.path) or {}).get("inputs") or {}).get("onnx")
    if not isinstance(onnx_in, dict) or not onnx_in.get("path"):
        return None
    return str(Path(onnx_in["path"]).resolve())


def _int8_gates(rows: list[Row], cfg: BenchmarkConfig) -> None:
    """Each INT8 row against its FP32/FP16 sibling, and an optimized INT8 model against the plain one it came from.

    Flagged when slower beyond noise (the two ranges of rounds do not overlap, the median lower), or when it loses
    more than ``max_accuracy_drop`` points of top-1 against the sibling.
    """
    ref = str(cfg.reference_batch)
    by_path = {str(Path(r.path).resolve()): r for r in rows if not r.skipped}
    for row in rows:
        if row.precision != "int8" or row.skipped:
            continue
        siblings = [r for r in rows if r is not row and not r.skipped and r.precision in ("fp32", "fp16")
                    and r.source_onnx_sha256 and r.source_onnx_sha256 == row.source_onnx_sha256
                    and r.device == row.device]
        siblings.sort(key=lambda r: (r.backend != row.backend, r.precision != "fp32"))
        if not siblings:
            row.int8_gate = {"sibling": None, "flags": ["no FP32/FP16 sibling in this run: gate not checked"]}
            continue
        sib = siblings[0]
        gate: dict[str, Any] = {"sibling": sib.name}
        flags = []
        c = _speed_against(row, sib, ref)
        gate.update(speedup=c and c["ratio"], speedup_range=c and [c["ratio_low"], c["ratio_high"]],
                    speed_verdict=c and c["verdict"], drop_pt=_drop_pt(sib, row))
        if c and c["verdict"] == "slower":
            flags.append(f"slower than its {sib.precision} sibling {sib.name} at batch {ref} "
                         f"({c['ratio']:.2f}x, {c['ratio_low']:.2f}-{c['ratio_high']:.2f} over the rounds)")
        if gate["drop_pt"] is not None and gate["drop_pt"] > cfg.max_accuracy_drop:
            flags.append(f"loses {gate['drop_pt']:.2f} pt top-1 against {sib.name} (budget "
                         f"{cfg.max_accuracy_drop:g} pt)")
        plain = by_path.get(_direct_input(row) or "")
        if plain is not None and plain is not row and plain.precision == "int8" and plain.device == row.device:
            c = _speed_against(row, plain, ref)
            gate.update(plain=plain.name, vs_plain=c and c["ratio"], vs_plain_verdict=c and c["verdict"])
            if c and c["verdict"] == "slower":
                flags.append(f"slower than the plain INT8 model it was optimized from, {plain.name} "
                             f"({c['ratio']:.2f}x): use {plain.name}")
        gate.update(flags=flags, passed=not flags)
        row.int8_gate = gate


def _drop_pt(base: Row, row: Row) -> float | None:
    """Top-1 points ``row`` loses against ``base`` (None when either has no accuracy figure).

    Rounded to 1e-6 pt: 10 of 1000 images is exactly 1.00 pt, not 1.0000000002 over a 1-pt budget.
    """
    return round(100 * (base.top1 - row.top1), 6) if row.top1 is not None and base.top1 is not None else None


def _speed_against(row: Row, other: Row, ref: str) -> dict[str, Any] | None:
    """:func:`optimize.timing.compare` of two rows' throughput at batch ``ref`` (None when either is untimed)."""
    mine, theirs = _spread(row, ref), _spread(other, ref)
    return compare(mine, theirs) if mine and theirs else None


def _final(rows: list[Row], base: Row, cfg: BenchmarkConfig) -> dict[str, Any] | None:
    """The final artifact: the fastest (median at the reference batch) within the accuracy budget.

    Candidates are every artifact but the baseline measured on the report's device. When none keeps within the
    budget, the most accurate one is named (and the verdict fails). The runner-up within the budget is compared
    with it: "within noise" means this run cannot tell which of the two is faster.
    """
    ref = str(cfg.reference_batch)
    candidates = [r for r in rows if r.role != "baseline" and not r.skipped and r.throughput.get(ref)
                  and r.device == cfg.device]
    if not candidates:
        return None
    within = [r for r in candidates if (d := _drop_pt(base, r)) is None or d <= cfg.max_accuracy_drop]
    if within:
        ranked = sorted(within, key=lambda r: -r.throughput[ref])
        final, why = ranked[0], (f"the fastest at batch {ref} within {cfg.max_accuracy_drop:g} pt of "
                                 f"{base.name}'s top-1" if not cfg.input_size else f"the fastest at batch {ref}")
    else:
        ranked = sorted(candidates, key=lambda r: -(r.top1 or 0))
        final, why = ranked[0], f"none keeps within {cfg.max_accuracy_drop:g} pt of {base.name}: the most accurate"
    out: dict[str, Any] = {"artifact": final.name, "why": why, "runner_up": None}
    if len(ranked) > 1 and within:
        c = compare(_spread(final, ref), _spread(ranked[1], ref))
        out.update(runner_up=ranked[1].name, vs_runner_up=c["ratio"], vs_runner_up_verdict=c["verdict"])
    return out


def _verdicts(rows: list[Row], base: Row, final: dict[str, Any] | None, cfg: BenchmarkConfig) -> list[dict[str, Any]]:
    """The user's budgets (``min_speedup``, ``max_accuracy_drop``) checked on the final artifact and INT8 rows."""
    ref = str(cfg.reference_batch)
    verdicts: list[dict[str, Any]] = []
    if final is not None and base.throughput.get(ref):
        row = next(r for r in rows if r.name == final["artifact"])
        drop = _drop_pt(base, row)
        speedup = row.speedup.get(ref)
        met = speedup is not None and speedup >= cfg.min_speedup and (drop is None or drop <= cfg.max_accuracy_drop)
        verdicts.append({"verdict": f"final artifact >= {cfg.min_speedup:g}x the baseline's throughput at batch {ref}"
                                    f" (median), <= {cfg.max_accuracy_drop:g} pt top-1 loss",
                         "artifact": row.name, "speedup": speedup, "speedup_range": row.speedup_range.get(ref),
                         "speed_verdict": row.speedup_verdict.get(ref), "drop_pt": drop,
                         "met": None if cfg.input_size else met})
    for row in rows:
        gate = row.int8_gate
        if not gate or not gate.get("sibling"):
            continue
        verdicts.append({"verdict": f"INT8 no slower than its {gate['sibling']} beyond noise at batch {ref}, "
                                    f"<= {cfg.max_accuracy_drop:g} pt top-1 loss",
                         "artifact": row.name, "speedup": gate["speedup"], "speedup_range": gate["speedup_range"],
                         "speed_verdict": gate["speed_verdict"], "drop_pt": gate["drop_pt"],
                         "met": gate["passed"]})
    return verdicts


def _pruning(entries: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """What each pruned checkpoint's manifest says about its pruning: top-1 at every point, MACs before/after."""
    found = []
    for path, _ in entries:
        manifest = read_manifest(path) or {}
        m = manifest.get("metrics") or {}
        if manifest.get("stage") != "prune" or "top1_pruned" not in m:
            continue
        found.append({"model": Path(path).name, "method": m.get("method"), "amount": m.get("amount"),
                      "macs_ratio": m["macs_before"] / m["macs_after"] if m.get("macs_after") else None,
                      **{k: m.get(k) for k in ("top1_before", "top1_pruned", "top1_before_finetune", "top1_after")}})
    return found


def run(cfg: BenchmarkConfig) -> Artifact:
    """Benchmark every artifact of ``cfg`` and write the report; returns report.json with the report as manifest."""
    from tqdm import tqdm

    out = Path(cfg.out)
    prepare_output(out / REPORT_JSON)
    threads = cfg.threads or default_threads()
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: PyTorch sees no CUDA device here; use --device cpu")
    entries = _entries(cfg)
    try:
        cfg = replace(cfg, data=resolve_data(cfg.data, entries[0][0]))
    except DataError:
        if not cfg.input_size:
            raise
        cfg = replace(cfg, data="fashion-mnist")  # speed only: the data names a default preprocessing at most
    cache = _ValCache(cfg)
    rows: list[Row] = []
    windows: dict[tuple[int, str], Callable[[float], Any]] = {}
    jobs = [(path, role, v) for path, role in entries for v in _variants(path, cfg)]
    with tempfile.TemporaryDirectory(prefix="edgeopt-bench-") as tmp:
        bar = tqdm(jobs, desc="benchmark: accuracy", unit="model", disable=not cfg.progress)
        for path, role, variant in bar:
            bar.set_postfix_str(Path(path).name)
            row, runner = _open(path, role, variant, cfg, cache, threads, Path(tmp))
            rows.append(row)
            if row.skipped:
                logger.warning("skipped %s: %s", row.name, row.skipped)
            else:
                windows.update(_windows(len(rows) - 1, row, runner, cfg, cache))
        bar.close()
        # every runner stays open: the rounds take turns over all of them (the ONNX copies in tmp stay too)
        with tqdm(total=cfg.rounds * len(windows), desc=f"benchmark: timing, {cfg.rounds} rounds", unit="window",
                  disable=not cfg.progress) as tbar:
            results = interleaved(windows, rounds=cfg.rounds, seconds=cfg.seconds,
                                  on_window=lambda _k: tbar.update())
    _apply_timings(rows, results)
    base = next((r for r in rows if r.role == "baseline" and not r.skipped), None)
    if base is None:
        raise RunnerError(f"the baseline {entries[0][0]} could not run: {rows[0].skipped}")
    for row in rows:
        for b in row.throughput:
            mine, theirs = _spread(row, b), _spread(base, b)
            if theirs is None:
                continue
            c = compare(mine, theirs)
            row.speedup[b], row.speedup_range[b], row.speedup_verdict[b] = (
                c["ratio"], [c["ratio_low"], c["ratio_high"]], "baseline" if row is base else c["verdict"])
    measured = [r for r in rows if not r.skipped and r.throughput.get(str(cfg.reference_batch))]
    if not cfg.input_size:
        flags = pareto_front([(r.throughput[str(cfg.reference_batch)], r.top1 or 0.0) for r in measured])
        for r, f in zip(measured, flags):
            r.pareto = f
    _int8_gates(rows, cfg)
    final = _final(rows, base, cfg)
    report = {"format": "edgeopt-benchmark", "version": 2, "config": asdict(cfg),
              "environment": environment(threads, cfg.device), "reference_batch": cfg.reference_batch,
              "baseline": base.name, "rows": [asdict(r) for r in rows], "final": final,
              "verdicts": _verdicts(rows, base, final, cfg), "pruning": _pruning(entries)}
    plots = _plots(rows, cfg, out)
    report["plots"] = [p.name for p in plots]
    write_json(out / REPORT_JSON, report)
    with atomic_path(out / REPORT_MD) as tmp_md:
        tmp_md.write_text(render_markdown(report))
    return Artifact(out / REPORT_JSON, report)


# -- output -----------------------------------------------------------------------------------------------------

def _fmt(value: float | None, spec: str, missing: str = "—") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _with_spread(value: float | None, spread: dict[str, Any] | None) -> str:
    """``20004 ±812``: the median and half the range of the rounds."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if not spread or len(spread.get("rounds", [])) < 2:
        return f"{value:.0f}"
    return f"{value:.0f} ±{(spread['high'] - spread['low']) / 2:.0f}"


def _range(bounds: list[float] | None) -> str:
    return f"{bounds[0]:.2f}-{bounds[1]:.2f} over the rounds" if bounds else "no range"


def _neg(value: float | None) -> float | None:
    return None if value is None else -value


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (pipe tables read fine in a terminal)."""
    cfg, env, ref = report["config"], report["environment"], str(report["reference_batch"])
    sizes = [str(b) for b in sorted(cfg["batch_sizes"])]
    speed_only = cfg["input_size"] is not None
    title = f"at {cfg['input_size']}x{cfg['input_size']} (speed only, random inputs)" if speed_only else "on the val split"
    lines = [f"# edgeopt benchmark {title}", "",
             f"Baseline: **{report['baseline']}**; speedups are against it at the same batch size, measured in this run. "
             f"{cfg['rounds']} rounds; in each, every artifact takes its turn for a {cfg['seconds']:g} s window per "
             f"batch size (order rotated each round; {cfg['warmup']} warm-up runs before the first). Figures are "
             "medians over the rounds, ± half the range between the slowest and fastest round; a speedup whose "
             "range overlaps the baseline's is marked *within noise*. Inputs preallocated (device memory on CUDA, "
             "synchronised).", ""]
    head = ["model", "backend", "precision", "size MB", "params M", "MACs M", "sparsity"]
    if not speed_only:
        head += ["top-1", "top-5", "agree"]
    head += ["b1 p50/p90/p99 ms"] + [f"img/s b{b}" for b in sizes] + [f"speedup b{ref}"]
    if not speed_only:
        head += ["e2e img/s", "Pareto"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * 3 + [" ---: "] * (len(head) - 3)) + "|"]
    skipped = []
    for r in report["rows"]:
        if r["skipped"]:
            skipped.append(f"- {r['name']}: {r['skipped']}")
            continue
        cells = [r["name"] + (" (baseline)" if r["role"] == "baseline" else ""), r["backend"] + (
            f" {r['device']}" if r["device"] != "cpu" else ""), r["precision"], _fmt(r["file_bytes"] / 1e6, ".2f"),
                 _fmt(r["params"] / 1e6 if r["params"] else None, ".2f"),
                 _fmt(r["macs"] / 1e6 if r["macs"] else None, ".1f"), _fmt(r["sparsity"], ".1%")]
        if not speed_only:
            cells += [_fmt(r["top1"], ".2%"), _fmt(r["top5"], ".2%"), _fmt(r["agreement"], ".1%")]
        lat = r["latency_ms_b1"]
        cells.append(f"{lat['p50']:.2f}/{lat['p90']:.2f}/{lat['p99']:.2f}" if lat else "—")
        cells += [_with_spread(r["throughput"].get(b), (r.get("throughput_spread") or {}).get(b)) for b in sizes]
        flag = " ⚠" if r["int8_gate"] and r["int8_gate"]["flags"] else ""
        noise = " *within noise*" if (r.get("speedup_verdict") or {}).get(ref) == "within noise" else ""
        cells.append(_fmt(r["speedup"].get(ref), ".2f", "—") + ("x" if r["speedup"].get(ref) else "") + noise + flag)
        if not speed_only:
            cells += [_with_spread(r["e2e_img_per_s"], r.get("e2e_spread")), "yes" if r["pareto"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Not measured:", *skipped]
    gates = [r for r in report["rows"] if r["int8_gate"]]
    if gates:
        lines += ["", f"## INT8 gate (flagged when slower than its FP32/FP16 sibling at batch {ref} beyond noise, or "
                      f"more than {cfg['max_accuracy_drop']:g} pt less top-1)", ""]
        for r in gates:
            g = r["int8_gate"]
            if not g.get("sibling"):
                lines.append(f"- {r['name']}: {g['flags'][0]}")
                continue
            verdict = "FLAGGED: " + "; ".join(g["flags"]) if g["flags"] else "passed"
            plain = (f"; vs the plain INT8 {g['plain']}: {_fmt(g.get('vs_plain'), '.2f')}x "
                     f"({g.get('vs_plain_verdict') or 'not timed'})" if g.get("plain") else "")
            top1 = f", top-1 {_neg(g['drop_pt']):+.2f} pt" if g.get("drop_pt") is not None else ""
            lines.append(f"- {r['name']} vs {g['sibling']}: {_fmt(g['speedup'], '.2f')}x "
                         f"({_range(g.get('speedup_range'))}, {g.get('speed_verdict') or 'not timed'}){top1}{plain}: "
                         f"{verdict}")
    for p in report.get("pruning") or []:
        lines += ["", f"## Pruning of {p['model']} ({p['method']} {_fmt(p['amount'], 'g')}, "
                      f"{_fmt(p['macs_ratio'], '.2f')}x fewer MACs)", "",
                  f"- top-1 before pruning {_fmt(p['top1_before'], '.2%')}; right after pruning "
                  f"{_fmt(p['top1_pruned'], '.2%')}; before any fine-tuning, BatchNorm statistics re-estimated "
                  f"{_fmt(p.get('top1_before_finetune'), '.2%')}; after fine-tuning {_fmt(p['top1_after'], '.2%')} "
                  "(the checkpoint's manifest, on its own val split)"]
    final = (report.get("final") or {}).get("artifact")
    final_row = next((r for r in report["rows"] if r["name"] == final and r.get("classification")), None)
    if final_row:
        c = final_row["classification"]
        lines += ["", f"## Per-class metrics of the final artifact ({final})", "",
                  f"Macro precision {c['macro_precision']:.2%}, recall {c['macro_recall']:.2%}, F1 "
                  f"{c['macro_f1']:.2%}; F1 weighted by support {c['weighted_f1']:.2%}.", "",
                  "| class | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {name} | {k['precision']:.2%} | {k['recall']:.2%} | {k['f1']:.2%} | {k['support']} |"
                  for name, k in c["per_class"].items()]
    if report.get("final"):
        f = report["final"]
        lines += ["", "## Final artifact", "", f"**{f['artifact']}**: {f['why']}."]
        if f.get("runner_up"):
            lines[-1] += (f" Against the runner-up {f['runner_up']}: {f['vs_runner_up']:.2f}x, "
                          + ("*within noise* (this run cannot rank the two)" if f["vs_runner_up_verdict"] ==
                             "within noise" else f"{f['vs_runner_up_verdict']} in every round") + ".")
    if report.get("verdicts"):
        lines += ["", f"## Verdicts (budgets: --min-speedup {cfg['min_speedup']:g}, --max-accuracy-drop "
                      f"{cfg['max_accuracy_drop']:g})", ""]
        for g in report["verdicts"]:
            state = {True: "MET", False: "NOT MET", None: "speed only (accuracy not measured)"}[g["met"]]
            lines.append(f"- {g['verdict']}: **{state}** ({g['artifact']}: {_fmt(g['speedup'], '.2f')}x, "
                         f"{_range(g.get('speedup_range'))}"
                         + (f", {g['speed_verdict']}" if g.get("speed_verdict") == "within noise" else "")
                         + (f", top-1 {_neg(g['drop_pt']):+.2f} pt)" if g["drop_pt"] is not None else ")"))
    lines += ["", "## Environment", "",
              f"- CPU: {env['cpu']} ({env['cpu_cores']} cores); instruction sets: "
              f"{isa_summary(env) if 'isa' in env else 'not recorded'}",
              f"- threads: {env['threads']} for every CPU backend (ONNX Runtime intra-op {env['threads']}, inter-op 1;"
              f" PyTorch {env['threads']})",
              f"- GPU: {env['gpu'] or 'none'}" + (f", driver {env['driver']}" if env.get("driver") else "")
              + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
              + (f", cuDNN {env['cudnn']}" if env.get("cudnn") else "")
              + (f", TensorRT {env['tensorrt']}" if env.get("tensorrt") else ""),
              "- libraries: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
              f"- ONNX Runtime providers: {', '.join(env.get('onnxruntime_providers', []))}",
              f"- date: {env['date']}; {env['platform']}"]
    if report.get("plots"):
        lines += ["", "Plots: " + ", ".join(report["plots"])]
    return "\n".join(lines) + "\n"


def _plots(rows: list[Row], cfg: BenchmarkConfig, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if not r.skipped and r.throughput]
    ref = str(cfg.reference_batch)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    pts = [r for r in measured if r.throughput.get(ref)]
    if cfg.input_size:  # no accuracy: MACs against speed instead
        for k, r in enumerate(pts):
            ax.scatter(r.throughput[ref], (r.macs or 0) / 1e6, s=30)
            ax.annotate(r.name, (r.throughput[ref], (r.macs or 0) / 1e6), fontsize=7, xytext=(3, 3 - 9 * (k % 3)),
                        textcoords="offset points")  # staggered: artifacts of one model sit on top of each other
        ax.set_ylabel("MACs per image (M)")
        ax.set_title(f"speed at {cfg.input_size}px (random inputs)", fontsize=9)
    else:
        for k, r in enumerate(pts):
            ax.scatter(r.throughput[ref], 100 * (r.top1 or 0), s=40 if r.pareto else 20,
                       marker="*" if r.pareto else "o", color="tab:red" if r.pareto else "tab:blue")
            ax.annotate(r.name, (r.throughput[ref], 100 * (r.top1 or 0)), fontsize=7, xytext=(3, 3 - 9 * (k % 3)),
                        textcoords="offset points")
        front = sorted((r for r in pts if r.pareto), key=lambda r: r.throughput[ref])
        if len(front) > 1:
            ax.plot([r.throughput[ref] for r in front], [100 * (r.top1 or 0) for r in front], "--", color="tab:red",
                    label="Pareto front")
            ax.legend(fontsize=8)
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"accuracy vs throughput at batch {ref} ({cfg.device})", fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel(f"images/s at batch {ref} (log)")
    fig.tight_layout()
    with atomic_path(out / PLOT_PARETO) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    written.append(out / PLOT_PARETO)

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for r in measured:
        bs = sorted(int(b) for b in r.latency_ms)
        ax.plot(bs, [r.latency_ms[str(b)] for b in bs], marker="o", label=r.name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency per batch, p50 (ms)")
    ax.set_title(f"latency vs batch size ({cfg.device}{f', {cfg.input_size}px' if cfg.input_size else ''})",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out / PLOT_LATENCY) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    written.append(out / PLOT_LATENCY)
    return written
