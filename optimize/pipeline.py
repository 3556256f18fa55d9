"""Stage ``pipeline``: teacher -> distill -> prune -> export -> calibrate -> build-engine -> benchmark, from a recipe.

A recipe is YAML (or the ``quick`` / ``standard`` preset) naming the data and each stage's options::

    data: fashion-mnist
    train_limit: 20000
    stages:
      teacher: {arch: resnet50, epochs: 3}
      distill: {student: resnet18, epochs: 4, alpha: 0.5}
      prune: {method: l1-channel, amount: 0.5, finetune_epochs: 2}
      export: {opset: 17}
      calibrate: {target: cpu, num_images: 512}
      build-engine: {onnxruntime: [fp32, int8], tensorrt: [fp16, int8]}
      benchmark: {batch_sizes: [1, 8, 32], rounds: 5, seconds: 0.4, min_speedup: 20, input_sizes: [224]}

Keys of a stage are the fields of that stage's config (and of the shared training loop's); a stage set to
``false`` is left out (``prune: false`` exports the distilled student). A recipe file is merged over the preset,
so it only needs what differs.

Each stage's config and the sha256 of the files it reads are recorded in ``<out>/pipeline.json``; a stage whose
record matches and whose outputs are intact is skipped. A stage killed while running is marked so, and the next
run resumes it (training stages from their ``.last.pth``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from . import build_engine, calibrate, distill, export, openvino_backend, prune, train
from .artifacts import (Artifact, calibration_cache_path, engine_path, last_checkpoint_path, prepare_output,
                        sha256_file, write_json)
from .benchmark import report
from .configs import PRESETS, STAGE_CONFIGS, LoopConfig, PipelineConfig, RecipeCommon
from .data import FASHION_MNIST, data_fingerprint
from .device import require_ort_cuda, resolve_device, resolve_for
from .errors import ConfigError, EdgeoptError
from .lock import locked
from .runners import backend_of
from .tensorrt_backend import import_tensorrt

logger = logging.getLogger(__name__)

STAGES = ("teacher", "distill", "prune", "export", "calibrate", "build-engine", "benchmark")
STATE_FILE = "pipeline.json"

_COMMON = dataclasses.asdict(RecipeCommon())



def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_recipe(cfg: PipelineConfig) -> dict[str, Any]:
    """The recipe the pipeline will run: preset, then the recipe file, then command-line overrides."""
    recipe = _merge(_COMMON, PRESETS[cfg.preset])
    if cfg.recipe:
        path = Path(cfg.recipe)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read recipe {path}: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"recipe {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                              "save it as UTF-8") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from e
        except ValueError as e:  # a number YAML reads but Python refuses, e.g. an integer of 5000 digits
            raise ConfigError(f"recipe {path} holds a value that cannot be read: {str(e).splitlines()[0]}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe {path} must be a mapping with 'stages:' (see 'cli.py pipeline --dry-run')")
        recipe = _merge(recipe, loaded)
    recipe = _merge(recipe, {k: v for k, v in cfg.overrides if v is not None})
    unknown = sorted(set(recipe) - set(_COMMON) - {"stages"})
    if unknown:
        raise ConfigError(f"unknown recipe key(s) {', '.join(unknown)}; top-level keys are "
                          f"{', '.join(sorted(_COMMON))} and stages")
    source = f"recipe {cfg.recipe}" if cfg.recipe else f"preset {cfg.preset}"
    _check_types(recipe, typing.get_type_hints(RecipeCommon), source, "key")
    stages = recipe.get("stages") or {}
    if not isinstance(stages, dict):
        raise ConfigError(f"{source}: 'stages' must be a mapping of stage names to options (got {stages!r})")
    bad = sorted(set(stages) - set(STAGES))
    if bad:
        raise ConfigError(f"unknown stage(s) {', '.join(bad)} in the recipe; stages are {', '.join(STAGES)}")
    for name in ("export", "benchmark"):
        if stages.get(name) is False:
            raise ConfigError(f"the {name} stage cannot be left out of a pipeline")
    for name, options in stages.items():
        if options is None or options is True:
            stages[name] = {}
        elif options is not False and not isinstance(options, dict):
            raise ConfigError(f"{source}: stage '{name}' must be a mapping of options or false (got {options!r})")
    hints = _stage_hints()
    for name, options in stages.items():
        if options:
            _check_types(options, hints[name], source, f"stage '{name}' option")
    recipe["stages"] = stages
    if recipe["teacher"] is not None:
        stages["teacher"] = False
    if recipe["student"] is not None:
        stages["distill"] = False
    return recipe


# -- checking a recipe's types against the stage configs' annotations ----------------------------------------------

# options the pipeline itself reads from a stage (and does not pass to its config)
_PIPELINE_OPTIONS: dict[str, dict[str, Any]] = {
    "prune": {"teacher": bool},  # distil from the pipeline's teacher while fine-tuning
    "build-engine": {"onnxruntime": tuple[str, ...], "tensorrt": tuple[str, ...]},
    "benchmark": {"input_sizes": tuple[int, ...]},
}


def _stage_hints() -> dict[str, dict[str, Any]]:
    """Each stage's option -> type: its config's annotations, the shared loop's (training stages), the pipeline's."""
    loop = typing.get_type_hints(LoopConfig)
    hints = {}
    for stage, config_cls in STAGE_CONFIGS.items():
        own = typing.get_type_hints(config_cls)
        hints[stage] = {**(loop if "loop" in own else {}), **own, **_PIPELINE_OPTIONS.get(stage, {})}
    return hints


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a config annotation (an int is a float; a bool is not a number; a list is a tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin in (tuple, list):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_fits(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type) and not dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return True  # Any, nested configs: checked by the config itself


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "null"
    if origin in (tuple, list):
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    return getattr(hint, "__name__", str(hint))


def _check_types(options: dict[str, Any], hints: dict[str, Any], source: str, what: str) -> None:
    """Refuse the first option whose value does not fit its annotation; unknown keys are left to the caller."""
    for key, value in options.items():
        if key in hints and not _fits(value, hints[key]):
            raise ConfigError(f"{source}: {what} '{key}' must be {_type_name(hints[key])} (got {value!r}); "
                              "fix its value")


# -- turning recipe entries into stage configs ------------------------------------------------------------------

_LOOP_FIELDS = {f.name for f in dataclasses.fields(LoopConfig)}


def stage_config(stage: str, options: dict[str, Any] | None, fixed: dict[str, Any], *,
                 progress: bool, device: str = "auto") -> Any:
    """``config_cls`` from a recipe stage's options plus what the pipeline wires in; unknown keys are refused.

    Options naming a field of the shared training loop go into the stage's ``loop`` (training stages only).
    """
    config_cls = STAGE_CONFIGS[stage]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    options = dict(options or {})
    loop_opts = {k: options.pop(k) for k in list(options) if k in _LOOP_FIELDS and k not in fields}
    trains = "loop" in fields
    unknown = sorted(set(options) - fields | (set(loop_opts) if not trains else set()))
    if unknown:
        allowed = sorted((fields | (_LOOP_FIELDS if trains else set())) - set(fixed) - {"loop", "progress"})
        raise ConfigError(f"recipe stage '{stage}' has unknown option(s) {', '.join(unknown)}; it takes "
                          f"{', '.join(allowed)}")
    kwargs = {**options, **fixed}
    if trains:
        kwargs["loop"] = LoopConfig(**{"device": device, **loop_opts, "progress": progress})
    if "progress" in fields:
        kwargs["progress"] = progress
    try:
        return config_cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"recipe stage '{stage}': {e}") from e


@dataclass
class _Step:
    """One unit of work: a stage (or one engine of build-engine) with its config, inputs and outputs."""

    name: str
    stage: str
    config: Any
    inputs: list[Path]
    outputs: list[Path]
    action: Callable[[bool], Any]
    resumable: bool = False


class _Planner:
    """Builds the steps of a resolved recipe, each wired to the artifacts of the ones before."""

    def __init__(self, recipe: dict[str, Any], out: Path, progress: bool):
        self.r, self.out, self.progress = recipe, out, progress
        self.stages = recipe.get("stages") or {}
        self.data = {"data": recipe["data"], "train_limit": recipe["train_limit"], "val_limit": recipe["val_limit"]}

    def options(self, stage: str) -> dict[str, Any] | None:
        opts = self.stages.get(stage, {})
        return None if opts is False else dict(opts or {})

    def steps(self) -> list[_Step]:
        """The recipe's steps in pipeline order, each reading the model the steps before it wrote."""
        teacher = self._teacher_path()
        model = self._given_student() or teacher
        steps: list[_Step] = []
        if (step := self._teacher_step(teacher)) is not None:
            steps.append(step)
        if (step := self._distill_step(teacher)) is not None:  # the next stage starts from what this one wrote
            steps.append(step)
            model = step.outputs[0]
        if (step := self._prune_step(model, teacher)) is not None:
            steps.append(step)
            model = step.outputs[0]
        steps.append(export := self._export_step(model))
        onnx_path, int8_path = export.outputs[0], None
        if (calibrate_step := self._calibrate_step(onnx_path)) is not None:
            steps.append(calibrate_step)
            int8_path = calibrate_step.outputs[0]
        steps += self._engine_steps(onnx_path, int8_path)
        return steps + self._benchmark_steps(teacher, steps)

    def _teacher_path(self) -> Path:
        """The teacher: the recipe's, else ``<out>/teacher.pth`` (trained by the teacher stage, or there already)."""
        teacher = Path(self.r["teacher"]) if self.r["teacher"] else self.out / "teacher.pth"
        if self.r["teacher"] and not teacher.is_file():
            raise ConfigError(f"--teacher {teacher} does not exist; give a checkpoint or drop --teacher to train one")
        if self.options("teacher") is None and not self.r["teacher"] and not teacher.is_file() \
                and self.options("distill") is not None:
            raise ConfigError(f"the recipe sets 'teacher: false' but names no teacher ({teacher} does not exist "
                              "either): give --teacher your_model.pth, or let the pipeline train one")
        return teacher

    def _given_student(self) -> Path | None:
        if not self.r["student"]:
            return None
        student = Path(self.r["student"])
        if not student.is_file():
            raise ConfigError(f"--student {student} does not exist; give a checkpoint or drop --student to "
                              "distill one")
        return student

    def _teacher_step(self, teacher: Path) -> _Step | None:
        if (opts := self.options("teacher")) is None:
            return None
        fixed = {"out": str(teacher), **self.data, "image_size": self.r["image_size"]}
        tcfg = stage_config("teacher", opts, fixed, progress=self.progress, device=self.r["device"])
        return _Step("teacher", "teacher", tcfg, [], [teacher],
                     lambda resume, c=tcfg: train.run(dataclasses.replace(c, resume=resume)), True)

    def _distill_step(self, teacher: Path) -> _Step | None:
        """A student distilled from the teacher (a recipe that names its student has no distill stage)."""
        if (opts := self.options("distill")) is None:
            return None
        student = self.out / "student.pth"
        fixed = {"teacher": str(teacher), "out": str(student), **self.data, "image_size": self.r["image_size"]}
        dcfg = stage_config("distill", opts, fixed, progress=self.progress, device=self.r["device"])
        return _Step("distill", "distill", dcfg, [teacher], [student],
                     lambda resume, c=dcfg: distill.run(dataclasses.replace(c, resume=resume)), True)

    def _prune_step(self, model: Path, teacher: Path) -> _Step | None:
        if (opts := self.options("prune")) is None:
            return None
        pruned = self.out / "pruned.pth"
        use_teacher = opts.pop("teacher", True)
        fixed = {"model": str(model), "out": str(pruned), **self.data,
                 "teacher": str(teacher) if use_teacher else None}
        pcfg = stage_config("prune", opts, fixed, progress=self.progress, device=self.r["device"])
        return _Step("prune", "prune", pcfg, [model] + ([teacher] if use_teacher else []), [pruned],
                     lambda resume, c=pcfg: prune.run(c))

    def _export_step(self, model: Path) -> _Step:
        onnx_path = self.out / "model.onnx"
        fixed = {"model": str(model), "out": str(onnx_path), "data": self.r["data"]}
        ecfg = stage_config("export", self.options("export"), fixed, progress=self.progress)
        return _Step("export", "export", ecfg, [model], [onnx_path], lambda resume, c=ecfg: export.run(c))

    def _calibrate_step(self, onnx_path: Path) -> _Step | None:
        if (opts := self.options("calibrate")) is None:
            return None
        int8_path = self.out / "model.int8.onnx"
        fixed = {"onnx": str(onnx_path), "out": str(int8_path), "data": self.r["data"],
                 "val_limit": self.r["val_limit"]}
        ccfg = stage_config("calibrate", opts, fixed, progress=self.progress)
        return _Step("calibrate", "calibrate", ccfg, [onnx_path], [int8_path, calibration_cache_path(int8_path)],
                     lambda resume, c=ccfg: calibrate.run(c))

    def _benchmark_steps(self, teacher: Path, steps: list[_Step]) -> list[_Step]:
        """One benchmark of every model the steps make, and one more per extra input size (speed only)."""
        bopts = self.options("benchmark")
        input_sizes = bopts.pop("input_sizes", [])
        val_limit = bopts.pop("val_limit", self.r["val_limit"])
        # the recipe's device, as training got it, unless the benchmark stage names its own; auto is resolved when the
        # benchmark runs (CUDA where every artifact can run on it), so a plan is the same on every machine
        bench_device = bopts.pop("device", self.r["device"])
        bopts = {k: (tuple(v) if isinstance(v, list) else v) for k, v in bopts.items()}
        models = [p for s in steps if s.stage in ("distill", "prune", "export", "calibrate")
                  for p in s.outputs if p.suffix in (".pth", ".onnx")]
        models += [p for s in steps if s.stage == "build-engine" for p in s.outputs]
        benchmarks = []
        for size in [None, *input_sizes]:
            folder = report.report_folder(self.out, size)
            fixed = {"baseline": str(teacher), "models": tuple(str(m) for m in models), "out": str(folder),
                     "data": self.r["data"], "input_size": size, "val_limit": val_limit,
                     "device": bench_device}
            bcfg = stage_config("benchmark", bopts, fixed, progress=self.progress)
            benchmarks.append(_Step("benchmark" if size is None else f"benchmark-{size}", "benchmark", bcfg,
                                    [teacher, *models], [folder / report.REPORT_JSON, folder / report.REPORT_MD],
                                    lambda resume, c=bcfg: report.run(c)))
        return benchmarks

    def _engine_steps(self, onnx_path: Path, int8_path: Path | None) -> list[_Step]:
        opts = self.options("build-engine")
        if opts is None:
            return []
        plan = {"onnxruntime": list(opts.pop("onnxruntime", ["fp32", "int8"])),
                "openvino": list(opts.pop("openvino", [])),
                "tensorrt": list(opts.pop("tensorrt", ["fp16", "int8"]))}
        if plan["openvino"] and openvino_backend.available() is None:
            logger.info("OpenVINO is not installed: no OpenVINO models (%s) in this run (%s)",
                        ", ".join(plan["openvino"]), openvino_backend.INSTALL_HINT)
            plan["openvino"] = []
        try:
            import_tensorrt()
        except EdgeoptError:
            if plan["tensorrt"]:
                logger.info("TensorRT is not installed: no TensorRT engines (%s) in this run",
                            ", ".join(plan["tensorrt"]))
            plan["tensorrt"] = []
        steps = []
        for backend, precisions in plan.items():
            for precision in precisions:
                out = engine_path(self.out, backend, precision)
                src, inputs = onnx_path, [onnx_path]
                fixed = {"out": str(out), "backend": backend, "precision": precision}
                if precision == "int8" and backend == "onnxruntime" and int8_path is not None:
                    src, inputs = int8_path, [int8_path]  # the CPU-target INT8 model the calibrate stage measured
                elif precision == "int8" and backend == "openvino":  # NNCF on the calibrate stage's image count
                    calib = self.options("calibrate") or {}
                    fixed.update(calib_data=self.r["data"], calib_val_limit=self.r["val_limit"],
                                 **({"num_images": calib["num_images"]} if "num_images" in calib else {}))
                elif precision == "int8":  # the calibrate stage's ranges when it ran, else made for this engine
                    cache = calibration_cache_path(int8_path if int8_path is not None else out)
                    fixed.update(calib_data=self.r["data"], calib_cache=str(cache))
                    if int8_path is not None:  # new ranges from calibrate rebuild this engine too
                        inputs.append(cache)
                fixed["onnx"] = str(src)
                bcfg = stage_config("build-engine", opts, fixed, progress=self.progress)
                steps.append(_Step(f"build-engine {backend} {precision}", "build-engine", bcfg, inputs, [out],
                                   lambda resume, c=bcfg: build_engine.run(c)))
        return steps


