"""Checkpoints users arrive with, loaded as the ResNet they hold: PyTorch Lightning's, and weights under a
wrapper's attribute prefix (backbone.), evaluated through the CLI with the same answers as the original."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli

EVAL = ["--data", "fashion-mnist", "--image-size", "16", "--val-limit", "256", "--json"]


@pytest.fixture(scope="module")
def reference(trained):
    """The tiny trained model's weights and its top-1 through evaluate."""
    proc = run_cli("-q", "evaluate", "--model", trained, "--val-limit", "256", "--json", check=True)
    return torch.load(trained, weights_only=True)["state_dict"], json.loads(proc.stdout)["top1"]


def test_a_lightning_checkpoint_loads_as_the_resnet_it_holds(reference, tmp_path):
    state_dict, top1 = reference
    ckpt = tmp_path / "epoch=2-step=300.ckpt"
    torch.save({"epoch": 2, "global_step": 300, "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in state_dict.items()},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}], "lr_schedulers": [],
                "hyper_parameters": {"lr": 0.1, "num_classes": 10}}, ckpt)
    proc = run_cli("evaluate", "--model", ckpt, *EVAL, check=True)
    assert json.loads(proc.stdout)["top1"] == top1
    assert "under the prefix 'model.'" in proc.stderr  # the log names what was stripped


def test_weights_under_a_backbone_prefix_load(reference, tmp_path):
    state_dict, top1 = reference
    path = tmp_path / "wrapped.pth"
    torch.save({f"backbone.{k}": v for k, v in state_dict.items()}, path)
    proc = run_cli("evaluate", "--model", path, "--arch", "resnet18", *EVAL, check=True)
    assert json.loads(proc.stdout)["top1"] == top1 and "'backbone.'" in proc.stderr


def test_two_prefixes_are_not_guessed_apart(reference, tmp_path):
    """A backbone and a head under different attributes is not one ResNet: named, not half-loaded."""
    state_dict, _ = reference
    path = tmp_path / "two.pth"
    torch.save({(f"head.{k}" if k.startswith("fc.") else f"backbone.{k}"): v for k, v in state_dict.items()}, path)
    proc = run_cli("-q", "evaluate", "--model", path, *EVAL)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
