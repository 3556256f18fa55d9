"""How ``benchmark`` shows its report: Markdown tables and two plots, drawn from report.json alone.

Everything here reads the report dictionary ``benchmark`` writes as report.json (and returns as its manifest), so
a report can be redrawn from the file without measuring again, and other reports (``search_vs_preset``) embed it.
The Markdown is a list of sections (:data:`_SECTIONS`), one function each, in the order they print; a section with
nothing to show returns no lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimize.artifacts import atomic_path
from optimize.timing import NOISE_FLOOR, isa_summary

PLOT_PARETO, PLOT_LATENCY = "accuracy_vs_throughput.png", "latency_vs_batch.png"


@dataclass(frozen=True)
class _View:
    """The report and what several sections derive from it, worked out once.

    Attributes:
        report: the report dictionary (report.json).
        sizes: the batch sizes as the report's keys (strings), ascending.
        ref: the reference batch size, the one speedups and gates compare at.
        speed_only: random inputs at a fixed size (``--input-size``): no accuracy columns or sections.
    """

    report: dict[str, Any]
    sizes: list[str]
    ref: str
    speed_only: bool

    @classmethod
    def of(cls, report: dict[str, Any]) -> _View:
        cfg = report["config"]
        return cls(report, [str(b) for b in sorted(cfg["batch_sizes"])], str(report["reference_batch"]),
                   cfg["input_size"] is not None)

    @property
    def cfg(self) -> dict[str, Any]:
        return self.report["config"]


def _fmt(value: float | None, spec: str, missing: str = "—") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _with_spread(value: float | None, spread: dict[str, Any] | None) -> str:
    """``20004 ±812``: the median and half the range of the rounds."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if not spread or len(spread.get("rounds", [])) < 2:
        return f"{value:.0f}"
    return f"{value:.0f} ±{(spread['high'] - spread['low']) / 2:.0f}"


def _range(bounds: list[float] | None) -> str:
    return f"{bounds[0]:.2f}-{bounds[1]:.2f} over the rounds" if bounds else "no range"


def _neg(value: float | None) -> float | None:
    return None if value is None else -value


def _peak_text(peak: dict[str, Any] | None) -> str:
    if not peak:
        return "not measured"
    rates = ", ".join(f"{k.upper()} {v:,.1f}" for k, v in peak["gmacs_per_s"].items())
    m, k, n = peak["shape_mkn"]
    threads = f", {peak['threads']} threads" if peak.get("threads") else ""
    return f"{rates} GMAC/s ({m}x{k}x{n} matrix products through {peak['library']}{threads})"


def _title(v: _View) -> list[str]:
    """The heading and how the run measured: baseline, rounds, windows, warm-ups, what the ± means."""
    cfg = v.cfg
    title = (f"at {cfg['input_size']}x{cfg['input_size']} (speed only, random inputs)" if v.speed_only
             else "on the val split")
    return [f"# edgeopt benchmark {title}", "",
            f"Baseline: **{v.report['baseline']}**; speedups are against it at the same batch size, measured in this "
            "run. "
            f"{cfg['rounds']} rounds; in each, every artifact takes its turn for a {cfg['seconds']:g} s window per "
            f"batch size (order rotated each round; {cfg['warmup']} warm-up runs before the first). Figures are "
            "medians over the rounds, ± half the range between the slowest and fastest round; a speedup whose "
            f"range overlaps the baseline's, or comes within {NOISE_FLOOR:.0%} of it, is marked *within noise*. "
            "Inputs preallocated (device memory on CUDA, synchronised).", ""]


