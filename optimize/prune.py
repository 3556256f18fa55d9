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

Channel pruning leaves every BatchNorm's running statistics describing channels that are gone from the layer
before it, which is why a pruned network used to score chance before fine-tuning; ``bn_images`` training
images are therefore run through the pruned network first (no gradients, no weight changes) to re-estimate
those statistics.

Fine-tuning runs the shared loop with the pruning masks held by ``torch.nn.utils.prune``'s re-parametrization
(weight = weight_orig * mask), so zeros stay zero; the masks are made permanent before saving. With
``steps`` > 1 the amount is reached in equal rounds with fine-tuning after each.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from .artifacts import Artifact, check_not_input, prepare_output, read_manifest, write_manifest
from .checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from .data import DataSplits, load_data
from .configs import PruneConfig
from .device import torch_device
from .distill import distillation_loss
from .errors import CheckpointError
from .evaluate import check_model_fits_data
from .loop import LoopConfig, evaluate, fit, make_loader, split_class_weights

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


# -- the three methods ----------------------------------------------------------------------------------

def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Mask keeping the 2 largest magnitudes of each group of 4 consecutive input channels.

    ``weight`` is a conv weight ``[out, in, kh, kw]`` with ``in % 4 == 0``; groups run along ``in`` at every
    (out, kh, kw) position, as sparse tensor cores read them.
    """
    o, i, kh, kw = weight.shape
    groups = weight.detach().abs().permute(0, 2, 3, 1).reshape(o, kh, kw, i // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups).scatter_(-1, keep, 1.0)
    return mask.reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous()


def apply_two_four(model: nn.Module) -> list[str]:
    """Mask every eligible conv 2:4 (held by torch.nn.utils.prune); returns the names masked."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels % 4 == 0:
            tprune.custom_from_mask(m, "weight", two_four_mask(m.weight))
            names.append(name)
    return names


def apply_l1_unstructured(layers: list[tuple[str, nn.Module]], fraction_of_remaining: float) -> None:
    """Zero ``fraction_of_remaining`` of the still-unpruned weights of ``layers``, ranked together by |w|."""
    tprune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=tprune.L1Unstructured,
                               amount=fraction_of_remaining)


def make_channel_pruner(model: nn.Module, cfg: PruneConfig, image_size: int):
    """Torch-Pruning's global L1 filter pruner for a torchvision ResNet (stem and fc outputs kept)."""
    import torch_pruning as tp

    if not (isinstance(getattr(model, "conv1", None), nn.Conv2d) and isinstance(getattr(model, "fc", None),
                                                                                nn.Linear)):
        raise CheckpointError(f"{cfg.model} is not a torchvision-style ResNet (no conv1/fc); l1-channel needs one")
    return tp.pruner.MetaPruner(
        model, _example(model, image_size),
        importance=tp.importance.MagnitudeImportance(p=1),
        global_pruning=True, pruning_ratio=cfg.target, iterative_steps=cfg.steps,
        max_pruning_ratio=cfg.max_layer_amount, isomorphic=cfg.isomorphic,
        ignored_layers=[model.conv1, model.fc], round_to=cfg.round_to)


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


def run(cfg: PruneConfig) -> Artifact:
    """Prune ``cfg.model``, fine-tune it, and write the pruned checkpoint with its figures."""
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

    model, size = loaded.model, loaded.preprocessing.image_size
    layers = prunable_layers(model, include_stem_and_fc=cfg.include_stem_and_fc)
    macs_before, params_before = count_macs_params(model, size)
    top1_before = _accuracy(model, splits, cfg.loop)
    logger.info("%s: val top-1 %.4f, %.1f M MACs, %.2f M params before pruning", cfg.model, top1_before,
                macs_before / 1e6, params_before / 1e6)

    pruner = make_channel_pruner(model, cfg, size) if cfg.method == "l1-channel" else None
    loss_fn = None
    if teacher:
        loss_fn = distillation_loss(teacher.model, temperature=cfg.temperature, alpha=cfg.alpha,
                                    weight=split_class_weights(splits, cfg.loop))
    rounds, done = [], 0.0
    for step in range(1, cfg.steps + 1):
        model.cpu()
        if cfg.method == "l1-unstructured":
            goal = cfg.target * step / cfg.steps
            apply_l1_unstructured(layers, (goal - done) / (1.0 - done))
            done = goal
        elif cfg.method == "l1-channel":
            pruner.step()
        else:
            apply_two_four(model)
        row: dict[str, Any] = {"step": step, "top1_pruned": _accuracy(model, splits, cfg.loop)}
        if cfg.method == "l1-channel" and cfg.bn_images:
            row["bn_images"] = reestimate_batchnorm(model, splits, cfg.loop, cfg.bn_images)
            row["top1_bn"] = _accuracy(model, splits, cfg.loop)
        if cfg.finetune_epochs:
            # masks held by torch.nn.utils.prune: plain NCHW weights (its global ranking views them flat) and
            # float32 (masked zeros were found non-zero after bf16 fine-tuning in 2 of 4 full test runs; cause
            # not pinned down, see the issue note)
            held = cfg.method != "l1-channel"
            loop = dataclasses.replace(cfg.finetune_loop,
                                       channels_last=cfg.loop.channels_last and not held,
                                       amp=cfg.loop.amp and not held)
            fit(model, splits, loop, loss_fn=loss_fn)
            model.to(memory_format=torch.contiguous_format)
            row["top1_finetuned"] = _accuracy(model, splits, cfg.loop)
        rounds.append(row)
        logger.info("round %d/%d: top-1 %.4f after pruning%s%s", step, cfg.steps, row["top1_pruned"],
                    f", {row['top1_bn']:.4f} with BatchNorm re-estimated" if "top1_bn" in row else "",
                    f", {row['top1_finetuned']:.4f} after fine-tuning" if "top1_finetuned" in row else "")

    model.cpu().eval()  # masks still held: save_checkpoint folds them (checkpoint.fold_prune_masks)
    layers = prunable_layers(model, include_stem_and_fc=cfg.include_stem_and_fc)
    macs_after, params_after = count_macs_params(model, size)
    report = sparsity(layers)
    metrics = {
        "method": cfg.method, "amount": 0.5 if cfg.method == "2:4" else cfg.target,
        "top1_before": top1_before, "top1_pruned": rounds[-1]["top1_pruned"],
        # before any fine-tuning: with re-estimated BatchNorm statistics when bn_images > 0
        "top1_before_finetune": rounds[-1].get("top1_bn", rounds[-1]["top1_pruned"]),
        "top1_after": rounds[-1].get("top1_finetuned", rounds[-1]["top1_pruned"]),
        "macs_before": macs_before, "macs_after": macs_after, "params_before": params_before,
        "params_after": params_after, "nonzero_params_after": params_after - report["zeros"],
        "sparsity": report["overall"], "sparsity_per_layer": report["per_layer"], "rounds": rounds,
    }
    metrics["val_top1"] = metrics["top1_after"]
    save_checkpoint(out, model, arch=loaded.arch, stem=loaded.stem, class_names=splits.class_names,
                    preprocessing=loaded.preprocessing, metrics=metrics)
    inputs = {"model": loaded.describe(), "data": splits.describe()}
    if teacher:
        inputs["teacher"] = teacher.describe()
    write_manifest(out, stage="prune", config=cfg, inputs=inputs, preprocessing=loaded.preprocessing.to_dict(),
                   class_names=splits.class_names, metrics=metrics, extra={"arch": loaded.arch, "stem": loaded.stem})
    return Artifact.of(out)
