"""edgeopt command line: ``python cli.py <stage> ...``.

Each subcommand maps its flags onto its stage's config, runs the stage, and prints the result. Errors of
ours become one line on stderr and exit code 2; Ctrl-C exits 130 and keeps the last complete checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Callable, Sequence

from optimize.errors import EdgeoptError


# subcommand -> (its config's name in optimize.configs, handler); each handler gets the config built from its flags
def _commands() -> dict[str, tuple[str, Callable[..., int]]]:
    return {
        "train": ("TrainConfig", cmd_train), "distill": ("DistillConfig", cmd_distill),
        "prune": ("PruneConfig", cmd_prune), "export": ("ExportConfig", cmd_export),
        "calibrate": ("CalibConfig", cmd_calibrate), "build-engine": ("BuildConfig", cmd_build_engine),
        "evaluate": ("EvalConfig", cmd_evaluate), "infer": ("InferConfig", cmd_infer),
        "package": ("PackageConfig", cmd_package), "serve": ("ServeConfig", cmd_serve),
        "benchmark": ("BenchmarkConfig", cmd_benchmark), "gpu-check": ("GpuCheckConfig", cmd_gpu_check),
        "pipeline": ("PipelineConfig", cmd_pipeline), "search": ("SearchConfig", cmd_search),
    }


# -- subcommands --------------------------------------------------------------------------------------------

def cmd_train(cfg, args: argparse.Namespace) -> int:
    """Train a ResNet (the teacher) on the data; writes the best checkpoint, its manifest and <out>.last.pth."""
    from optimize import train

    artifact = train.run(cfg)
    m = artifact.manifest.get("metrics", {})
    _print_artifact(artifact, args.json, f"best epoch {m.get('epoch')}: val top-1 {m.get('val_top1', 0):.2%}, "
                                         f"top-5 {m.get('val_top5', 0):.2%}{_early_stop_note(artifact.manifest)}")
    return 0


def cmd_evaluate(cfg, args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on the val split: top-1, top-5, loss, per-class accuracy/precision/recall/F1, confusion."""
    from optimize import evaluate

    report = evaluate.run(cfg)
    if args.json:
        return _print_json(report.to_dict())
    m = report.metrics
    print(f"{cfg.model}: top-1 {m.top1:.2%}  top-5 {m.top5:.2%}  loss {m.loss:.4f}  ({m.count} images)")
    width = max(len(n) for n in report.class_names)
    c = report.classification
    print(f"  {'class':<{width}}  accuracy  precision   recall       F1  support")
    for name, acc in zip(report.class_names, m.per_class_accuracy):
        k = c["per_class"][name]
        print(f"  {name:<{width}}  {acc:8.2%}  {k['precision']:9.2%}  {k['recall']:7.2%}  {k['f1']:7.2%}  "
              f"{k['support']:7d}")
    print(f"  {'macro':<{width}}  {'':8}  {c['macro_precision']:9.2%}  {c['macro_recall']:7.2%}  "
          f"{c['macro_f1']:7.2%}")
    print("confusion matrix (rows: true, columns: predicted):")
    for name, row in zip(report.class_names, m.confusion):
        print(f"  {name:<{width}} " + " ".join(f"{v:5d}" for v in row))
    for written in (report.plot, report.feature_maps):
        if written:
            print(f"wrote {written}")
    return 0


def _print_json(obj) -> int:
    print(json.dumps(obj, indent=2))
    return 0


def _print_report(artifact, as_json: bool, render: Callable[[dict], str], written: str) -> None:
    """A report's tables (or, with --json, its manifest) and the files written."""
    if as_json:
        _print_json(artifact.manifest)
        return
    print(render(artifact.manifest), end="")
    print(f"wrote {written}")


def _print_artifact(artifact, as_json: bool, summary: str) -> None:
    if not _is_main_process():
        return
    if as_json:
        print(json.dumps({"out": str(artifact.path), "metrics": artifact.manifest.get("metrics", {})}, indent=2))
    else:
        print(f"wrote {artifact.path} ({summary})")


def _early_stop_note(manifest: dict) -> str:
    """The summary's word that --patience ended a training run early (the manifest's record), or nothing."""
    stop = manifest.get("early_stop")
    return f"; stopped early after epoch {stop['after_epoch']} of {stop['epochs']}: {stop['reason']}" if stop else ""


