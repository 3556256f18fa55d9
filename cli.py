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


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


# -- shared argument groups -------------------------------------------------------------------------------

def add_data_args(parser: argparse.ArgumentParser, *, train: bool = True, image_size: bool = True,
                  recorded: bool = False) -> None:
    """Data flags; ``image_size=False`` for stages that take the model's recorded preprocessing; ``recorded``:
    --data defaults to the data the model's manifest records."""
    g = parser.add_argument_group("data")
    if recorded:
        g.add_argument("--data", default=None,
                       help="'fashion-mnist' or a folder with train/ and val/, one subfolder per class (default: the "
                            "data the model's manifest records, else fashion-mnist)")
    else:
        g.add_argument("--data", default="fashion-mnist",
                       help="'fashion-mnist' (embedded default) or a folder with train/ and val/, one subfolder per "
                            "class")
    if image_size:
        g.add_argument("--image-size", type=int, default=None,
                       help="input side in pixels (default: 32 for fashion-mnist, 224 for folders)")
    if train:
        g.add_argument("--train-limit", type=int, default=None, metavar="N",
                       help="use a class-stratified subset of N training images")
    g.add_argument("--val-limit", type=int, default=None, metavar="N",
                   help="use a class-stratified subset of N validation images")


def add_loop_args(parser: argparse.ArgumentParser, *, finetune: bool = False) -> None:
    """The shared loop's flags; ``finetune``: without --epochs (the stage has its own) and --resume."""
    from optimize.loop import CLASS_WEIGHTS, DEVICES, OPTIMIZERS, SCHEDULES

    g = parser.add_argument_group("training loop")
    if not finetune:
        g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-3 AdamW, 0.05 SGD)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=None, help="default: 0.05 AdamW, 5e-4 SGD")
    g.add_argument("--schedule", choices=SCHEDULES, default="warmup-cosine",
                   help="warmup-cosine: per step, linear warm-up then cosine to 0; cosine: per epoch")
    g.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps warming up (warmup-cosine)")
    g.add_argument("--step-size", type=int, default=10, help="epochs between decays for --schedule step")
    g.add_argument("--gamma", type=float, default=0.1, help="decay factor for --schedule step")
    g.add_argument("--patience", type=int, default=0, help="stop after N epochs without val improvement (0: off)")
    g.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--class-weights", choices=CLASS_WEIGHTS, default="none",
                   help="balanced: weigh each class's loss by n / (classes * its count) in the training split")
    g.add_argument("--clip-grad-norm", type=float, default=None, metavar="MAX",
                   help="clip the gradients' global L2 norm to MAX before each step")
    g.add_argument("--device", choices=DEVICES, default="auto")
    g.add_argument("--no-amp", action="store_true",
                   help="no float16 mixed precision on CUDA (the CPU trains in float32 unless --cpu-bf16)")
    g.add_argument("--cpu-bf16", action="store_true",
                   help="bfloat16 autocast when training on a CPU with native bf16 (AVX512-BF16/AMX): ~1.5x faster; "
                        "steps with non-finite gradients are skipped and counted")
    g.add_argument("--no-channels-last", action="store_true", help="keep the NCHW memory format")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 on <= 2 CPU cores)")
    if not finetune:
        g.add_argument("--resume", action="store_true", help="continue from <out>.last.pth after a kill")


def loop_config(args: argparse.Namespace):
    from optimize.loop import LoopConfig

    return LoopConfig(epochs=getattr(args, "epochs", 1), batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                      momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                      warmup=args.warmup, step_size=args.step_size, gamma=args.gamma, patience=args.patience,
                      accumulate=args.accumulate, label_smoothing=args.label_smoothing,
                      class_weights=args.class_weights, clip_grad_norm=args.clip_grad_norm, device=args.device,
                      amp=not args.no_amp, cpu_bf16=args.cpu_bf16, channels_last=not args.no_channels_last,
                      seed=args.seed, workers=args.workers, progress=not args.quiet)


def add_model_args(parser: argparse.ArgumentParser, flag: str = "--model") -> None:
    from optimize.models import ARCHS

    g = parser.add_argument_group("model loading")
    g.add_argument(flag, required=True, help="edgeopt checkpoint, torchvision ResNet state_dict or TorchScript file")
    g.add_argument("--arch", choices=ARCHS, default=None,
                   help="architecture of a plain state_dict (guessed from its keys when omitted)")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a pickled whole nn.Module (unpickling runs code from the file)")


