"""Stage ``search``: the fastest model within an accuracy budget, found by an optuna study over the recipe.

The seeds tuned a learning rate with optuna; here the study searches the compression recipe (prune method and
amount, pruning rounds, fine-tuning epochs, KD alpha and temperature, calibration method and image count, INT8
form), or with ``space="training"`` the seeds' training options, and every trial is measured on the target.

How a trial runs: it *is* a pipeline run. The trial's parameters become a recipe (``trials/trial-NNNN/recipe.yaml``)
with the shared teacher and distilled student as ``teacher:`` / ``student:``, and :func:`optimize.pipeline.run`
prunes, fine-tunes, exports, calibrates and benchmarks through the existing stages. The trial's figures are its
benchmark report's final artifact (the fastest within the budget, as ``benchmark`` picks it): val top-1 and
throughput at the target batch (or p50 latency at batch 1 with ``objective="latency"``), measured on the target
backend. The chosen trial's recipe is written as ``best.yaml``; ``cli.py pipeline --config best.yaml`` runs the
very same stages again.

The study (optuna, two objectives, TPE sampler) lives in ``storage``: SQLite under ``out`` by default, or any
database URL optuna's RDB storage takes (PostgreSQL, MySQL), so that several ``search`` processes on several
machines can share one study. The first trial is the preset's own recipe, the starting point to beat.

- Count: ``trials`` is the number of finished trials (complete or stopped as hopeless) in the study, whoever ran
  them; a process that would start one too many gives its number up (state FAIL, ``surplus``).
- Resume: a trial whose process is gone (killed; this host's pid and start time tell) is marked failed and its
  parameters run again first; finished trials are never redone. A trial of another host is failed by optuna's
  heartbeat after ``grace_period`` seconds without one.
- Hopeless trials: optuna's pruners need ``trial.report``, which optuna refuses in multi-objective studies, so
  the rule is ours: a trial whose fine-tuned FP32 top-1 is already more than ``max_accuracy_drop`` + 0.5 pt
  below the teacher is stopped there (state PRUNED) instead of being exported, calibrated and benchmarked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .artifacts import (Artifact, atomic_path, last_checkpoint_path, prepare_output, read_manifest, resolve_data,
                        sha256_file, write_json)
from .configs import CALIB_METHODS, PRESETS, CalibConfig, PruneConfig, SearchConfig
from .errors import ConfigError, EdgeoptError, SearchError
from .pipeline import STAGES
from .lock import locked, process_record, process_running
from . import distill, pipeline
from .checkpoint import load_checkpoint
from .data import load_data
from .evaluate import check_model_fits_data
from .benchmark import report
from .benchmark.gates import Contender, fastest_within_budget
from .benchmark.report import pareto_front
from .timing import Spread, cpu_facts, isa_summary

logger = logging.getLogger(__name__)

REPORT_JSON = "search.json"
REPORT_MD = "report.md"
BEST_YAML = "best.yaml"
PARETO_PNG = "pareto.png"
HOPELESS_MARGIN_PT = 0.5  # fine-tuned FP32 this far below the budget: INT8 will not bring it back
MAX_FAILURES = 3  # trials in a row that fail with an error before this process gives up


# -- the search space ---------------------------------------------------------------------------------------------

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
    recipe: dict[str, Any] = {"data": data, "image_size": cfg.image_size, "train_limit": cfg.train_limit,
                              "val_limit": cfg.val_limit, "device": "cuda" if cfg.target == "tensorrt" else "auto",
                              "teacher": str(teacher.resolve())}
    # the target's device, whatever training ran on (a pipeline benchmarks where it trained unless told)
    bench = {"batch_sizes": [cfg.timed_batch], "rounds": cfg.rounds, "seconds": cfg.seconds,
             "max_accuracy_drop": cfg.max_accuracy_drop, "input_sizes": [],
             "device": "cuda" if cfg.target == "tensorrt" else "cpu"}
    stages: dict[str, Any] = {"export": {}, "benchmark": bench}
    if cfg.space == "training":
        stages.update(distill=dict(params), prune=False, calibrate=False, **{"build-engine": False})
        recipe["stages"] = _in_pipeline_order(stages)
        return recipe
    recipe["student"] = str(student.resolve()) if student else None
    if params["method"] == "none":
        stages["prune"] = False
    else:
        prune = {"method": params["method"], "finetune_epochs": params.get("finetune_epochs", 0)}
        prune.update({k: params[k] for k in ("amount", "steps", "alpha", "temperature") if k in params})
        if params["method"] == "2:4":
            prune["amount"], prune["steps"] = None, 1
        stages["prune"] = prune
    precision = params["precision"]
    if cfg.target == "tensorrt":
        stages["calibrate"] = False
        stages["build-engine"] = {"onnxruntime": [], "tensorrt": [precision], "opt_batch": cfg.timed_batch,
                                  "sparse_weights": params["method"] == "2:4"}
        if precision == "int8":
            stages["build-engine"].update(calib_method=params["calib_method"], num_images=params["calib_images"])
    else:
        stages["build-engine"] = False
        stages["calibrate"] = False if precision == "fp32" else {
            "target": "cpu", "form": precision, "method": params["calib_method"],
            "num_images": params["calib_images"], "timing_seconds": cfg.seconds}
    recipe["stages"] = _in_pipeline_order(stages)
    return recipe


def _in_pipeline_order(stages: dict[str, Any]) -> dict[str, Any]:
    return {name: stages[name] for name in STAGES if name in stages}


# -- the study ------------------------------------------------------------------------------------------------------

def _optuna():
    try:
        import optuna
    except ImportError as e:  # pragma: no cover - a dependency in pyproject
        raise ConfigError("search needs optuna: pip install optuna (it is in edgeopt's dependencies)") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats and fail_stale_trials are marked experimental; they are what lets a fleet share a study
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def open_study(cfg: SearchConfig):
    """The study in ``cfg.storage``: created, or (``resume``) loaded; refused when it exists without ``resume``."""
    optuna = _optuna()
    url = cfg.storage_url
    for attempt in range(3):  # processes starting together may race to create a new database's tables
        try:
            # a trial of another host whose heartbeat stopped is failed and its parameters queued again
            if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9
                retry = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1)}
            else:
                retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=cfg.heartbeat,
                                                 grace_period=cfg.grace_period, **retry)
            names = {s.study_name for s in optuna.study.get_all_study_summaries(storage)}
            break
        except Exception as e:  # noqa: BLE001 - SQLAlchemy / driver errors: the URL is wrong or unreachable
            if attempt < 2 and "already exists" in str(e):
                time.sleep(1.0)
                continue
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"cannot open --storage {url}: {first}; give a database URL this machine can reach "
                              "(sqlite:///path/study.db, postgresql://user@host/db)") from e
    if cfg.study_name in names and not cfg.resume:
        raise ConfigError(f"{url} already holds the study '{cfg.study_name}'; pass --resume to continue (or join) it, "
                          "or give another --out / --storage / --study-name")
    directions = ["maximize", "minimize" if cfg.objective == "latency" else "maximize"]
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=min(5, cfg.trials))
    study = optuna.create_study(storage=storage, study_name=cfg.study_name, directions=directions, sampler=sampler,
                                load_if_exists=True)
    return study, storage


_STUDY_KEYS = ("space", "target", "objective", "batch", "preset", "image_size", "train_limit", "val_limit")


def _check_or_record_setup(study: Any, cfg: SearchConfig, teacher_sha: str, data: str) -> None:
    """A resumed study must be searching the same thing: same teacher, data, space, target and objective."""
    setup = {**{k: getattr(cfg, k) for k in _STUDY_KEYS}, "teacher_sha256": teacher_sha, "data": data}
    recorded = study.user_attrs.get("setup")
    if recorded is None:
        study.set_user_attr("setup", setup)
        return
    differs = [k for k in setup if recorded.get(k) != setup[k]]
    if differs:
        k = differs[0]
        raise ConfigError(f"the study '{cfg.study_name}' in {cfg.storage_url} was made with {k}={recorded.get(k)!r}, "
                          f"not {setup[k]!r}; search with the study's settings or give another --study-name")


# -- one process's share of the trials ------------------------------------------------------------------------------

class _Surplus(Exception):
    """This process asked for a trial after the study already had enough."""


class _Stop(Exception):
    """The trial was stopped early (hopeless); carries the reason."""


def _counts(study: Any) -> tuple[int, int]:
    """(finished, running) trials: complete or pruned, and running ones (surplus trials excluded)."""
    from optuna.trial import TrialState

    finished = running = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            finished += 1
        elif t.state == TrialState.RUNNING:
            running += 1
    return finished, running


def fail_dead_trials(study: Any, storage: Any) -> list[int]:
    """Mark failed the running trials whose process (on this host) is gone; run their parameters again first.

    Returns the numbers of the trials failed. Trials of other hosts are left to optuna's heartbeat.
    """
    from optuna.trial import TrialState


    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if not isinstance(worker, dict) or process_running(worker) or worker.get("host") is None:
            continue
        storage.set_trial_user_attr(t._trial_id, "error", "its process stopped (killed) before it finished")
        if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
            failed.append(t.number)
    return failed


@dataclass
class TrialEvent:
    """What the CLI prints after each trial: the trial's figures, the running best, an ETA."""

    number: int
    state: str
    params: dict[str, Any]
    top1: float | None
    speed: float | None
    seconds: float
    finished: int
    total: int
    best: dict[str, Any] | None
    eta_seconds: float | None
    note: str = ""