def cmd_distill(cfg, args: argparse.Namespace) -> int:
    """Distill a teacher into a ResNet-18/34 student through the shared training loop (logit KD)."""
    from optimize import distill

    artifact = distill.run(cfg)
    m = artifact.manifest.get("metrics", {})
    _print_artifact(artifact, args.json, f"best epoch {m.get('epoch')}: val top-1 {m.get('val_top1', 0):.2%}"
                                         f"{_early_stop_note(artifact.manifest)}")
    return 0


def cmd_prune(cfg, args: argparse.Namespace) -> int:
    """Prune a ResNet globally by L1 magnitude (unstructured, channel or 2:4) and fine-tune it."""
    from optimize import prune

    artifact = prune.run(cfg)
    m = artifact.manifest.get("metrics", {})
    _print_artifact(artifact, args.json,
                    f"{m['method']}: sparsity {m['sparsity']:.1%}, MACs {m['macs_before'] / 1e6:.1f}M -> "
                    f"{m['macs_after'] / 1e6:.1f}M, params {m['params_before'] / 1e6:.2f}M -> "
                    f"{m['params_after'] / 1e6:.2f}M, top-1 {m['top1_before']:.2%} -> {m['top1_pruned']:.2%} pruned "
                    + (f"-> {m['top1_before_finetune']:.2%} BatchNorm re-estimated "
                       if m["top1_before_finetune"] != m["top1_pruned"] else "")
                    + f"-> {m['top1_after']:.2%} fine-tuned")
    return 0


def cmd_export(cfg, args: argparse.Namespace) -> int:
    """Export a checkpoint to ONNX (symbolic batch axis), verified against PyTorch at batch 1, 7 and 32."""
    from optimize import export

    artifact = export.run(cfg)
    v = artifact.manifest["metrics"]["verification"]
    summary = (f"opset {cfg.opset}, batch axis '{export.BATCH_DIM}'; vs PyTorch at batch "
               f"{'/'.join(map(str, export.VERIFY_BATCHES))}: max abs diff {v['max_abs_diff']:.1e}, "
               f"top-1 agreement {v['top1_agreement']:.0%}")
    if artifact.manifest.get("torchscript"):
        summary += f"; also wrote {artifact.path.with_name(artifact.manifest['torchscript'])}"
    _print_artifact(artifact, args.json, summary)
    return 0


def cmd_calibrate(cfg, args: argparse.Namespace) -> int:
    """Calibrate an ONNX model to INT8: Q/DQ for TensorRT, or the fastest measured form for the CPU."""
    from optimize import calibrate

    artifact = calibrate.run(cfg)
    m = artifact.manifest["metrics"]
    summary = f"{m['target']}, {m['form']}"
    if m["top1_int8"] is not None:
        summary += (f": top-1 {m['top1_int8']:.2%} vs FP32 {m['top1_fp32']:.2%} ({m['top1_drop_pt']:+.2f} pt drop), "
                    f"agreement {m['agreement_with_fp32']:.2%}")
    if m["target"] == "cpu":
        summary += "; img/s at batch 8: FP32 %.0f, " % m["fp32"]["img_per_s_b8"] + ", ".join(
            f"{form} {c['img_per_s_b8']:.0f} ({c['speedup_vs_fp32']:.2f}x)" for form, c in m["candidates"].items())
    cache = artifact.path.with_name(artifact.manifest["calibration_cache"])
    _print_artifact(artifact, args.json, summary + f"; cache {cache}")
    return 0


def cmd_build_engine(cfg, args: argparse.Namespace) -> int:
    """Build an inference engine: ONNX Runtime or OpenVINO (CPU, fp32/int8), or TensorRT 8.5 to 11
    (fp32/fp16/int8)."""
    from optimize import build_engine

    artifact = build_engine.run(cfg)
    e = artifact.manifest["engine"]
    where = {"tensorrt": lambda: f"TensorRT {e['tensorrt']} on {e['gpu']}",
             "openvino": lambda: f"OpenVINO {e['openvino'].split('-')[0]}, {e['hint']} hint",
             "onnxruntime": lambda: f"ONNX Runtime {e['onnxruntime']}"}[e["backend"]]()
    calibration = (artifact.manifest.get("metrics") or {}).get("calibration") or {}
    if e["backend"] == "openvino" and calibration.get("top1_int8") is not None:
        where += (f"; NNCF INT8 top-1 {calibration['top1_int8']:.4f} vs FP32 {calibration['top1_fp32']:.4f}, "
                  f"agreement {calibration['agreement_with_fp32']:.4f}")
    if e["backend"] == "onnxruntime" and e.get("comparison"):
        c = e["comparison"]
        where += (f"; kept the {e['kept']} graph (optimized/input {c['ratio']:.2f}x at batch {c['batch']}, "
                  f"{c['verdict']})")
    _print_artifact(artifact, args.json, f"{where}, {e['precision']}, batch {e['profile']['min_batch']}/"
                                         f"{e['profile']['opt_batch']}/{e['profile']['max_batch']}")
    return 0


