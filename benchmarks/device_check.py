"""The device check: what a GPU machine lent for minutes, with nothing to fetch, can prove about our GPU path.

``benchmarks/device_check.sh`` (``make device-check``) installs the carried wheels and runs this with the
machine's own Python. Steps, each recorded with its wall time and outcome, none stopping the others:

1. ``pipeline``: the quick preset with ``--device cuda`` (training, distillation and fine-tuning on the GPU; the
   benchmark stage on ``auto``, which is the CPU when ONNX Runtime has no CUDA provider).
2. ``cuda-runtime``: :class:`optimize.cuda_runtime.CudaRuntime` for real: pinned host buffers, asynchronous copies
   on a stream of its own, device memory allocated in the primary context and read by PyTorch (the teacher's
   logits from our buffer against its logits from torch's own copy: equal), then copied back through our stream.
3. ``gpu-check``: ``cli.py gpu-check --allow-no-tensorrt`` over the run: PyTorch FP32 / TF32 / FP16 / BF16 rows
   on CUDA, ONNX Runtime CUDA where installed, TensorRT skipped with its reason, GPU clocks before and after.
4. ``cuda-peak``: the GPU's achievable multiply-accumulates per second (optimize.peak: FP32, TF32, FP16, BF16 and
   INT8 matrix products through PyTorch), the ceiling the rows' fractions of peak are taken against.
5. ``full-epoch``: one epoch of the ``full`` preset's ResNet-18 (the student's recipe) on all training images,
   timed, and the preset's ResNet-18 epochs projected from it.

Writes ``device_check.json`` / ``device_check.md`` in ``--out`` (and copies them, gpu_check.md/json and the
pipeline's report to ``$OUT`` when set, the folder a lent machine sends back). ``--dry-run`` checks that every
step is wired (configs build, the pipeline's ``--dry-run`` plans the run, paths resolve) without a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optimize import train
from optimize.benchmark.report import REPORT_MD as PIPELINE_REPORT_MD, report_folder
from optimize.configs import PRESETS, GpuCheckConfig
from optimize.cuda_runtime import CudaRuntime
from optimize.peak import cuda_peak
from optimize.pipeline import stage_config
from optimize.runners import open_runner

logger = logging.getLogger("benchmarks.device_check")
ROOT = Path(__file__).resolve().parents[1]
REPORT_JSON, REPORT_MD = "device_check.json", "device_check.md"


@dataclass
class Step:
    name: str
    run: Callable[[bool], dict[str, Any]]  # dry_run -> figures
    result: dict[str, Any] = field(default_factory=dict)


def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """``python cli.py ARGS`` with this interpreter, as a user runs it."""
    cmd = [sys.executable, str(ROOT / "cli.py"), *map(str, args)]
    logger.info("$ %s", " ".join(cmd))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _tail(proc: subprocess.CompletedProcess) -> str:
    return "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])


def pipeline_step(runs: Path, data: str) -> Callable[[bool], dict[str, Any]]:
    recipe = runs.parent / "device-check-recipe.yaml"

    def run(dry: bool) -> dict[str, Any]:
        recipe.parent.mkdir(parents=True, exist_ok=True)
        # ONNX Runtime here is the CPU build: the report's rows run on auto (the CPU), training on CUDA
        recipe.write_text("stages:\n  benchmark: {device: auto}\n")  # merged over the quick preset
        # a dry run plans on auto: the pipeline refuses --device cuda where there is no GPU, before any stage
        device = "auto" if dry else "cuda"
        args = ["pipeline", "--preset", "quick", "--config", recipe, "--device", device, "--data", data, "--out", runs]
        proc = _cli(*args, *(["--dry-run"] if dry else []), timeout=600)
        (runs.parent / "pipeline.log").write_text(proc.stdout + proc.stderr)  # the whole of it, sent back
        if proc.returncode != 0:
            raise RuntimeError(f"pipeline exited {proc.returncode}:\n{_tail(proc)}")
        if dry:
            return {"planned": proc.stdout.strip().splitlines()[-1], "device": "cuda (planned on auto)"}
        state = json.loads((runs / "pipeline.json").read_text())
        return {"stage_seconds": {k: round(v.get("seconds", 0), 1) for k, v in state["steps"].items()},
                "report": str(report_folder(runs) / PIPELINE_REPORT_MD)}

    return run


def cuda_runtime_step(runs: Path) -> Callable[[bool], dict[str, Any]]:
    def run(dry: bool) -> dict[str, Any]:
        if dry:
            return {"skipped": "dry run (needs a GPU)", "class": CudaRuntime.__name__}
        import torch

        cuda = CudaRuntime()
        runner = open_runner(runs / "teacher.pth", device="cuda")
        x = np.random.default_rng(0).standard_normal((8, 3, runner.image_size, runner.image_size)).astype(np.float32)
        host = cuda.pinned(x.shape)
        host[:] = x
        stream, handle = cuda.stream()
        owner, address = cuda.device_buffer(x.nbytes)
        cuda.to_device(address, host, stream)
        cuda.synchronize(stream)
        ours = torch.as_tensor(_CudaArray(address, x.shape), device="cuda")  # our memory, read by torch
        with torch.inference_mode():
            from_ours = runner.model(ours)
            from_torch = runner.model(torch.from_numpy(x).cuda())
        torch.cuda.synchronize()
        back = cuda.pinned(tuple(from_ours.shape))
        cuda.to_host(back, from_ours.contiguous().data_ptr(), stream)
        cuda.synchronize(stream)
        result = {"binding": cuda.kind, "driver_cuda": cuda.driver, "stream_handle_is_int": isinstance(handle, int),
                  "input_roundtrip_equal": bool(torch.equal(ours.cpu(), torch.from_numpy(x))),
                  "logits_max_abs_diff_vs_torch_copy": float((from_ours - from_torch).abs().max()),
                  "copied_back_equal": bool(np.array_equal(back, from_ours.cpu().numpy())), **cuda.device()}
        cuda.free([owner], [host, back], stream)
        result["ok"] = (result["input_roundtrip_equal"] and result["copied_back_equal"]
                        and result["logits_max_abs_diff_vs_torch_copy"] == 0.0)
        return result

    return run


class _CudaArray:
    """``__cuda_array_interface__`` over a float32 device buffer, so torch reads memory CudaRuntime allocated."""

    def __init__(self, address: int, shape: tuple[int, ...]):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": "<f4", "data": (address, False),
                                         "version": 3, "strides": None, "stream": None}


def gpu_check_step(runs: Path, out: Path, data: str) -> Callable[[bool], dict[str, Any]]:
    def run(dry: bool) -> dict[str, Any]:
        args = ["gpu-check", "--runs", runs, "--out", out / "gpu-check", "--data", data, "--allow-no-tensorrt",
                "--seconds", "2.0", "--rounds", "2", "--val-limit", "1000"]
        if dry:
            cfg = GpuCheckConfig(runs=str(runs), out=str(out / "gpu-check"), data=data, allow_no_tensorrt=True,
                                 seconds=2.0, rounds=2, val_limit=1000)
            cfg.check()
            return {"command": " ".join(map(str, ["cli.py", *args])), "tf32_rows": cfg.tf32}
        proc = _cli(*args, "--json", timeout=900)
        figures = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
        if not figures:
            raise RuntimeError(f"gpu-check exited {proc.returncode}:\n{_tail(proc)}")
        return {"exit_code": proc.returncode, "verdict": figures.get("verdict"), "gpu": figures.get("gpu"),
                "gpu_state": figures.get("gpu_state"), "tensorrt": figures.get("tensorrt_missing"),
                "rows": figures.get("rows"), "report": str(out / "gpu-check" / "gpu_check.md")}

    return run


def peak_step() -> Callable[[bool], dict[str, Any]]:
    def run(dry: bool) -> dict[str, Any]:
        if dry:
            return {"skipped": "dry run (needs a GPU)", "measures": cuda_peak.__doc__.splitlines()[0]}
        return cuda_peak().as_dict()

    return run


def full_epoch_step(out: Path, data: str) -> Callable[[bool], dict[str, Any]]:
    def run(dry: bool) -> dict[str, Any]:
        full = PRESETS["full"]
        # the student's recipe (distillation's own keys aside) trained as the teacher stage trains: one epoch
        recipe = {k: v for k, v in full["stages"]["distill"].items() if k not in ("student", "alpha", "temperature")}
        cfg = stage_config("teacher", {**recipe, "arch": full["stages"]["distill"]["student"], "epochs": 1},
                           {"out": str(out / "full-epoch" / "resnet18.pth"), "data": data},
                           progress=False, device="cuda")
        epochs = full["stages"]["distill"]["epochs"] + full["stages"]["prune"]["finetune_epochs"]
        if dry:
            return {"config": {"arch": cfg.arch, "augment": cfg.augment, "optimizer": cfg.loop.optimizer,
                               "lr": cfg.loop.lr, "epochs": cfg.loop.epochs}, "projected_epochs": epochs}
        start = time.perf_counter()
        artifact = train.run(cfg)
        seconds = time.perf_counter() - start
        return {"seconds_one_epoch": round(seconds, 1),
                "val_top1_after_one_epoch": artifact.manifest.get("metrics", {}).get("val_top1"),
                "resnet18_epochs_in_full_preset": epochs, "projected_resnet18_minutes": round(seconds * epochs / 60, 1),
                "note": "the ResNet-50 teacher's epochs are not timed here"}

    return run


def run(out: Path, data: str, dry: bool) -> dict[str, Any]:
    """Every step, in order; a step that fails is recorded and the next one still runs."""
    runs = out / "runs"
    steps = [Step("pipeline", pipeline_step(runs, data)), Step("cuda-runtime", cuda_runtime_step(runs)),
             Step("gpu-check", gpu_check_step(runs, out, data)), Step("cuda-peak", peak_step()),
             Step("full-epoch", full_epoch_step(out, data))]
    for step in steps:
        start = time.perf_counter()
        try:
            step.result = {"ok": True, **step.run(dry)}
        except Exception as e:  # noqa: BLE001 - a step's failure is a finding; the others still run
            logger.exception("step %s failed", step.name)
            step.result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        step.result["seconds"] = round(time.perf_counter() - start, 1)
        logger.info("%s: %s in %.0f s", step.name, "ok" if step.result["ok"] else "FAILED", step.result["seconds"])
    return {"dry_run": dry, "python": sys.version.split()[0], "steps": {s.name: s.result for s in steps},
            "passed": all(s.result["ok"] for s in steps)}


def render(report: dict[str, Any]) -> str:
    lines = ["# Device check", "", f"{'Dry run' if report['dry_run'] else 'Run'}: "
             f"{'passed' if report['passed'] else 'FAILED'} (Python {report['python']})", "",
             "| step | ok | seconds | figures |", "| --- | --- | ---: | --- |"]
    for name, r in report["steps"].items():
        shown = {k: v for k, v in r.items() if k not in ("ok", "seconds", "rows", "planned")}
        lines.append(f"| {name} | {'yes' if r['ok'] else 'NO'} | {r['seconds']:.0f} | "
                     f"{json.dumps(shown)[:600].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/device-check"))
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--dry-run", action="store_true", help="check the wiring without a GPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args.out, args.data, args.dry_run)
    (args.out / REPORT_JSON).write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / REPORT_MD).write_text(render(report))
    logger.info("\n%s", render(report))
    sent = os.environ.get("OUT")
    if sent and not args.dry_run:  # a lent machine sends back what is under $OUT (at most 8 files)
        for path in (args.out / REPORT_JSON, args.out / REPORT_MD, args.out / "gpu-check" / "gpu_check.md",
                     args.out / "gpu-check" / "gpu_check.json",
                     report_folder(args.out / "runs") / PIPELINE_REPORT_MD,
                     args.out / "pipeline.log"):
            if path.is_file():
                shutil.copyfile(path, Path(sent) / (path.parent.name + "-" + path.name))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
