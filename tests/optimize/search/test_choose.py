"""The trial the study keeps (optimize/search/choose.py), on trial rows made by hand."""

from __future__ import annotations

from dataclasses import replace

from optimize import search
from optimize.timing import Spread


def test_choose_takes_the_most_accurate_trial_within_noise_of_the_fastest(tmp_path):
    """The rule of the benchmark's final artifact, with the tie-break for accuracy: the trial the study keeps."""

    def trial(number: int, top1: float, speed: float) -> dict:
        return {"number": number, "top1": top1, "speed": speed,
                "spread": Spread.of([speed * 0.99, speed, speed * 1.01]).to_dict()}

    baseline = {"top1": 0.90}
    cfg = search.SearchConfig(teacher=str(tmp_path / "t.pth"), out=str(tmp_path), max_accuracy_drop=1.0)
    over, lead, close, far = trial(0, 0.885, 2000.0), trial(1, 0.892, 1000.0), trial(2, 0.898, 995.0), trial(
        3, 0.899, 800.0)
    # (a) trial 0 is the fastest but 1.5 pt down; (b) 1 leads 2 by noise only: the more accurate 2 is kept
    assert search.choose([over, lead, close, far], baseline, cfg) == {**close, "within": True, "fastest": 1}
    assert search.choose([over, lead, far], baseline, cfg) == {**lead, "within": True, "fastest": 1}
    # searching the training options: one architecture, so every speed is a tie and the most accurate wins
    assert search.choose([over, lead, close, far], baseline, replace(cfg, space="training"))["number"] == 3
    # latency: lower is faster
    fast, slow = trial(4, 0.892, 2.0), trial(5, 0.898, 2.01)
    latency = replace(cfg, objective="latency")
    assert search.choose([fast, slow, trial(6, 0.899, 3.0)], baseline, latency) == {**slow, "within": True,
                                                                                      "fastest": 4}
    # (c) none within the budget: the most accurate, said so
    assert search.choose([over, trial(7, 0.87, 5000.0)], baseline, cfg) == {**over, "within": False,
                                                                            "fastest": None}
    assert search.choose([], baseline, cfg) is None