# -- deploy subcommands: infer, package, serve ---------------------------------------------------------------

def cmd_infer(cfg, args: argparse.Namespace) -> int:
    """Classify images (files or folders) with a checkpoint, ONNX model or engine; exit 1 if any was unreadable."""
    from optimize import infer

    results = infer.run(cfg)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            if r.error:
                print(f"{r.image}: error: {r.error}")
                continue
            print(r.image)
            for c in r.top_k:
                print(f"  {c.probability:7.2%}  {c.name}")
    return 1 if any(r.error for r in results) else 0


def cmd_package(cfg, args: argparse.Namespace) -> int:
    """Write a deployment bundle: model, runner.py (no torch), build_engine.sh and a Triton model repository."""
    from optimize import package

    artifact = package.run(cfg)
    m = artifact.manifest
    if args.json:
        print(json.dumps({"out": str(artifact.path), "bundle": m}, indent=2))
    else:
        print(f"wrote {artifact.path} ({len(m['files'])} files; build_engine.sh defaults to {m['precision']}; "
              f"Triton model '{m['name']}' ({m['triton']['platform']}, max_batch_size "
              f"{m['triton']['max_batch_size']}))")
    return 0


def cmd_serve(cfg, args: argparse.Namespace) -> int:
    """Serve a model over HTTP: POST /predict (images -> top-k JSON), GET /health, GET /metadata."""
    from optimize import serve

    try:
        serve.run(cfg, ready=lambda url: print(f"serving {cfg.model} on {url} (POST /predict, GET /health, "
                                               "GET /metadata); Ctrl-C stops", flush=True))
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the Ctrl-C it caught
        print("stopped", file=sys.stderr)
    return 0


# -- benchmark and pipeline -----------------------------------------------------------------------------------

def cmd_benchmark(cfg, args: argparse.Namespace) -> int:
    """Benchmark artifacts against the baseline: accuracy, latency, throughput, speedups; report.md/.json + plots."""
    from optimize.benchmark import report

    artifact = report.run(cfg)
    written = f"{artifact.path.parent / report.REPORT_MD}, {artifact.path} and {', '.join(artifact.manifest['plots'])}"
    _print_report(artifact, args.json, report.render_markdown, written)
    return 0


def cmd_search(cfg, args: argparse.Namespace) -> int:
    """Search the compression recipe (optuna): the fastest model within your accuracy budget, measured on the target."""
    from optimize import search

    def on_trial(e: search.TrialEvent) -> None:
        figures = (f"top-1 {e.top1:.2%}, {search.speed_text(e.speed, cfg)}" + (f" ({e.note})" if e.note else "")
                   if e.top1 is not None else e.note or e.state.lower())
        best = "" if not e.best else (f" | best: trial {e.best['number']} {e.best['top1']:.2%} "
                                      f"{search.speed_text(e.best['speed'], cfg)}"
                                      + ("" if e.best["within"] else " (none within budget yet)"))
        eta = f" | ETA {e.eta_seconds / 60:.0f} min" if e.eta_seconds else ""
        print(f"trial {e.number} [{e.finished}/{e.total}] {e.state.lower()} in {e.seconds / 60:.1f} min: {figures}"
              f"{best}{eta}", flush=True)

    artifact = search.run(cfg, on_trial=on_trial)
    if args.json:
        return _print_json(artifact.manifest)
    out = artifact.path.parent
    chosen = artifact.manifest["chosen"]
    if chosen:
        print(f"chosen: trial {chosen['number']} (top-1 {chosen['top1']:.2%}, "
              f"{search.speed_text(chosen['speed'], cfg)}){'' if chosen['within'] else ' - NOT within the budget'}")
        print(f"recipe: {out / search.BEST_YAML} (reproduce: {search.reproduce_command(cfg)})")
    print(f"wrote {out / search.REPORT_MD}, {artifact.path}" +
          "".join(f", {out / p}" for p in artifact.manifest["plots"]))
    return 0


