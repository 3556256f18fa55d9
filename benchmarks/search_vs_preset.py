"""The search's chosen model against a pipeline preset's final artifact, side by side in one benchmark run.

    python -m benchmarks.search_vs_preset --search runs/search --preset-run runs/demo \\
        --command "python cli.py search ..."

Runs ``benchmark`` with the teacher as baseline and both artifacts as models (same rounds, interleaved), then
writes the ``search`` section of docs/RESULTS.md: the search's report as written, the side-by-side report, and
whether the chosen model beats the preset's: faster beyond noise at no more top-1 loss, or more accurate at no
less speed (not slower beyond noise).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.results_doc import write_section
from optimize.search.report import REPORT_JSON as SEARCH_JSON, REPORT_MD as SEARCH_MD
from optimize.benchmark import report
from optimize.timing import Spread, compare


def _row(rep: dict[str, Any], path: str) -> dict[str, Any]:
    return next(r for r in rep["rows"] if Path(r["path"]).resolve() == Path(path).resolve())


def verdict(chosen: dict[str, Any], preset: dict[str, Any], batch: str) -> tuple[bool, str]:
    """Whether ``chosen`` beats ``preset`` (report rows of one run) and the sentence that says why."""

    c = compare(*(Spread.from_dict(row["throughput_spread"][batch]) for row in (chosen, preset)))
    d_pt = 100 * (chosen["top1"] - preset["top1"])
    speed = (f"{c['ratio']:.2f}x its throughput at batch {batch} ({c['ratio_low']:.2f}-{c['ratio_high']:.2f}, "
             f"{c['verdict']})")
    if c["verdict"] == "faster" and d_pt >= 0:
        return True, f"beats it: faster at no more loss ({speed}; top-1 {d_pt:+.2f} pt)"
    if d_pt > 0 and c["verdict"] != "slower":
        return True, f"beats it: more accurate at no less speed (top-1 {d_pt:+.2f} pt; {speed})"
    return False, f"does not beat it (top-1 {d_pt:+.2f} pt; {speed})"


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search", type=Path, required=True, help="the search's --out folder")
    parser.add_argument("--preset-run", type=Path, required=True, help="the preset pipeline's --out folder")
    parser.add_argument("--command", required=True, help="the search command, quoted in the doc")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.4)
    parser.add_argument("--doc", type=Path, default=Path("docs/RESULTS.md"))
    parser.add_argument("--note", default="", help="a paragraph after the verdict")
    return parser.parse_args(argv)


@dataclass
class SideBySide:
    """The benchmark run of the preset's final artifact beside the search's chosen trial (and its peer)."""

    rep: dict[str, Any]  # the run's report manifest
    ok: bool  # the chosen trial, or the peer, beats the preset's final artifact
    sentence: str  # the chosen trial's verdict
    peer_line: str  # the peer's verdict ("" without a peer)


def _peer(found: dict[str, Any], chosen: dict[str, Any], preset_row: dict[str, Any]) -> dict[str, Any] | None:
    """The fastest trial more accurate than the preset's final (by the search's own figures), unless it is the
    chosen one: the chosen trial may trade accuracy for speed within the budget, this one can dominate the preset."""
    peers = [t for t in found["trials"] if t["state"] == "COMPLETE" and t["top1"] > preset_row["top1"]]
    peer = max(peers, key=lambda t: t["speed"]) if peers else None
    return None if peer is None or peer["number"] == chosen["number"] else peer


def _measure(args: argparse.Namespace, found: dict[str, Any], chosen: dict[str, Any], peer: dict[str, Any] | None,
             preset_final: str) -> SideBySide:
    """Benchmark the preset's final artifact, the chosen trial's and the peer's in one run under ``--search``
    ``/vs-preset``; the trials' artifacts are renamed there (their dicts' ``artifact`` now points at the link)."""
    out = args.search / "vs-preset"
    out.mkdir(parents=True, exist_ok=True)

    def named(trial: dict[str, Any]) -> str:
        """The trial's artifact under a name of its own (a report row is named by its file: 'model.onnx' twice)."""
        link = out / f"trial-{trial['number']}.{Path(trial['artifact']).name}"
        link.unlink(missing_ok=True)
        link.symlink_to(Path(trial["artifact"]).resolve())
        return str(link)

    chosen["artifact"] = named(chosen)
    if peer is not None:
        peer["artifact"] = named(peer)
    models = (preset_final, chosen["artifact"]) + ((peer["artifact"],) if peer else ())
    cfg = report.BenchmarkConfig(models=models, baseline=found["baseline"]["artifact"], out=str(out),
                                 batch_sizes=(1, 8, 32), rounds=args.rounds, seconds=args.seconds,
                                 max_accuracy_drop=found["config"]["max_accuracy_drop"], progress=False)
    rep = report.run(cfg).manifest
    ref = str(cfg.reference_batch)
    ok, sentence = verdict(_row(rep, chosen["artifact"]), _row(rep, preset_final), ref)
    peer_line = ""
    if peer is not None:
        peer_ok, peer_sentence = verdict(_row(rep, peer["artifact"]), _row(rep, preset_final), ref)
        ok = ok or peer_ok
        peer_line = (f"The fastest trial more accurate than the preset's final by the search's figures, trial "
                     f"{peer['number']} (`{Path(peer['artifact']).name}`), in the same run: {peer_sentence}.")
    return SideBySide(rep, ok, sentence, peer_line)


def section(args: argparse.Namespace, chosen: dict[str, Any], preset_final: str, measured: SideBySide) -> str:
    """The ``search`` section of docs/RESULTS.md: the verdicts, the side-by-side report, the search's report."""
    demote = lambda text: re.sub(r"^(#+) ", lambda m: "##" + m.group(1) + " ", text, flags=re.M)  # noqa: E731
    lines = ["## Search (`cli.py search`): the fastest model within 1 pt, against the standard preset", "",
             f"Made by `{args.command}`, then `python -m benchmarks.search_vs_preset --search {args.search} "
             f"--preset-run {args.preset_run}` for the side-by-side run.", "",
             f"**The chosen model (trial {chosen['number']}, `{Path(chosen['artifact']).name}`) against the standard "
             f"preset's final artifact (`{Path(preset_final).name}`), measured in one benchmark run: "
             f"{measured.sentence}.**", ""] + ([measured.peer_line, ""] if measured.peer_line else []) + [
             f"Beats the preset's final artifact (faster at no more loss, or more accurate at no less speed): "
             f"**{'MET' if measured.ok else 'NOT MET'}**.", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["### The side-by-side run", "", demote(report.render_markdown(measured.rep)).rstrip(), "",
              "### The search's report", "",
              demote("\n".join(ln for ln in (args.search / SEARCH_MD).read_text().splitlines()
                               if not ln.startswith("!["))).rstrip()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    found = json.loads((args.search / SEARCH_JSON).read_text())
    chosen = next(t for t in found["trials"] if t["number"] == found["chosen"]["number"])
    preset_report = json.loads((report.report_folder(args.preset_run) / report.REPORT_JSON).read_text())
    preset_row = next(r for r in preset_report["rows"] if r["name"] == preset_report["final"]["artifact"])
    peer = _peer(found, chosen, preset_row)
    measured = _measure(args, found, chosen, peer, preset_row["path"])
    write_section(args.doc, "search", section(args, chosen, preset_row["path"], measured))
    logging.getLogger("benchmarks.search_vs_preset").info("%s; wrote section 'search' of %s", measured.sentence,
                                                          args.doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
