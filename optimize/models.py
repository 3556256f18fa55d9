"""ResNet builders, and rebuilding a ResNet from nothing but its state_dict.

Helpers -> :func:`build_resnet` (torchvision's ResNets with a choice of stem) -> :func:`model_from_state_dict`,
which recovers the architecture, the class count, the stem and, for channel-pruned networks, every narrowed
layer from the tensor shapes alone. That is what lets every checkpoint load with ``weights_only=True``: no
pickled module is ever needed.
"""

from __future__ import annotations

import logging
import re
from typing import Mapping

import torch
from torch import nn
from torchvision import models as tvm

from .configs import ARCHS, STEMS
from .errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

# blocks per stage and whether the block is a Bottleneck, as in torchvision's resnet.py
RESNET_LAYOUTS = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
    "resnet152": ((3, 8, 36, 3), True),
}
assert tuple(RESNET_LAYOUTS) == ARCHS, "configs.ARCHS names the ResNets built here"


def _use_cifar_stem(model: tvm.ResNet) -> None:
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def _unstride_last_stage(model: tvm.ResNet) -> None:
    """Output stride 16: layer4's first block keeps its input's resolution (the same weights, one stride 1)."""
    block = model.layer4[0]
    conv = block.conv2 if isinstance(block, tvm.resnet.Bottleneck) else block.conv1
    conv.stride = (1, 1)
    block.downsample[0].stride = (1, 1)


def build_resnet(arch: str, num_classes: int, *, stem: str = "imagenet", pretrained: bool = False) -> tvm.ResNet:
    """A torchvision ResNet with ``num_classes`` outputs.

    Args:
        arch: one of :data:`ARCHS`.
        num_classes: size of the classifier.
        stem: ``imagenet`` (7x7/2 conv + max-pool), ``cifar`` (3x3/1 conv, no pool) for small images, or
            ``imagenet-os16`` (the imagenet stem, layer4 not strided: 2x2 final features at 32 px).
        pretrained: start from torchvision's ImageNet weights (needs the network); the classifier is replaced.
    """
    if arch not in RESNET_LAYOUTS:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if stem not in STEMS:
        raise ConfigError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    if pretrained:
        weights = tvm.get_model_weights(arch).DEFAULT
        try:
            model = getattr(tvm, arch)(weights=weights)
        except Exception as e:  # noqa: BLE001 - urllib/hub errors have many types
            raise CheckpointError(f"could not fetch torchvision's {weights} ({type(e).__name__}: {e}); go online, "
                                  "or drop --pretrained") from e
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        if stem == "cifar":
            logger.warning("the cifar stem replaces the pretrained first convolution; it starts untrained")
    else:
        # no zero_init_residual: on the short CPU budgets measured here it cost accuracy (ResNet-50, 6k images,
        # 1 epoch, AdamW: 50.9% with it, 66.1% without)
        model = getattr(tvm, arch)(weights=None, num_classes=num_classes)
    if stem == "cifar":
        _use_cifar_stem(model)
    elif stem == "imagenet-os16":
        _unstride_last_stage(model)
    return model


STAGES = ("layer1", "layer2", "layer3", "layer4")


def set_trainable(model: nn.Module, *, freeze_backbone: bool = False, trainable_layers: int | None = None) -> list[str]:
    """Freeze a ResNet for transfer learning; returns the top-level children left trainable.

    ``freeze_backbone``: only the classifier ``fc`` trains. ``trainable_layers=N``: the last ``N`` of the four
    residual stages train too (0 is the same as ``freeze_backbone``, 4 leaves the stem frozen). Frozen
    parameters get ``requires_grad=False``; the training loop keeps their BatchNorm statistics as well.
    """
    if freeze_backbone and trainable_layers not in (None, 0):
        raise ConfigError("--freeze-backbone trains only the classifier; drop it or --trainable-layers")
    if not freeze_backbone and trainable_layers is None:
        return [name for name, _ in model.named_children()]
    n = 0 if freeze_backbone else trainable_layers
    if not 0 <= n <= len(STAGES):
        raise ConfigError(f"--trainable-layers must be 0..{len(STAGES)} (got {n})")
    if not all(isinstance(getattr(model, name, None), nn.Module) for name in (*STAGES, "fc")):
        raise ConfigError("--freeze-backbone / --trainable-layers need a torchvision-style ResNet (layer1-4, fc)")
    trainable = {"fc", *STAGES[len(STAGES) - n:]}
    for name, child in model.named_children():
        child.requires_grad_(name in trainable)
    return [name for name, _ in model.named_children() if name in trainable]


