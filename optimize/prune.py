"""Stage ``prune``: global L1 pruning of a ResNet, with fine-tuning that holds the sparsity.

Methods:
    ``l1-unstructured``: ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured`` over every conv and
        linear weight (the stem conv and fc only with ``include_stem_and_fc``): ``amount`` of those weights,
        ranked together by magnitude, become zero. The network keeps its shape; the zeros pay off only on
        sparse-aware runtimes.
    ``l1-channel``: whole filters removed by Torch-Pruning's dependency graph (residual-coupled channels go
        together), ranked globally by the L1 norm of their group, channel counts rounded to ``round_to``;
        the stem's and fc's outputs are kept. The network really shrinks: fewer MACs on every runtime.
    ``2:4``: semi-structured sparsity for sparse tensor cores (Ampere, Orin): in every conv whose input channel
        count is a multiple of 4, each group of 4 weights along the input channels keeps its 2 largest.

Each method is one :class:`Pruner` (``run`` picks it from :data:`PRUNERS` by name) with one face, ``step()``, and
what it ranks by is a scorer kept apart from it, as Torch-Pruning keeps importances apart from pruners: the weight
pruners take any :data:`WeightScorer` (default :func:`l1_scores`), the channel pruner any Torch-Pruning importance
(default the L1 norm of each channel's group).

Channel pruning leaves every BatchNorm's running statistics describing channels that are gone from the layer
before it, which is why a pruned network used to score chance before fine-tuning; ``bn_images`` training
images are therefore run through the pruned network first (no gradients, no weight changes) to re-estimate
those statistics.

Fine-tuning runs the shared loop with the pruning masks held by ``torch.nn.utils.prune``'s re-parametrization
(weight = weight_orig * mask), so zeros stay zero; the masks are made permanent before saving. With
``steps`` > 1 the amount is reached in equal rounds with fine-tuning after each.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from .artifacts import Artifact, check_not_input, prepare_output, read_manifest, write_manifest
from .checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from .configs import PruneConfig
from .data import DataSplits, load_data
from .device import torch_device
from .distill import distillation_loss
from .errors import CheckpointError
from .evaluate import check_model_fits_data
from .loop import LoopConfig, LossFn, evaluate, fit, make_loader, split_class_weights

logger = logging.getLogger(__name__)

# -- what is prunable and how sparse it is ----------------------------------------------------------------

def prunable_layers(model: nn.Module, *, include_stem_and_fc: bool = False) -> list[tuple[str, nn.Module]]:
    """Conv and linear layers pruning may touch, in model order."""
    ends = {"conv1", "fc"}
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and (include_stem_and_fc or name not in ends)]


def sparsity(layers: list[tuple[str, nn.Module]]) -> dict[str, Any]:
    """Zero fraction of each layer's (effective) weight and over all of them."""
    per_layer, zeros, total = {}, 0, 0
    for name, m in layers:
        w = m.weight.detach()
        z = int((w == 0).sum())
        per_layer[name] = {"zeros": z, "numel": w.numel(), "sparsity": z / w.numel(), "shape": list(w.shape)}
        zeros, total = zeros + z, total + w.numel()
    return {"overall": zeros / max(total, 1), "zeros": zeros, "numel": total, "per_layer": per_layer}


def _example(model: nn.Module, image_size: int) -> torch.Tensor:
    """A zero image on the model's device: Torch-Pruning traces the model with it (a model left on CUDA by the
    accuracy check before pruning failed the CUDA pipeline with a CPU example)."""
    weight = next(model.parameters(), None)
    return torch.zeros(1, 3, image_size, image_size, device=weight.device if weight is not None else "cpu")


def count_macs_params(model: nn.Module, image_size: int) -> tuple[int, int]:
    """Dense multiply-accumulates of one image, and the parameter count (Torch-Pruning's counter)."""
    import torch_pruning as tp

    was_training = model.training
    macs, params = tp.utils.count_ops_and_params(model.eval(), _example(model, image_size))
    model.train(was_training)
    return int(macs), int(params)


# -- scorers: which weights or channels matter ------------------------------------------------------------

WeightScorer = Callable[[nn.Module], torch.Tensor]
"""Scores of one layer's weights, shaped like its ``weight``, non-negative: the higher, the likelier kept."""

GroupScorer = Callable[[Any], torch.Tensor]
"""A Torch-Pruning importance: a dependency group (coupled layers) -> one score per channel, higher kept."""


def l1_scores(module: nn.Module) -> torch.Tensor:
    """|w| of every weight of ``module`` (its effective weight while a pruning mask is held).

    The default scorer of the weight pruners; any other :data:`WeightScorer` takes its place, e.g. keeping the
    smallest weights instead::

        UnstructuredPruner(layers, amount=0.5, scorer=lambda m: 1 / (l1_scores(m) + 1e-12))
    """
    return module.weight.detach().abs()


