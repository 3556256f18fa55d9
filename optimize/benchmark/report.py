"""Stage ``benchmark``: what each artifact bought against the baseline, measured in one run.

For every artifact (and the baseline, usually the teacher checkpoint) on the device asked for: backend, precision,
file size, params, MACs, sparsity, top-1 / top-5 on the val split, agreement with the baseline's predictions,
latency p50/p90/p99 at batch 1, throughput at each batch size, speedup against the baseline at the same batch
size, and an end-to-end figure that includes preprocessing. The runners (:mod:`optimize.runners`) share one
face, so every backend is timed by the same loop: the input is prepared once (device memory on CUDA, where each
run is synchronised), a few warm-up runs, then ``rounds`` rounds in which every artifact takes its turn for one
window per batch size (:mod:`optimize.timing`). Each speed figure is the median over the rounds with the
slowest and fastest round beside it; a speedup whose two ranges overlap (or come within
:data:`optimize.timing.NOISE_FLOOR` of each other) is "within noise". The final artifact
and every "A beats B" statement (INT8 gate, verdicts) are read from those medians, against the user's budgets
(``max_accuracy_drop``, ``min_speedup``).

``input_size`` benchmarks speed only at another resolution (224 for photos): PyTorch models run as they are (a
ResNet's global pooling takes any size) and ONNX models get their input dims rewritten in a temporary copy;
the weights are the trained ones but the inputs are random, so no accuracy is reported. TensorRT engines are
fixed at their built size and are skipped there.

``device`` is resolved once (:func:`optimize.device.resolve_for`: ``auto`` is CUDA when every listed artifact
can run there);
an ONNX model on a CUDA that ONNX Runtime cannot use is an error, never a quiet CPU row.

Output (``out`` folder): ``report.json`` (every raw figure), ``report.md`` (tables that read in a terminal too),
``accuracy_vs_throughput.png`` (Pareto front marked) and ``latency_vs_batch.png``.

The stage is three jobs, one module each: :mod:`optimize.benchmark.measure` (open, score and time the artifacts),
:mod:`optimize.benchmark.gates` (Pareto front, INT8 gate, final artifact, verdicts against the budgets) and
:mod:`optimize.benchmark.render` (Markdown and plots from report.json). This module runs them in order and writes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

from optimize.artifacts import Artifact, atomic_path, prepare_output, resolve_data, write_json
from optimize.configs import FASHION_MNIST, BenchmarkConfig
from optimize.device import resolve_for
from optimize.errors import ConfigError, DataError
from optimize.peak import measure_peak
from optimize.runners import RunnerError, backend_of, default_threads

from . import device_rows, gates, measure, render
from .gates import pareto_front
from .measure import Row, cpu_name, onnx_graph_stats
from .render import PLOT_LATENCY, PLOT_PARETO, render_markdown

__all__ = ["BenchmarkConfig", "PLOT_LATENCY", "PLOT_PARETO", "REPORT_FOLDER", "REPORT_JSON", "REPORT_MD", "Row",
           "cpu_name", "onnx_graph_stats", "pareto_front", "render_markdown", "report_folder", "run"]

logger = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD = "report.json", "report.md"
REPORT_FOLDER = "report"


def report_folder(run: Path, input_size: int | None = None) -> Path:
    """Where a pipeline run in the folder ``run`` keeps its benchmark report: ``report/``, or ``report-<size>/``
    for the speed-only one at another input size. The pipeline writes there; ``search`` and ``cli.py`` read it."""
    return Path(run) / (REPORT_FOLDER if input_size is None else f"{REPORT_FOLDER}-{input_size}")


def redraw_with_devices(out: Path, checks: tuple[str, ...]) -> Artifact:
    """The report already in ``out`` with the rows of these device checks added (:mod:`optimize.benchmark.device_rows`),
    written again; nothing is measured here."""
    try:
        report = json.loads((out / REPORT_JSON).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--device-results without --models adds rows to the report in --out, and "
                          f"{out / REPORT_JSON} is not readable ({e}); point --out at a benchmark's folder "
                          "(runs/demo/report)") from e
    device_rows.add(report, checks)
    write_json(out / REPORT_JSON, report)
    with atomic_path(out / REPORT_MD) as tmp_md:
        tmp_md.write_text(render_markdown(report))
    return Artifact(out / REPORT_JSON, report)


def run(cfg: BenchmarkConfig) -> Artifact:
    """Benchmark every artifact of ``cfg`` and write the report; returns report.json with the report as manifest.

    Raises:
        DeviceError: ``cfg.device`` cannot run here (no CUDA device; an ONNX model and no CUDA ONNX Runtime).
        RunnerError: the baseline could not run.
    """
    out = Path(cfg.out)
    if cfg.device_results and not (cfg.models or cfg.baseline):
        return redraw_with_devices(out, cfg.device_results)
    prepare_output(out / REPORT_JSON)
    # one device for every row: auto is CUDA only where all the listed artifacts can run on it
    cfg = replace(cfg, device=resolve_for(cfg.device, [backend_of(p) for p in (cfg.baseline, *cfg.models) if p]))
    threads = cfg.threads or default_threads()
    jobs = measure.entries(cfg)
    try:
        cfg = replace(cfg, data=resolve_data(cfg.data, jobs[0][0]))
    except DataError:
        if not cfg.input_size:
            raise
        cfg = replace(cfg, data=FASHION_MNIST)  # speed only: the data names a default preprocessing at most
    rows = measure.measure(cfg, jobs, threads)
    base = next((r for r in rows if r.role == "baseline" and not r.skipped), None)
    if base is None:
        raise RunnerError(f"the baseline {jobs[0][0]} could not run: {rows[0].skipped}")
    measure.add_speedups(rows, base)
    # the machine's own limit, once per run, after the rounds (a few seconds; never while they run)
    peak = measure_peak(cfg.device, threads, seconds=max(2 * cfg.seconds, 0.2))
    measure.add_efficiency(rows, peak)
    decided = gates.judge(rows, base, cfg)
    environment = {**measure.environment(threads, cfg.device), "peak": peak.as_dict() if peak else None}
    report = {"format": "edgeopt-benchmark", "version": 2, "config": asdict(cfg),
              "environment": environment, "reference_batch": cfg.reference_batch,
              "baseline": base.name, "rows": [asdict(r) for r in rows], **decided,
              "pruning": measure.pruning_records(jobs)}
    if cfg.device_results:
        device_rows.add(report, cfg.device_results)
    report["plots"] = [p.name for p in render.plots(report, out)]
    write_json(out / REPORT_JSON, report)
    with atomic_path(out / REPORT_MD) as tmp_md:
        tmp_md.write_text(render_markdown(report))
    return Artifact(out / REPORT_JSON, report)
