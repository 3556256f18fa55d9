"""Every checkpoint a user may arrive with loads safely, or is refused with a one-line error."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torchvision
from torch import nn

from conftest import error_line, run_cli, run_main
from optimize.checkpoint import load_checkpoint, save_checkpoint
from optimize.data import FASHION_MNIST_CLASSES
from optimize.models import build_resnet, guess_arch
from optimize.preprocess import fashion_mnist_preset


def _eval(model_path, *extra):
    proc = run_cli("-q", "evaluate", "--model", model_path, "--val-limit", "256", "--json", *extra, check=True)
    return json.loads(proc.stdout)


def test_plain_torchvision_state_dict_with_arch(trained, tmp_path):
    reference = _eval(trained)
    plain = tmp_path / "plain.pth"
    torch.save(torch.load(trained, weights_only=True)["state_dict"], plain)
    report = _eval(plain, "--arch", "resnet18", "--image-size", "16")
    assert report["top1"] == reference["top1"] and report["model"]["kind"] == "state_dict"

    # nested the way torchvision's reference scripts save it, with DataParallel's prefix
    nested = tmp_path / "nested.pth"
    sd = {f"module.{k}": v for k, v in torch.load(plain, weights_only=True).items()}
    torch.save({"model": sd, "epoch": 3}, nested)
    assert _eval(nested, "--image-size", "16")["top1"] == reference["top1"]


def test_arch_mismatch_names_the_right_arch(trained, tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save(torch.load(trained, weights_only=True)["state_dict"], plain)
    proc = run_cli("-q", "evaluate", "--model", plain, "--arch", "resnet50")
    assert proc.returncode == 2
    assert "resnet18" in error_line(proc) and str(plain) in error_line(proc)


def test_guess_arch_for_every_resnet():
    for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        assert guess_arch(getattr(torchvision.models, arch)().state_dict()) == arch


def test_pickled_module_refused_unless_trusted(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(torchvision.models.resnet18(num_classes=10), path)
    proc = run_cli("-q", "evaluate", "--model", path, "--image-size", "16", "--val-limit", "64")
    assert proc.returncode == 2
    assert "--trust-checkpoint" in error_line(proc) and str(path) in error_line(proc)
    report = _eval(path, "--image-size", "16", "--trust-checkpoint")
    assert report["model"]["kind"] == "pickled-module" and report["model"]["arch"] == "resnet18"


def test_torchscript_teacher_evaluates(trained, tmp_path):
    model = load_checkpoint(trained).model
    scripted = tmp_path / "teacher.ts"
    torch.jit.trace(model, torch.randn(1, 3, 16, 16)).save(str(scripted))
    loaded = load_checkpoint(scripted)
    assert loaded.kind == "torchscript" and not loaded.trainable
    assert _eval(scripted, "--image-size", "16")["top1"] == _eval(trained)["top1"]


def _narrow(model: nn.Module) -> nn.Module:
    """Halve layer1.0's inner width and a quarter of layer4.1's, as channel pruning does."""
    block = model.layer1[0]
    block.conv1 = nn.Conv2d(64, 32, 3, 1, 1, bias=False)
    block.bn1 = nn.BatchNorm2d(32)
    block.conv2 = nn.Conv2d(32, 64, 3, 1, 1, bias=False)
    block = model.layer4[1]
    block.conv1 = nn.Conv2d(512, 384, 3, 1, 1, bias=False)
    block.bn1 = nn.BatchNorm2d(384)
    block.conv2 = nn.Conv2d(384, 512, 3, 1, 1, bias=False)
    return model


def test_narrowed_model_reloads_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = _narrow(build_resnet("resnet18", 10)).eval()
    path = save_checkpoint(tmp_path / "narrow.pth", model, arch="resnet18", stem="imagenet",
                           class_names=FASHION_MNIST_CLASSES, preprocessing=fashion_mnist_preset(image_size=16))
    torch.load(path, weights_only=True)  # nothing but tensors and primitives
    loaded = load_checkpoint(path)
    assert loaded.model.layer1[0].conv1.out_channels == 32 and loaded.model.layer4[1].bn1.num_features == 384
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(loaded.model(x), model(x))
    report = _eval(path)
    assert report["count"] == 256


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_output_stride_16_keeps_layer4_at_2x2_and_reloads_as_itself(arch, tmp_path):
    """imagenet-os16 has imagenet's weight shapes: only the recorded stem rebuilds it, with the unstrided layer4."""
    torch.manual_seed(0)
    model = build_resnet(arch, 10, stem="imagenet-os16").eval()
    plain = build_resnet(arch, 10)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    shapes = []
    model.layer4.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape[-2:])))
    x = torch.randn(2, 3, 32, 32)
    model(x)
    assert shapes == [(2, 2)]  # imagenet: 1x1 at 32 px
    path = save_checkpoint(tmp_path / "os16.pth", model, arch=arch, stem="imagenet-os16",
                           class_names=FASHION_MNIST_CLASSES, preprocessing=fashion_mnist_preset())
    loaded = load_checkpoint(path)
    assert loaded.stem == "imagenet-os16"
    torch.testing.assert_close(loaded.model(x), model(x))
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain.eval()(x), model(x))  # the same weights in imagenet's layout differ


def test_bad_checkpoints_give_one_line_errors(trained, tmp_path):
    cases = {
        "missing": tmp_path / "nope.pth",
        "empty": tmp_path / "empty.pth",
        "text": tmp_path / "notes.pth",
        "truncated": tmp_path / "cut.pth",
    }
    cases["empty"].write_bytes(b"")
    cases["text"].write_text("these are not weights\n")
    cases["truncated"].write_bytes(trained.read_bytes()[: trained.stat().st_size // 3])
    for name, path in cases.items():
        proc = run_main("-q", "evaluate", "--model", path)
        assert proc.returncode == 2, name
        assert str(path) in error_line(proc), name


def test_the_same_weights_save_to_the_same_bytes(tmp_path):
    """A checkpoint's sha256 (what later stages' manifests record as their input) depends on its content only, not
    on the temporary file it was written through or the name it gets."""
    torch.manual_seed(0)
    model = build_resnet("resnet18", 10).eval()
    kwargs = dict(arch="resnet18", stem="cifar", class_names=FASHION_MNIST_CLASSES,
                  preprocessing=fashion_mnist_preset(image_size=16), metrics={"val_top1": 0.5})
    first = save_checkpoint(tmp_path / "a.pth", model, **kwargs)
    second = save_checkpoint(tmp_path / "b" / "other-name.pth", model, **kwargs)
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