def cmd_gpu_check(cfg, args: argparse.Namespace) -> int:
    """On a GPU machine: every GPU backend over a pipeline run's artifacts (or why it's absent), context check."""
    from optimize import gpu_check

    artifact = gpu_check.run(cfg)
    _print_report(artifact, args.json, gpu_check.render_markdown,
                  f"{artifact.path} and {artifact.path.with_name(gpu_check.GPU_CHECK_MD)}")
    verdict = artifact.manifest["verdict"]
    for problem in verdict["problems"]:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 0 if verdict["passed"] else 1


def cmd_pipeline(cfg, args: argparse.Namespace) -> int:
    """Run teacher -> distill -> prune -> export -> calibrate -> build-engine -> benchmark from a recipe."""
    import time

    import yaml

    from optimize import pipeline
    from optimize.benchmark import report

    if args.dry_run:
        recipe, steps = pipeline.plan(cfg)
        print(yaml.safe_dump(recipe, sort_keys=False), end="")
        print(f"# {len(steps)} steps: " + ", ".join(name for name, _ in steps))
        return 0
    started, clock = time.perf_counter(), {}

    def on_step(i: int, total: int, name: str, event: str, estimate: float | None) -> None:
        elapsed = time.perf_counter() - started
        if event in ("start", "resume"):
            clock[name] = time.perf_counter()
            eta = f"; ETA {estimate / 60:.1f} min by the last run" if estimate else ""
            print(f"[{i}/{total}] {name}{' (resuming)' if event == 'resume' else ''} ... "
                  f"({elapsed / 60:.1f} min elapsed{eta})", flush=True)
        elif event == "skip":
            print(f"[{i}/{total}] {name}: unchanged, skipped", flush=True)
        else:
            print(f"[{i}/{total}] {name}: done in {time.perf_counter() - clock[name]:.0f} s", flush=True)

    artifact = pipeline.run(cfg, on_step=on_step)
    ran = [r for r in artifact.manifest["last_run"] if r["status"] == "ran"]
    print(f"pipeline finished in {(time.perf_counter() - started) / 60:.1f} min: {len(ran)} step(s) ran, "
          f"{len(artifact.manifest['last_run']) - len(ran)} skipped; state in {artifact.path}")
    report_md = report.report_folder(artifact.path.parent) / report.REPORT_MD
    if report_md.exists():
        print(f"report: {report_md}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per stage, its flags made from its config's fields (optimize.options): no torch imported."""
    from optimize import configs
    from optimize.options import add_options

    parser = argparse.ArgumentParser(prog="cli.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (config_name, handler) in _commands().items():
        config_cls = getattr(configs, config_name)
        p = sub.add_parser(name, help=handler.__doc__.splitlines()[0], description=handler.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(handler=handler, config=config_cls)
        groups: dict[str, argparse._ArgumentGroup] = {}
        add_options(p, config_cls, groups=groups)
        if config_cls is configs.PipelineConfig:  # the recipe's top-level keys, overridden from the command line
            add_options(p, configs.RecipeCommon, groups=groups,
                        defaults={f.name: None for f in dataclasses.fields(configs.RecipeCommon)},
                        defaults_text="the recipe's")
            p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and stop")
        if name not in ("serve", "pipeline"):
            (groups.get("output") or p).add_argument("--json", action="store_true",
                                                     help="print the result as JSON instead of the summary")
    return parser


def _config(args: argparse.Namespace):
    """The subcommand's config from its flags (the pipeline's recipe keys become overrides)."""
    from optimize import configs
    from optimize.options import from_args

    fixed = {"progress": not args.quiet}
    if args.config is configs.PipelineConfig:
        fixed["overrides"] = tuple((f.name, getattr(args, f.name)) for f in dataclasses.fields(configs.RecipeCommon))
    return from_args(args.config, args, **fixed)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    if not _is_main_process():
        level = logging.WARNING
    # other libraries (onnxscript, onnx_ir, optuna) speak at WARNING and above; ours at the level asked for
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s")
    for name in ("optimize", "calib", "benchmarks", "cli", "__main__"):
        logging.getLogger(name).setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        return args.handler(_config(args), args)
    except EdgeoptError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # an I/O failure no stage turned into an EdgeoptError still gets one line
        print(f"error: {e}; check the path, its permissions and free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # training's (TrainingInterrupted) says whether a checkpoint was kept
        print(f"interrupted: {e}" if str(e) else "interrupted: nothing half-written is left, and no checkpoint to "
              "resume from was written", file=sys.stderr)  # Ctrl-C before training began, or outside training
        return 130
    finally:
        from optimize.loop import shutdown_distributed

        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