# -- subcommands --------------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    """Train a ResNet (the teacher) on the data; writes the best checkpoint, its manifest and <out>.last.pth."""
    from optimize import train

    cfg = train.TrainConfig(out=args.out, arch=args.arch, data=args.data, image_size=args.image_size,
                            stem=args.stem, pretrained=args.pretrained, freeze_backbone=args.freeze_backbone,
                            trainable_layers=args.trainable_layers, augment=args.augment,
                            train_limit=args.train_limit,
                            val_limit=args.val_limit, resume=args.resume, loop=loop_config(args))
    artifact = train.run(cfg)
    m = artifact.manifest.get("metrics", {})
    _print_artifact(artifact, args.json, f"best epoch {m.get('epoch')}: val top-1 {m.get('val_top1', 0):.2%}, "
                                         f"top-5 {m.get('val_top5', 0):.2%}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on the val split: top-1, top-5, loss, per-class accuracy/precision/recall/F1, confusion."""
    from optimize import evaluate

    cfg = evaluate.EvalConfig(model=args.model, data=args.data, arch=args.arch, image_size=args.image_size,
                              val_limit=args.val_limit, batch_size=args.batch_size, device=args.device,
                              trust_checkpoint=args.trust_checkpoint, plot=args.plot, progress=not args.quiet)
    report = evaluate.run(cfg)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    m = report.metrics
    print(f"{args.model}: top-1 {m.top1:.2%}  top-5 {m.top5:.2%}  loss {m.loss:.4f}  ({m.count} images)")
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


def _print_artifact(artifact, as_json: bool, summary: str) -> None:
    if not _is_main_process():
        return
    if as_json:
        print(json.dumps({"out": str(artifact.path), "metrics": artifact.manifest.get("metrics", {})}, indent=2))
    else:
        print(f"wrote {artifact.path} ({summary})")


def cmd_distill(args: argparse.Namespace) -> int:
    """Distill a teacher into a ResNet-18/34 student through the shared training loop (logit KD)."""
    from optimize import distill

    cfg = distill.DistillConfig(teacher=args.teacher, out=args.out, student=args.student,
                                teacher_arch=args.teacher_arch, trust_checkpoint=args.trust_checkpoint,
                                student_init=args.student_init, temperature=args.temperature, alpha=args.alpha,
                                data=args.data, image_size=args.image_size, stem=args.stem, augment=args.augment,
                                train_limit=args.train_limit, val_limit=args.val_limit, resume=args.resume,
                                loop=loop_config(args))
    artifact = distill.run(cfg)
    m = artifact.manifest.get("metrics", {})
    _print_artifact(artifact, args.json, f"best epoch {m.get('epoch')}: val top-1 {m.get('val_top1', 0):.2%}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a ResNet globally by L1 magnitude (unstructured, channel or 2:4) and fine-tune it."""
    from optimize import prune

    loop = loop_config(args)
    if args.lr is None:  # fine-tuning starts from trained weights: half the training default (AdamW 1e-3 gave
        # 89.67% where 2e-4 gave 89.30%, l1-channel 0.5 of a 90.43% ResNet-18, 1 epoch, KD alpha 0.5)
        loop = dataclasses.replace(loop, lr=0.01 if args.optimizer == "sgd" else 1e-3)
    cfg = prune.PruneConfig(model=args.model, out=args.out, method=args.method, amount=args.amount,
                            finetune_epochs=args.finetune_epochs, steps=args.steps, teacher=args.teacher,
                            temperature=args.temperature, alpha=args.alpha, round_to=args.round_to,
                            max_layer_amount=args.max_layer_amount, isomorphic=args.isomorphic,
                            bn_images=args.bn_images,
                            include_stem_and_fc=args.include_stem_and_fc, arch=args.arch,
                            trust_checkpoint=args.trust_checkpoint, data=args.data, train_limit=args.train_limit,
                            val_limit=args.val_limit, loop=loop)
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


def cmd_export(args: argparse.Namespace) -> int:
    """Export a checkpoint to ONNX (symbolic batch axis), verified against PyTorch at batch 1, 7 and 32."""
    from optimize import export

    cfg = export.ExportConfig(model=args.model, out=args.out, opset=args.opset, atol=args.atol, data=args.data,
                              image_size=args.image_size, torchscript=args.torchscript, arch=args.arch,
                              trust_checkpoint=args.trust_checkpoint)
    artifact = export.run(cfg)
    v = artifact.manifest["metrics"]["verification"]
    summary = (f"opset {args.opset}, batch axis '{export.BATCH_DIM}'; vs PyTorch at batch "
               f"{'/'.join(map(str, export.VERIFY_BATCHES))}: max abs diff {v['max_abs_diff']:.1e}, "
               f"top-1 agreement {v['top1_agreement']:.0%}")
    if artifact.manifest.get("torchscript"):
        summary += f"; also wrote {artifact.path.with_name(artifact.manifest['torchscript'])}"
    _print_artifact(artifact, args.json, summary)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate an ONNX model to INT8: Q/DQ for TensorRT, or the fastest measured form for the CPU."""
    from calib import calibrate

    cfg = calibrate.CalibConfig(onnx=args.onnx, out=args.out, data=args.data, num_images=args.num_images,
                                method=args.method, target=args.target, cache=args.cache, val_limit=args.val_limit,
                                batch_size=args.batch_size, timing_seconds=args.timing_seconds, form=args.form)
    artifact = calibrate.run(cfg)
    m = artifact.manifest["metrics"]
    summary = f"{m['target']}, {m['form']}"
    if m["top1_int8"] is not None:
        summary += (f": top-1 {m['top1_int8']:.2%} vs FP32 {m['top1_fp32']:.2%} ({m['top1_drop_pt']:+.2f} pt drop), "
                    f"agreement {m['agreement_with_fp32']:.2%}")
    if m["target"] == "cpu":
        summary += "; img/s at batch 8: FP32 %.0f, " % m["fp32"]["img_per_s_b8"] + ", ".join(
            f"{form} {c['img_per_s_b8']:.0f} ({c['speedup_vs_fp32']:.2f}x)" for form, c in m["candidates"].items())
    _print_artifact(artifact, args.json, summary + f"; cache {artifact.path.with_name(artifact.manifest['calibration_cache'])}")
    return 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    """Build an inference engine: ONNX Runtime (CPU, fp32/int8) or TensorRT 8.5 to 11 (fp32/fp16/int8)."""
    from optimize import build_engine

    cfg = build_engine.BuildConfig(onnx=args.onnx, out=args.out, backend=args.backend, precision=args.precision,
                                   calib_data=args.calib_data, calib_cache=args.calib_cache,
                                   calib_method=args.calib_method, num_images=args.num_images,
                                   calib_val_limit=args.calib_val_limit, min_batch=args.min_batch,
                                   opt_batch=args.opt_batch, max_batch=args.max_batch,
                                   workspace=args.workspace, timing_cache=args.timing_cache,
                                   sparse_weights=args.sparse_weights, dla_core=args.dla_core, tf32=args.tf32,
                                   compare_rounds=args.compare_rounds, compare_seconds=args.compare_seconds,
                                   threads=args.threads)
    artifact = build_engine.run(cfg)
    e = artifact.manifest["engine"]
    where = f"TensorRT {e['tensorrt']} on {e['gpu']}" if e["backend"] == "tensorrt" else f"ONNX Runtime {e['onnxruntime']}"
    if e["backend"] == "onnxruntime" and e.get("comparison"):
        c = e["comparison"]
        where += (f"; kept the {e['kept']} graph (optimized/input {c['ratio']:.2f}x at batch {c['batch']}, "
                  f"{c['verdict']})")
    _print_artifact(artifact, args.json, f"{where}, {e['precision']}, batch {e['profile']['min_batch']}/"
                                         f"{e['profile']['opt_batch']}/{e['profile']['max_batch']}")
    return 0


# -- deploy subcommands: infer, package, serve ---------------------------------------------------------------

def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """How to open a model for inference (infer, serve)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help=".pth/.pt checkpoint, .onnx model (export, calibrate, build-engine) or TensorRT .engine/.plan")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    g.add_argument("--threads", type=int, default=None, help="CPU threads; not given: every core this process may use")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a pickled whole nn.Module (unpickling runs code from the file)")
    g.add_argument("--top-k", type=int, default=5, help="classes reported per image")


def cmd_infer(args: argparse.Namespace) -> int:
    """Classify images (files or folders) with a checkpoint, ONNX model or engine; exit 1 if any was unreadable."""
    from optimize import infer

    cfg = infer.InferConfig(model=args.model, images=tuple(args.images), top_k=args.top_k,
                            batch_size=args.batch_size, device=args.device, threads=args.threads,
                            trust_checkpoint=args.trust_checkpoint)
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


def cmd_package(args: argparse.Namespace) -> int:
    """Write a deployment bundle: model, runner.py (no torch), build_engine.sh and a Triton model repository."""
    from optimize import package

    cfg = package.PackageConfig(model=args.model, out=args.out, name=args.name, onnx=args.onnx,
                                precision=args.precision, min_batch=args.min_batch, opt_batch=args.opt_batch,
                                max_batch=args.max_batch, force=args.force)
    artifact = package.run(cfg)
    m = artifact.manifest
    if args.json:
        print(json.dumps({"out": str(artifact.path), "bundle": m}, indent=2))
    else:
        print(f"wrote {artifact.path} ({len(m['files'])} files; build_engine.sh defaults to {m['precision']}; "
              f"Triton model '{m['name']}' ({m['triton']['platform']}, max_batch_size "
              f"{m['triton']['max_batch_size']}))")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a model over HTTP: POST /predict (images -> top-k JSON), GET /health, GET /metadata."""
    from optimize import serve

    cfg = serve.ServeConfig(model=args.model, host=args.host, port=args.port, top_k=args.top_k,
                            max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                            max_upload_bytes=args.max_upload_bytes, max_images=args.max_images,
                            max_pixels=args.max_pixels, device=args.device, threads=args.threads,
                            timeout_s=args.timeout, trust_checkpoint=args.trust_checkpoint)
    try:
        serve.run(cfg, ready=lambda url: print(f"serving {args.model} on {url} (POST /predict, GET /health, "
                                               "GET /metadata); Ctrl-C stops", flush=True))
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the Ctrl-C it caught
        print("stopped", file=sys.stderr)
    return 0



# -- benchmark and pipeline -----------------------------------------------------------------------------------

def cmd_benchmark(args: argparse.Namespace) -> int:
    """Benchmark artifacts against the baseline: accuracy, latency, throughput, speedups; report.md/.json + plots."""
    from benchmarks import report

    cfg = report.BenchmarkConfig(models=tuple(args.models), out=args.out, baseline=args.baseline, data=args.data,
                                 batch_sizes=tuple(args.batch_sizes), device=args.device, threads=args.threads,
                                 rounds=args.rounds, seconds=args.seconds, warmup=args.warmup,
                                 val_limit=args.val_limit, input_size=args.input_size,
                                 max_accuracy_drop=args.max_accuracy_drop, min_speedup=args.min_speedup,
                                 e2e_batch=args.e2e_batch, trust_checkpoint=args.trust_checkpoint,
                                 progress=not args.quiet)
    artifact = report.run(cfg)
    if args.json:
        print(json.dumps(artifact.manifest, indent=2))
        return 0
    print(report.render_markdown(artifact.manifest), end="")
    print(f"wrote {artifact.path.parent / report.REPORT_MD}, {artifact.path} and "
          f"{', '.join(artifact.manifest['plots'])}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Search the compression recipe (optuna): the fastest model within your accuracy budget, measured on the target."""
    from optimize import search

    cfg = search.SearchConfig(teacher=args.teacher, out=args.out, data=args.data, student=args.student,
                              max_accuracy_drop=args.max_accuracy_drop, target=args.target, trials=args.trials,
                              storage=args.storage, study_name=args.study_name, space=args.space,
                              objective=args.objective, batch=args.batch, resume=args.resume, preset=args.preset,
                              image_size=args.image_size, train_limit=args.train_limit, val_limit=args.val_limit,
                              rounds=args.rounds, seconds=args.seconds, seed=args.seed, minutes=args.minutes,
                              heartbeat=args.heartbeat,
                              grace_period=args.grace_period, progress=not args.quiet)

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
        print(json.dumps(artifact.manifest, indent=2))
        return 0
    out = artifact.path.parent
    chosen = artifact.manifest["chosen"]
    if chosen:
        print(f"chosen: trial {chosen['number']} (top-1 {chosen['top1']:.2%}, "
              f"{search.speed_text(chosen['speed'], cfg)}){'' if chosen['within'] else ' - NOT within the budget'}")
        print(f"recipe: {out / search.BEST_YAML} (reproduce: {search.reproduce_command(cfg)})")
    print(f"wrote {out / search.REPORT_MD}, {artifact.path}" +
          "".join(f", {out / p}" for p in artifact.manifest["plots"]))
    return 0


def cmd_gpu_check(args: argparse.Namespace) -> int:
    """On a GPU machine: every GPU backend over a pipeline run's artifacts (or why it's absent), context check."""
    from benchmarks import gpu_check

    cfg = gpu_check.GpuCheckConfig(runs=args.runs, out=args.out or os.path.join(args.runs, "gpu-check"),
                                   data=args.data, seconds=args.seconds, val_limit=args.val_limit)
    artifact = gpu_check.run(cfg)
    if args.json:
        print(json.dumps(artifact.manifest, indent=2))
        return 0
    print(gpu_check.render_markdown(artifact.manifest), end="")
    print(f"wrote {artifact.path} and {artifact.path.with_name(gpu_check.GPU_CHECK_MD)}")
    return 0 if artifact.manifest["context_check"]["ok"] else 1


def cmd_pipeline(args: argparse.Namespace) -> int:
    """Run teacher -> distill -> prune -> export -> calibrate -> build-engine -> benchmark from a recipe."""
    import time

    import yaml

    from optimize import pipeline

    overrides = (("data", args.data), ("teacher", args.teacher), ("student", args.student),
                 ("train_limit", args.train_limit),
                 ("val_limit", args.val_limit), ("image_size", args.image_size), ("device", args.device))
    cfg = pipeline.PipelineConfig(out=args.out, preset=args.preset, recipe=args.config, overrides=overrides,
                                  force=args.force, progress=not args.quiet)
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
    report_md = artifact.path.parent / "report" / "report.md"
    if report_md.exists():
        print(f"report: {report_md}")
    return 0



def add_kd_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distillation")
    g.add_argument("--temperature", type=float, default=4.0, help="softening temperature T")
    g.add_argument("--alpha", type=float, default=0.9, help="weight of the teacher term (1 - alpha: labels)")


def add_augment_arg(parser: argparse.ArgumentParser) -> None:
    from optimize.preprocess import AUGMENTS

    parser.add_argument("--augment", choices=AUGMENTS, default=None,
                        help="training augmentation; -rotate adds a random rotation of up to 15 degrees "
                             "(default: crop-flip for fashion-mnist, random-resized-crop for folders)")


def build_parser() -> argparse.ArgumentParser:
    from optimize.models import ARCHS, STEMS

    parser = argparse.ArgumentParser(prog="cli.py", description=__doc__, formatter_class=_Formatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=func.__doc__.splitlines()[0], description=func.__doc__,
                           formatter_class=_Formatter)
        p.set_defaults(func=func)
        return p

    p = add("train", cmd_train)
    p.add_argument("--arch", choices=ARCHS, default="resnet50")
    p.add_argument("--stem", choices=STEMS, default="imagenet",
                   help="imagenet: torchvision's 7x7/2 conv + max-pool; cifar: 3x3/1 conv, no pool "
                        "(better on small images, ~13x slower)")
    p.add_argument("--pretrained", action="store_true", help="start from torchvision's ImageNet weights (online)")
    p.add_argument("--freeze-backbone", action="store_true", help="train only the new classifier (transfer learning)")
    p.add_argument("--trainable-layers", type=int, default=None, metavar="N",
                   help="train the classifier and the last N of the 4 residual stages (default: everything)")
    add_augment_arg(p)
    p.add_argument("--out", required=True, help="checkpoint to write, e.g. runs/teacher.pth")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_data_args(p)
    add_loop_args(p)

    p = add("distill", cmd_distill)
    p.add_argument("--teacher", required=True, help="teacher checkpoint (any format evaluate accepts)")
    p.add_argument("--teacher-arch", choices=ARCHS, default=None, help="architecture of a plain state_dict teacher")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow a pickled whole nn.Module teacher")
    p.add_argument("--student", choices=("resnet18", "resnet34"), default="resnet18")
    p.add_argument("--student-init", default=None, help="start the student from this checkpoint")
    p.add_argument("--stem", choices=STEMS, default=None, help="student stem (default: the teacher's)")
    add_augment_arg(p)
    p.add_argument("--out", required=True, help="student checkpoint to write, e.g. runs/student.pth")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_kd_args(p)
    add_data_args(p)
    add_loop_args(p)

    from optimize.prune import METHODS

    p = add("prune", cmd_prune)
    add_model_args(p)
    p.add_argument("--method", choices=METHODS, default="l1-unstructured")
    p.add_argument("--amount", type=float, default=None,
                   help="fraction of weights (unstructured) or channels (channel) to remove (default 0.5; "
                        "not for 2:4)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tuning epochs after each round")
    p.add_argument("--steps", type=int, default=1, help="reach --amount in this many prune + fine-tune rounds")
    p.add_argument("--teacher", default=None, help="distil from this checkpoint while fine-tuning")
    p.add_argument("--round-to", type=int, default=8, help="l1-channel: keep channel counts multiples of this")
    p.add_argument("--max-layer-amount", type=float, default=0.75,
                   help="l1-channel: remove at most this fraction of any one layer's channels")
    p.add_argument("--isomorphic", action="store_true",
                   help="l1-channel: rank channels only against groups of the same structure")
    p.add_argument("--bn-images", type=int, default=2048,
                   help="l1-channel: training images that re-estimate BatchNorm statistics after each round (0: off)")
    p.add_argument("--include-stem-and-fc", action="store_true",
                   help="l1-unstructured: also prune the first conv and the classifier")
    p.add_argument("--out", required=True, help="pruned checkpoint to write, e.g. runs/pruned.pth")
    p.add_argument("--json", action="store_true", help="print every figure as JSON")
    add_kd_args(p)
    add_data_args(p, image_size=False)
    add_loop_args(p, finetune=True)

    p = add("export", cmd_export)
    add_model_args(p)
    p.add_argument("--out", required=True, help="ONNX file to write, e.g. runs/model.onnx")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--atol", type=float, default=1e-3, help="largest logit difference ONNX vs PyTorch accepted")
    p.add_argument("--torchscript", action="store_true", help="also write a traced <out>.torchscript.pt")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_data_args(p, train=False, recorded=True)

    from calib.calibrate import CPU_FORMS, METHODS as CALIB_METHODS, TARGETS

    p = add("calibrate", cmd_calibrate)
    p.add_argument("--onnx", required=True, help="FP32 ONNX model written by export")
    p.add_argument("--out", required=True, help="INT8 ONNX model to write, e.g. runs/model.int8.onnx")
    p.add_argument("--num-images", type=int, default=512, help="class-stratified calibration images")
    p.add_argument("--method", choices=CALIB_METHODS, default="entropy")
    p.add_argument("--target", choices=TARGETS, default="tensorrt")
    p.add_argument("--cache", default=None, help="calibration cache to reuse, or to write if missing "
                                                 "(default: <out stem>.calib.json)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--timing-seconds", type=float, default=2.0,
                   help="cpu target: time each model this long at batch 1 and 8")
    p.add_argument("--form", choices=CPU_FORMS, default=None,
                   help="cpu target: write this INT8 form without comparing (default: both, the faster is kept)")
    p.add_argument("--json", action="store_true", help="print every figure as JSON")
    add_data_args(p, train=False, image_size=False, recorded=True)

    from optimize.build_engine import BACKENDS, PRECISIONS

    p = add("build-engine", cmd_build_engine)
    p.add_argument("--onnx", required=True, help="ONNX model from export (or an INT8 one from calibrate)")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--calib-data", default=None, help="int8: calibration data ('fashion-mnist' or a folder)")
    p.add_argument("--calib-cache", default=None, help="int8: calibration cache to reuse or write")
    p.add_argument("--calib-method", choices=CALIB_METHODS, default="entropy")
    p.add_argument("--num-images", type=int, default=512, help="int8: calibration images")
    p.add_argument("--calib-val-limit", type=int, default=None, metavar="N",
                   help="int8: val images for the INT8-vs-FP32 accuracy figures (default: the whole split)")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--workspace", default="2G", help="TensorRT workspace limit")
    p.add_argument("--timing-cache", default=None, help="TensorRT timing cache to load and update")
    p.add_argument("--sparse-weights", action="store_true", help="TensorRT: use 2:4 sparse tensor cores")
    p.add_argument("--dla-core", type=int, default=None,
                   help="TensorRT: build for this DLA core (Jetson; fp16/int8, min = opt = max batch)")
    p.add_argument("--tf32", action="store_true", help="TensorRT fp32: allow TF32 math (off: fp32 means FP32)")
    p.add_argument("--compare-rounds", type=int, default=5,
                   help="ONNX Runtime: rounds timing the optimized model against its input at --opt-batch; the "
                        "faster is kept (0: keep the optimized one unmeasured)")
    p.add_argument("--compare-seconds", type=float, default=0.3, help="ONNX Runtime: one window of that timing")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime: CPU threads (default: all cores)")
    p.add_argument("--out", required=True, help="engine to write: runs/model.engine (TensorRT), "
                                                "runs/model.ort.onnx (ONNX Runtime)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = add("evaluate", cmd_evaluate)
    add_model_args(p)
    add_data_args(p, train=False)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also save the confusion matrix as a PNG, and the first conv layer's feature maps for one "
                        "val image as <PNG stem>.conv1.png")
    p.add_argument("--json", action="store_true", help="print every figure as JSON")

    # deploy parsers: infer, package, serve
    p = add("infer", cmd_infer)
    add_runtime_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders searched recursively")
    p.add_argument("--batch-size", type=int, default=32, help="images per inference (an engine's max batch caps it)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")

    p = add("package", cmd_package)
    p.add_argument("--model", required=True, help="ONNX model (export, calibrate, build-engine) or TensorRT engine")
    p.add_argument("--out", required=True, help="bundle folder to write, e.g. dist/bundle")
    p.add_argument("--name", default=None, help="Triton model name; not given: the model file's stem")
    p.add_argument("--onnx", default=None, help="an engine's source ONNX, when it moved since build-engine")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="what build_engine.sh builds unless told; not given: the engine's precision, else the ONNX's")
    p.add_argument("--min-batch", type=int, default=None, help="not given: the engine's profile, else 1")
    p.add_argument("--opt-batch", type=int, default=None, help="not given: the engine's profile, else 8")
    p.add_argument("--max-batch", type=int, default=None,
                   help="Triton max_batch_size and engine profile; not given: the engine's profile, else 64")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--json", action="store_true", help="print bundle.json")

    p = add("serve", cmd_serve)
    add_runtime_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed at start)")
    p.add_argument("--max-batch", type=int, default=32, help="most images per inference (an engine's caps it)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long an image waits for others to batch with")
    p.add_argument("--max-queue", type=int, default=1024, help="images waiting at most; beyond, 503")
    p.add_argument("--max-upload-bytes", type=int, default=10 << 20, help="largest request body; beyond, 413")
    p.add_argument("--max-images", type=int, default=64, help="most images per request")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image (width x height); beyond, 413")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a connection with an incomplete request (slow headers or body) may stay silent")

    # benchmark and pipeline parsers
    p = add("benchmark", cmd_benchmark)
    p.add_argument("--baseline", default=None, help="reference artifact, e.g. the original teacher checkpoint "
                                                    "(default: the first of --models)")
    p.add_argument("--models", nargs="+", default=[], metavar="ARTIFACT",
                   help=".pth / .onnx / .engine files to compare; the final artifact is the fastest within "
                        "--max-accuracy-drop of the baseline")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every backend (default: all cores)")
    p.add_argument("--rounds", type=int, default=5,
                   help="timing rounds; the artifacts take turns in each, figures are medians over the rounds")
    p.add_argument("--seconds", type=float, default=0.4,
                   help="one timing window: per artifact, batch size and round")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before an artifact's first window")
    p.add_argument("--input-size", type=int, default=None,
                   help="speed-only run at this input side (e.g. 224): random inputs, no accuracy")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0,
                   help="your accuracy budget in top-1 points: the final artifact against the baseline, an INT8 "
                        "artifact against its FP32/FP16 sibling")
    p.add_argument("--min-speedup", type=float, default=1.0,
                   help="your speed budget: the final artifact's throughput at the reference batch in multiples of "
                        "the baseline's")
    p.add_argument("--e2e-batch", type=int, default=8, help="batch size of the end-to-end (preprocessing included) "
                                                           "figure")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow pickled whole-module checkpoints")
    p.add_argument("--out", required=True, help="folder for report.md, report.json and the plots")
    p.add_argument("--json", action="store_true", help="print report.json instead of the tables")
    add_data_args(p, train=False, image_size=False, recorded=True)

    p = add("gpu-check", cmd_gpu_check)
    p.add_argument("--runs", default="runs/demo", help="a pipeline's output folder (make demo writes runs/demo)")
    p.add_argument("--out", default=None, help="folder for the engines and reports (default: RUNS/gpu-check)")
    p.add_argument("--data", default="fashion-mnist", help="val and calibration data of that run")
    p.add_argument("--seconds", type=float, default=0.4,
                   help="one benchmark timing window (per artifact, batch size and round; 5 rounds)")
    p.add_argument("--val-limit", type=int, default=2000, help="val images for the accuracy figures")
    p.add_argument("--json", action="store_true", help="print gpu_check.json instead of the tables")

    from optimize.pipeline import PRESETS

    p = add("pipeline", cmd_pipeline)
    p.add_argument("--config", "--recipe", dest="config", default=None, metavar="RECIPE.yaml",
                   help="YAML recipe naming each stage's options, merged over --preset")
    p.add_argument("--preset", choices=tuple(PRESETS), default="standard",
                   help="quick: ~3 min slice; standard: ~25 min on 2 CPU cores")
    p.add_argument("--teacher", default=None, help="an existing teacher checkpoint: skip training one")
    p.add_argument("--student", default=None, help="an existing distilled student: skip distilling one")
    p.add_argument("--data", default=None, help="'fashion-mnist' (default) or a folder with train/ and val/")
    p.add_argument("--image-size", type=int, default=None, help="input side (default: the data's preset)")
    p.add_argument("--train-limit", type=int, default=None, metavar="N", help="class-stratified training subset")
    p.add_argument("--val-limit", type=int, default=None, metavar="N", help="class-stratified val subset")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="training and benchmark device")
    p.add_argument("--out", default="runs", help="folder for every artifact and the reports")
    p.add_argument("--force", action="store_true", help="rerun every stage even when unchanged")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and stop")

    from optimize.search import OBJECTIVES, SPACES, TARGETS as SEARCH_TARGETS

    p = add("search", cmd_search)
    p.add_argument("--teacher", required=True, help="the original model: the accuracy baseline, shared by all trials")
    p.add_argument("--student", default=None, help="a distilled student to prune (default: distilled once into "
                                                   "OUT/student.pth with the preset's options)")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, help="budget: top-1 points below the teacher")
    p.add_argument("--target", choices=SEARCH_TARGETS, default="cpu",
                   help="where trials are measured: cpu (ONNX Runtime) or tensorrt (engines on the GPU)")
    p.add_argument("--trials", type=int, default=20, help="finished trials the study holds in all (every process)")
    p.add_argument("--storage", default=None, help="optuna storage URL shared by every search process "
                                                   "(default: sqlite:///OUT/study.db; postgresql://... for a fleet)")
    p.add_argument("--study-name", default="edgeopt-search", help="the study's name in --storage")
    p.add_argument("--space", choices=SPACES, default="compression",
                   help="compression: prune/KD/calibration/INT8 form; training: lr, batch size, weight decay, label "
                        "smoothing of the student")
    p.add_argument("--objective", choices=OBJECTIVES, default="throughput",
                   help="throughput: img/s at --batch; latency: p50 ms at batch 1")
    p.add_argument("--batch", type=int, default=8, help="target batch size for --objective throughput")
    p.add_argument("--resume", action="store_true", help="continue (or join) the study in --storage")
    p.add_argument("--preset", choices=tuple(PRESETS), default="standard",
                   help="pipeline preset whose options a trial's recipe is merged over")
    p.add_argument("--rounds", type=int, default=3, help="each trial's benchmark: timing rounds")
    p.add_argument("--seconds", type=float, default=0.3, help="each trial's benchmark: one timing window")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    p.add_argument("--minutes", type=float, default=None,
                   help="time budget of this process: no trial is started that would end after it")
    p.add_argument("--heartbeat", type=int, default=60, help="seconds between a running trial's heartbeats")
    p.add_argument("--grace-period", type=int, default=300,
                   help="seconds without a heartbeat before another process fails a trial (other hosts)")
    p.add_argument("--out", default="runs/search", help="folder for the study, trials/, report.md and best.yaml")
    p.add_argument("--json", action="store_true", help="print search.json instead of the summary")
    add_data_args(p, recorded=True)
    return parser


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    if not _is_main_process():
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
                        stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        return args.func(args)
    except EdgeoptError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
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
