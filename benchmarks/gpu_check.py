"""``make gpu-check``: one command a person runs on a GPU machine to see every GPU path work, or why it can't.

Over a pipeline run's artifacts (``make demo``'s ``runs/demo`` by default) it records the GPU (nvidia-smi), which
GPU backends this machine has and the reason for each one it lacks (PyTorch CUDA, ONNX Runtime's CUDA provider,
TensorRT, a CUDA binding for TensorRT), builds TensorRT fp32/fp16/int8 engines from the run's FP32 ONNX when
TensorRT is there, then runs the benchmark with ``--device cuda``: PyTorch FP32/FP16/BF16, ONNX Runtime CUDA,
TensorRT, each backend skipped with its reason when absent. The engines are listed *before* the student and pruned
checkpoints on purpose, and the teacher's logits are computed before any TensorRT work and again after all of it:
PyTorch, ONNX Runtime and TensorRT must share the device's primary CUDA context, and a runner that left another
context current would change or break what runs after it (the context check).

Writes ``gpu_check.json`` and ``gpu_check.md`` (short) beside the benchmark's own report folder.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from optimize.artifacts import Artifact, atomic_path, engine_path, prepare_output, write_json
from optimize.configs import GpuCheckConfig
from optimize.device import DeviceError
from optimize.errors import ConfigError, EdgeoptError

from . import report

logger = logging.getLogger(__name__)

GPU_CHECK_JSON = "gpu_check.json"
GPU_CHECK_MD = "gpu_check.md"
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")


def nvidia_smi() -> dict[str, str]:
    """GPU name, driver, memory and compute capability from nvidia-smi (raises when there is no NVIDIA GPU)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise ConfigError("gpu-check needs an NVIDIA GPU: nvidia-smi is not on PATH here (no driver installed)")
    fields = ("name", "driver_version", "memory.total", "compute_cap")
    proc = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"], capture_output=True,
                          text=True, timeout=30)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise ConfigError(f"gpu-check: nvidia-smi found no usable GPU ({(proc.stderr or proc.stdout).strip()})")
    return dict(zip(fields, (v.strip() for v in proc.stdout.splitlines()[0].split(","))))


def backends() -> dict[str, dict[str, Any]]:
    """Each GPU backend: ``{"available": bool, "version" or "reason": ...}``."""
    import onnxruntime as ort
    import torch

    from optimize.device import cuda_available, ort_cuda_missing, ort_has_cuda, torch_cuda_missing
    from optimize.cuda_runtime import CudaRuntime
    from optimize.tensorrt_backend import import_tensorrt

    found: dict[str, dict[str, Any]] = {}
    found["torch"] = ({"available": True, "version": torch.__version__, "cuda": torch.version.cuda,
                       "cudnn": torch.backends.cudnn.version()} if cuda_available()
                      else {"available": False, "reason": torch_cuda_missing()})
    found["onnxruntime"] = ({"available": True, "version": ort.__version__} if ort_has_cuda()
                            else {"available": False, "reason": ort_cuda_missing()})
    for name, probe in (("tensorrt", import_tensorrt), ("cuda_binding", CudaRuntime)):
        try:
            obj = probe()
            found[name] = {"available": True,
                           "version": str(obj.__version__) if name == "tensorrt" else obj.kind}
        except EdgeoptError as e:
            found[name] = {"available": False, "reason": str(e)}
    return found


