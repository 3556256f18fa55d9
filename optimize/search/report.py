"""The search's report: ``search.json`` (every trial), ``report.md``, ``pareto.png`` and ``best.yaml``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..artifacts import Artifact, atomic_path, write_json
from ..benchmark.gates import pareto_front
from .choose import choose
from ..configs import SearchConfig
from .space import write_recipe
from ..timing import cpu_facts, isa_summary

REPORT_JSON = "search.json"
REPORT_MD = "report.md"
BEST_YAML = "best.yaml"
PARETO_PNG = "pareto.png"


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
    write_recipe(path, best["recipe"], header)


def speed_text(value: float | None, cfg: SearchConfig) -> str:
    if value is None:
        return "—"
    if cfg.objective == "latency":
        return f"{value:.2f} ms p50 at batch 1"
    return f"{value:,.0f} img/s at batch {cfg.batch}"


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def render_markdown(report: dict[str, Any]) -> str:
    """report.md from search.json: the study, the chosen trial, the Pareto front and every trial."""
    cfg = SearchConfig(**{k: v for k, v in report["config"].items()})
    lines = _summary_lines(report, cfg) + _chosen_lines(report, cfg)
    trials, chosen = report["trials"], report.get("chosen")
    unit = "p50 ms b1" if cfg.objective == "latency" else f"img/s b{cfg.batch}"
    head = [f"| trial | state | top-1 | {unit} | size MB | MMACs | min | parameters / note |",
            "|---|---|---|---|---|---|---|---|"]
    front = [t for t in trials if t.get("pareto")]
    if front:
        lines += ["## Pareto front (no other trial is both faster and more accurate)", "", *head]
        lines += [_trial_row(t, chosen) for t in sorted(front, key=lambda t: -t["top1"])] + [""]
    lines += ["## Every trial", "", *head] + [_trial_row(t, chosen) for t in trials] + [""]
    if report.get("plots"):
        lines += [f"![Pareto front]({report['plots'][0]})", ""]
    return "\n".join(lines)


def _summary_lines(report: dict[str, Any], cfg: SearchConfig) -> list[str]:
    """What was searched where, how the trials ended, the budget and the machine."""
    base, trials = report["baseline"], report["trials"]
    counts = {s: sum(t["state"] == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    return [f"# edgeopt search: {cfg.space}, target {cfg.target}", "",
            f"Study `{report['study']}` in `{report['storage']}`: {counts['COMPLETE']} complete, "
            f"{counts['PRUNED']} stopped as hopeless, {counts['FAIL']} failed"
            + (f", {counts['RUNNING']} still running" if counts["RUNNING"] else "") + "."
            + (f" This process stopped at its --minutes {cfg.minutes:g} budget." if report.get("out_of_time") else ""),
            f"Budget: at most {cfg.max_accuracy_drop:g} top-1 points below the teacher "
            f"`{Path(base['artifact']).name}` ({base['top1']:.2%}, {speed_text(base['speed'], cfg)}).",
            f"Machine: {report['environment']['isa']}.", ""]


def _chosen_lines(report: dict[str, Any], cfg: SearchConfig) -> list[str]:
    """The chosen trial against the teacher, and why it and not the fastest by median."""
    base, trials, chosen = report["baseline"], report["trials"], report.get("chosen")
    if chosen is None:
        return ["No trial has finished yet.", ""]
    t = next(t for t in trials if t["number"] == chosen["number"])
    ratio = (t["speed"] / base["speed"] if cfg.objective == "throughput" else base["speed"] / t["speed"]) \
        if base.get("speed") else None
    verdict = "within the budget" if chosen["within"] else "**no trial is within the budget**: the most accurate"
    if chosen["within"] and chosen.get("fastest") not in (None, t["number"]):
        f = next(x for x in trials if x["number"] == chosen["fastest"])
        verdict += (f"; trial {f['number']} is faster by median ({speed_text(f['speed'], cfg)}, top-1 "
                    f"{f['top1']:.2%}) but its range overlaps this one's: within noise, so the more accurate")
    return ["## Chosen", "",
            f"Trial {t['number']} ({verdict}): top-1 {t['top1']:.2%} "
            f"({100 * (t['top1'] - base['top1']):+.2f} pt), {speed_text(t['speed'], cfg)}"
            + (f", {ratio:.1f}x the teacher" if ratio else "") + f"; `{t['artifact']}`.",
            f"Parameters: {_params_text(t['params'])}.",
            f"Recipe: `{BEST_YAML}`; reproduce with `{reproduce_command(cfg)}`.", ""]


def _trial_row(t: dict[str, Any], chosen: dict[str, Any] | None) -> str:
    """One trial as a row of the tables: marks (chosen, start, retry), figures, parameters and note."""
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

