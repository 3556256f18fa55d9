"""The search space: what a trial may try, the preset's own recipe as the first trial, and a trial's recipe.

A trial's parameters (optuna's suggestions) become a pipeline recipe over the preset, so a trial *is* a pipeline
run and the chosen trial's recipe (``best.yaml``) runs again with ``cli.py pipeline --config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..artifacts import atomic_path
from ..configs import CALIB_METHODS, PRESETS, CalibConfig, PruneConfig, SearchConfig
from ..pipeline import STAGES


@dataclass(frozen=True)
class TrialDevices:
    """Where a search's models are trained (the shared student, each trial's fine-tuning) and where they are
    measured (the teacher's figures, each trial's benchmark)."""

    train: str
    measure: str


def trial_devices(cfg: SearchConfig) -> TrialDevices:
    """A TensorRT target's trials train and are measured on CUDA (its engines run nowhere else); a CPU target's
    train wherever is fastest and are measured on the CPU, whatever training ran on (a pipeline benchmarks where
    it trained unless told)."""
    if cfg.target == "tensorrt":
        return TrialDevices(train="cuda", measure="cuda")
    return TrialDevices(train="auto", measure="cpu")


def objective_speed(row: dict[str, Any], cfg: SearchConfig) -> float | None:
    """The speed a benchmark report row has for the study's objective at its timed batch: latency (ms) or img/s."""
    b = str(cfg.timed_batch)
    return row["latency_ms"].get(b) if cfg.objective == "latency" else row["throughput"].get(b)