def _key(step: _Step, recipe: dict[str, Any]) -> dict[str, Any]:
    config = dataclasses.asdict(step.config)
    for noise in ("progress",):
        config.pop(noise, None)
        if isinstance(config.get("loop"), dict):
            config["loop"].pop(noise, None)
    key = {"config": config, "data": data_fingerprint(recipe["data"]),
           "inputs": {str(p): sha256_file(p) for p in step.inputs}}
    return json.loads(json.dumps(key, default=str))  # as pipeline.json will hold it (tuples become lists)


@dataclass
class StepResult:
    name: str
    status: str  # ran | skipped
    seconds: float
    outputs: list[str]


def plan(cfg: PipelineConfig, *, here: bool = True) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """The resolved recipe and the steps it makes, ``(name, stage config)``, checked but not run (``--dry-run``):
    the same checks as a real run makes before its first stage (:func:`check_runnable`), unless ``here`` is False
    (a recipe planned for another machine: its stages' options are checked, not this machine's devices or data)."""
    recipe = resolve_recipe(cfg)
    steps = _Planner(recipe, Path(cfg.out), cfg.progress).steps()
    if here:
        check_runnable(recipe, steps)
    return recipe, [(s.name, s.config) for s in steps]


def check_runnable(recipe: dict[str, Any], steps: list[_Step]) -> None:
    """What would stop the run after minutes of stages, checked before the first: the data is here, and every
    stage's device can run here (training's, and the benchmark's for the artifacts it will time).

    Raises:
        ConfigError: a data folder that is not there. DeviceError: a device this machine cannot honour.
    """

    data = recipe["data"]
    if data != FASHION_MNIST and not Path(data).is_dir():
        raise ConfigError(f"data folder {data} does not exist; give --data a folder with train/ and val/, or "
                          f"{FASHION_MNIST}")
    for step in steps:
        loop = getattr(step.config, "loop", None)
        if loop is not None:
            resolve_device(loop.device)
        if step.stage == "benchmark":
            backends = [backend_of(p) for p in (step.config.baseline, *step.config.models) if p]
            if resolve_for(step.config.device, backends) == "cuda" and "onnxruntime" in backends:
                require_ort_cuda()