def primary_context_is_current() -> bool | None:
    """Whether the current CUDA context is device 0's primary one (None without cuda-python to ask)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return None
    _, current = driver.cuCtxGetCurrent()
    _, device = driver.cuDeviceGet(0)
    _, primary = driver.cuDevicePrimaryCtxRetain(device)
    driver.cuDevicePrimaryCtxRelease(device)
    return int(current) == int(primary)


def _teacher_logits(path: Path, batch: np.ndarray) -> np.ndarray:
    from optimize.runners import open_runner

    return open_runner(path, device="cuda").infer(batch)


def _build_engines(cfg: GpuCheckConfig, onnx_path: Path, out: Path) -> tuple[list[Path], dict[str, str]]:
    from optimize import build_engine

    engines, failures = [], {}
    for precision in ENGINE_PRECISIONS:
        engine = engine_path(out, "tensorrt", precision)  # INT8: its cache by build-engine's rule, beside it
        bcfg = build_engine.BuildConfig(onnx=str(onnx_path), out=str(engine), backend="tensorrt", precision=precision,
                                        calib_data=cfg.data if precision == "int8" else None)
        try:
            build_engine.run(bcfg)
            engines.append(engine)
        except EdgeoptError as e:
            failures[precision] = str(e)
            logger.error("TensorRT %s engine: %s", precision, e)
    return engines, failures


def run(cfg: GpuCheckConfig) -> Artifact:
    """Run every GPU check over ``cfg.runs``; returns gpu_check.json with its figures."""
    runs, out = Path(cfg.runs), cfg.out_dir
    gpu = nvidia_smi()
    teacher, onnx_path = runs / "teacher.pth", runs / "model.onnx"
    for needed in (teacher, onnx_path):
        if not needed.is_file():
            raise ConfigError(f"{needed} is missing: run the pipeline first ('make demo', or 'make demo PRESET=quick' "
                              f"for a short one) or point --runs at its folder")
    prepare_output(out / GPU_CHECK_JSON)
    found = backends()
    if not found["torch"]["available"]:
        raise DeviceError(f"gpu-check: {found['torch']['reason']}")
    batch = np.random.default_rng(0).standard_normal((8, 3, *_input_hw(onnx_path))).astype(np.float32)
    before = _teacher_logits(teacher, batch)

    engines, failures = [], {}
    if found["tensorrt"]["available"] and found["cuda_binding"]["available"]:
        engines, failures = _build_engines(cfg, onnx_path, out)
    checkpoints = [p for p in (runs / "student.pth", runs / "pruned.pth") if p.is_file()]
    # engines before checkpoints: on purpose. The ONNX model only where ONNX Runtime has CUDA (the benchmark
    # refuses a CUDA run it cannot give; the backends table says why it is absent)
    onnx_models = [str(onnx_path)] if found["onnxruntime"]["available"] else []
    models = [*map(str, engines), *onnx_models, *map(str, checkpoints)]
    bench = report.run(report.BenchmarkConfig(models=tuple(models), baseline=str(teacher), out=str(out / "benchmark"),
                                              data=cfg.data, device="cuda", seconds=cfg.seconds,
                                              val_limit=cfg.val_limit, progress=False))
    after = _teacher_logits(teacher, batch)
    context = {"teacher_logits_max_abs_diff": float(np.abs(after - before).max()),
               "primary_context_current": primary_context_is_current()}
    context["ok"] = context["teacher_logits_max_abs_diff"] < 1e-3 and context["primary_context_current"] is not False
    rows = [{k: r.get(k) for k in ("name", "backend", "precision", "runner", "top1", "skipped")}
            | {"img_per_s_b8": r.get("throughput", {}).get("8"),
               "latency_ms_b1_p50": (r.get("latency_ms_b1") or {}).get("p50")} for r in bench.manifest["rows"]]
    figures = {"gpu": gpu, "backends": found, "engine_failures": failures, "context_check": context, "rows": rows,
               "benchmark": str(out / "benchmark" / report.REPORT_MD)}
    with atomic_path(out / GPU_CHECK_MD) as tmp:
        tmp.write_text(render_markdown(figures))
    return Artifact(write_json(out / GPU_CHECK_JSON, figures), figures)


def _input_hw(onnx_path: Path) -> tuple[int, int]:
    from optimize.onnx_model import OnnxModel

    size = OnnxModel.read(onnx_path).image_size
    return size, size


def render_markdown(f: dict[str, Any]) -> str:
    """The short report: GPU, backends, the benchmark's rows, the context check."""
    g = f["gpu"]
    lines = ["# GPU check", "",
             f"GPU: {g['name']}, driver {g['driver_version']}, {g['memory.total']}, compute capability "
             f"{g['compute_cap']}", "", "| backend | here | version or reason |", "|---|---|---|"]
    for name, b in f["backends"].items():
        lines.append(f"| {name} | {'yes' if b['available'] else 'no'} | {b.get('version') or b.get('reason')} |")
    for precision, why in f["engine_failures"].items():
        lines.append(f"\nTensorRT {precision} engine not built: {why}")
    lines += ["", "| artifact | runner | top-1 | img/s b8 | p50 ms b1 |", "|---|---|---|---|---|"]
    for r in f["rows"]:
        if r["skipped"]:
            lines.append(f"| {r['name']} | skipped: {r['skipped']} | | | |")
            continue
        top1 = f"{100 * r['top1']:.2f}%" if r["top1"] is not None else "—"
        ips = f"{r['img_per_s_b8']:.0f}" if r["img_per_s_b8"] else "—"
        p50 = f"{r['latency_ms_b1_p50']:.3f}" if r["latency_ms_b1_p50"] else "—"
        lines.append(f"| {r['name']} | {r['runner']} | {top1} | {ips} | {p50} |")
    c = f["context_check"]
    lines += ["", f"Context check ({'passed' if c['ok'] else 'FAILED'}): the teacher's logits after every TensorRT "
              f"and ONNX Runtime row differ from before by {c['teacher_logits_max_abs_diff']:.2e}; primary context "
              f"current: {c['primary_context_current']}", "", f"Full report: {f['benchmark']}", ""]
    return "\n".join(lines)
