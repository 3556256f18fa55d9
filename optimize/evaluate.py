"""Stage ``evaluate``: top-1, top-5, loss, per-class accuracy and the confusion matrix of a checkpoint.

The model's recorded preprocessing is used as is; a plain state_dict or TorchScript file, which records none,
gets the data's default preset (``image_size`` overrides its size).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import atomic_path
from .checkpoint import LoadedModel, load_checkpoint
from .data import DataSplits, default_preprocessing, load_data
from .errors import DataError
from .loop import EvalMetrics, evaluate, make_loader, resolve_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Options of ``cli.py evaluate``.

    Attributes:
        model: checkpoint (edgeopt, torchvision state_dict, TorchScript).
        data: ``fashion-mnist`` or a folder with ``train/`` and ``val/``.
        arch: expected ResNet for a plain state_dict (guessed when None).
        image_size: input side when the checkpoint records no preprocessing.
        val_limit: class-stratified subset of the val split.
        batch_size: images per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        trust_checkpoint: allow a pickled whole nn.Module (runs code from the file).
        plot: also write the confusion matrix as a PNG here.
        progress: show a progress bar.
    """

    model: str
    data: str = "fashion-mnist"
    arch: str | None = None
    image_size: int | None = None
    val_limit: int | None = None
    batch_size: int = 256
    device: str = "auto"
    trust_checkpoint: bool = False
    plot: str | None = None
    progress: bool = True


@dataclass
class EvalReport:
    metrics: EvalMetrics
    class_names: list[str]
    model: dict[str, Any]
    plot: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            **self.metrics.summary(),
            "per_class_accuracy": dict(zip(self.class_names, self.metrics.per_class_accuracy)),
            "class_names": self.class_names,
            "confusion_matrix": self.metrics.confusion.tolist(),
            "plot": str(self.plot) if self.plot else None,
        }


def check_model_fits_data(loaded: LoadedModel, splits: DataSplits) -> None:
    """Refuse a model whose classes differ from the data's, naming both."""
    if loaded.num_classes is not None and loaded.num_classes != splits.num_classes:
        raise DataError(f"{loaded.path} predicts {loaded.num_classes} classes but {splits.name} has "
                        f"{splits.num_classes}; use data with the model's classes, or retrain for these")
    if loaded.class_names and loaded.class_names != splits.class_names:
        raise DataError(f"{loaded.path} was trained on classes {loaded.class_names[:5]}... but {splits.name} has "
                        f"{splits.class_names[:5]}...; class folders must match the model's (same names, same order)")


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: str | Path, title: str) -> Path:
    """Save a row-normalized confusion matrix as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    norm = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n), dpi=100)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for i in range(n):
        for j in range(n):
            if confusion[i, j]:
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def run(cfg: EvalConfig) -> EvalReport:
    """Evaluate ``cfg.model`` on the val split of ``cfg.data``."""
    loaded = load_checkpoint(cfg.model, arch=cfg.arch, trust=cfg.trust_checkpoint)
    preprocessing = loaded.preprocessing or default_preprocessing(cfg.data, cfg.image_size)
    if loaded.preprocessing and cfg.image_size and cfg.image_size != loaded.preprocessing.image_size:
        logger.warning("--image-size %d ignored: %s records its own preprocessing (%d px)", cfg.image_size,
                       cfg.model, loaded.preprocessing.image_size)
    splits = load_data(cfg.data, preprocessing, val_limit=cfg.val_limit, augment=False, val_only=True)
    check_model_fits_data(loaded, splits)
    device = resolve_device(cfg.device)
    loader = make_loader(splits.val, batch_size=cfg.batch_size, shuffle=False, device=device)
    metrics = evaluate(loaded.model.to(device), loader, num_classes=splits.num_classes, device=device,
                       progress=cfg.progress)
    plot = None
    if cfg.plot:
        plot = plot_confusion(metrics.confusion, splits.class_names, cfg.plot,
                              f"{Path(cfg.model).name} on {splits.name}: top-1 {metrics.top1:.2%}")
    return EvalReport(metrics, splits.class_names, loaded.describe(), plot)