class _Trials:
    """Runs this process's trials of the study, each through the pipeline."""

    def __init__(self, cfg: SearchConfig, study: Any, storage: Any, *, teacher: Path, student: Path | None,
                 data: str, baseline: dict[str, Any], on_trial: Callable[[TrialEvent], None] | None):
        self.cfg, self.study, self.storage = cfg, study, storage
        self.teacher, self.student, self.data, self.baseline = teacher, student, data, baseline
        self.on_trial = on_trial
        self.durations: list[float] = []
        self.out_of_time = False

    def run(self) -> None:
        optuna = _optuna()
        failures = 0
        started = time.perf_counter()
        while True:
            if self.cfg.minutes is not None:
                mean = sum(self.durations) / len(self.durations) if self.durations else 0.0
                if time.perf_counter() - started + mean > 60 * self.cfg.minutes:
                    logger.info("--minutes %g: no time for another trial (%.1f min each so far)", self.cfg.minutes,
                                mean / 60)
                    self.out_of_time = True
                    return
            for number in fail_dead_trials(self.study, self.storage):
                logger.warning("trial %d: its process is gone; its parameters run again", number)
            optuna.storages.fail_stale_trials(self.study)  # other hosts' trials without a heartbeat
            finished, running = _counts(self.study)
            if finished >= self.cfg.trials:
                return
            if finished + running >= self.cfg.trials:  # the last trials run elsewhere: wait for them
                time.sleep(min(5.0, self.cfg.heartbeat))
                continue
            ran: list[Any] = []
            self.study.optimize(self._objective, n_trials=1, catch=(_Surplus, EdgeoptError),
                                callbacks=[lambda _study, frozen: ran.append(frozen)])
            last = ran[-1] if ran else None
            if last is not None and last.state.name == "FAIL" and "surplus" not in last.user_attrs:
                failures += 1
                logger.warning("trial %d failed: %s", last.number, last.user_attrs.get("error", "see the log"))
                if failures >= MAX_FAILURES:
                    raise SearchError(f"{failures} trials in a row failed (last: trial {last.number}: "
                                      f"{last.user_attrs.get('error')}); fix that and rerun with --resume")
            else:
                failures = 0

    def _objective(self, trial: Any) -> tuple[float, float]:
        import optuna


        start = time.perf_counter()
        trial.set_user_attr("worker", process_record())
        ahead = [t for t in self.study.get_trials(deepcopy=False)
                 if t.number < trial.number and t.state.name in ("COMPLETE", "PRUNED", "RUNNING")]
        if len(ahead) >= self.cfg.trials:
            trial.set_user_attr("surplus", True)
            raise _Surplus(f"the study already has {self.cfg.trials} trials")
        params = suggest(trial, self.cfg)
        twin = self._twin(params)
        if twin is not None:  # TPE proposes a finished point again now and then: its figures stand, not rerun
            return self._as_twin(trial, twin, params, start)
        folder = Path(self.cfg.out) / "trials" / f"trial-{trial.number:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        recipe_path = folder / "recipe.yaml"
        pcfg = pipeline.PipelineConfig(out=str(folder), preset=self.cfg.preset, recipe=str(recipe_path),
                                       progress=self.cfg.progress)
        _write_yaml(recipe_path, trial_recipe(params, self.cfg, teacher=self.teacher, student=self.student,
                                              data=self.data))
        recipe = pipeline.resolve_recipe(pcfg)  # every option, the preset's too: best.yaml holds if a preset changes
        _write_yaml(recipe_path, recipe)
        trial.set_user_attr("recipe", recipe)
        trial.set_user_attr("folder", str(folder))
        floor = self.baseline["top1"] - (self.cfg.max_accuracy_drop + HOPELESS_MARGIN_PT) / 100

        def on_step(_i: int, _total: int, name: str, event: str, _estimate: float | None) -> None:
            if event != "done" or name not in ("prune", "distill"):
                return
            trained = folder / ("pruned.pth" if name == "prune" else "student.pth")
            top1 = ((read_manifest(trained) or {}).get("metrics") or {}).get("val_top1")
            if isinstance(top1, float) and top1 < floor:
                raise _Stop(f"FP32 top-1 {top1:.2%} after {name} is below {floor:.2%} (the budget "
                            f"{self.cfg.max_accuracy_drop:g} pt + {HOPELESS_MARGIN_PT} pt): stopped before export")

        try:
            pipeline.run(pcfg, on_step=on_step)
        except _Stop as e:
            trial.set_user_attr("stopped", str(e))
            trial.set_user_attr("seconds", time.perf_counter() - start)
            self._emit(trial, "PRUNED", params, None, None, start, note=str(e))
            raise optuna.TrialPruned(str(e)) from None
        except KeyboardInterrupt:
            self.study.enqueue_trial(params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
            trial.set_user_attr("error", "interrupted (Ctrl-C); its parameters run first on --resume")
            raise
        except EdgeoptError as e:
            trial.set_user_attr("error", str(e))
            raise
        figures = trial_figures(folder, self.cfg)
        for key, value in figures.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("seconds", time.perf_counter() - start)
        self._emit(trial, "COMPLETE", params, figures["top1"], figures["speed"], start)
        return figures["top1"], figures["speed"]

    def _twin(self, params: dict[str, Any]) -> Any:
        """A finished trial (complete or stopped) with exactly these parameters, if any."""
        return next((t for t in self.study.get_trials(deepcopy=False) if t.params == params
                     and t.state.name in ("COMPLETE", "PRUNED")), None)

    def _as_twin(self, trial: Any, twin: Any, params: dict[str, Any], start: float) -> tuple[float, float]:
        import optuna

        note = f"same parameters as trial {twin.number}: its figures, not run again"
        for key, value in twin.user_attrs.items():
            if key not in ("worker", "starting_point", "retry_of", "seconds", "duplicate_of"):
                trial.set_user_attr(key, value)
        trial.set_user_attr("duplicate_of", twin.number)
        trial.set_user_attr("seconds", 0.0)
        if twin.state.name == "PRUNED":
            self._emit(trial, "PRUNED", params, None, None, start, note=note, timed=False)
            raise optuna.TrialPruned(note)
        self._emit(trial, "COMPLETE", params, twin.values[0], twin.values[1], start, note=note, timed=False)
        return twin.values[0], twin.values[1]

    def _emit(self, trial: Any, state: str, params: dict[str, Any], top1: float | None, speed: float | None,
              start: float, note: str = "", timed: bool = True) -> None:
        seconds = time.perf_counter() - start
        if timed:  # the ETA and --minutes go by the trials that ran
            self.durations.append(seconds)
        if self.on_trial is None:
            return
        finished, _ = _counts(self.study)
        finished += 1  # this one, not yet told to the storage
        left = max(self.cfg.trials - finished, 0)
        eta = left * (sum(self.durations) / len(self.durations)) if left and self.durations else None
        mine = {"number": trial.number, "top1": top1, "speed": speed, "spread": trial.user_attrs.get("spread")}
        best = choose(completed_rows(self.study, self.cfg) + ([mine] if top1 is not None else []), self.baseline,
                      self.cfg)
        self.on_trial(TrialEvent(trial.number, state, params, top1, speed, seconds, finished, self.cfg.trials,
                                 best, eta, note))


def _write_yaml(path: Path, data: dict[str, Any], header: str = "") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def trial_figures(folder: Path, cfg: SearchConfig) -> dict[str, Any]:
    """The figures of a finished trial: its benchmark report's final artifact at the target batch."""
    path = report.report_folder(folder) / report.REPORT_JSON
    bench = json.loads(path.read_text())
    final = bench.get("final") or {}
    row = next((r for r in bench["rows"] if r["name"] == final.get("artifact")), None)
    if row is None:
        raise SearchError(f"{path} names no final artifact; see its report.md")
    b = str(cfg.timed_batch)
    speed = row["latency_ms"].get(b) if cfg.objective == "latency" else row["throughput"].get(b)
    return {"top1": row["top1"], "speed": speed, "artifact": row["path"], "file_bytes": row["file_bytes"],
            "macs": row.get("macs"), "params_count": row.get("params"), "spread": row["throughput_spread"].get(b),
            "teacher_top1": next((r["top1"] for r in bench["rows"] if r["role"] == "baseline"), None)}


def completed_rows(study: Any, cfg: SearchConfig) -> list[dict[str, Any]]:
    from optuna.trial import TrialState

    return [{"number": t.number, "top1": t.values[0], "speed": t.values[1], "spread": t.user_attrs.get("spread")}
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def choose(rows: list[dict[str, Any]], baseline: dict[str, Any], cfg: SearchConfig) -> dict[str, Any] | None:
    """The chosen trial: the fastest within the budget, but among the trials within the budget whose speed cannot
    be told from the fastest's (their throughput ranges overlap, as ``benchmark`` says "within noise") the most
    accurate; when none is within the budget, the most accurate (``within`` False). The rule is the benchmark
    report's (:func:`optimize.benchmark.gates.fastest_within_budget`), with the tie-break for accuracy.

    ``rows``: ``{"number", "top1", "speed", "spread"}`` (``spread``: the throughput's low / high over the rounds).
    """
    sign = 1 if cfg.objective == "throughput" else -1  # the rule wants higher = faster; a latency is lower
    contenders = [Contender(r, r["top1"], sign * r["speed"], Spread.from_dict(r["spread"]) if r.get("spread") else None)
                  for r in rows]
    # searching the training options leaves one architecture: speeds differ by noise only
    ties = "accurate" if cfg.space == "training" else "accurate-within-noise"
    pick = fastest_within_budget(contenders, baseline["top1"], cfg.max_accuracy_drop, ties=ties)
    if pick is None:
        return None
    fastest = pick.fastest
    return {**pick.chosen.item, "within": pick.within, "fastest": fastest.item["number"] if fastest else None}


# -- shared inputs: the baseline figures and the distilled student ---------------------------------------------------

def _check_teacher_fits(teacher: Path, data: str, cfg: SearchConfig) -> None:
    """Refuse a teacher that does not fit the data before anything is written."""

    loaded = load_checkpoint(teacher)
    splits = load_data(data, loaded.preprocessing, val_limit=min(cfg.val_limit or 64, 64), augment=False,
                       val_only=True)
    check_model_fits_data(loaded, splits)


def _baseline(study: Any, cfg: SearchConfig, teacher: Path, data: str) -> dict[str, Any]:
    """The teacher's top-1 and speed on the target (measured once per study, kept in the storage)."""
    recorded = study.user_attrs.get("baseline")
    if isinstance(recorded, dict) and isinstance(recorded.get("top1"), float):
        return recorded

    bcfg = report.BenchmarkConfig(models=(), baseline=str(teacher), out=str(Path(cfg.out) / "baseline"), data=data,
                                  batch_sizes=(cfg.timed_batch,), device="cuda" if cfg.target == "tensorrt" else "cpu",
                                  rounds=cfg.rounds, seconds=cfg.seconds, val_limit=cfg.val_limit,
                                  progress=cfg.progress)
    row = report.run(bcfg).manifest["rows"][0]
    b = str(cfg.timed_batch)
    baseline = {"artifact": str(teacher), "top1": row["top1"],
                "speed": row["latency_ms"].get(b) if cfg.objective == "latency" else row["throughput"].get(b),
                "file_bytes": row["file_bytes"], "macs": row.get("macs")}
    study.set_user_attr("baseline", baseline)
    return baseline


def _shared_student(cfg: SearchConfig, teacher: Path, data: str) -> Path | None:
    """The distilled student every compression trial prunes: given, or distilled once with the preset's options."""
    if cfg.space == "training":
        return None
    if cfg.student:
        return Path(cfg.student)  # checked before anything was written

    student = Path(cfg.out) / "student.pth"
    manifest = read_manifest(student) or {}
    teacher_sha = ((manifest.get("inputs") or {}).get("teacher") or {}).get("sha256")
    if student.is_file() and teacher_sha == sha256_file(teacher):
        return student
    recipe = pipeline.resolve_recipe(pipeline.PipelineConfig(out=cfg.out, preset=cfg.preset))
    options = dict(recipe["stages"].get("distill") or {})
    fixed = {"teacher": str(teacher), "out": str(student), "data": data, "image_size": cfg.image_size,
             "train_limit": cfg.train_limit, "val_limit": cfg.val_limit}
    dcfg = pipeline.stage_config("distill", options, fixed, progress=cfg.progress,
                                 device="cuda" if cfg.target == "tensorrt" else "auto")
    logger.info("distilling the shared student %s once (the preset's distill options)", student)
    distill.run(dataclasses.replace(dcfg, resume=last_checkpoint_path(student).is_file()))
    return student


# -- the entry point ----------------------------------------------------------------------------------------------

def run(cfg: SearchConfig, *, on_trial: Callable[[TrialEvent], None] | None = None) -> Artifact:
    """Run (or resume, or join) the study until it holds ``cfg.trials`` finished trials; write the report.

    Returns ``search.json`` (the report's data) with ``report.md``, ``pareto.png`` and ``best.yaml`` beside it.
    """

    teacher = Path(cfg.teacher)
    if not teacher.is_file():
        raise ConfigError(f"--teacher {teacher} does not exist; train one ('cli.py train') or give its path")
    if cfg.student and not Path(cfg.student).is_file():
        raise ConfigError(f"--student {cfg.student} does not exist; give a checkpoint or drop --student to distill "
                          "one")
    data = resolve_data(cfg.data, teacher)
    _check_teacher_fits(teacher, data, cfg)
    out = Path(cfg.out)
    created = not out.exists()
    prepare_output(out / REPORT_JSON)
    try:
        study, storage = open_study(cfg)
    except EdgeoptError:
        if created:  # nothing half-written: the folder this call made goes again
            shutil.rmtree(out, ignore_errors=True)
        raise
    _check_or_record_setup(study, cfg, sha256_file(teacher), data)
    with locked(out / "shared", wait=True):  # several processes: one measures / distils, the others wait
        baseline = _baseline(study, cfg, teacher, data)
        student = _shared_student(cfg, teacher, data)
    if not study.get_trials(deepcopy=False) and (point := starting_point(cfg)) is not None:
        study.enqueue_trial(point, user_attrs={"starting_point": cfg.preset}, skip_if_exists=True)
    trials = _Trials(cfg, study, storage, teacher=teacher, student=student, data=data, baseline=baseline,
                     on_trial=on_trial)
    trials.run()
    return write_report(study, cfg, baseline, out_of_time=trials.out_of_time)


# -- the report -----------------------------------------------------------------------------------------------------

def _trial_record(t: Any) -> dict[str, Any]:
    a = t.user_attrs
    return {"number": t.number, "state": t.state.name, "params": t.params,
            "top1": t.values[0] if t.values else None, "speed": t.values[1] if t.values else None,
            "file_bytes": a.get("file_bytes"), "macs": a.get("macs"), "artifact": a.get("artifact"),
            "seconds": a.get("seconds"),
            "note": (f"same parameters as trial {a['duplicate_of']}: its figures" if "duplicate_of" in a
                     else a.get("stopped") or a.get("error") or ""),
            "retry_of": a.get("retry_of"), "starting_point": a.get("starting_point"), "folder": a.get("folder"),
            "surplus": bool(a.get("surplus")), "spread": a.get("spread"), "recipe": a.get("recipe")}


def write_report(study: Any, cfg: SearchConfig, baseline: dict[str, Any], *, out_of_time: bool = False) -> Artifact:
    """search.json, report.md, pareto.png and best.yaml from every trial in the study."""

    out = Path(cfg.out)
    trials = [_trial_record(t) for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    done = [t for t in trials if t["state"] == "COMPLETE"]
    sign = 1 if cfg.objective == "throughput" else -1
    flags = pareto_front([(sign * t["speed"], t["top1"]) for t in done])
    for t, flag in zip(done, flags):
        t["pareto"] = flag
    chosen = choose([{k: t[k] for k in ("number", "top1", "speed", "spread")} for t in done], baseline, cfg)
    best = next((t for t in done if chosen and t["number"] == chosen["number"]), None)
    facts = cpu_facts()
    report = {"format": "edgeopt-search", "version": 1, "config": dataclasses.asdict(cfg),
              "storage": cfg.storage_url, "study": cfg.study_name, "baseline": baseline,
              "unit": "ms p50 at batch 1" if cfg.objective == "latency" else f"img/s at batch {cfg.batch}",
              "chosen": None if best is None else {**chosen, "recipe": best["recipe"]},
              "trials": trials, "out_of_time": out_of_time,
              "environment": {"cpu": facts, "isa": isa_summary(facts)}}
    if best is not None:
        _write_best(out / BEST_YAML, best, baseline, cfg)
        report["best_yaml"] = BEST_YAML
    report["plots"] = [p.name for p in [_plot(done, baseline, best, cfg, out / PARETO_PNG)] if p]
    write_json(out / REPORT_JSON, report)
    with atomic_path(out / REPORT_MD) as tmp:
        tmp.write_text(render_markdown(report), encoding="utf-8")
    return Artifact(out / REPORT_JSON, report)


def reproduce_command(cfg: SearchConfig) -> str:
    preset = "" if cfg.preset == "standard" else f" --preset {cfg.preset}"
    return f"python cli.py pipeline{preset} --config {Path(cfg.out) / BEST_YAML} --out runs/best"


def _write_best(path: Path, best: dict[str, Any], baseline: dict[str, Any], cfg: SearchConfig) -> None:
    speed = speed_text(best["speed"], cfg)
    header = (f"# edgeopt search: trial {best['number']} of study '{cfg.study_name}', the fastest within "
              f"{cfg.max_accuracy_drop:g} pt of the teacher's top-1 (the most accurate of those within noise of it)\n"
              f"# measured: top-1 {best['top1']:.2%} (teacher {baseline['top1']:.2%}), {speed}\n"
              f"# reproduce: {reproduce_command(cfg)}\n")
    _write_yaml(path, best["recipe"], header)


def speed_text(value: float | None, cfg: SearchConfig) -> str:
    if value is None:
        return "—"
    if cfg.objective == "latency":
        return f"{value:.2f} ms p50 at batch 1"
    return f"{value:,.0f} img/s at batch {cfg.batch}"


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def render_markdown(report: dict[str, Any]) -> str:
    cfg = SearchConfig(**{k: v for k, v in report["config"].items()})
    base = report["baseline"]
    trials = report["trials"]
    counts = {s: sum(t["state"] == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    lines = [f"# edgeopt search: {cfg.space}, target {cfg.target}", "",
             f"Study `{report['study']}` in `{report['storage']}`: {counts['COMPLETE']} complete, "
             f"{counts['PRUNED']} stopped as hopeless, {counts['FAIL']} failed"
             + (f", {counts['RUNNING']} still running" if counts["RUNNING"] else "") + "."
             + (f" This process stopped at its --minutes {cfg.minutes:g} budget." if report.get("out_of_time") else ""),
             f"Budget: at most {cfg.max_accuracy_drop:g} top-1 points below the teacher "
             f"`{Path(base['artifact']).name}` ({base['top1']:.2%}, {speed_text(base['speed'], cfg)}).",
             f"Machine: {report['environment']['isa']}.", ""]
    chosen = report.get("chosen")
    if chosen is None:
        lines += ["No trial has finished yet.", ""]
    else:
        t = next(t for t in trials if t["number"] == chosen["number"])
        ratio = (t["speed"] / base["speed"] if cfg.objective == "throughput" else base["speed"] / t["speed"]) \
            if base.get("speed") else None
        verdict = "within the budget" if chosen["within"] else "**no trial is within the budget**: the most accurate"
        if chosen["within"] and chosen.get("fastest") not in (None, t["number"]):
            f = next(x for x in trials if x["number"] == chosen["fastest"])
            verdict += (f"; trial {f['number']} is faster by median ({speed_text(f['speed'], cfg)}, top-1 "
                        f"{f['top1']:.2%}) but its range overlaps this one's: within noise, so the more accurate")
        lines += ["## Chosen", "",
                  f"Trial {t['number']} ({verdict}): top-1 {t['top1']:.2%} "
                  f"({100 * (t['top1'] - base['top1']):+.2f} pt), {speed_text(t['speed'], cfg)}"
                  + (f", {ratio:.1f}x the teacher" if ratio else "") + f"; `{t['artifact']}`.",
                  f"Parameters: {_params_text(t['params'])}.",
                  f"Recipe: `{BEST_YAML}`; reproduce with `{reproduce_command(cfg)}`.", ""]
    unit = "p50 ms b1" if cfg.objective == "latency" else f"img/s b{cfg.batch}"
    head = f"| trial | state | top-1 | {unit} | size MB | MMACs | min | parameters / note |"
    rule = "|---|---|---|---|---|---|---|---|"

    def row(t: dict[str, Any]) -> str:
        mark = " **chosen**" if chosen and t["number"] == chosen["number"] else ""
        mark += " (start)" if t.get("starting_point") else ""
        mark += f" (retry of {t['retry_of']})" if t.get("retry_of") is not None else ""
        size = f"{t['file_bytes'] / 1e6:.2f}" if t.get("file_bytes") else "—"
        macs = f"{t['macs'] / 1e6:.1f}" if t.get("macs") else "—"
        top1 = f"{t['top1']:.2%}" if t.get("top1") is not None else "—"
        speed = f"{t['speed']:,.2f}" if t.get("speed") is not None else "—"
        minutes = f"{t['seconds'] / 60:.1f}" if t.get("seconds") else "—"
        note = _params_text(t["params"]) + (f" — {t['note']}" if t["note"] else "")
        cells = [f"{t['number']}{mark}", t["state"].lower(), top1, speed, size, macs, minutes, note]
        return "| " + " | ".join(cells) + " |"

    front = [t for t in trials if t.get("pareto")]
    if front:
        lines += ["## Pareto front (no other trial is both faster and more accurate)", "", head, rule]
        lines += [row(t) for t in sorted(front, key=lambda t: -t["top1"])] + [""]
    lines += ["## Every trial", "", head, rule] + [row(t) for t in trials] + [""]
    if report.get("plots"):
        lines += [f"![Pareto front]({report['plots'][0]})", ""]
    return "\n".join(lines)


def _plot(done: list[dict[str, Any]], baseline: dict[str, Any], best: dict[str, Any] | None, cfg: SearchConfig,
          path: Path) -> Path | None:
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    front = sorted((t for t in done if t.get("pareto")), key=lambda t: t["speed"])
    ax.scatter([t["speed"] for t in done], [100 * t["top1"] for t in done], c="#999999", label="trial")
    ax.plot([t["speed"] for t in front], [100 * t["top1"] for t in front], "o-", c="#1f77b4", label="Pareto front")
    if best is not None:
        ax.scatter([best["speed"]], [100 * best["top1"]], s=160, facecolors="none", edgecolors="#d62728", lw=2,
                   label=f"chosen (trial {best['number']})")
    ax.axhline(100 * baseline["top1"] - cfg.max_accuracy_drop, ls="--", c="#d62728", lw=1,
               label=f"budget: teacher - {cfg.max_accuracy_drop:g} pt")
    ax.set_xlabel("p50 latency at batch 1 (ms)" if cfg.objective == "latency" else f"img/s at batch {cfg.batch}")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"search: {cfg.space}, target {cfg.target}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path

