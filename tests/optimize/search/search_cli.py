"""How the search tests start ``cli.py search``: tiny on purpose (not a test module; the files beside it import it).

The session's 16-px ResNet-18 serves as teacher and student, 256 training / 128 val images, one timing round of
0.05 s. The figures mean nothing; the study's bookkeeping (resume, sharing, the report) is the point.
"""

from __future__ import annotations

from pathlib import Path

FAST = ["--preset", "quick", "--train-limit", "256", "--val-limit", "128", "--rounds", "1", "--seconds", "0.05",
        "--max-accuracy-drop", "50"]


def search_args(teacher: Path, out: Path, trials: int, *extra: str) -> list[str]:
    return ["search", "--teacher", str(teacher), "--student", str(teacher), "--out", str(out), "--trials", str(trials),
            *FAST, *extra]
