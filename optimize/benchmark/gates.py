"""What ``benchmark`` concludes from the figures, every threshold one of the user's options.

- the Pareto front over (throughput at the reference batch, top-1);
- the INT8 gate: each INT8 artifact against its FP32/FP16 sibling (slower beyond noise, or more than
  ``max_accuracy_drop`` points of top-1 lost, flags it) and an optimized INT8 model against the plain one;
- the final artifact: the fastest within ``max_accuracy_drop`` of the baseline's top-1 (the rule,
  :func:`fastest_within_budget`, also picks ``search``'s trial, with another tie-break);
- the verdicts: the final artifact against ``min_speedup`` and ``max_accuracy_drop``, and each INT8 gate.

No number here is a constant: the budgets are :class:`~optimize.configs.BenchmarkConfig`'s ``min_speedup`` and
``max_accuracy_drop`` (``--min-speedup``, ``--max-accuracy-drop``, a recipe's benchmark stage), and "faster" means
faster in every round (:func:`optimize.timing.compare`), not by a fixed margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from optimize.timing import Spread, compare

from .measure import Row, direct_input, throughput_spread

if TYPE_CHECKING:
    from optimize.configs import BenchmarkConfig


def judge(rows: list[Row], base: Row, cfg: BenchmarkConfig) -> dict[str, Any]:
    """Mark the Pareto front and the INT8 gates on ``rows``; returns ``{"final": ..., "verdicts": [...]}``."""
    if not cfg.input_size:
        mark_pareto(rows, cfg)
    int8_gates(rows, cfg)
    final = final_artifact(rows, base, cfg)
    return {"final": final, "verdicts": verdicts(rows, base, final, cfg)}


def mark_pareto(rows: list[Row], cfg: BenchmarkConfig) -> None:
    """Set ``pareto`` on the timed rows no other beats on both throughput (reference batch) and top-1."""
    ref = str(cfg.reference_batch)
    measured = [r for r in rows if not r.skipped and r.throughput.get(ref)]
    for r, on_front in zip(measured, pareto_front([(r.throughput[ref], r.top1 or 0.0) for r in measured])):
        r.pareto = on_front


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which (speed, accuracy) points no other point beats on both (ties kept)."""
    front = []
    for i, (s, a) in enumerate(points):
        dominated = any(s2 >= s and a2 >= a and (s2 > s or a2 > a) for j, (s2, a2) in enumerate(points) if j != i)
        front.append(not dominated)
    return front


def int8_gates(rows: list[Row], cfg: BenchmarkConfig) -> None:
    """Each INT8 row against its FP32/FP16 sibling, and an optimized INT8 model against the plain one it came from.

    Flagged when slower beyond noise (the two ranges of rounds do not overlap, the median lower), or when it loses
    more than ``max_accuracy_drop`` points of top-1 against the sibling.
    """
    ref = str(cfg.reference_batch)
    by_path = {str(Path(r.path).resolve()): r for r in rows if not r.skipped}
    for row in rows:
        if row.precision != "int8" or row.skipped:
            continue
        siblings = [r for r in rows if r is not row and not r.skipped and r.precision in ("fp32", "fp16")
                    and r.source_onnx_sha256 and r.source_onnx_sha256 == row.source_onnx_sha256
                    and r.device == row.device]
        siblings.sort(key=lambda r: (r.backend != row.backend, r.precision != "fp32"))
        if not siblings:
            row.int8_gate = {"sibling": None, "flags": ["no FP32/FP16 sibling in this run: gate not checked"]}
            continue
        sib = siblings[0]
        gate: dict[str, Any] = {"sibling": sib.name}
        flags = []
        c = _speed_against(row, sib, ref)
        gate.update(speedup=c and c["ratio"], speedup_range=c and [c["ratio_low"], c["ratio_high"]],
                    speed_verdict=c and c["verdict"], drop_pt=drop_pt(sib, row))
        if c and c["verdict"] == "slower":
            flags.append(f"slower than its {sib.precision} sibling {sib.name} at batch {ref} "
                         f"({c['ratio']:.2f}x, {c['ratio_low']:.2f}-{c['ratio_high']:.2f} over the rounds)")
        if gate["drop_pt"] is not None and gate["drop_pt"] > cfg.max_accuracy_drop:
            flags.append(f"loses {gate['drop_pt']:.2f} pt top-1 against {sib.name} (budget "
                         f"{cfg.max_accuracy_drop:g} pt)")
        plain = by_path.get(direct_input(row) or "")
        if plain is not None and plain is not row and plain.precision == "int8" and plain.device == row.device:
            c = _speed_against(row, plain, ref)
            gate.update(plain=plain.name, vs_plain=c and c["ratio"], vs_plain_verdict=c and c["verdict"])
            if c and c["verdict"] == "slower":
                flags.append(f"slower than the plain INT8 model it was optimized from, {plain.name} "
                             f"({c['ratio']:.2f}x): use {plain.name}")
        gate.update(flags=flags, passed=not flags)
        row.int8_gate = gate