def suggest(trial: Any, cfg: SearchConfig) -> dict[str, Any]:
    """The trial's parameters (optuna's suggestions; conditional ones only where they apply)."""
    if cfg.space == "training":
        return {"lr": trial.suggest_float("lr", 1e-5, 1e-2, log=True),
                "batch_size": trial.suggest_categorical("batch_size", [32, 64, 128]),
                "weight_decay": trial.suggest_float("weight_decay", 1e-5, 0.1, log=True),
                "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2)}
    # zeros in a dense graph buy no speed on ONNX Runtime's CPU kernels (measured: l1-unstructured trials ran at
    # 3,893 and 3,886 img/s, the unpruned student at 3,291): channel pruning or none there; sparsity for TensorRT
    methods = ["l1-channel", "none"] + (["l1-unstructured", "2:4"] if cfg.target == "tensorrt" else [])
    p: dict[str, Any] = {"method": trial.suggest_categorical("method", methods)}
    if p["method"] != "none":
        if p["method"] != "2:4":
            p["amount"] = trial.suggest_float("amount", 0.2, 0.7, step=0.05)
            p["steps"] = trial.suggest_int("steps", 1, 3)
        p["finetune_epochs"] = trial.suggest_int("finetune_epochs", 0, 2)
        if p["finetune_epochs"]:
            p["alpha"] = trial.suggest_float("alpha", 0.1, 0.9, step=0.1)
            p["temperature"] = trial.suggest_float("temperature", 1.0, 8.0, step=1.0)
    forms = ["fp16", "int8"] if cfg.target == "tensorrt" else ["qoperator-u8s8", "qdq-s8s8", "fp32"]
    p["precision"] = trial.suggest_categorical("precision", forms)
    if p["precision"] not in ("fp32", "fp16"):
        p["calib_method"] = trial.suggest_categorical("calib_method", list(CALIB_METHODS))
        p["calib_images"] = trial.suggest_categorical("calib_images", [128, 256, 512, 1024])
    return p


def starting_point(cfg: SearchConfig) -> dict[str, Any] | None:
    """The preset's own compression recipe as parameters: trial 0, the figure the search has to beat."""
    if cfg.space != "compression":
        return None
    stages = PRESETS[cfg.preset]["stages"]
    # what the preset says, else what the prune and calibrate stages would take by default: one source of defaults
    prune = {**_defaults(PruneConfig, ("method", "amount", "steps", "finetune_epochs", "alpha", "temperature")),
             **(stages.get("prune") or {})}
    calib = {**_defaults(CalibConfig, ("method", "num_images")), **(stages.get("calibrate") or {})}
    point = {"method": prune["method"], "amount": prune["amount"], "steps": prune["steps"],
             "finetune_epochs": min(prune["finetune_epochs"], 2), "alpha": prune["alpha"],
             "temperature": prune["temperature"]}
    if not point["finetune_epochs"]:
        point.pop("alpha"), point.pop("temperature")
    if cfg.target == "tensorrt":
        point["precision"] = "int8"
    else:
        point["precision"] = "qoperator-u8s8"  # what the demo's calibrate measured fastest (docs/RESULTS.md)
    point.update(calib_method=calib["method"], calib_images=calib["num_images"])
    return point


def _defaults(config: type, names: tuple[str, ...]) -> dict[str, Any]:
    """The defaults of a stage config's fields."""
    fields = config.__dataclass_fields__
    return {n: fields[n].default for n in names}


def trial_recipe(params: dict[str, Any], cfg: SearchConfig, *, teacher: Path, student: Path | None,
                 data: str) -> dict[str, Any]:
    """The pipeline recipe a trial runs (and ``best.yaml`` holds), merged over ``cfg.preset`` by the pipeline."""
    devices = trial_devices(cfg)
    recipe: dict[str, Any] = {"data": data, "image_size": cfg.image_size, "train_limit": cfg.train_limit,
                              "val_limit": cfg.val_limit, "device": devices.train, "teacher": str(teacher.resolve())}
    bench = {"batch_sizes": [cfg.timed_batch], "rounds": cfg.rounds, "seconds": cfg.seconds,
             "max_accuracy_drop": cfg.max_accuracy_drop, "input_sizes": [], "device": devices.measure}
    stages: dict[str, Any] = {"export": {}, "benchmark": bench}
    if cfg.space == "training":
        stages.update(distill=dict(params), prune=False, calibrate=False, **{"build-engine": False})
    else:
        recipe["student"] = str(student.resolve()) if student else None
        stages.update(prune=_prune_stage(params), **_target_stages(params, cfg))
    recipe["stages"] = _in_pipeline_order(stages)
    return recipe


def _prune_stage(params: dict[str, Any]) -> dict[str, Any] | bool:
    """The prune stage of a compression trial (False: no pruning)."""
    if params["method"] == "none":
        return False
    prune = {"method": params["method"], "finetune_epochs": params.get("finetune_epochs", 0)}
    prune.update({k: params[k] for k in ("amount", "steps", "alpha", "temperature") if k in params})
    if params["method"] == "2:4":  # the pattern fixes the amount, in one step
        prune["amount"], prune["steps"] = None, 1
    return prune


def _target_stages(params: dict[str, Any], cfg: SearchConfig) -> dict[str, Any]:
    """How a compression trial's model becomes its precision on the target: a TensorRT engine (calibrated by the
    build) or, on the CPU, the calibrate stage's INT8 form (none for FP32)."""
    precision = params["precision"]
    if cfg.target == "tensorrt":
        engine = {"onnxruntime": [], "tensorrt": [precision], "opt_batch": cfg.timed_batch,
                  "sparse_weights": params["method"] == "2:4"}
        if precision == "int8":
            engine.update(calib_method=params["calib_method"], num_images=params["calib_images"])
        return {"calibrate": False, "build-engine": engine}
    calibrate = False if precision == "fp32" else {
        "target": "cpu", "form": precision, "method": params["calib_method"],
        "num_images": params["calib_images"], "timing_seconds": cfg.seconds}
    return {"build-engine": False, "calibrate": calibrate}


def _in_pipeline_order(stages: dict[str, Any]) -> dict[str, Any]:
    return {name: stages[name] for name in STAGES if name in stages}


def write_recipe(path: Path, recipe: dict[str, Any], header: str = "") -> None:
    """A recipe as YAML in the pipeline's stage order (a trial's ``recipe.yaml``, ``best.yaml``), written whole."""
    with atomic_path(path) as tmp:
        tmp.write_text(header + yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
