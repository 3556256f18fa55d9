"""What ``benchmark`` concludes from the figures, every threshold one of the user's options.

- the Pareto front over (throughput at the reference batch, top-1);
- the INT8 gate: each INT8 artifact against its FP32/FP16 sibling (slower beyond noise, or more than
  ``max_accuracy_drop`` points of top-1 lost, flags it) and an optimized INT8 model against the plain one;
- the final artifact: the fastest within ``max_accuracy_drop`` of the baseline's top-1;
- the verdicts: the final artifact against ``min_speedup`` and ``max_accuracy_drop``, and each INT8 gate.

No number here is a constant: the budgets are :class:`~optimize.configs.BenchmarkConfig`'s ``min_speedup`` and
``max_accuracy_drop`` (``--min-speedup``, ``--max-accuracy-drop``, a recipe's benchmark stage), and "faster" means
faster in every round (:func:`optimize.timing.compare`), not by a fixed margin.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimize.timing import compare

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
    return round(100 * (base.top1 - row.top1), 6) if row.top1 is not None and base.top1 is not None else None


def _speed_against(row: Row, other: Row, ref: str) -> dict[str, Any] | None:
    """:func:`optimize.timing.compare` of two rows' throughput at batch ``ref`` (None when either is untimed)."""
    mine, theirs = throughput_spread(row, ref), throughput_spread(other, ref)
    return compare(mine, theirs) if mine and theirs else None


def final_artifact(rows: list[Row], base: Row, cfg: BenchmarkConfig) -> dict[str, Any] | None:
    """The final artifact: the fastest (median at the reference batch) within the accuracy budget.

    Candidates are every artifact but the baseline measured on the report's device. When none keeps within the
    budget, the most accurate one is named (and the verdict fails). The runner-up within the budget is compared
    with it: "within noise" means this run cannot tell which of the two is faster.
    """
    ref = str(cfg.reference_batch)
    candidates = [r for r in rows if r.role != "baseline" and not r.skipped and r.throughput.get(ref)
                  and r.device == cfg.device]
    if not candidates:
        return None
    within = [r for r in candidates if (d := drop_pt(base, r)) is None or d <= cfg.max_accuracy_drop]
    if within:
        ranked = sorted(within, key=lambda r: -r.throughput[ref])
        final, why = ranked[0], (f"the fastest at batch {ref} within {cfg.max_accuracy_drop:g} pt of "
                                 f"{base.name}'s top-1" if not cfg.input_size else f"the fastest at batch {ref}")
    else:
        ranked = sorted(candidates, key=lambda r: -(r.top1 or 0))
        final, why = ranked[0], f"none keeps within {cfg.max_accuracy_drop:g} pt of {base.name}: the most accurate"
    out: dict[str, Any] = {"artifact": final.name, "why": why, "runner_up": None}
    if len(ranked) > 1 and within:
        c = compare(throughput_spread(final, ref), throughput_spread(ranked[1], ref))
        out.update(runner_up=ranked[1].name, vs_runner_up=c["ratio"], vs_runner_up_verdict=c["verdict"])
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
