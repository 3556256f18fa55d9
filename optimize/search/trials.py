"""One process's share of the study's trials, each run as a pipeline in ``trials/trial-NNNN/``.

A trial whose fine-tuned FP32 top-1 is already hopeless is stopped before export (state PRUNED: optuna's own
pruners need ``trial.report``, which multi-objective studies refuse); a trial proposing the parameters of a
finished one takes its figures instead of running again; a process that would run one trial too many gives its
number up (state FAIL, ``surplus``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import pipeline
from ..artifacts import read_manifest
from ..benchmark import report as benchmark_report
from .choose import choose, completed_rows
from ..configs import SearchConfig
from ..errors import EdgeoptError, SearchError
from ..lock import process_record
from .space import objective_speed, suggest, trial_recipe, write_recipe
from .study import counts, fail_dead_trials, load_optuna

logger = logging.getLogger(__name__)

HOPELESS_MARGIN_PT = 0.5  # fine-tuned FP32 this far below the budget: INT8 will not bring it back
MAX_FAILURES = 3  # trials in a row that fail with an error before this process gives up


class _Surplus(Exception):
    """This process asked for a trial after the study already had enough."""


class _Stop(Exception):
    """The trial was stopped early (hopeless); carries the reason."""


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


class Trials:
    """Runs this process's trials of the study, each through the pipeline."""

    def __init__(self, cfg: SearchConfig, study: Any, storage: Any, *, teacher: Path, student: Path | None,
                 data: str, baseline: dict[str, Any], on_trial: Callable[[TrialEvent], None] | None):
        self.cfg, self.study, self.storage = cfg, study, storage
        self.teacher, self.student, self.data, self.baseline = teacher, student, data, baseline
        self.on_trial = on_trial
        self.durations: list[float] = []
        self.out_of_time = False

    def run(self) -> None:
        optuna = load_optuna()
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
            finished, running = counts(self.study)
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
        """One trial: its parameters run as a pipeline; returns (top-1, speed), optuna's two objectives."""
        import optuna

        start = time.perf_counter()
        trial.set_user_attr("worker", process_record())
        self._refuse_surplus(trial)
        params = suggest(trial, self.cfg)
        twin = self._twin(params)
        if twin is not None:  # TPE proposes a finished point again now and then: its figures stand, not rerun
            return self._as_twin(trial, twin, params, start)
        folder, pcfg = self._prepare(trial, params)
        try:
            pipeline.run(pcfg, on_step=self._stop_if_hopeless(folder))
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

    def _refuse_surplus(self, trial: Any) -> None:
        """Give the trial's number up when enough trials are finished or running ahead of it (other processes')."""
        ahead = [t for t in self.study.get_trials(deepcopy=False)
                 if t.number < trial.number and t.state.name in ("COMPLETE", "PRUNED", "RUNNING")]
        if len(ahead) >= self.cfg.trials:
            trial.set_user_attr("surplus", True)
            raise _Surplus(f"the study already has {self.cfg.trials} trials")

    def _prepare(self, trial: Any, params: dict[str, Any]) -> tuple[Path, pipeline.PipelineConfig]:
        """The trial's folder with its recipe, and the config of the pipeline that runs it."""
        folder = Path(self.cfg.out) / "trials" / f"trial-{trial.number:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        recipe_path = folder / "recipe.yaml"
        pcfg = pipeline.PipelineConfig(out=str(folder), preset=self.cfg.preset, recipe=str(recipe_path),
                                       progress=self.cfg.progress)
        write_recipe(recipe_path, trial_recipe(params, self.cfg, teacher=self.teacher, student=self.student,
                                               data=self.data))
        recipe = pipeline.resolve_recipe(pcfg)  # every option, the preset's too: best.yaml holds if a preset changes
        write_recipe(recipe_path, recipe)
        trial.set_user_attr("recipe", recipe)
        trial.set_user_attr("folder", str(folder))
        return folder, pcfg

    def _stop_if_hopeless(self, folder: Path) -> Callable[[int, int, str, str, float | None], None]:
        """The pipeline's ``on_step``: after prune (or distill) it reads the model's FP32 top-1, and a model
        already more than the budget + :data:`HOPELESS_MARGIN_PT` below the teacher stops the trial (:class:`_Stop`)
        before export, calibration and benchmark spend minutes on it."""
        floor = self.baseline["top1"] - (self.cfg.max_accuracy_drop + HOPELESS_MARGIN_PT) / 100

        def on_step(_i: int, _total: int, name: str, event: str, _estimate: float | None) -> None:
            if event != "done" or name not in ("prune", "distill"):
                return
            trained = folder / ("pruned.pth" if name == "prune" else "student.pth")
            top1 = ((read_manifest(trained) or {}).get("metrics") or {}).get("val_top1")
            if isinstance(top1, float) and top1 < floor:
                raise _Stop(f"FP32 top-1 {top1:.2%} after {name} is below {floor:.2%} (the budget "
                            f"{self.cfg.max_accuracy_drop:g} pt + {HOPELESS_MARGIN_PT} pt): stopped before export")

        return on_step

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
        finished, _ = counts(self.study)
        finished += 1  # this one, not yet told to the storage
        left = max(self.cfg.trials - finished, 0)
        eta = left * (sum(self.durations) / len(self.durations)) if left and self.durations else None
        mine = {"number": trial.number, "top1": top1, "speed": speed, "spread": trial.user_attrs.get("spread")}
        best = choose(completed_rows(self.study, self.cfg) + ([mine] if top1 is not None else []), self.baseline,
                      self.cfg)
        self.on_trial(TrialEvent(trial.number, state, params, top1, speed, seconds, finished, self.cfg.trials,
                                 best, eta, note))


def trial_figures(folder: Path, cfg: SearchConfig) -> dict[str, Any]:
    """The figures of a finished trial: its benchmark report's final artifact at the target batch."""
    path = benchmark_report.report_folder(folder) / benchmark_report.REPORT_JSON
    bench = json.loads(path.read_text())
    final = bench.get("final") or {}
    row = next((r for r in bench["rows"] if r["name"] == final.get("artifact")), None)
    if row is None:
        raise SearchError(f"{path} names no final artifact; see its {benchmark_report.REPORT_MD}")
    b = str(cfg.timed_batch)
    return {"top1": row["top1"], "speed": objective_speed(row, cfg), "artifact": row["path"],
            "file_bytes": row["file_bytes"], "macs": row.get("macs"), "params_count": row.get("params"),
            "spread": row["throughput_spread"].get(b),
            "teacher_top1": next((r["top1"] for r in bench["rows"] if r["role"] == "baseline"), None)}

