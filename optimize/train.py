"""Stage ``train``: train a ResNet (usually the teacher) from scratch or from torchvision's ImageNet weights.

Writes ``out`` (the best epoch by val top-1, an edgeopt checkpoint), its manifest ``out.json``, and
``<out stem>.last.pth``: the last finished epoch with optimizer and scheduler state, which ``resume=True``
continues from after a kill.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifacts import (Artifact, last_checkpoint_path, manifest_path, prepare_output, read_manifest, write_json,
                        write_manifest)
from .checkpoint import load_checkpoint, save_checkpoint
from .configs import TrainConfig
from .data import DataSplits, default_preprocessing, load_data
from .errors import CheckpointError, ConfigError
from .loop import EarlyStop, FitResult, LoopConfig, fit, split_class_weights
from .models import build_resnet, set_trainable
from .preprocess import Preprocessing

logger = logging.getLogger(__name__)

# options that may differ between a run and its resumption without changing what is trained
_RESUME_FREE = {"resume", "progress", "workers", "device"}


def with_augment(preprocessing: Preprocessing, augment: str | None) -> Preprocessing:
    """``preprocessing`` with another training augmentation (recorded with the checkpoint), or as it is."""
    return preprocessing if augment is None else dataclasses.replace(preprocessing, train_augment=augment)


def loss_weights_record(splits: DataSplits, loop: LoopConfig, weights: torch.Tensor | None) -> dict[str, Any]:
    """What the manifest says about class weighting: the mode and, when on, each class's weight."""
    record: dict[str, Any] = {"class_weights": loop.class_weights}
    if weights is not None:
        record["class_weight_values"] = dict(zip(splits.class_names, [round(float(w), 6) for w in weights]))
    return record


class CheckpointWriter:
    """Writes a run's best checkpoint (+ manifest) and its resumable last state; used by every training stage.

    Args:
        out: the best checkpoint's path.
        stage: recorded in the manifest (``train``, ``distill``, ``prune``...).
        arch / stem / class_names / preprocessing: what the checkpoint records.
        config: the stage's config (recorded in both files; compared on resume).
        inputs: identities (sha256) of what the stage read, for the manifest.
        extra: more top-level manifest keys (what was frozen, class weights).
    """

    def __init__(self, out: Path, *, stage: str, arch: str, stem: str, class_names: list[str],
                 preprocessing: Preprocessing, config: Any, inputs: dict[str, Any],
                 extra: dict[str, Any] | None = None):
        self.out, self.last = Path(out), last_checkpoint_path(out)
        self.stage, self.arch, self.stem = stage, arch, stem
        self.class_names, self.preprocessing = class_names, preprocessing
        self.config = dataclasses.asdict(config)
        self.inputs = inputs
        self.extra = {"arch": arch, "stem": stem, **(extra or {})}
        self.wrote = False  # whether save_best wrote self.out in this run

    def save_best(self, model: nn.Module, metrics: dict[str, Any]) -> None:
        self.wrote = True
        save_checkpoint(self.out, model, arch=self.arch, stem=self.stem, class_names=self.class_names,
                        preprocessing=self.preprocessing, metrics=metrics)
        write_manifest(self.out, stage=self.stage, config=self.config, inputs=self.inputs,
                       preprocessing=self.preprocessing.to_dict(), class_names=self.class_names, metrics=metrics,
                       extra=self.extra)

    def discard(self) -> None:
        """Remove the best checkpoint and its manifest this run wrote (a run that diverged delivers no model; its
        resumable state stays, holding the last finite epoch)."""
        if self.wrote:
            for path in (self.out, manifest_path(self.out)):
                path.unlink(missing_ok=True)

    def save_last(self, model: nn.Module, train_state: dict[str, Any]) -> None:
        save_checkpoint(self.last, model, arch=self.arch, stem=self.stem, class_names=self.class_names,
                        preprocessing=self.preprocessing, metrics=train_state.get("best"),
                        extra={"train_state": train_state, "run_config": self.config})

    def save_stop(self, stop: EarlyStop) -> None:
        """Add to the best checkpoint's manifest that ``--patience`` ended the run, after which epoch and why:
        the manifest is where a user (or a pipeline) looks to learn that fewer epochs ran than were asked for.
        The manifest is that of the best epoch, written before the stop was known; it gains the one key."""
        manifest = read_manifest(self.out)
        if manifest is None:  # no best checkpoint to describe: the log line is all there is
            logger.warning("early stop not recorded: %s has no manifest", self.out)
            return
        manifest["early_stop"] = dataclasses.asdict(stop)
        write_json(manifest_path(self.out), manifest)

    def load_last(self) -> dict[str, Any]:
        """The train_state to resume from, checked against this run's config."""
        if not self.last.exists():
            raise CheckpointError(f"nothing to resume: {self.last} does not exist; run without --resume")
        loaded = load_checkpoint(self.last)
        saved, current = _flatten(loaded.extra.get("run_config") or {}), _flatten(self.config)
        diff = sorted(k for k in set(saved) | set(current)
                      if k.rpartition(".")[2] not in _RESUME_FREE and saved.get(k) != current.get(k))
        if diff:
            raise ConfigError(f"{self.last} was made with other options ({', '.join(diff)}); resume with the same "
                              "options, or start afresh without --resume")
        state = dict(loaded.extra["train_state"])
        state["model"] = loaded.model.state_dict()
        return state


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loop": {"lr": 1}}`` -> ``{"loop.lr": 1}``, so a refused resume names the very option."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def train_model(model: nn.Module, splits: DataSplits, loop: LoopConfig, writer: CheckpointWriter, resume: bool,
                **fit_kwargs: Any) -> FitResult:
    """Run the shared loop for a training stage, resuming from the writer's last state when asked."""
    resume_state = writer.load_last() if resume else None
    result = fit(model, splits, loop, writer=writer, resume_state=resume_state, **fit_kwargs)
    if not result.history:
        raise ConfigError("no epoch was run")
    return result


def run(cfg: TrainConfig) -> Artifact:
    """Train ``cfg.arch`` on ``cfg.data`` and return the best checkpoint written."""
    out = prepare_output(cfg.out)
    preprocessing = with_augment(default_preprocessing(cfg.data, cfg.image_size), cfg.augment)
    splits = load_data(cfg.data, preprocessing, train_limit=cfg.train_limit, val_limit=cfg.val_limit)
    torch.manual_seed(cfg.loop.seed)
    model = build_resnet(cfg.arch, splits.num_classes, stem=cfg.stem, pretrained=cfg.pretrained)
    trainable = set_trainable(model, freeze_backbone=cfg.freeze_backbone, trainable_layers=cfg.trainable_layers)
    if (cfg.freeze_backbone or cfg.trainable_layers is not None) and not cfg.pretrained:
        logger.warning("freezing layers of a network that starts untrained: its frozen layers stay random; "
                       "add --pretrained, or train everything")
    writer = CheckpointWriter(out, stage="train", arch=cfg.arch, stem=cfg.stem, class_names=splits.class_names,
                              preprocessing=preprocessing, config=cfg, inputs={"data": splits.describe()},
                              extra={"trainable": trainable,
                                     **loss_weights_record(splits, cfg.loop, split_class_weights(splits, cfg.loop))})
    result = train_model(model, splits, cfg.loop, writer, cfg.resume)
    logger.info("best val top-1 %.4f at epoch %d of %d%s", result.best.get("val_top1", float("nan")),
                result.best.get("epoch", 0), result.epochs_run, " (stopped early)" if result.stopped_early else "")
    return Artifact.of(out)
