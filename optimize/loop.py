"""The one training loop: ``train_one_epoch``, ``evaluate`` and ``fit``.

Teacher training, distillation and fine-tuning all run through :func:`fit`; they differ only in the loss
they plug in. A loss is any callable ``loss_fn(logits, targets, images) -> scalar tensor``: plain
cross-entropy ignores ``images``, distillation runs its teacher on them.

Example::

    cfg = LoopConfig(epochs=3, lr=0.05)
    result = fit(model, splits, cfg, writer=writer)   # writer saves best and resumable checkpoints

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`fit` runs DistributedDataParallel: gloo on the CPU, nccl on
CUDA, a DistributedSampler for training and a sharded, all-reduced evaluation, so every rank agrees on the
metrics and on early stopping; only rank 0 writes files or shows progress.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm.auto import tqdm

from .checkpoint import unwrap
from .data import DataSplits, LabeledImages, skip_unreadable_collate
from .configs import CLASS_WEIGHTS, LoopConfig
from .device import torch_device
from .errors import ConfigError, DivergedError
from .metrics import EvalMetrics, confusion_matrix

logger = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`fit`, saying what it kept: the message tells whether ``--resume`` has anything to use.

    Attributes:
        checkpoint: the resumable checkpoint written (or resumed from) before the interrupt; None: none yet.
    """

    def __init__(self, checkpoint: Path | None, epoch: int):
        self.checkpoint = checkpoint
        super().__init__(f"the checkpoint of epoch {epoch}, {checkpoint}, is kept; rerun with --resume to continue"
                         if checkpoint is not None else
                         f"stopped in epoch {epoch + 1}, before any checkpoint was written: there is no checkpoint "
                         "to resume from; run the command again without --resume")


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# -- processes and devices ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank 0 of 1 unless started by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistContext:
    """Join the process group torchrun set up (env://); a single process needs nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        backend = "nccl" if torch_device(device, local_rank).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        tdist.init_process_group(backend=backend)
        logger.info("DDP rank %d/%d on %s", rank, world, backend)
    return DistContext(rank, world, local_rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Shard(Sampler[int]):
    """Every ``world``-th index from ``rank``: a split of an eval set with no padding or repeats."""

    def __init__(self, n: int, ctx: DistContext):
        self.indices = list(range(ctx.rank, n, ctx.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    if device.type == "cpu" and cores <= 2:
        return 0
    return min(8, max(1, cores // 2))


def lone_last_batch(images: int, batch_size: int) -> bool:
    """Whether a training epoch of ``images`` would end on a batch of one image, which BatchNorm cannot train on
    (one value per channel where the feature maps are 1x1); that batch is dropped (:func:`make_loader`)."""
    return images > batch_size and images % batch_size == 1


def make_loader(dataset: LabeledImages, *, batch_size: int, shuffle: bool, device: torch.device,
                ctx: DistContext = DistContext(), workers: int | None = None, seed: int = 0) -> DataLoader:
    """The DataLoader every stage uses: sharded under DDP, skipping unreadable images. A training loader
    (``shuffle``) drops a last batch of one image (:func:`lone_last_batch`), saying so."""
    workers = default_workers(device) if workers is None else workers
    if shuffle:
        sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=seed) \
            if ctx.enabled else None
    else:
        sampler = _Shard(len(dataset), ctx) if ctx.enabled else None
    per_rank = len(sampler) if sampler is not None else len(dataset)
    drop_last = shuffle and lone_last_batch(per_rank, batch_size)
    if drop_last:
        logger.info("%d training images in batches of %d leave a last batch of one, which BatchNorm cannot train "
                    "on: that image sits out this epoch (another one the next, as the order is shuffled)", per_rank,
                    batch_size)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=device.type == "cuda", drop_last=drop_last,
                      collate_fn=skip_unreadable_collate, generator=generator,
                      persistent_workers=False)


# -- one epoch --------------------------------------------------------------------------------------

def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast is slower."""
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported"))


def mixed_precision(device: torch.device, amp: bool, cpu_bf16: bool = False) -> str:
    """The autocast dtype training uses on ``device``: ``float16`` (CUDA), ``bfloat16`` (``cpu_bf16`` on a bf16
    CPU) or ``float32``."""
    if not amp:
        return "float32"
    if device.type == "cuda":
        return "float16"
    # bfloat16 autocast on the CPU is opt-in: under core contention a backward pass now and then gives
    # non-finite gradients (seen in layer4 at 1x1 spatial size), which the loop then skips
    return "bfloat16" if cpu_bf16 and cpu_has_native_bf16() else "float32"