def drop_pt(base: Row, row: Row) -> float | None:
    """Top-1 points ``row`` loses against ``base`` (None when either has no accuracy figure).

    Rounded to 1e-6 pt: 10 of 1000 images is exactly 1.00 pt, not 1.0000000002 over a 1-pt budget.
    """
    return _drop(base.top1, row.top1)


def _drop(base_top1: float | None, top1: float | None) -> float | None:
    return round(100 * (base_top1 - top1), 6) if top1 is not None and base_top1 is not None else None


def _speed_against(row: Row, other: Row, ref: str) -> dict[str, Any] | None:
    """:func:`optimize.timing.compare` of two rows' throughput at batch ``ref`` (None when either is untimed)."""
    mine, theirs = throughput_spread(row, ref), throughput_spread(other, ref)
    return compare(mine, theirs) if mine and theirs else None


Ties = Literal["fastest", "accurate-within-noise", "accurate"]


@dataclass(frozen=True)
class Contender:
    """An artifact or a trial as :func:`fastest_within_budget` sees it.

    ``item`` is the caller's own (a :class:`Row`, a trial's figures), handed back untouched. ``top1`` None means no
    accuracy figure (a speed-only run): never over the budget. ``speed`` is higher when faster (img/s, or minus a
    latency); ``spread`` is the throughput over the rounds, what "within noise" compares.
    """

    item: Any
    top1: float | None
    speed: float
    spread: Spread | None


@dataclass(frozen=True)
class Pick:
    """What :func:`fastest_within_budget` chose, and from what."""

    chosen: Contender
    within: bool  # False: none keeps within the budget, and ``chosen`` is the most accurate of all
    ranked: list[Contender]  # those within the budget, fastest first (ties in the callers' order); empty if none

    @property
    def fastest(self) -> Contender | None:
        return self.ranked[0] if self.ranked else None


def fastest_within_budget(contenders: list[Contender], base_top1: float | None, max_drop: float, *,
                          ties: Ties = "fastest") -> Pick | None:
    """The fastest contender losing at most ``max_drop`` top-1 points against ``base_top1``; None if none.

    When none keeps within the budget, the most accurate is chosen (``within`` False). ``ties`` says what wins
    among those within the budget:

    - ``"fastest"``: the fastest by median, even when its lead is within noise (the benchmark report names the
      runner-up and whether the two can be told apart; it does not overrule the median).
    - ``"accurate-within-noise"``: the most accurate of those whose throughput range over the rounds overlaps the
      fastest's (``search``: a lead the rounds cannot tell from noise buys no accuracy).
    - ``"accurate"``: the most accurate of all within the budget (``search`` over the training options: one
      architecture, so speeds differ by noise only).

    Example: with the baseline at 90 % and a 1-pt budget, a 2,000 img/s model at 88 % is over the budget, so of
    ``A`` (1,000 img/s, 89.1 %) and ``B`` (990 img/s, 89.8 %, ranges overlapping A's) ``"fastest"`` picks A and
    ``"accurate-within-noise"`` picks B.
    """
    if ties not in get_args(Ties):
        raise ValueError(f"ties must be one of {', '.join(get_args(Ties))}, not {ties!r}")
    if not contenders:
        return None
    within = [c for c in contenders if (d := _drop(base_top1, c.top1)) is None or d <= max_drop]
    if not within:
        return Pick(max(contenders, key=lambda c: c.top1 or 0.0), within=False, ranked=[])
    ranked = sorted(within, key=lambda c: -c.speed)
    fastest = ranked[0]
    if ties == "fastest":
        tied = [fastest]
    elif ties == "accurate":
        tied = within
    else:
        tied = [c for c in within if c is fastest or (c.spread is not None and fastest.spread is not None
                                                      and c.spread.overlaps(fastest.spread))]
    return Pick(max(tied, key=lambda c: (c.top1 or 0.0, c.speed)), within=True, ranked=ranked)


