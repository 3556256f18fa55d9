"""Speed figures a reader can trust: repeated rounds, candidates interleaved, a median with its spread.

One timed window per figure on a shared machine cannot tell 10% apart: a neighbour's job, a frequency change or
the page cache moves a 2-second window by more than that, and it moves whichever model happened to be timed then.
So every speed figure edgeopt compares (``benchmark``, ``build-engine --backend onnxruntime`` keeping the faster
file) is measured here the same way:

- each candidate is prepared once (input in place, ``warmup`` untimed runs);
- then ``rounds`` rounds; in each, every candidate gets one window of ``seconds``, the candidates taking turns in
  an order rotated by one each round, so drift of the machine hits all of them alike;
- a figure is the median over the rounds, its spread the lowest and highest round (:class:`Spread`);
- two figures are "within noise" of each other when their ranges overlap (neither beats the other in every
  round, so the run cannot rank them) or come within :data:`NOISE_FLOOR` of each other;
- a choice between two ways of running one model is a :func:`race` of the two: both timed so, the faster kept.

Example::

    def window(seconds):                     # one round's window of one candidate: img/s
        return time_throughput(lambda: runner.run(x), batch=batch, seconds=seconds, synchronize=runner.synchronize)

    figures = interleaved({"fp32": window_a, "int8": window_b}, rounds=5, seconds=0.4)
    a, b = Spread.of(figures["fp32"]), Spread.of(figures["int8"])
    ratio, low, high = a.ratio(b)            # median ratio and the range the rounds allow
    a.overlaps(b)                            # True: "within noise"
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def time_runs(run: Callable[[], Any], *, seconds: float, warmup: int = 0, min_runs: int = 3,
              synchronize: Callable[[], Any] | None = None) -> list[float]:
    """Seconds each call of ``run`` took: ``warmup`` untimed calls, then calls until ``seconds`` are spent.

    This is edgeopt's one timing loop: every speed figure (``benchmark``, ``calibrate``'s form choice,
    ``build-engine``'s comparison) comes from it.

    Args:
        run: one inference on a prepared input.
        seconds: the timed window; at least ``min_runs`` calls are timed however long they take.
        warmup: untimed calls first (kernel selection, caches, lazy allocation).
        synchronize: waits until the device has finished what ``run`` queued (a CUDA stream); called after every
            call, warm-up included, before the clock stops. Without it a GPU backend's window would time the
            queueing, not the model. None when ``run`` returns only once its work is done (the CPU).
    """
    step = run if synchronize is None else (lambda: (run(), synchronize()))
    for _ in range(warmup):
        step()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < min_runs:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def time_throughput(run: Callable[[], Any], *, batch: int, seconds: float, warmup: int = 1,
                    synchronize: Callable[[], Any] | None = None) -> float:
    """Images per second of ``run`` (``batch`` images a call) over one :func:`time_runs` window."""
    return images_per_second(time_runs(run, seconds=seconds, warmup=warmup, synchronize=synchronize), batch)


def images_per_second(times: Sequence[float], batch: int) -> float:
    """Throughput of runs of ``batch`` images that took ``times`` seconds each."""
    return batch * len(times) / sum(times)


def interleaved(windows: dict[K, Callable[[float], T]], *, rounds: int, seconds: float,
                on_window: Callable[[K], None] | None = None) -> dict[K, list[T]]:
    """Call every window once per round for ``seconds``, in an order rotated by one each round.

    Returns each key's results in round order. ``windows`` values take the seconds of one window and return its
    figure (or any record of it, e.g. the run times); ``on_window`` is told each key after its window (progress).
    """
    if rounds < 1 or seconds <= 0:
        raise ValueError("rounds must be >= 1 and seconds > 0")
    keys = list(windows)
    results: dict[K, list[T]] = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys) if keys else 0
        for k in keys[shift:] + keys[:shift]:
            results[k].append(windows[k](seconds))
            if on_window is not None:
                on_window(k)
    return results


NOISE_FLOOR = 0.03
"""Two figures closer than this (3%) are within noise even when the ranges of their rounds do not touch. Two ONNX
Runtime sessions of the same bytes, pinned to one core, measured 1.6% apart in every one of 7 interleaved rounds
(the suite, 2026-12-04): where each session's memory landed is a difference between sessions that no number of
rounds removes, so a lead that small ranks nothing."""


@dataclass(frozen=True)
class Spread:
    """A figure measured in several rounds: the median, the lowest and the highest round."""

    median: float
    low: float
    high: float
    rounds: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        if not values:
            raise ValueError("a spread needs at least one value")
        vals = tuple(float(v) for v in values)
        return cls(statistics.median(vals), min(vals), max(vals), vals)

    @property
    def half_range(self) -> float:
        """Half the range: what ``±`` means in the report."""
        return (self.high - self.low) / 2

    def overlaps(self, other: "Spread") -> bool:
        """True when the rounds cannot tell the two figures apart ("within noise"): their ranges overlap once each
        reaches :data:`NOISE_FLOOR` further up."""
        reach = 1 + NOISE_FLOOR
        return self.low <= other.high * reach and other.low <= self.high * reach

    def ratio(self, other: "Spread") -> tuple[float, float, float]:
        """``self / other``: the ratio of the medians, and the lowest and highest ratio the two ranges allow."""
        return (self.median / other.median, self.low / other.high if other.high else float("inf"),
                self.high / other.low if other.low else float("inf"))

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "low": self.low, "high": self.high, "rounds": list(self.rounds)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Spread":
        """The inverse of :meth:`to_dict` (a report.json figure)."""
        return cls(d["median"], d["low"], d["high"], tuple(d["rounds"]))


def compare(a: Spread, b: Spread) -> dict[str, Any]:
    """How ``a`` compares with ``b`` (higher is better, e.g. img/s): ratio, its range, and the verdict.

    ``verdict`` is ``faster`` / ``slower`` when the ranges do not overlap (:meth:`Spread.overlaps`: nor come within
    :data:`NOISE_FLOOR` of each other), else ``within noise``.
    """
    ratio, low, high = a.ratio(b)
    verdict = "within noise" if a.overlaps(b) else ("faster" if a.median > b.median else "slower")
    return {"ratio": ratio, "ratio_low": low, "ratio_high": high, "verdict": verdict}


@dataclass(frozen=True)
class Race:
    """Two runs timed against each other: each one's img/s over the rounds, how they compare, the one to keep.

    Attributes:
        spreads: each run's img/s, in the order given: the first is compared against the second.
        comparison: :func:`compare` of the first with the second (ratio first / second, its range, the verdict).
        kept: the run with the higher median (a tie keeps the one :meth:`of` was told).
    """

    spreads: dict[str, Spread]
    comparison: dict[str, Any]
    kept: str

    @classmethod
    def of(cls, spreads: dict[str, Spread], *, ties: str | None = None) -> "Race":
        """The race between the two runs of ``spreads``; equal medians keep ``ties`` (the first run when None)."""
        (first, a), (second, b) = spreads.items()
        kept = first if a.median > b.median else second if b.median > a.median else ties or first
        return cls(dict(spreads), compare(a, b), kept)


def race(runs: dict[str, Callable[[], Any]], *, batch: int, rounds: int, seconds: float, ties: str | None = None,
         warmup: int = 3) -> Race:
    """Time two prepared runs in interleaved rounds and keep the faster (:meth:`Race.of`).

    Every choice edgeopt makes between two ways of running one model (build-engine's optimized graph against its
    input, OpenVINO's LATENCY hint against THROUGHPUT) is this race, so all are measured alike.

    Args:
        runs: two named runs, each one inference of ``batch`` images on a prepared input that returns once its
            work is done (a run that queues device work waits for it itself); the first is compared against the
            second.
        batch / rounds / seconds: images per run, interleaved rounds, seconds of each window.
        ties: the run kept when the medians are equal (the first when None).
        warmup: untimed runs of each before the first round (kernel selection, caches, lazy allocation).
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    windows = {name: (lambda s, run=run: time_throughput(run, batch=batch, seconds=s)) for name, run in runs.items()}
    figures = interleaved(windows, rounds=rounds, seconds=seconds)
    return Race.of({name: Spread.of(figures[name]) for name in runs}, ties=ties)


# Instruction sets that decide how fast INT8 and BF16 run on a CPU (x86 flags of /proc/cpuinfo; Arm "Features":
# asimddp = dot product, i8mm = int8 matrix multiply). The same INT8 model ran at 0.36x FP32 on an AVX2 CPU
# without VNNI and at 2.46x on one with AVX-512 VNNI: a speed figure without these says little.
X86_ISA = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
ARM_ISA = ("asimd", "asimddp", "i8mm", "bf16", "sve")


def cpu_facts(cpuinfo: str | None = None, machine: str | None = None) -> dict[str, Any]:
    """The CPU's model name, core count and which instruction sets of :data:`X86_ISA` / :data:`ARM_ISA` it has."""
    import os
    import platform
    from pathlib import Path

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    machine = machine or platform.machine()
    name, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not name:
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    relevant = ARM_ISA if machine.lower() in ("aarch64", "arm64") else X86_ISA
    return {"cpu": name or platform.processor() or machine or "unknown", "cpu_cores": os.cpu_count(),
            "machine": machine, "isa": [f for f in relevant if f in flags],
            "isa_missing": [f for f in relevant if f not in flags]}


def isa_summary(facts: dict[str, Any]) -> str:
    """``avx2 fma avx512f avx512_vnni avx512_bf16 (no avx_vnni, amx_tile, ...)`` for a report's environment."""
    have, missing = facts.get("isa") or [], facts.get("isa_missing") or []
    if not have:
        return "none of " + ", ".join(missing) if missing else "unknown"
    return " ".join(have) + (f" (no {', '.join(missing)})" if missing else "")
