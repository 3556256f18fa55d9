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

One module per job: :mod:`~optimize.search.space` (what a trial may try, and its recipe),
:mod:`~optimize.search.study` (the shared storage, the setup check, dead trials), :mod:`~optimize.search.trials`
(this process's trials, each a pipeline run), :mod:`~optimize.search.shared` (the teacher's figures and the
distilled student, made once), :mod:`~optimize.search.choose` (the trial kept) and :mod:`~optimize.search.report`
(search.json, report.md, the plot, best.yaml). :func:`run` below runs them in that order.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from ..artifacts import Artifact, prepare_output, resolve_data, sha256_file
from .choose import choose
from ..configs import SearchConfig
from ..errors import ConfigError, EdgeoptError
from ..lock import locked
from .report import BEST_YAML, REPORT_JSON, REPORT_MD, render_markdown, reproduce_command, speed_text, write_report
from .shared import baseline_figures, check_teacher_fits, shared_student
from .space import starting_point, suggest, trial_recipe
from .study import check_or_record_setup, open_study
from .trials import TrialEvent, Trials

__all__ = ["BEST_YAML", "REPORT_JSON", "REPORT_MD", "SearchConfig", "TrialEvent", "choose", "open_study",
           "render_markdown", "reproduce_command", "run", "speed_text", "starting_point", "suggest", "trial_recipe",
           "write_report"]


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
    check_teacher_fits(teacher, data, cfg)
    out = Path(cfg.out)
    created = not out.exists()
    prepare_output(out / REPORT_JSON)
    try:
        study, storage = open_study(cfg)
    except EdgeoptError:
        if created:  # nothing half-written: the folder this call made goes again
            shutil.rmtree(out, ignore_errors=True)
        raise
    check_or_record_setup(study, cfg, sha256_file(teacher), data)
    with locked(out / "shared", wait=True):  # several processes: one measures / distils, the others wait
        baseline = baseline_figures(study, cfg, teacher, data)
        student = shared_student(cfg, teacher, data)
    if not study.get_trials(deepcopy=False) and (point := starting_point(cfg)) is not None:
        study.enqueue_trial(point, user_attrs={"starting_point": cfg.preset}, skip_if_exists=True)
    trials = Trials(cfg, study, storage, teacher=teacher, student=student, data=data, baseline=baseline,
                    on_trial=on_trial)
    trials.run()
    return write_report(study, cfg, baseline, out_of_time=trials.out_of_time)