_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


def guess_arch(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Name the torchvision ResNet whose block layout matches ``state_dict``'s keys, or None."""
    blocks = [0, 0, 0, 0]
    for key in state_dict:
        m = _BLOCK_KEY.match(key)
        if m:
            stage, index = int(m.group(1)) - 1, int(m.group(2))
            blocks[stage] = max(blocks[stage], index + 1)
    bottleneck = any(k.endswith("conv3.weight") for k in state_dict)
    for arch, (layout, is_bottleneck) in RESNET_LAYOUTS.items():
        if tuple(blocks) == layout and bottleneck == is_bottleneck:
            return arch
    return None


def guess_stem(state_dict: Mapping[str, torch.Tensor]) -> str:
    weight = state_dict.get("conv1.weight")
    return "cifar" if weight is not None and weight.shape[-1] == 3 else "imagenet"


def conform_to_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Replace each conv / batch-norm / linear layer whose stored shape differs (a channel-pruned layer).

    Returns:
        the names of the layers rebuilt.
    """
    rebuilt = []
    for name, module in list(model.named_modules()):
        weight = state_dict.get(f"{name}.weight")
        if weight is None or not isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            continue
        if tuple(weight.shape) == tuple(module.weight.shape):
            continue
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(weight.shape[1] * module.groups, weight.shape[0], module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, bias=f"{name}.bias" in state_dict)
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(weight.shape[0], eps=module.eps, momentum=module.momentum)
        else:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=f"{name}.bias" in state_dict)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        rebuilt.append(name)
    return rebuilt


def model_from_state_dict(state_dict: Mapping[str, torch.Tensor], *, arch: str | None = None,
                          stem: str | None = None, source: str = "state_dict") -> tuple[nn.Module, str, str]:
    """Rebuild a ResNet (narrowed layers included) from its state_dict alone.

    Args:
        state_dict: torchvision-style ResNet keys.
        arch: expected architecture; guessed from the keys when None.
        stem: one of :data:`STEMS`; read from ``conv1``'s kernel size when None (``imagenet-os16`` has
            imagenet's shapes, so only a recorded stem names it).
        source: the file it came from, for error messages.

    Returns:
        ``(model, arch, stem)``.
    """
    guessed = guess_arch(state_dict)
    if arch is None:
        if guessed is None:
            raise CheckpointError(f"{source} does not hold a torchvision ResNet state_dict (its keys match none of "
                                  f"{', '.join(ARCHS)}); export it as one, or load it as TorchScript")
        arch = guessed
    elif guessed != arch:
        hint = f"it looks like {guessed}; pass --arch {guessed}" if guessed else "it matches no known ResNet"
        raise CheckpointError(f"{source} does not match --arch {arch}: {hint}")
    if "fc.weight" not in state_dict:
        raise CheckpointError(f"{source} has no fc.weight, so its class count is unknown; save the whole state_dict")
    stem = stem or guess_stem(state_dict)
    model = build_resnet(arch, int(state_dict["fc.weight"].shape[0]), stem=stem)
    rebuilt = conform_to_state_dict(model, state_dict)
    if rebuilt:
        logger.info("rebuilt %d narrowed layer(s) from stored shapes", len(rebuilt))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[:3]
        raise CheckpointError(f"{source} does not fit {arch}: {' '.join(first)}") from e
    return model, arch, stem