def _grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient element is finite.

    One fused pass: each gradient's largest magnitude (an inf-norm, which cannot overflow as a 2-norm of large finite
    values can) is finite exactly when all its elements are; 32 ms vs 37 ms for an isfinite per tensor (ResNet-50).
    """
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all())


def _autocast(device: torch.device, amp: bool, *, training: bool = False, cpu_bf16: bool = False):
    dtype = mixed_precision(device, amp, cpu_bf16)
    if dtype == "float16":
        return torch.autocast("cuda", dtype=torch.float16)
    if dtype == "bfloat16" and training:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _all_reduce(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        values = values.clone()
        tdist.all_reduce(values)
    return values


def _broadcast_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Give every rank rank 0's buffers: BatchNorm statistics drift apart between DDP ranks while training."""
    if ctx.enabled:
        for buffer in model.buffers():
            tdist.broadcast(buffer, src=0)


def _keep_frozen_norms(model: nn.Module) -> None:
    """Batch-norm layers whose parameters are frozen keep their running statistics too (transfer learning)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.requires_grad:
            m.eval()


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, loss_fn: LossFn, *,
                    device: torch.device, scaler: torch.amp.GradScaler, cfg: LoopConfig,
                    ctx: DistContext = DistContext(), desc: str = "train",
                    on_step: Callable[[], None] | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns the mean loss and top-1 of the training batches (all ranks).

    ``on_step`` runs after every optimizer step (a per-step learning-rate schedule).
    """
    model.train()
    _keep_frozen_norms(model)
    guard = mixed_precision(device, cfg.amp, cfg.cpu_bf16) == "bfloat16"
    skipped = 0
    sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
    optimizer.zero_grad(set_to_none=True)
    steps = len(loader)
    bar = tqdm(loader, desc=desc, disable=not (cfg.progress and ctx.is_main), leave=False, dynamic_ncols=True,
               mininterval=1.0)
    for i, (x, y) in enumerate(bar):
        if len(y) < 2:  # empty, or one image left after unreadable ones were skipped: BatchNorm can't train on it
            continue
        x, y = _to_device(x, y, device, cfg.channels_last)
        boundary = (i + 1) % cfg.accumulate == 0 or i + 1 == steps
        sync = contextlib.nullcontext() if boundary or not isinstance(model, nn.parallel.DistributedDataParallel) \
            else model.no_sync()
        with sync:
            with _autocast(device, cfg.amp, training=True, cpu_bf16=cfg.cpu_bf16):
                logits = model(x)
                loss = loss_fn(logits, y, x)
            if not torch.isfinite(loss):
                raise DivergedError(f"the loss became {loss.item()} at step {i}; lower --lr")
            scaler.scale(loss / cfg.accumulate).backward()
        if boundary and guard and not _grads_finite(optimizer):
            skipped += 1  # the weights and the optimizer state stay as they were; the schedule moves on
            logger.warning("step %d: non-finite bfloat16 gradients, step skipped", i)
            optimizer.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step()
        elif boundary:
            if cfg.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               cfg.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step()
        n = len(y)
        sums += torch.tensor([loss.item() * n, (logits.argmax(1) == y).sum().item(), n], dtype=torch.float64)
        bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{sums[1] / sums[2]:.3f}", refresh=False)
    sums = _all_reduce(sums, ctx)
    n = max(sums[2].item(), 1.0)
    result = {"loss": sums[0].item() / n, "top1": sums[1].item() / n}
    if guard:
        result["skipped_steps"] = skipped
    return result


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, num_classes: int, device: torch.device,
             amp: bool = True, channels_last: bool = True, ctx: DistContext = DistContext(),
             progress: bool = False, desc: str = "eval") -> EvalMetrics:
    """Top-1, top-5, mean cross-entropy and the confusion matrix over ``loader`` (all-reduced under DDP)."""
    model.eval()
    k = min(5, num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    sums = torch.zeros(2, dtype=torch.float64)  # loss * n, top-k hits
    for x, y in tqdm(loader, desc=desc, disable=not (progress and ctx.is_main), leave=False, mininterval=1.0):
        if len(y) == 0:
            continue
        x, y = _to_device(x, y, device, channels_last)
        with _autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        if logits.shape[1] != num_classes:
            raise ConfigError(f"the model has {logits.shape[1]} outputs but the data has {num_classes} classes")
        sums[0] += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        sums[1] += (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum().item()
        confusion += torch.from_numpy(confusion_matrix(y.cpu().numpy(), logits.argmax(1).cpu().numpy(), num_classes))
    confusion = _all_reduce(confusion, ctx)
    sums = _all_reduce(sums, ctx)
    count = int(confusion.sum())
    n = max(count, 1)
    return EvalMetrics(loss=sums[0].item() / n, top1=float(confusion.diag().sum()) / n,
                       top5=sums[1].item() / n, count=count, confusion=confusion.numpy())


# -- the whole run ----------------------------------------------------------------------------------

class RunWriter(Protocol):
    """Where :func:`fit` puts its results (rank 0 only); ``last``, when it has one, is the file ``save_last`` writes."""

    def save_best(self, model: nn.Module, metrics: dict[str, Any]) -> None: ...

    def save_last(self, model: nn.Module, train_state: dict[str, Any]) -> None: ...


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    epochs_run: int = 0
    stopped_early: bool = False


@dataclass
class _Kept:
    """The resumable checkpoint a run has written so far (None: none yet) and the epoch it holds."""

    checkpoint: Path | None
    epoch: int


@contextlib.contextmanager
def _naming_checkpoint_on_interrupt(kept: _Kept):
    """Turn Ctrl-C into :class:`TrainingInterrupted`, which says whether there is a checkpoint to resume from."""
    try:
        yield
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt as e:
        raise TrainingInterrupted(kept.checkpoint, kept.epoch) from e


def cross_entropy_loss(label_smoothing: float = 0.0, weight: torch.Tensor | None = None) -> LossFn:
    ce = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

    def loss(logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if ce.weight is not None and ce.weight.device != logits.device:
            ce.to(logits.device)
        return ce(logits.float(), targets)

    return loss


def class_weights(labels: np.ndarray, num_classes: int, mode: str = "balanced") -> torch.Tensor | None:
    """Per-class loss weights ``n / (k * n_c)`` from the training labels (scikit-learn's "balanced"), or None.

    A class absent from ``labels`` gets weight 0 (nothing of it is trained on either way).
    """
    if mode == "none":
        return None
    if mode not in CLASS_WEIGHTS:
        raise ConfigError(f"--class-weights must be one of {CLASS_WEIGHTS}")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def split_class_weights(splits: DataSplits, cfg: LoopConfig) -> torch.Tensor | None:
    """:func:`class_weights` of ``splits``' training labels under ``cfg.class_weights``: what each stage's loss uses."""
    return class_weights(splits.train.labels, splits.num_classes, cfg.class_weights)


def _make_optimizer(model: nn.Module, cfg: LoopConfig) -> torch.optim.Optimizer:
    # no weight decay on biases and batch-norm parameters, as in torchvision's reference recipes
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        make = functools.partial(torch.optim.SGD, groups, lr=cfg.peak_lr, momentum=cfg.momentum,
                                 nesterov=cfg.momentum > 0)
    else:
        make = functools.partial(torch.optim.AdamW, groups, lr=cfg.peak_lr)
    # the fused kernel: one pass over all parameters (AdamW on a ResNet-50 here: 9 ms a step vs 58 ms for the
    # per-tensor loop the CPU otherwise gets); older torch has it on CUDA only, and falls back to the loop
    try:
        return make(fused=True)
    except (RuntimeError, TypeError, ValueError):
        return make()


def warmup_cosine(step: int, total: int, warmup: float) -> float:
    """Learning-rate factor at optimizer step ``step`` of ``total``: linear warm-up, then cosine to 0."""
    warm = int(round(warmup * total))
    if step < warm:
        return (step + 1) / (warm + 1)
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _make_scheduler(optimizer: torch.optim.Optimizer, cfg: LoopConfig, steps_per_epoch: int):
    if cfg.schedule == "warmup-cosine":
        total = cfg.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, cfg.warmup))
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1,
                                                          patience=max(1, cfg.patience // 2))
    return None


def fit(model: nn.Module, splits: DataSplits, cfg: LoopConfig, *, loss_fn: LossFn | None = None,
        writer: RunWriter | None = None, resume_state: dict[str, Any] | None = None,
        ctx: DistContext | None = None) -> FitResult:
    """Train ``model`` on ``splits.train``, evaluating on ``splits.val`` after every epoch.

    Args:
        model: the bare module (wrapped in DDP here when running under torchrun).
        splits: the data; ``splits.train`` carries the training transform.
        cfg: loop options.
        loss_fn: ``loss_fn(logits, targets, images)``; cross-entropy with ``cfg.label_smoothing`` when None.
        writer: receives the best model (by val top-1) and, every epoch, the resumable state.
        resume_state: a ``train_state`` saved by a previous run: training continues after its last epoch.
        ctx: the process group; read from torchrun's environment when None.

    Returns:
        the per-epoch history, the best epoch's metrics, and whether early stopping ended the run.
    """
    ctx = ctx or init_distributed(cfg.device)
    device = torch_device(cfg.device, ctx.local_rank)
    seed_everything(cfg.seed)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if loss_fn is None:
        loss_fn = cross_entropy_loss(cfg.label_smoothing, split_class_weights(splits, cfg))
    optimizer = _make_optimizer(model, cfg)
    # optimizer steps per epoch (the per-step schedule's length), as the training loader will make them
    per_rank = math.ceil(len(splits.train) / ctx.world_size)
    batches = per_rank // cfg.batch_size if lone_last_batch(per_rank, cfg.batch_size) else \
        math.ceil(per_rank / cfg.batch_size)
    scheduler = _make_scheduler(optimizer, cfg, max(1, math.ceil(batches / cfg.accumulate)))
    per_step = cfg.schedule == "warmup-cosine"
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    result = FitResult()
    if cfg.cpu_bf16 and device.type == "cpu" and mixed_precision(device, cfg.amp, True) == "float32":
        logger.warning("cpu_bf16: this CPU has no native bfloat16 (AVX512-BF16 / AMX) or amp is off: float32")
    logger.info("training in %s on %s%s", mixed_precision(device, cfg.amp, cfg.cpu_bf16), device,
                ", channels_last" if cfg.channels_last else "")
    best_top1, since_best, start = -1.0, 0, 0

    if resume_state:
        unwrap(model).load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if scheduler is not None and resume_state.get("scheduler"):
            scheduler.load_state_dict(resume_state["scheduler"])
        if resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        start = int(resume_state["epoch"])
        result.history = list(resume_state.get("history", []))
        result.best = dict(resume_state.get("best", {}))
        best_top1 = float(result.best.get("val_top1", -1.0))
        since_best = int(resume_state.get("since_best", 0))
        logger.info("resuming after epoch %d of %d (best val top-1 so far %.4f)", start, cfg.epochs, best_top1)

    train_model = model
    if ctx.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    val_loader = make_loader(splits.val, batch_size=cfg.batch_size * 2, shuffle=False, device=device, ctx=ctx,
                             workers=cfg.workers)
    last = getattr(writer, "last", None) if ctx.is_main else None
    kept = _Kept(last if resume_state else None, start)  # what --resume would continue from, so far
    with _naming_checkpoint_on_interrupt(kept):
        for epoch in range(start, cfg.epochs):
            if cfg.patience and since_best >= cfg.patience:
                result.stopped_early = True
                logger.info("early stop: val top-1 has not improved for %d epoch(s)", since_best)
                break
            torch.manual_seed(cfg.seed + epoch)  # augmentation draws: the same sequence after a resume
            train_loader = make_loader(splits.train, batch_size=cfg.batch_size, shuffle=True, device=device,
                                       ctx=ctx, workers=cfg.workers, seed=cfg.seed + epoch)
            if isinstance(train_loader.sampler, DistributedSampler):
                train_loader.sampler.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            train = train_one_epoch(train_model, train_loader, optimizer, loss_fn, device=device, scaler=scaler,
                                    cfg=cfg, ctx=ctx, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                                    on_step=scheduler.step if per_step else None)
            _broadcast_buffers(model, ctx)  # every rank evaluates (and rank 0 saves) the same BN statistics
            val = evaluate(model, val_loader, num_classes=splits.num_classes, device=device, amp=cfg.amp,
                           channels_last=cfg.channels_last, ctx=ctx)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val.top1)
            elif scheduler is not None and not per_step:
                scheduler.step()
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": train["loss"], "train_top1": train["top1"],
                   "val_loss": val.loss, "val_top1": val.top1, "val_top5": val.top5}
            if "skipped_steps" in train:
                row["skipped_steps"] = train["skipped_steps"]
            result.history.append(row)
            logger.info("epoch %d/%d: train loss %.4f top-1 %.4f | val loss %.4f top-1 %.4f top-5 %.4f",
                        epoch + 1, cfg.epochs, train["loss"], train["top1"], val.loss, val.top1, val.top5)
            broken = non_finite(unwrap(model))
            if not math.isfinite(train["loss"]) or not math.isfinite(val.loss) or broken:
                if writer is not None and ctx.is_main and hasattr(writer, "discard"):
                    writer.discard()  # no file at the final path: a run that diverged delivers no model
                loss = train["loss"] if not math.isfinite(train["loss"]) else val.loss
                what = (f"{len(broken)} weight or statistics tensor(s) hold NaN or inf ({', '.join(broken[:3])})"
                        if broken else f"the loss became {loss}")
                raise DivergedError(f"training diverged in epoch {epoch + 1}: {what}; lower --lr")
            improved = val.top1 > best_top1
            if improved:
                best_top1, since_best = val.top1, 0
                result.best = dict(row)
                if writer and ctx.is_main:
                    writer.save_best(model, dict(row))
            else:
                since_best += 1
            if writer and ctx.is_main:
                writer.save_last(model, {
                    "epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler else None, "scaler": scaler.state_dict(),
                    "history": result.history, "best": result.best, "since_best": since_best})
                kept.checkpoint, kept.epoch = last, epoch + 1
            if ctx.enabled:
                tdist.barrier()
    result.epochs_run = len(result.history)
    return result


def non_finite(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers (BatchNorm's running statistics too) holding NaN or inf."""
    return [name for name, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def shutdown_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
