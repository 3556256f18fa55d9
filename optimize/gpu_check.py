"""``make gpu-check``: one command a person runs on a GPU machine to see every GPU path work, or why it can't.

Over a pipeline run's artifacts (``make demo``'s ``runs/demo`` by default) it records the GPU (nvidia-smi), which
GPU backends this machine has and the reason for each one it lacks (PyTorch CUDA, ONNX Runtime's CUDA provider,
TensorRT, a CUDA binding for TensorRT), builds TensorRT fp32/fp16/int8 engines from the run's FP32 ONNX when
TensorRT is there, then runs the benchmark with ``--device cuda``: PyTorch FP32/FP16/BF16, ONNX Runtime CUDA,
TensorRT, each backend skipped with its reason when absent. The engines are listed *before* the student and pruned
checkpoints on purpose, and the teacher's logits are computed before any TensorRT work and again after all of it:
PyTorch, ONNX Runtime and TensorRT must share the device's primary CUDA context, and a runner that left another
context current would change or break what runs after it (the context check).

A GPU check that skipped TensorRT is not a pass: without TensorRT and a CUDA binding that runs on this driver it
stops before any work, naming what to install for the driver's CUDA major, unless ``allow_no_tensorrt`` (then the
report says TensorRT was not checked). Engines that fail to build and a failed context check make the verdict
fail too. The GPU's SM clock, power and temperature are read before and after the benchmark, whose windows last
seconds (a GPU's clocks ramp over the first ones).

Writes ``gpu_check.json`` and ``gpu_check.md`` (short) beside the benchmark's own report folder.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from . import build_engine
from .artifacts import Artifact, atomic_path, engine_path, prepare_output, write_json
from .benchmark import report
from .configs import GpuCheckConfig
from .cuda_runtime import CudaRuntime, cuda_text, driver_cuda_version, install_hint, native_handle
from .device import DeviceError, cuda_available, ort_cuda_missing, ort_has_cuda, torch_cuda_missing
from .errors import ConfigError, EdgeoptError
from .onnx_model import OnnxModel
from .runners import open_runner
from .tensorrt_backend import import_tensorrt

logger = logging.getLogger(__name__)

GPU_CHECK_JSON = "gpu_check.json"
GPU_CHECK_MD = "gpu_check.md"
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")


STATE_FIELDS = ("clocks.sm", "clocks.max.sm", "clocks.mem", "power.draw", "power.limit", "temperature.gpu", "pstate")


def _query(fields: tuple[str, ...]) -> dict[str, str]:
    """One ``nvidia-smi --query-gpu`` row (device 0) as a dict (raises when there is no NVIDIA GPU)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise ConfigError("gpu-check needs an NVIDIA GPU: nvidia-smi is not on PATH here (no driver installed)")
    proc = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"], capture_output=True,
                          text=True, timeout=30)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise ConfigError(f"gpu-check: nvidia-smi found no usable GPU ({(proc.stderr or proc.stdout).strip()})")
    return dict(zip(fields, (v.strip() for v in proc.stdout.splitlines()[0].split(","))))


def nvidia_smi() -> dict[str, str]:
    """GPU name, driver, memory and compute capability from nvidia-smi (raises when there is no NVIDIA GPU)."""
    return _query(("name", "driver_version", "memory.total", "compute_cap"))


def gpu_state() -> dict[str, str]:
    """SM clock (now and its maximum), memory clock, power draw and limit, temperature and performance state: read
    before and after the benchmark, so a throttled or idle-clocked GPU shows in the report ("[N/A]" where the GPU
    does not report one, e.g. power on some boards)."""
    try:
        return _query(STATE_FIELDS)
    except (ConfigError, OSError, subprocess.SubprocessError) as e:
        return {"error": str(e)}


def backends() -> dict[str, dict[str, Any]]:
    """Each GPU backend: ``{"available": bool, "version" or "reason": ...}``."""
    import onnxruntime as ort
    import torch

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

    status, current = driver.cuCtxGetCurrent()
    status_dev, device = driver.cuDeviceGet(0)
    if int(status) or int(status_dev) or current is None:
        return None  # this cuda-python can't ask this driver (the runners used pycuda): no answer, not "no"
    status, primary = driver.cuDevicePrimaryCtxRetain(device)
    if int(status):
        return None
    driver.cuDevicePrimaryCtxRelease(device)
    return native_handle(current) == native_handle(primary)


def _teacher_logits(path: Path, batch: np.ndarray) -> np.ndarray:
    return open_runner(path, device="cuda").infer(batch)


def _build_engines(cfg: GpuCheckConfig, onnx_path: Path, out: Path) -> tuple[list[Path], dict[str, str]]:
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


def tensorrt_missing(found: dict[str, dict[str, Any]]) -> str | None:
    """Why TensorRT can't be checked here (what is missing and what to install), or None when it can."""
    missing = {name: found[name]["reason"] for name in ("tensorrt", "cuda_binding") if not found[name]["available"]}
    if not missing:
        return None
    driver = driver_cuda_version()
    fix = (f"this driver supports CUDA {cuda_text(driver)}: {install_hint(driver // 1000)}" if driver
           else "no NVIDIA driver answers here")
    return "; ".join(f"{name}: {why}" for name, why in missing.items()) + f" ({fix})"