def _scores(scorer: WeightScorer, module: nn.Module) -> torch.Tensor:
    """``scorer(module)``, refused unless shaped like the weight and non-negative (torch's L1 ranking takes
    magnitudes, so a negative score would silently count as a large one)."""
    scores = scorer(module)
    if scores.shape != module.weight.shape or bool((scores < 0).any()):
        raise ValueError(f"a weight scorer must return non-negative scores shaped like the weight "
                         f"{tuple(module.weight.shape)}; got {tuple(scores.shape)}")
    return scores


def keep_two_of_four(scores: torch.Tensor) -> torch.Tensor:
    """Mask keeping the 2 highest ``scores`` of each group of 4 consecutive input channels.

    ``scores`` is shaped like a conv weight ``[out, in, kh, kw]`` with ``in % 4 == 0``; groups run along ``in``
    at every (out, kh, kw) position, as sparse tensor cores read them.
    """
    o, i, kh, kw = scores.shape
    groups = scores.permute(0, 2, 3, 1).reshape(o, kh, kw, i // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups).scatter_(-1, keep, 1.0)
    return mask.reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous()


# -- pruners: one per method, the same face -------------------------------------------------------------

class Pruner(abc.ABC):
    """One pruning method, built on a model: each :meth:`step` is one of ``steps`` rounds, in place.

    Attributes:
        amount: the fraction removed once every round is done (the manifest's ``amount``).
        holds_masks: the zeros are held by ``torch.nn.utils.prune`` masks on a network that keeps its shape;
            False when channels are removed (BatchNorm statistics then need re-estimating).
    """

    amount: float
    holds_masks: ClassVar[bool] = True

    @classmethod
    @abc.abstractmethod
    def from_config(cls, model: nn.Module, cfg: PruneConfig, image_size: int) -> Pruner:
        """The pruner ``cfg`` asks for, with the default (L1) scorer."""

    @abc.abstractmethod
    def step(self) -> None:
        """Prune one round."""


class UnstructuredPruner(Pruner):
    """``l1-unstructured``: single weights of ``layers``, ranked together by ``scorer`` (global ranking).

    Round ``k`` of ``steps`` brings the zero fraction to ``amount * k / steps``: it prunes that share of the
    weights still unpruned (the held masks keep earlier zeros out of the ranking).
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], *, amount: float, steps: int = 1,
                 scorer: WeightScorer = l1_scores):
        self.layers, self.amount, self.steps, self.scorer = layers, amount, steps, scorer
        self._rounds, self._done = 0, 0.0

    @classmethod
    def from_config(cls, model: nn.Module, cfg: PruneConfig, image_size: int) -> UnstructuredPruner:
        return cls(prunable_layers(model, include_stem_and_fc=cfg.include_stem_and_fc), amount=cfg.target,
                   steps=cfg.steps)

    def step(self) -> None:
        self._rounds += 1
        goal = self.amount * self._rounds / self.steps
        params = [(m, "weight") for _, m in self.layers]
        tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured,
                                   importance_scores={p: _scores(self.scorer, p[0]) for p in params},
                                   amount=(goal - self._done) / (1.0 - self._done))
        self._done = goal


class TwoFourPruner(Pruner):
    """``2:4``: in every conv whose input channel count is a multiple of 4, the 2 of each 4 that ``scorer``
    ranks highest are kept. One round: the pattern is the amount (half)."""

    amount = 0.5

    def __init__(self, model: nn.Module, *, scorer: WeightScorer = l1_scores):
        self.model, self.scorer = model, scorer

    @classmethod
    def from_config(cls, model: nn.Module, cfg: PruneConfig, image_size: int) -> TwoFourPruner:
        return cls(model)

    def step(self) -> None:
        for m in self.model.modules():
            if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels % 4 == 0:
                tprune.custom_from_mask(m, "weight", keep_two_of_four(_scores(self.scorer, m)))


class ChannelPruner(Pruner):
    """``l1-channel``: whole filters removed by Torch-Pruning's dependency graph, ranked globally by ``scorer``
    (default: the L1 norm of each channel's group), the stem's and the classifier's outputs kept."""

    holds_masks = False

    def __init__(self, model: nn.Module, example: torch.Tensor, *, amount: float, steps: int = 1,
                 max_layer_amount: float = 1.0, isomorphic: bool = False, round_to: int | None = None,
                 scorer: GroupScorer | None = None):
        import torch_pruning as tp

        self.amount = amount
        self._pruner = tp.pruner.MetaPruner(
            model, example, importance=scorer if scorer is not None else tp.importance.MagnitudeImportance(p=1),
            global_pruning=True, pruning_ratio=amount, iterative_steps=steps,
            max_pruning_ratio=max_layer_amount, isomorphic=isomorphic,
            ignored_layers=[model.conv1, model.fc], round_to=round_to)

    @classmethod
    def from_config(cls, model: nn.Module, cfg: PruneConfig, image_size: int) -> ChannelPruner:
        """Refuses a model that is not a torchvision-style ResNet: the stem and fc it keeps whole must be there."""
        if not (isinstance(getattr(model, "conv1", None), nn.Conv2d)
                and isinstance(getattr(model, "fc", None), nn.Linear)):
            raise CheckpointError(f"{cfg.model} is not a torchvision-style ResNet (no conv1/fc); l1-channel needs "
                                  "one")
        return cls(model, _example(model, image_size), amount=cfg.target, steps=cfg.steps,
                   max_layer_amount=cfg.max_layer_amount, isomorphic=cfg.isomorphic, round_to=cfg.round_to)

    def step(self) -> None:
        self._pruner.step()


PRUNERS: dict[str, type[Pruner]] = {"l1-unstructured": UnstructuredPruner, "l1-channel": ChannelPruner,
                                    "2:4": TwoFourPruner}
"""The pruner of each ``--method`` (the keys are :data:`optimize.configs.PRUNE_METHODS`)."""


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, splits: DataSplits, loop: LoopConfig, images: int) -> int:
    """Recompute every BatchNorm's running mean and variance from ``images`` training images.

    A cumulative average over the batches (momentum None), in train mode under no_grad: the weights do not
    change. The images go through the eval transform. Returns the number of images used.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or images <= 0 or len(splits.train) == 0:
        return 0
    device = torch_device(loop.device)
    model.to(device)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    # un-augmented training images in a seeded order: the statistics of what evaluation feeds, the same every run
    plain = splits.train.without_transform()
    plain.transform = splits.val.transform
    loader = make_loader(plain, batch_size=min(256, images), shuffle=True, device=device, workers=loop.workers,
                         seed=loop.seed)
    was_training, seen = model.training, 0
    model.train()
    try:
        for x, _ in loader:
            if len(x) == 0:
                continue
            model(x[: images - seen].to(device))
            seen += min(len(x), images - seen)
            if seen >= images:
                break
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return seen


# -- the stage ------------------------------------------------------------------------------------------

def _check_not_pruned_otherwise(loaded: LoadedModel, method: str) -> None:
    manifest = read_manifest(loaded.path) or {}
    previous = (manifest.get("config") or {}).get("method") if manifest.get("stage") == "prune" else None
    if previous and previous != method:
        raise CheckpointError(f"{loaded.path} is already pruned with {previous}; prune the unpruned model with "
                              f"{method} instead, or keep --method {previous}")


def _accuracy(model: nn.Module, splits: DataSplits, loop: LoopConfig) -> float:
    device = torch_device(loop.device)
    loader = make_loader(splits.val, batch_size=256, shuffle=False, device=device, workers=loop.workers)
    return evaluate(model.to(device), loader, num_classes=splits.num_classes, device=device).top1


@dataclass(frozen=True)
class _Inputs:
    """The model to prune, its data and the optional teacher, loaded and checked before any work."""

    out: Path
    loaded: LoadedModel
    splits: DataSplits
    teacher: LoadedModel | None


def _load_inputs(cfg: PruneConfig) -> _Inputs:
    """Load ``cfg.model``, its data and the teacher, with every check that can refuse them before pruning."""
    check_not_input(cfg.out, {"--model": cfg.model, "--teacher": cfg.teacher})
    out = prepare_output(cfg.out)
    loaded = load_checkpoint(cfg.model, arch=cfg.arch, trust=cfg.trust_checkpoint)
    if not loaded.trainable:
        raise CheckpointError(f"{cfg.model} is a {loaded.kind} model edgeopt cannot rebuild; prune a ResNet "
                              "checkpoint or state_dict")
    _check_not_pruned_otherwise(loaded, cfg.method)
    if loaded.preprocessing is None:
        raise CheckpointError(f"{cfg.model} records no preprocessing; evaluate or distill it into an edgeopt "
                              "checkpoint first")
    splits = load_data(cfg.data, loaded.preprocessing, train_limit=cfg.train_limit, val_limit=cfg.val_limit)
    check_model_fits_data(loaded, splits)
    teacher = None
    if cfg.teacher:
        teacher = load_checkpoint(cfg.teacher, trust=cfg.trust_checkpoint)
        check_model_fits_data(teacher, splits)
    return _Inputs(out, loaded, splits, teacher)


def _round(step: int, model: nn.Module, pruner: Pruner, cfg: PruneConfig, splits: DataSplits,
           loss_fn: LossFn | None) -> dict[str, Any]:
    """Prune round ``step`` of ``cfg.steps``, re-estimate BatchNorm and fine-tune as asked; the round's figures."""
    model.cpu()
    pruner.step()
    row: dict[str, Any] = {"step": step, "top1_pruned": _accuracy(model, splits, cfg.loop)}
    if not pruner.holds_masks and cfg.bn_images:
        row["bn_images"] = reestimate_batchnorm(model, splits, cfg.loop, cfg.bn_images)
        row["top1_bn"] = _accuracy(model, splits, cfg.loop)
    if cfg.finetune_epochs:
        # masks held by torch.nn.utils.prune: plain NCHW weights (its global ranking views them flat) and
        # float32 (masked zeros were found non-zero after bf16 fine-tuning in 2 of 4 full test runs; cause
        # not pinned down, see the issue note)
        held = pruner.holds_masks
        loop = dataclasses.replace(cfg.finetune_loop, channels_last=cfg.loop.channels_last and not held,
                                   amp=cfg.loop.amp and not held)
        fit(model, splits, loop, loss_fn=loss_fn)
        model.to(memory_format=torch.contiguous_format)
        row["top1_finetuned"] = _accuracy(model, splits, cfg.loop)
    logger.info("round %d/%d: top-1 %.4f after pruning%s%s", step, cfg.steps, row["top1_pruned"],
                f", {row['top1_bn']:.4f} with BatchNorm re-estimated" if "top1_bn" in row else "",
                f", {row['top1_finetuned']:.4f} after fine-tuning" if "top1_finetuned" in row else "")
    return row


def _metrics(model: nn.Module, size: int, cfg: PruneConfig, amount: float, top1_before: float,
             before: tuple[int, int], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The checkpoint's and manifest's figures: accuracy at each point, MACs and parameters, sparsity."""
    macs_after, params_after = count_macs_params(model, size)
    report = sparsity(prunable_layers(model, include_stem_and_fc=cfg.include_stem_and_fc))
    last = rounds[-1]
    metrics = {
        "method": cfg.method, "amount": amount,
        "top1_before": top1_before, "top1_pruned": last["top1_pruned"],
        # before any fine-tuning: with re-estimated BatchNorm statistics when bn_images > 0
        "top1_before_finetune": last.get("top1_bn", last["top1_pruned"]),
        "top1_after": last.get("top1_finetuned", last["top1_pruned"]),
        "macs_before": before[0], "macs_after": macs_after, "params_before": before[1],
        "params_after": params_after, "nonzero_params_after": params_after - report["zeros"],
        "sparsity": report["overall"], "sparsity_per_layer": report["per_layer"], "rounds": rounds,
    }
    metrics["val_top1"] = metrics["top1_after"]
    return metrics


def run(cfg: PruneConfig) -> Artifact:
    """Prune ``cfg.model``, fine-tune it, and write the pruned checkpoint with its figures.

    The method's pruner comes from :data:`PRUNERS`; each of ``cfg.steps`` rounds (:func:`_round`) prunes,
    re-estimates BatchNorm where channels went, and fine-tunes when asked.
    """
    inputs = _load_inputs(cfg)
    out, loaded, splits, teacher = inputs.out, inputs.loaded, inputs.splits, inputs.teacher
    model, size = loaded.model, loaded.preprocessing.image_size
    macs_before, params_before = count_macs_params(model, size)
    top1_before = _accuracy(model, splits, cfg.loop)
    logger.info("%s: val top-1 %.4f, %.1f M MACs, %.2f M params before pruning", cfg.model, top1_before,
                macs_before / 1e6, params_before / 1e6)

    pruner = PRUNERS[cfg.method].from_config(model, cfg, size)
    loss_fn = None
    if teacher:
        loss_fn = distillation_loss(teacher.model, temperature=cfg.temperature, alpha=cfg.alpha,
                                    weight=split_class_weights(splits, cfg.loop))
    rounds = [_round(step, model, pruner, cfg, splits, loss_fn) for step in range(1, cfg.steps + 1)]

    model.cpu().eval()  # masks still held: save_checkpoint folds them (checkpoint.fold_prune_masks)
    metrics = _metrics(model, size, cfg, pruner.amount, top1_before, (macs_before, params_before), rounds)
    save_checkpoint(out, model, arch=loaded.arch, stem=loaded.stem, class_names=splits.class_names,
                    preprocessing=loaded.preprocessing, metrics=metrics)
    described = {"model": loaded.describe(), "data": splits.describe()}
    if teacher:
        described["teacher"] = teacher.describe()
    write_manifest(out, stage="prune", config=cfg, inputs=described, preprocessing=loaded.preprocessing.to_dict(),
                   class_names=splits.class_names, metrics=metrics, extra={"arch": loaded.arch, "stem": loaded.stem})
    return Artifact.of(out)
