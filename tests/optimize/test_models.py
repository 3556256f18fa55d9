"""optimize.models: ResNets per stem, freezing for transfer learning, and a ResNet rebuilt from its state_dict alone.

Untrained models at 32 px in eval mode: the shapes and the weights are what is promised, not accuracy.
tests/optimize/test_checkpoint.py checks the same rebuilding through saved checkpoints (and imagenet-os16).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optimize.errors import CheckpointError, ConfigError
from optimize.models import (build_resnet, conform_to_state_dict, guess_stem, model_from_state_dict,
                             set_trainable)


def _layer4_side(model: nn.Module, side: int = 32) -> tuple[int, int, int]:
    """(logits' classes, layer4's channels, layer4's output side) for one image of ``side`` pixels."""
    shapes = []
    hook = model.layer4.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape)))
    with torch.no_grad():
        logits = model.eval()(torch.randn(1, 3, side, side))
    hook.remove()
    (_, channels, height, width), = shapes
    assert height == width
    return logits.shape[1], channels, height


@pytest.mark.parametrize("arch, stem, side, expected", [
    ("resnet18", "imagenet", 32, (7, 512, 1)),  # 7x7/2 conv + max-pool, then 3 strided stages: 32 / 32
    ("resnet18", "cifar", 32, (7, 512, 4)),  # 3x3/1 conv, no pool: 16x the resolution through the body
    # layer4 unstrided, shortcut included: at 64 px a strided shortcut (2x2) would no longer broadcast onto 4x4
    ("resnet18", "imagenet-os16", 64, (7, 512, 4)),
    ("resnet50", "imagenet", 32, (7, 2048, 1)),  # Bottleneck: 4x the width out of layer4
])
def test_the_output_and_final_features_per_arch_and_stem(arch, stem, side, expected):
    torch.manual_seed(0)
    model = build_resnet(arch, 7, stem=stem)
    assert _layer4_side(model, side) == expected
    assert model.fc.out_features == 7 and model.fc.in_features == expected[1]
    assert isinstance(model.maxpool, nn.Identity) == (stem == "cifar")
    assert model.conv1.kernel_size == ((3, 3) if stem == "cifar" else (7, 7))


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "resnet19", "num_classes": 10}, "unknown architecture 'resnet19'; choose one of resnet18, resnet34"),
    ({"arch": "resnet18", "num_classes": 10, "stem": "vit"}, "unknown stem 'vit'; choose one of imagenet, cifar"),
    ({"arch": "resnet18", "num_classes": 1}, "a classifier needs at least 2 classes, got 1"),
])
def test_bad_builds_are_refused_with_the_choices(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_resnet(**kwargs)


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, child in model.named_children()
            if any(p.requires_grad for p in child.parameters())}


@pytest.mark.parametrize("kwargs, trainable", [
    ({}, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}),
    ({"freeze_backbone": True}, {"fc"}),
    ({"trainable_layers": 0}, {"fc"}),
    ({"freeze_backbone": True, "trainable_layers": 0}, {"fc"}),
    ({"trainable_layers": 2}, {"layer3", "layer4", "fc"}),
    ({"trainable_layers": 4}, {"layer1", "layer2", "layer3", "layer4", "fc"}),  # the stem stays frozen
])
def test_set_trainable_leaves_the_classifier_and_the_last_stages(kwargs, trainable):
    model = build_resnet("resnet18", 3)
    returned = set_trainable(model, **kwargs)
    assert _trainable(model) == trainable
    # in the model's order; nothing frozen: every child, the parameter-free ones too
    assert returned == [name for name, _ in model.named_children()
                        if name in trainable | ({"relu", "maxpool", "avgpool"} if not kwargs else set())]


@pytest.mark.parametrize("kwargs, message", [
    ({"freeze_backbone": True, "trainable_layers": 2}, "--freeze-backbone trains only the classifier"),
    ({"trainable_layers": 5}, r"--trainable-layers must be 0\.\.4 \(got 5\)"),
])
def test_set_trainable_refuses_what_cannot_be_meant(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        set_trainable(build_resnet("resnet18", 3), **kwargs)


def test_set_trainable_needs_a_resnet_layout():
    with pytest.raises(ConfigError, match="need a torchvision-style ResNet"):
        set_trainable(nn.Sequential(nn.Linear(2, 2)), freeze_backbone=True)


def test_the_stem_is_read_from_the_first_convolution():
    assert guess_stem(build_resnet("resnet18", 3, stem="cifar").state_dict()) == "cifar"
    assert guess_stem(build_resnet("resnet18", 3, stem="imagenet-os16").state_dict()) == "imagenet"  # same shapes
    assert guess_stem({}) == "imagenet"


def _narrowed_state_dict() -> dict[str, torch.Tensor]:
    """A resnet18's state_dict with layer1.0's inner width cut from 64 to 24 channels (an l1-channel prune)."""
    torch.manual_seed(0)
    state = build_resnet("resnet18", 4, stem="cifar").state_dict()
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"][:24]
    for key in ("weight", "bias", "running_mean", "running_var"):
        state[f"layer1.0.bn1.{key}"] = state[f"layer1.0.bn1.{key}"][:24]
    state["layer1.0.conv2.weight"] = state["layer1.0.conv2.weight"][:, :24]
    return state


def test_a_narrowed_network_is_rebuilt_from_its_shapes_alone():
    state = _narrowed_state_dict()
    model, arch, stem = model_from_state_dict(state)
    assert (arch, stem) == ("resnet18", "cifar") and model.fc.out_features == 4
    assert model.layer1[0].conv1.out_channels == 24 and model.layer1[0].bn1.num_features == 24
    assert model.layer1[0].conv2.in_channels == 24 and model.layer1[1].conv1.in_channels == 64
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.eval()(torch.randn(2, 3, 16, 16)).shape == (2, 4)


def test_conform_rebuilds_only_the_layers_whose_shape_differs():
    model = build_resnet("resnet18", 4, stem="cifar")
    assert conform_to_state_dict(model, _narrowed_state_dict()) == ["layer1.0.conv1", "layer1.0.bn1",
                                                                    "layer1.0.conv2"]
    assert conform_to_state_dict(model, _narrowed_state_dict()) == []  # already conformed


def test_the_recorded_stem_wins_over_the_shapes():
    state = build_resnet("resnet18", 3, stem="imagenet-os16").state_dict()
    model, arch, stem = model_from_state_dict(state, stem="imagenet-os16")
    assert (arch, stem) == ("resnet18", "imagenet-os16") and _layer4_side(model)[2] == 2
    assert model_from_state_dict(state)[2] == "imagenet"  # unrecorded, the shapes say imagenet


@pytest.mark.parametrize("change, kwargs, message", [
    (lambda s: s, {"arch": "resnet34"}, r"m\.pth does not match --arch resnet34: it looks like resnet18; pass "
                                        r"--arch resnet18"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("layer4.1.")}, {"arch": "resnet18"},
     "it matches no known ResNet"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("layer4.1.")}, {},
     "its keys match none of resnet18, resnet34"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("fc.")}, {}, "has no fc.weight, so its class count"),
    (lambda s: {**s, "fc.bias": torch.zeros(7)}, {}, r"m\.pth does not fit resnet18: "),
])
def test_state_dicts_that_are_not_the_resnet_asked_for_are_refused(change, kwargs, message):
    state = change(build_resnet("resnet18", 3).state_dict())
    with pytest.raises(CheckpointError, match=message):
        model_from_state_dict(state, source="m.pth", **kwargs)
