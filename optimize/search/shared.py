"""What every trial shares, made once per study: the teacher's figures on the target and the distilled student.

Several processes sharing a study take turns here (under a lock in ``<out>/shared``): the first measures and
distils, the others find it done.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from .. import distill, pipeline
from ..artifacts import last_checkpoint_path, read_manifest, sha256_file
from ..benchmark import report as benchmark_report
from ..checkpoint import load_checkpoint
from ..configs import SearchConfig
from ..data import load_data
from ..evaluate import check_model_fits_data
from .space import objective_speed, trial_devices

logger = logging.getLogger(__name__)


def check_teacher_fits(teacher: Path, data: str, cfg: SearchConfig) -> None:
    """Refuse a teacher that does not fit the data before anything is written."""

    loaded = load_checkpoint(teacher)
    splits = load_data(data, loaded.preprocessing, val_limit=min(cfg.val_limit or 64, 64), augment=False,
                       val_only=True)
    check_model_fits_data(loaded, splits)


def baseline_figures(study: Any, cfg: SearchConfig, teacher: Path, data: str) -> dict[str, Any]:
    """The teacher's top-1 and speed on the target (measured once per study, kept in the storage)."""
    recorded = study.user_attrs.get("baseline")
    if isinstance(recorded, dict) and isinstance(recorded.get("top1"), float):
        return recorded

    bcfg = benchmark_report.BenchmarkConfig(models=(), baseline=str(teacher), out=str(Path(cfg.out) / "baseline"),
                                            data=data, batch_sizes=(cfg.timed_batch,),
                                            device=trial_devices(cfg).measure, rounds=cfg.rounds,
                                            seconds=cfg.seconds, val_limit=cfg.val_limit, progress=cfg.progress)
    row = benchmark_report.run(bcfg).manifest["rows"][0]
    baseline = {"artifact": str(teacher), "top1": row["top1"], "speed": objective_speed(row, cfg),
                "file_bytes": row["file_bytes"], "macs": row.get("macs")}
    study.set_user_attr("baseline", baseline)
    return baseline


def shared_student(cfg: SearchConfig, teacher: Path, data: str) -> Path | None:
    """The distilled student every compression trial prunes: given, or distilled once with the preset's options."""
    if cfg.space == "training":
        return None
    if cfg.student:
        return Path(cfg.student)  # checked before anything was written

    student = Path(cfg.out) / "student.pth"
    manifest = read_manifest(student) or {}
    teacher_sha = ((manifest.get("inputs") or {}).get("teacher") or {}).get("sha256")
    if student.is_file() and teacher_sha == sha256_file(teacher):
        return student
    recipe = pipeline.resolve_recipe(pipeline.PipelineConfig(out=cfg.out, preset=cfg.preset))
    options = dict(recipe["stages"].get("distill") or {})
    fixed = {"teacher": str(teacher), "out": str(student), "data": data, "image_size": cfg.image_size,
             "train_limit": cfg.train_limit, "val_limit": cfg.val_limit}
    dcfg = pipeline.stage_config("distill", options, fixed, progress=cfg.progress,
                                 device=trial_devices(cfg).train)
    logger.info("distilling the shared student %s once (the preset's distill options)", student)
    distill.run(dataclasses.replace(dcfg, resume=last_checkpoint_path(student).is_file()))
    return student