def run(cfg: PipelineConfig, *,
        on_step: Callable[[int, int, str, str, float | None], None] | None = None) -> Artifact:
    """Run the recipe's stages in order, skipping unchanged ones; returns ``<out>/pipeline.json``.

    Args:
        cfg: the pipeline's options.
        on_step: called as ``on_step(index, total, name, event, estimate)`` with event ``start``, ``resume``,
            ``skip`` or ``done``; ``estimate``: seconds the step took when it last completed here (None the first
            time), the ETA the CLI prints.
    """
    recipe = resolve_recipe(cfg)
    out = Path(cfg.out)
    check_runnable(recipe, _Planner(recipe, out, cfg.progress).steps())
    prepare_output(out / STATE_FILE)
    with locked(out):
        return _run_steps(cfg, recipe, out, on_step)


def _run_steps(cfg: PipelineConfig, recipe: dict[str, Any], out: Path, on_step) -> Artifact:
    state_path = out / STATE_FILE
    steps = _Planner(recipe, out, cfg.progress).steps()
    state = _read_state(state_path)
    state["recipe"] = recipe
    state.setdefault("timings", {})
    results: list[StepResult] = []
    for i, step in enumerate(steps, 1):
        record = state["steps"].get(step.name, {})
        for p in step.inputs:
            if not p.is_file():
                raise ConfigError(f"pipeline step '{step.name}' needs {p}, which is missing")
        key = _key(step, recipe)
        intact = all(p.is_file() and record.get("outputs", {}).get(str(p)) == sha256_file(p) for p in step.outputs)
        if not cfg.force and record.get("status") == "done" and record.get("key") == key and intact:
            logger.debug("[%d/%d] %s: unchanged, skipped", i, len(steps), step.name)
            if on_step:
                on_step(i, len(steps), step.name, "skip", None)
            results.append(StepResult(step.name, "skipped", 0.0, [str(p) for p in step.outputs]))
            continue
        resume = (step.resumable and record.get("status") == "running" and record.get("key") == key
                  and last_checkpoint_path(step.outputs[0]).is_file())
        logger.debug("[%d/%d] %s%s", i, len(steps), step.name, " (resuming)" if resume else "")
        if on_step:
            on_step(i, len(steps), step.name, "resume" if resume else "start", state["timings"].get(step.name))
        state["steps"][step.name] = {"status": "running", "key": key, "started": time.time()}
        write_json(state_path, state)
        start = time.perf_counter()
        try:
            step.action(resume)
        except KeyboardInterrupt as e:  # the pipeline resumes by itself: no --resume to give
            raise KeyboardInterrupt(f"stopped in step '{step.name}'; rerun the same pipeline command to continue "
                                    "from there") from e
        seconds = time.perf_counter() - start
        state["steps"][step.name] = {"status": "done", "key": key, "seconds": round(seconds, 1),
                                     "outputs": {str(p): sha256_file(p) for p in step.outputs}}
        state["timings"][step.name] = round(seconds, 1)  # kept when the config changes: the next run's ETA
        write_json(state_path, state)
        if on_step:
            on_step(i, len(steps), step.name, "done", None)
        results.append(StepResult(step.name, "ran", seconds, [str(p) for p in step.outputs]))
    state["last_run"] = [dataclasses.asdict(r) for r in results]
    write_json(state_path, state)
    return Artifact(state_path, state)


def _read_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"format": "edgeopt-pipeline", "version": 1, "steps": {}}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        logger.warning("%s is unreadable: every stage runs again", path)
        return {"format": "edgeopt-pipeline", "version": 1, "steps": {}}
    state.setdefault("steps", {})
    return state