def _table(v: _View) -> list[str]:
    """One row per measured artifact (accuracy columns unless speed-only), then the ones not measured and why."""
    head = ["model", "backend", "precision", "size MB", "params M", "MACs M", "sparsity"]
    if not v.speed_only:
        head += ["top-1", "top-5", "agree"]
    head += ["b1 p50/p90/p99 ms"] + [f"img/s b{b}" for b in v.sizes] + [f"speedup b{v.ref}"]
    if not v.speed_only:
        head += ["e2e img/s", "Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * 3 + [" ---: "] * (len(head) - 3)) + "|"]
    lines += ["| " + " | ".join(_row_cells(v, r)) + " |" for r in v.report["rows"] if not r["skipped"]]
    skipped = [f"- {r['name']}: {r['skipped']}" for r in v.report["rows"] if r["skipped"]]
    return lines + (["", "Not measured:", *skipped] if skipped else [])


def _row_cells(v: _View, r: dict[str, Any]) -> list[str]:
    """A measured row's cells, in the order :func:`_table` heads them."""
    cells = [r["name"] + (" (baseline)" if r["role"] == "baseline" else ""),
             r["backend"] + (f" {r['device']}" if r["device"] != "cpu" else ""), r["precision"],
             _fmt(r["file_bytes"] / 1e6, ".2f"), _fmt(r["params"] / 1e6 if r["params"] else None, ".2f"),
             _fmt(r["macs"] / 1e6 if r["macs"] else None, ".1f"), _fmt(r["sparsity"], ".1%")]
    if not v.speed_only:
        cells += [_fmt(r["top1"], ".2%"), _fmt(r["top5"], ".2%"), _fmt(r["agreement"], ".1%")]
    lat = r["latency_ms_b1"]
    cells.append(f"{lat['p50']:.2f}/{lat['p90']:.2f}/{lat['p99']:.2f}" if lat else "—")
    cells += [_with_spread(r["throughput"].get(b), (r.get("throughput_spread") or {}).get(b)) for b in v.sizes]
    flag = " ⚠" if r["int8_gate"] and r["int8_gate"]["flags"] else ""
    noise = " *within noise*" if (r.get("speedup_verdict") or {}).get(v.ref) == "within noise" else ""
    speedup = r["speedup"].get(v.ref)
    cells.append(_fmt(speedup, ".2f", "—") + ("x" if speedup else "") + noise + flag)
    if not v.speed_only:
        cells += [_with_spread(r["e2e_img_per_s"], r.get("e2e_spread")), "yes" if r["pareto"] else ""]
    return cells


def _gates(v: _View) -> list[str]:
    """Each INT8 row against its float sibling (and the plain INT8 build it refines, if any): passed or why not."""
    gated = [r for r in v.report["rows"] if r["int8_gate"]]
    if not gated:
        return []
    lines = ["", f"## INT8 gate (flagged when slower than its FP32/FP16 sibling at batch {v.ref} beyond noise, or "
                 f"more than {v.cfg['max_accuracy_drop']:g} pt less top-1)", ""]
    for r in gated:
        g = r["int8_gate"]
        if not g.get("sibling"):
            lines.append(f"- {r['name']}: {g['flags'][0]}")
            continue
        verdict = "FLAGGED: " + "; ".join(g["flags"]) if g["flags"] else "passed"
        plain = (f"; vs the plain INT8 {g['plain']}: {_fmt(g.get('vs_plain'), '.2f')}x "
                 f"({g.get('vs_plain_verdict') or 'not timed'})" if g.get("plain") else "")
        top1 = f", top-1 {_neg(g['drop_pt']):+.2f} pt" if g.get("drop_pt") is not None else ""
        lines.append(f"- {r['name']} vs {g['sibling']}: {_fmt(g['speedup'], '.2f')}x "
                     f"({_range(g.get('speedup_range'))}, {g.get('speed_verdict') or 'not timed'}){top1}{plain}: "
                     f"{verdict}")
    return lines


def _peak(v: _View) -> list[str]:
    """Each row's multiply-accumulates per second against the machine's peak for its arithmetic."""
    peak = v.report["environment"].get("peak")
    rows = [r for r in v.report["rows"] if not r["skipped"] and r.get("gmacs_per_s")]
    if not rows:
        return []
    lines = ["", "## Against this machine's peak", "",
             f"Achieved GMAC/s (MACs per image x img/s) and the fraction of the peak for the row's arithmetic "
             f"({_peak_text(peak)}; INT8 rows against the INT8 peak, the others against their float's).", "",
             "| model | precision | MACs M | " + " | ".join(f"GMAC/s b{b} (of peak)" for b in v.sizes) + " |",
             "| --- | --- | ---: |" + " ---: |" * len(v.sizes)]
    for r in rows:
        cells = []
        for b in v.sizes:
            g, f = r["gmacs_per_s"].get(b), (r.get("peak_fraction") or {}).get(b)
            cells.append("—" if g is None else f"{g:,.1f}" + (f" ({f:.1%})" if f is not None else ""))
        lines.append(f"| {r['name']} | {r['precision']} | {r['macs'] / 1e6:.1f} | " + " | ".join(cells) + " |")
    return lines


def _pruning(v: _View) -> list[str]:
    """Top-1 along each pruned checkpoint's way (before, pruned, BatchNorm re-estimated, fine-tuned)."""
    lines: list[str] = []
    for p in v.report.get("pruning") or []:
        lines += ["", f"## Pruning of {p['model']} ({p['method']} {_fmt(p['amount'], 'g')}, "
                      f"{_fmt(p['macs_ratio'], '.2f')}x fewer MACs)", "",
                  f"- top-1 before pruning {_fmt(p['top1_before'], '.2%')}; right after pruning "
                  f"{_fmt(p['top1_pruned'], '.2%')}; before any fine-tuning, BatchNorm statistics re-estimated "
                  f"{_fmt(p.get('top1_before_finetune'), '.2%')}; after fine-tuning {_fmt(p['top1_after'], '.2%')} "
                  "(the checkpoint's manifest, on its own val split)"]
    return lines


def _device(v: _View) -> list[str]:
    """The rows measured on other machines (``runner.py --check``): the same speed columns, the machine named."""
    rows = v.report.get("device_rows") or []
    if not rows:
        return []
    lines = ["", "## Measured on other machines (runner.py --check)", "",
             f"Top-1 on each bundle's acceptance set (its images, not this report's val split) beside the host's on "
             f"the same set; speed on that machine, copies to and from the device included; speedups divide its "
             f"images/s by this report's baseline ({v.report['baseline']}) on this machine: **cross-machine**.", "",
             "| model @ machine | backend | precision | images | top-1 (set) | host top-1 (set) | agree with host | "
             "b1 p50/p99 ms | " + " | ".join(f"img/s b{b}" for b in v.sizes)
             + f" | cross-machine speedup b{v.ref} | check |",
             "|" + "|".join([" --- "] * 3 + [" ---: "] * (6 + len(v.sizes)) + [" --- "]) + "|"]
    for r in rows:
        lat = r.get("latency_ms_b1")
        verdict = r.get("verdict") or {}
        cells = [r["name"], r["backend"] or "—", r["precision"] or "—", str(r["images"]), _fmt(r["top1"], ".2%"),
                 _fmt(r["host_top1"], ".2%"), _fmt(r["agreement_with_host"], ".2%"),
                 f"{lat['p50']:.2f}/{lat['p99']:.2f}" if lat else "—"]
        cells += [_with_spread(r["throughput"].get(b), _as_spread(r["throughput_spread"].get(b))) for b in v.sizes]
        speedup = r["speedup_cross_machine"].get(v.ref)
        cells += [_fmt(speedup, ".2f") + ("x" if speedup else ""),
                  "passed" if verdict.get("passed") else "FAILED: " + "; ".join(verdict.get("problems", []))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _as_spread(t: dict[str, float] | None) -> dict[str, Any] | None:
    """A device check's ``{median, low, high}`` in the form :func:`_with_spread` reads."""
    return None if not t else {"low": t["low"], "high": t["high"], "rounds": [t["low"], t["high"]]}


def _per_class(v: _View) -> list[str]:
    """Precision, recall and F1 per class of the final artifact, when its row carries them."""
    final = (v.report.get("final") or {}).get("artifact")
    row = next((r for r in v.report["rows"] if r["name"] == final and r.get("classification")), None)
    if not row:
        return []
    c = row["classification"]
    return ["", f"## Per-class metrics of the final artifact ({final})", "",
            f"Macro precision {c['macro_precision']:.2%}, recall {c['macro_recall']:.2%}, F1 "
            f"{c['macro_f1']:.2%}; F1 weighted by support {c['weighted_f1']:.2%}.", "",
            "| class | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |",
            *(f"| {name} | {k['precision']:.2%} | {k['recall']:.2%} | {k['f1']:.2%} | {k['support']} |"
              for name, k in c["per_class"].items())]


def _final(v: _View) -> list[str]:
    """Which artifact the run chose and why, and whether it beat the runner-up beyond noise."""
    f = v.report.get("final")
    if not f:
        return []
    why = f"**{f['artifact']}**: {f['why']}."
    if f.get("runner_up"):
        why += (f" Against the runner-up {f['runner_up']}: {f['vs_runner_up']:.2f}x, "
                + ("*within noise* (this run cannot rank the two)" if f["vs_runner_up_verdict"] ==
                   "within noise" else f"{f['vs_runner_up_verdict']} in every round") + ".")
    return ["", "## Final artifact", "", why]


def _verdicts(v: _View) -> list[str]:
    """Each budget (``--min-speedup``, ``--max-accuracy-drop``) met or not, with the artifact that decides it."""
    if not v.report.get("verdicts"):
        return []
    lines = ["", f"## Verdicts (budgets: --min-speedup {v.cfg['min_speedup']:g}, --max-accuracy-drop "
                 f"{v.cfg['max_accuracy_drop']:g})", ""]
    for g in v.report["verdicts"]:
        state = {True: "MET", False: "NOT MET", None: "speed only (accuracy not measured)"}[g["met"]]
        lines.append(f"- {g['verdict']}: **{state}** ({g['artifact']}: {_fmt(g['speedup'], '.2f')}x, "
                     f"{_range(g.get('speedup_range'))}"
                     + (f", {g['speed_verdict']}" if g.get("speed_verdict") == "within noise" else "")
                     + (f", top-1 {_neg(g['drop_pt']):+.2f} pt)" if g["drop_pt"] is not None else ")"))
    return lines


def _environment(v: _View) -> list[str]:
    """The machine and software the figures belong to, then the plots' file names."""
    env = v.report["environment"]
    lines = ["", "## Environment", "",
             f"- CPU: {env['cpu']} ({env['cpu_cores']} cores); instruction sets: "
             f"{isa_summary(env) if 'isa' in env else 'not recorded'}",
             f"- threads: {env['threads']} for every CPU backend (ONNX Runtime intra-op {env['threads']}, inter-op 1;"
             f" PyTorch {env['threads']})",
             f"- GPU: {env['gpu'] or 'none'}" + (f", driver {env['driver']}" if env.get("driver") else "")
             + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
             + (f", cuDNN {env['cudnn']}" if env.get("cudnn") else "")
             + (f", TensorRT {env['tensorrt']}" if env.get("tensorrt") else ""),
             "- libraries: " + ", ".join(f"{name} {version}" for name, version in env["versions"].items()),
             f"- ONNX Runtime providers: {', '.join(env.get('onnxruntime_providers', []))}",
             f"- OpenVINO: {env.get('openvino') or 'not recorded'}",
             f"- peak: {_peak_text(env.get('peak'))}",
             f"- date: {env['date']}; {env['platform']}"]
    return lines + (["", "Plots: " + ", ".join(v.report["plots"])] if v.report.get("plots") else [])


def _on_the_device(v: _View) -> list[str]:
    """How to prove the final artifact on the target device and fold its rows back into this report."""
    if v.speed_only or not v.report.get("final"):
        return []
    return ["", "## On the device", "",
            f"Prove there what this report measured here: `python cli.py package --model "
            f"{v.report['final']['artifact']} --out dist/bundle` (with its acceptance set), copy the bundle, run "
            "`python runner.py --check` on the device (`./build_engine.sh` runs it after each engine it builds), "
            "then `python cli.py benchmark --out <this folder> --device-results check.json` adds its rows to "
            "this report."]


_SECTIONS: tuple[Callable[[_View], list[str]], ...] = (
    _title, _table, _gates, _peak, _pruning, _device, _per_class, _final, _verdicts, _environment, _on_the_device)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (pipe tables read fine in a terminal): each section of :data:`_SECTIONS`."""
    view = _View.of(report)
    return "\n".join(line for section in _SECTIONS for line in section(view)) + "\n"


def plots(report: dict[str, Any], out: Path) -> list[Path]:
    """Accuracy (or MACs, speed-only) against throughput with the Pareto front, and latency against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, ref = report["config"], str(report["reference_batch"])
    measured = [r for r in report["rows"] if not r["skipped"] and r["throughput"]]
    pts = [r for r in measured if r["throughput"].get(ref)]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    if cfg["input_size"]:  # no accuracy: MACs against speed instead
        for k, r in enumerate(pts):
            ax.scatter(r["throughput"][ref], (r["macs"] or 0) / 1e6, s=30)
            ax.annotate(r["name"], (r["throughput"][ref], (r["macs"] or 0) / 1e6), fontsize=7,
                        xytext=(3, 3 - 9 * (k % 3)), textcoords="offset points")  # staggered: one model's overlap
        ax.set_ylabel("MACs per image (M)")
        ax.set_title(f"speed at {cfg['input_size']}px (random inputs)", fontsize=9)
    else:
        for k, r in enumerate(pts):
            ax.scatter(r["throughput"][ref], 100 * (r["top1"] or 0), s=40 if r["pareto"] else 20,
                       marker="*" if r["pareto"] else "o", color="tab:red" if r["pareto"] else "tab:blue")
            ax.annotate(r["name"], (r["throughput"][ref], 100 * (r["top1"] or 0)), fontsize=7,
                        xytext=(3, 3 - 9 * (k % 3)), textcoords="offset points")
        front = sorted((r for r in pts if r["pareto"]), key=lambda r: r["throughput"][ref])
        if len(front) > 1:
            ax.plot([r["throughput"][ref] for r in front], [100 * (r["top1"] or 0) for r in front], "--",
                    color="tab:red", label="Pareto front")
            ax.legend(fontsize=8)
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"accuracy vs throughput at batch {ref} ({cfg['device']})", fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel(f"images/s at batch {ref} (log)")
    written = [_save(fig, out / PLOT_PARETO)]

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for r in measured:
        bs = sorted(int(b) for b in r["latency_ms"])
        ax.plot(bs, [r["latency_ms"][str(b)] for b in bs], marker="o", label=r["name"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency per batch, p50 (ms)")
    size = f", {cfg['input_size']}px" if cfg["input_size"] else ""
    ax.set_title(f"latency vs batch size ({cfg['device']}{size})", fontsize=9)
    ax.legend(fontsize=7)
    written.append(_save(fig, out / PLOT_LATENCY))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