def final_artifact(rows: list[Row], base: Row, cfg: BenchmarkConfig) -> dict[str, Any] | None:
    """The final artifact: the fastest (median at the reference batch) within the accuracy budget.

    Candidates are every artifact but the baseline measured on the report's device. When none keeps within the
    budget, the most accurate one is named (and the verdict fails). The runner-up within the budget is compared
    with it: "within noise" means this run cannot tell which of the two is faster.
    """
    ref = str(cfg.reference_batch)
    candidates = [Contender(r, r.top1, r.throughput[ref], throughput_spread(r, ref)) for r in rows
                  if r.role != "baseline" and not r.skipped and r.throughput.get(ref) and r.device == cfg.device]
    pick = fastest_within_budget(candidates, base.top1, cfg.max_accuracy_drop, ties="fastest")
    if pick is None:
        return None
    if not pick.within:
        why = f"none keeps within {cfg.max_accuracy_drop:g} pt of {base.name}: the most accurate"
    elif cfg.input_size:
        why = f"the fastest at batch {ref}"
    else:
        why = f"the fastest at batch {ref} within {cfg.max_accuracy_drop:g} pt of {base.name}'s top-1"
    out: dict[str, Any] = {"artifact": pick.chosen.item.name, "why": why, "runner_up": None}
    if len(pick.ranked) > 1:
        runner_up = pick.ranked[1]
        c = compare(pick.chosen.spread, runner_up.spread)
        out.update(runner_up=runner_up.item.name, vs_runner_up=c["ratio"], vs_runner_up_verdict=c["verdict"])
    return out


def verdicts(rows: list[Row], base: Row, final: dict[str, Any] | None, cfg: BenchmarkConfig) -> list[dict[str, Any]]:
    """The user's budgets (``min_speedup``, ``max_accuracy_drop``) checked on the final artifact and INT8 rows."""
    ref = str(cfg.reference_batch)
    found: list[dict[str, Any]] = []
    if final is not None and base.throughput.get(ref):
        row = next(r for r in rows if r.name == final["artifact"])
        drop = drop_pt(base, row)
        speedup = row.speedup.get(ref)
        met = speedup is not None and speedup >= cfg.min_speedup and (drop is None or drop <= cfg.max_accuracy_drop)
        found.append({"verdict": f"final artifact >= {cfg.min_speedup:g}x the baseline's throughput at batch {ref}"
                                    f" (median), <= {cfg.max_accuracy_drop:g} pt top-1 loss",
                         "artifact": row.name, "speedup": speedup, "speedup_range": row.speedup_range.get(ref),
                         "speed_verdict": row.speedup_verdict.get(ref), "drop_pt": drop,
                         "met": None if cfg.input_size else met})
    for row in rows:
        gate = row.int8_gate
        if not gate or not gate.get("sibling"):
            continue
        found.append({"verdict": f"INT8 no slower than its {gate['sibling']} beyond noise at batch {ref}, "
                                    f"<= {cfg.max_accuracy_drop:g} pt top-1 loss",
                         "artifact": row.name, "speedup": gate["speedup"], "speedup_range": gate["speedup_range"],
                         "speed_verdict": gate["speed_verdict"], "drop_pt": gate["drop_pt"],
                         "met": gate["passed"]})
    return found