def run(cfg: GpuCheckConfig) -> Artifact:
    """Run every GPU check over ``cfg.runs``; returns gpu_check.json with its figures and ``verdict``.

    Raises:
        ConfigError: no GPU, no pipeline run, or TensorRT missing without ``cfg.allow_no_tensorrt``.
        DeviceError: PyTorch sees no CUDA device.
    """
    runs, out = Path(cfg.runs), cfg.out_dir
    gpu = nvidia_smi()
    teacher, onnx_path = runs / "teacher.pth", runs / "model.onnx"
    for needed in (teacher, onnx_path):
        if not needed.is_file():
            raise ConfigError(f"{needed} is missing: run the pipeline first ('make demo', or 'make demo PRESET=quick' "
                              f"for a short one) or point --runs at its folder")
    found = backends()
    no_tensorrt = tensorrt_missing(found)
    if no_tensorrt and not cfg.allow_no_tensorrt:
        raise ConfigError(f"gpu-check would skip TensorRT: {no_tensorrt}; install it, or pass --allow-no-tensorrt "
                          "(make gpu-check ALLOW_NO_TENSORRT=1) to check the other backends only")
    if not found["torch"]["available"]:
        raise DeviceError(f"gpu-check: {found['torch']['reason']}")
    prepare_output(out / GPU_CHECK_JSON)
    batch = np.random.default_rng(0).standard_normal((8, 3, *_input_hw(onnx_path))).astype(np.float32)
    before = _teacher_logits(teacher, batch)

    engines, failures = [], {}
    if not no_tensorrt:
        engines, failures = _build_engines(cfg, onnx_path, out)
    checkpoints = [p for p in (runs / "student.pth", runs / "pruned.pth") if p.is_file()]
    # engines before checkpoints: on purpose. The ONNX model only where ONNX Runtime has CUDA (the benchmark
    # refuses a CUDA run it cannot give; the backends table says why it is absent)
    onnx_models = [str(onnx_path)] if found["onnxruntime"]["available"] else []
    models = [*map(str, engines), *onnx_models, *map(str, checkpoints)]
    state_before = gpu_state()
    bench = report.run(report.BenchmarkConfig(models=tuple(models), baseline=str(teacher), out=str(out / "benchmark"),
                                              data=cfg.data, device="cuda", seconds=cfg.seconds, rounds=cfg.rounds,
                                              val_limit=cfg.val_limit, tf32=cfg.tf32, progress=False))
    state_after = gpu_state()
    after = _teacher_logits(teacher, batch)
    context = {"teacher_logits_max_abs_diff": float(np.abs(after - before).max()),
               "primary_context_current": primary_context_is_current()}
    context["ok"] = context["teacher_logits_max_abs_diff"] < 1e-3 and context["primary_context_current"] is not False
    rows = [{k: r.get(k) for k in ("name", "backend", "precision", "runner", "top1", "skipped")}
            | {"img_per_s_b8": r.get("throughput", {}).get("8"),
               "latency_ms_b1_p50": (r.get("latency_ms_b1") or {}).get("p50")} for r in bench.manifest["rows"]]
    problems = [f"TensorRT {p} engine not built: {why}" for p, why in failures.items()]
    if not context["ok"]:
        problems.append("context check failed: the teacher's logits changed after the TensorRT and ONNX Runtime "
                        "rows, or another context was left current")
    figures = {"gpu": gpu, "gpu_state": {"before": state_before, "after": state_after}, "backends": found,
               "tensorrt_checked": no_tensorrt is None, "tensorrt_missing": no_tensorrt,
               "engine_failures": failures, "context_check": context, "rows": rows,
               "timing": {"seconds": cfg.seconds, "rounds": cfg.rounds},
               "verdict": {"passed": not problems, "problems": problems},
               "benchmark": str(out / "benchmark" / report.REPORT_MD)}
    with atomic_path(out / GPU_CHECK_MD) as tmp:
        tmp.write_text(render_markdown(figures))
    return Artifact(write_json(out / GPU_CHECK_JSON, figures), figures)


def _input_hw(onnx_path: Path) -> tuple[int, int]:
    size = OnnxModel.read(onnx_path).image_size
    return size, size


def render_markdown(f: dict[str, Any]) -> str:
    """The short report: GPU, backends, the benchmark's rows, the context check."""
    g = f["gpu"]
    verdict = f["verdict"]
    lines = ["# GPU check", "",
             f"Verdict: {'passed' if verdict['passed'] else 'FAILED'}"
             + ("" if f["tensorrt_checked"] else " (TensorRT NOT checked: allowed by --allow-no-tensorrt)"), ""]
    lines += [f"- {p}" for p in verdict["problems"]]
    if not f["tensorrt_checked"]:
        lines.append(f"- TensorRT not checked: {f['tensorrt_missing']}")
    lines += ["", f"GPU: {g['name']}, driver {g['driver_version']}, {g['memory.total']}, compute capability "
              f"{g['compute_cap']}", ""]
    for when, state in f["gpu_state"].items():
        lines.append(f"GPU {when} the benchmark: " + ", ".join(f"{k} {v}" for k, v in state.items()))
    t = f["timing"]
    lines += ["", f"Timing: {t['rounds']} rounds of {t['seconds']:g} s windows per artifact and batch size", "",
              "| backend | here | version or reason |", "|---|---|---|"]
    for name, b in f["backends"].items():
        lines.append(f"| {name} | {'yes' if b['available'] else 'no'} | {b.get('version') or b.get('reason')} |")
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
