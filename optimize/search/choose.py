"""Choosing the trial: the fastest within the accuracy budget, the most accurate among those within noise of it."""

from __future__ import annotations

from typing import Any

from ..benchmark.gates import Contender, fastest_within_budget
from ..configs import SearchConfig
from ..timing import Spread


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

