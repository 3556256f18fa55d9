"""The one training loop: ``train_one_epoch``, ``evaluate`` and ``fit``.

Teacher training, distillation and fine-tuning all run through :func:`fit`; they differ only in the loss
they plug in. A loss is any callable ``loss_fn(logits, targets, images) -> scalar tensor``: plain
cross-entropy ignores ``images``, distillation runs its teacher on them.

:func:`fit` is orchestration over three pieces: a :class:`TrainState` (model, optimizer, schedule, scaler, epoch,
best epoch, history) that saves and restores the resumable checkpoint, :func:`run_epoch`, which trains and
evaluates one epoch and returns its row, and :func:`early_stop`, which says when ``--patience`` ends the run.
The metrics themselves live in :mod:`optimize.metrics`.

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
import signal
import threading
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
from .configs import CLASS_WEIGHTS, LoopConfig, default_workers
from .data import DataSplits, LabeledImages, skip_unreadable_collate
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


def lone_last_batch(images: int, batch_size: int) -> bool:
    """Whether a training epoch of ``images`` would end on a batch of one image, which BatchNorm cannot train on
    (one value per channel where the feature maps are 1x1); that batch is dropped (:func:`make_loader`)."""
    return images > batch_size and images % batch_size == 1


def make_loader(dataset: LabeledImages, *, batch_size: int, shuffle: bool, device: torch.device,
                ctx: DistContext = DistContext(), workers: int | None = None, seed: int = 0) -> DataLoader:
    """The DataLoader every stage uses: sharded under DDP, skipping unreadable images. A training loader
    (``shuffle``) drops a last batch of one image (:func:`lone_last_batch`), saying so."""
    workers = default_workers(device.type) if workers is None else workers
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
    """Where :func:`fit` puts its results (rank 0 only); ``last``, when it has one, is the file ``save_last`` writes.

    ``save_best`` gets each better epoch's model and row, ``save_last`` every epoch's resumable state
    (:meth:`TrainState.save`), ``save_stop`` an early stop, and ``discard`` is called when the run diverged.
    """

    def save_best(self, model: nn.Module, metrics: dict[str, Any]) -> None: ...

    def save_last(self, model: nn.Module, train_state: dict[str, Any]) -> None: ...

    def save_stop(self, stop: EarlyStop) -> None: ...

    def discard(self) -> None: ...


@dataclass(frozen=True)
class EarlyStop:
    """Why and when ``--patience`` ended a run before its ``--epochs``: what the manifest and the log tell the user.

    Attributes:
        after_epoch: the last epoch run (1-based); the run stopped before the next one.
        epochs: the epochs asked for.
        patience: ``--patience``, the epochs without a better val top-1 it waits.
        best_epoch: the epoch whose model the run delivers.
        reason: the sentence the log gives.
    """

    after_epoch: int
    epochs: int
    patience: int
    best_epoch: int
    reason: str


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    early_stop: EarlyStop | None = None  # None: the run went through all its epochs

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def stopped_early(self) -> bool:
        return self.early_stop is not None


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


@contextlib.contextmanager
def _interrupt_after_saving():
    """Hold a Ctrl-C that lands while an epoch's checkpoints are written until they are, then raise it.

    A checkpoint is in place before its manifest is written (the first manifest of a process imports every library
    it records: seconds); a Ctrl-C in between used to say "no checkpoint to resume from" beside the checkpoint it
    had just written. Only the main thread can take signals; elsewhere this holds nothing.
    """
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous in (None, signal.SIG_IGN):  # another thread, a handler set outside Python, or Ctrl-C ignored
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


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


def optimizer_steps_per_epoch(train_images: int, cfg: LoopConfig, world_size: int = 1) -> int:
    """Optimizer steps in one epoch (the per-step schedule's length), as the training loader will batch it:
    ``train_images`` shared out over the ranks, a lone last batch dropped (:func:`lone_last_batch`), ``cfg.accumulate``
    micro-batches a step."""
    per_rank = math.ceil(train_images / world_size)
    batches = per_rank // cfg.batch_size if lone_last_batch(per_rank, cfg.batch_size) else \
        math.ceil(per_rank / cfg.batch_size)
    return max(1, math.ceil(batches / cfg.accumulate))


# -- the state a run carries from epoch to epoch ----------------------------------------------------------

@dataclass
class TrainState:
    """Everything :func:`fit` carries from one epoch to the next, and so everything ``--resume`` needs.

    :meth:`save` writes it through a :class:`RunWriter` (the model as the resumable checkpoint's weights, the rest,
    :meth:`state_dict`, as its ``train_state``); :meth:`restore` reads that back (:meth:`load_state_dict`). The two
    name the same keys, which are those of every resumable checkpoint written so far: old ones resume too.

    Example::

        state = TrainState.create(model, cfg, device=torch.device("cpu"), steps_per_epoch=8)
        state.restore(writer.load_last())      # continue after the epoch it holds
        state.record(run_epoch(state, setup))  # True when that epoch is the best so far
        state.save(writer)
    """

    model: nn.Module  # the bare module (DDP wraps it for training only)
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LRScheduler or ReduceLROnPlateau, or None (--schedule none)
    scaler: torch.amp.GradScaler
    epoch: int = 0  # epochs finished
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch (:func:`run_epoch`)
    best: dict[str, Any] = field(default_factory=dict)  # the row of the best epoch by val top-1
    since_best: int = 0  # epochs since that one: what --patience counts

    @classmethod
    def create(cls, model: nn.Module, cfg: LoopConfig, *, device: torch.device, steps_per_epoch: int) -> TrainState:
        """A fresh state: ``cfg``'s optimizer and schedule over ``model`` (already on ``device``), and a grad
        scaler that only CUDA float16 uses."""
        optimizer = _make_optimizer(model, cfg)
        return cls(model, optimizer, _make_scheduler(optimizer, cfg, steps_per_epoch),
                   torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda"))

    @property
    def best_top1(self) -> float:
        """Val top-1 an epoch must beat to become the best (-1 before any, so the first one always does)."""
        return float(self.best.get("val_top1", -1.0))

    def state_dict(self) -> dict[str, Any]:
        """The ``train_state`` a resumable checkpoint holds beside the model's weights."""
        return {"epoch": self.epoch, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "scaler": self.scaler.state_dict(), "history": self.history, "best": self.best,
                "since_best": self.since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take up a :meth:`state_dict`; a scheduler or scaler state that is empty or absent leaves theirs as is."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.history = list(state.get("history", []))
        self.best = dict(state.get("best", {}))
        self.since_best = int(state.get("since_best", 0))

    def save(self, writer: RunWriter) -> None:
        """Write the resumable checkpoint: the model's weights and :meth:`state_dict`."""
        writer.save_last(self.model, self.state_dict())

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from what :meth:`save` wrote, read back as ``CheckpointWriter.load_last`` gives it: the
        ``train_state`` with the checkpoint's weights under ``"model"``."""
        unwrap(self.model).load_state_dict(saved["model"])
        self.load_state_dict(saved)

    def record(self, row: dict[str, float]) -> bool:
        """Add a finished epoch's row; returns whether it is the best so far (a strictly higher val top-1)."""
        self.history.append(row)
        self.epoch = int(row["epoch"])
        if row["val_top1"] > self.best_top1:
            self.best, self.since_best = dict(row), 0
            return True
        self.since_best += 1
        return False


# -- one epoch of a run, and what ends a run ----------------------------------------------------------------

@dataclass
class EpochSetup:
    """What stays the same over a run's epochs: the options, the process group, the data and the loss.

    ``train_model`` is the model wrapped in DistributedDataParallel under torchrun (the bare one otherwise);
    ``val_loader`` is made once, as the validation split is read in the same order every epoch.
    """

    cfg: LoopConfig
    ctx: DistContext
    device: torch.device
    splits: DataSplits
    loss_fn: LossFn
    train_model: nn.Module
    val_loader: DataLoader

    @classmethod
    def of(cls, model: nn.Module, splits: DataSplits, cfg: LoopConfig, loss_fn: LossFn | None, *,
           ctx: DistContext, device: torch.device) -> EpochSetup:
        """The setup for training ``model`` (already on ``device``, with its weights final: DDP copies rank 0's to
        the other ranks here); cross-entropy with ``cfg.label_smoothing`` and class weights when ``loss_fn`` is None."""
        if loss_fn is None:
            loss_fn = cross_entropy_loss(cfg.label_smoothing, split_class_weights(splits, cfg))
        train_model = model
        if ctx.enabled:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        val_loader = make_loader(splits.val, batch_size=cfg.batch_size * 2, shuffle=False, device=device, ctx=ctx,
                                 workers=cfg.workers)
        return cls(cfg, ctx, device, splits, loss_fn, train_model, val_loader)


def run_epoch(state: TrainState, setup: EpochSetup) -> dict[str, float]:
    """Train the epoch after ``state.epoch``, evaluate it and move the schedule on; returns the epoch's row.

    The row: ``epoch`` (1-based), ``lr`` (at the epoch's start), ``train_loss``, ``train_top1``, ``val_loss``,
    ``val_top1``, ``val_top5``, and ``skipped_steps`` where bfloat16 guards the steps. ``state`` itself only moves
    in its optimizer, schedule and scaler: :meth:`TrainState.record` takes the row.
    """
    cfg, ctx, epoch = setup.cfg, setup.ctx, state.epoch
    torch.manual_seed(cfg.seed + epoch)  # augmentation draws: the same sequence after a resume
    loader = make_loader(setup.splits.train, batch_size=cfg.batch_size, shuffle=True, device=setup.device, ctx=ctx,
                         workers=cfg.workers, seed=cfg.seed + epoch)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    lr = state.optimizer.param_groups[0]["lr"]
    per_step = cfg.schedule == "warmup-cosine"  # the schedule that moves every optimizer step (_make_scheduler)
    train = train_one_epoch(setup.train_model, loader, state.optimizer, setup.loss_fn, device=setup.device,
                            scaler=state.scaler, cfg=cfg, ctx=ctx, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                            on_step=state.scheduler.step if per_step else None)
    _broadcast_buffers(state.model, ctx)  # every rank evaluates (and rank 0 saves) the same BN statistics
    val = evaluate(state.model, setup.val_loader, num_classes=setup.splits.num_classes, device=setup.device,
                   amp=cfg.amp, channels_last=cfg.channels_last, ctx=ctx)
    if isinstance(state.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        state.scheduler.step(val.top1)
    elif state.scheduler is not None and not per_step:
        state.scheduler.step()
    row = {"epoch": epoch + 1, "lr": lr, "train_loss": train["loss"], "train_top1": train["top1"],
           "val_loss": val.loss, "val_top1": val.top1, "val_top5": val.top5}
    if "skipped_steps" in train:
        row["skipped_steps"] = train["skipped_steps"]
    logger.info("epoch %d/%d: train loss %.4f top-1 %.4f | val loss %.4f top-1 %.4f top-5 %.4f",
                epoch + 1, cfg.epochs, train["loss"], train["top1"], val.loss, val.top1, val.top5)
    return row


def divergence(model: nn.Module, row: dict[str, float]) -> str | None:
    """Why the epoch of ``row`` diverged (a non-finite loss, or weights or BatchNorm statistics holding NaN or inf:
    BatchNorm keeps the loss finite while its running variance overflows), or None when it did not."""
    broken = non_finite(unwrap(model))
    train_loss, val_loss = row["train_loss"], row["val_loss"]
    if math.isfinite(train_loss) and math.isfinite(val_loss) and not broken:
        return None
    loss = train_loss if not math.isfinite(train_loss) else val_loss
    what = (f"{len(broken)} weight or statistics tensor(s) hold NaN or inf ({', '.join(broken[:3])})"
            if broken else f"the loss became {loss}")
    return f"training diverged in epoch {row['epoch']}: {what}; lower --lr"


def _raise_if_diverged(model: nn.Module, row: dict[str, float], writer: RunWriter | None) -> None:
    """:class:`DivergedError` when the epoch of ``row`` diverged (:func:`divergence`), after ``writer`` removed the
    best checkpoint: no file at the final path, as a run that diverged delivers no model."""
    diverged = divergence(model, row)
    if diverged:
        if writer:
            writer.discard()
        raise DivergedError(diverged)


def early_stop(state: TrainState, cfg: LoopConfig) -> EarlyStop | None:
    """Whether ``--patience`` ends the run before its next epoch: that many epochs in a row without a better val
    top-1 (None: go on, or no ``--patience``)."""
    if not cfg.patience or state.since_best < cfg.patience:
        return None
    return EarlyStop(after_epoch=state.epoch, epochs=cfg.epochs, patience=cfg.patience,
                     best_epoch=int(state.best.get("epoch", 0)),
                     reason=f"val top-1 has not improved for {state.since_best} epoch(s)")


def _log_precision(device: torch.device, cfg: LoopConfig) -> None:
    if cfg.cpu_bf16 and device.type == "cpu" and mixed_precision(device, cfg.amp, True) == "float32":
        logger.warning("cpu_bf16: this CPU has no native bfloat16 (AVX512-BF16 / AMX) or amp is off: float32")
    logger.info("training in %s on %s%s", mixed_precision(device, cfg.amp, cfg.cpu_bf16), device,
                ", channels_last" if cfg.channels_last else "")


def _to_training_device(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def start_run(model: nn.Module, splits: DataSplits, cfg: LoopConfig, *, loss_fn: LossFn | None = None,
              resume_state: dict[str, Any] | None = None,
              ctx: DistContext | None = None) -> tuple[TrainState, EpochSetup]:
    """What :func:`fit` starts from: the process group joined, the seed set, ``model`` on its device, a fresh
    :class:`TrainState` (or the one ``resume_state`` holds) and the :class:`EpochSetup` its epochs share."""
    ctx = ctx or init_distributed(cfg.device)
    device = torch_device(cfg.device, ctx.local_rank)
    seed_everything(cfg.seed)
    state = TrainState.create(_to_training_device(model, device, cfg.channels_last), cfg, device=device,
                              steps_per_epoch=optimizer_steps_per_epoch(len(splits.train), cfg, ctx.world_size))
    _log_precision(device, cfg)
    if resume_state:
        state.restore(resume_state)
        logger.info("resuming after epoch %d of %d (best val top-1 so far %.4f)", state.epoch, cfg.epochs,
                    state.best_top1)
    # after the restore: under torchrun, DDP hands rank 0's weights to every rank as it wraps the model
    return state, EpochSetup.of(model, splits, cfg, loss_fn, ctx=ctx, device=device)


def fit(model: nn.Module, splits: DataSplits, cfg: LoopConfig, *, loss_fn: LossFn | None = None,
        writer: RunWriter | None = None, resume_state: dict[str, Any] | None = None,
        ctx: DistContext | None = None) -> FitResult:
    """Train ``model`` on ``splits.train``, evaluating on ``splits.val`` after every epoch.

    Args:
        model: the bare module (wrapped in DDP here when running under torchrun).
        splits: the data; ``splits.train`` carries the training transform.
        cfg: loop options.
        loss_fn: ``loss_fn(logits, targets, images)``; cross-entropy with ``cfg.label_smoothing`` when None.
        writer: receives the best model (by val top-1), every epoch the resumable state, and an early stop.
        resume_state: what ``writer.load_last()`` read (:meth:`TrainState.restore`); training goes on after it.
        ctx: the process group; read from torchrun's environment when None.

    Returns:
        the per-epoch history, the best epoch's metrics, and the early stop that ended the run, if one did.
    """
    state, setup = start_run(model, splits, cfg, loss_fn=loss_fn, resume_state=resume_state, ctx=ctx)
    writer = writer if setup.ctx.is_main else None  # only rank 0 writes files
    kept = _Kept(getattr(writer, "last", None) if resume_state else None, state.epoch)  # what --resume would use
    stop = None
    with _naming_checkpoint_on_interrupt(kept):
        while state.epoch < cfg.epochs and (stop := early_stop(state, cfg)) is None:
            row = run_epoch(state, setup)
            _raise_if_diverged(model, row, writer)
            with _interrupt_after_saving():
                if state.record(row) and writer:
                    writer.save_best(model, dict(row))
                if writer:
                    state.save(writer)
                    kept.checkpoint, kept.epoch = getattr(writer, "last", None), state.epoch
            if setup.ctx.enabled:
                tdist.barrier()
    if stop is not None:
        logger.info("early stop: %s", stop.reason)
        if writer:
            writer.save_stop(stop)
    return FitResult(state.history, state.best, stop)


def non_finite(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers (BatchNorm's running statistics too) holding NaN or inf."""
    return [name for name, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def shutdown_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
