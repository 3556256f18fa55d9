"""The study: optuna's storage shared by every ``search`` process, and what keeps the processes in step.

Several processes (on several machines) may share one study. They agree on what the study searches (the setup
recorded on first use), count the finished trials together, and take over the trials of a process that died: on
this host by its pid and start time (:mod:`optimize.lock`), elsewhere by optuna's heartbeat.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

from ..configs import SearchConfig
from ..errors import ConfigError
from ..lock import process_running


def load_optuna():
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
    optuna = load_optuna()
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


def check_or_record_setup(study: Any, cfg: SearchConfig, teacher_sha: str, data: str) -> None:
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


def counts(study: Any) -> tuple[int, int]:
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

