"""Put a pipeline run's reports into docs/RESULTS.md (its own marked section), with the command that made it.

    python -m benchmarks.publish runs/demo --command "make demo"

The section holds each stage's wall time from ``pipeline.json``, then ``report/report.md`` and every
``report-<size>/report.md`` as written (headings demoted one level), so the committed figures are exactly the
measured ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from benchmarks.results_doc import write_section
from optimize.benchmark.report import REPORT_FOLDER, REPORT_MD, report_folder


def section(run_dir: Path, command: str, note: str = "") -> str:
    """The Markdown of one pipeline run: command, stage times, reports."""
    state = json.loads((run_dir / "pipeline.json").read_text())
    steps = state["steps"]
    total = sum(s.get("seconds", 0) for s in steps.values())
    lines = ["## Pipeline run (`pipeline`, the whole chain on this machine)", "",
             f"Made by `{command}`; stage wall times (this machine, {total / 60:.1f} min in all):", "",
             "| step | seconds |", "| --- | ---: |"]
    lines += [f"| {name} | {s.get('seconds', 0):.0f} |" for name, s in steps.items()]
    if note:
        lines += ["", note]
    for report in [report_folder(run_dir) / REPORT_MD, *sorted(run_dir.glob(f"{REPORT_FOLDER}-*/{REPORT_MD}"))]:
        text = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", report.read_text(), flags=re.M)
        lines += ["", text.rstrip()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the pipeline's --out folder")
    parser.add_argument("--command", required=True, help="the command that made the run, quoted in the doc")
    parser.add_argument("--doc", type=Path, default=Path("docs/RESULTS.md"))
    parser.add_argument("--name", default="pipeline", help="section marker name")
    parser.add_argument("--note", default="", help="a paragraph to put after the stage times (what to read from it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_section(args.doc, args.name, section(args.run_dir, args.command, args.note))
    logging.getLogger("benchmarks.publish").info("wrote section '%s' of %s", args.name, args.doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
