"""Rows measured on other machines: ``runner.py --check`` results (``check.json``) folded into a host report.

A bundle's acceptance check runs on the Jetson or server the model is deployed to and writes ``check.json``:
top-1 and agreement on the bundle's acceptance set against the host's reference, latency and images/s there.
:func:`add` turns each into a row of the host's report (``report["device_rows"]``), marked with its machine;
:mod:`optimize.benchmark.render` shows them in a table of their own with the same speed columns. Their speedups divide
the device's images/s by the host baseline's at the same batch size: a cross-machine ratio, labelled so.

Example::

    report = json.loads(Path("runs/demo/report/report.json").read_text())
    add(report, ["jetson/check.json"])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from optimize.errors import ConfigError

CHECK_FORMAT = "edgeopt-device-check"


def read_check(path: str | Path) -> dict[str, Any]:
    """A ``check.json`` from ``runner.py --check``.

    Raises:
        ConfigError: not there, not JSON, or not a device check.
    """
    path = Path(path)
    try:
        check = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"--device-results {path}: {e.strerror or e}; give the check.json 'runner.py --check' "
                          "wrote on the device") from e
    except ValueError as e:
        raise ConfigError(f"--device-results {path} is not JSON ({e}); give the check.json 'runner.py --check' "
                          "wrote") from e
    if not isinstance(check, dict) or check.get("format") != CHECK_FORMAT:
        raise ConfigError(f"--device-results {path} is not a device check (no \"format\": \"{CHECK_FORMAT}\"); give "
                          "the check.json 'runner.py --check' wrote")
    return check


def device_row(check: dict[str, Any], source: str, baseline: dict[str, Any] | None) -> dict[str, Any]:
    """One report row from a device check; ``baseline``: the host report's baseline row (for the speedups)."""
    device, speed = check.get("device", {}), check.get("speed", {})
    machine = device.get("gpu") or device.get("cpu") or device.get("machine") or "device"
    throughput = {b: t["median"] for b, t in speed.get("throughput", {}).items()}
    host = (baseline or {}).get("throughput", {})
    return {"name": f"{check.get('model')} @ {machine}", "source": source, "machine": machine,
            "device": device, "backend": check.get("backend"),
            "precision": device.get("precision") or check.get("host", {}).get("precision"),
            "images": check.get("images"), "top1": check.get("top1"), "host_top1": check.get("host_top1"),
            "agreement_with_host": check.get("agreement_with_host"), "latency_ms_b1": speed.get("latency_ms_b1"),
            "throughput": throughput, "throughput_spread": speed.get("throughput", {}),
            "timing": {k: speed.get(k) for k in ("seconds", "rounds", "includes")},
            "speedup_cross_machine": {b: v / host[b] for b, v in throughput.items() if host.get(b)},
            "verdict": check.get("verdict")}


def add(report: dict[str, Any], paths: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``report`` with a row per device check in ``report["device_rows"]`` (replacing rows from the same file)."""
    baseline = next((r for r in report.get("rows", []) if r.get("role") == "baseline"), None)
    kept = [r for r in report.get("device_rows", []) if r["source"] not in set(map(str, paths))]
    report["device_rows"] = kept + [device_row(read_check(p), str(p), baseline) for p in paths]
    return report
