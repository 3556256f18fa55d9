"""The shared training loop (optimize/loop.py) and its options: the train state and its checkpoint, early stopping,
class weights, frozen layers, gradient clipping, rotation, the schedule, bf16, DDP. The metrics: test_metrics.py."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, error_line, fashion_arrays, run_cli
from optimize.checkpoint import load_checkpoint
from optimize.configs import LoopConfig
from optimize.data import load_data
from optimize.errors import DivergedError
from optimize.loop import (TrainingInterrupted, _make_scheduler, class_weights, cpu_has_native_bf16, cross_entropy_loss,
                           fit, run_epoch, start_run, train_one_epoch, warmup_cosine)
from optimize.models import build_resnet
from optimize.preprocess import fashion_mnist_preset
from optimize.train import CheckpointWriter

# what every resumable checkpoint's train_state has held: a checkpoint written before TrainState resumes the same
TRAIN_STATE_KEYS = {"epoch", "optimizer", "scheduler", "scaler", "history", "best", "since_best"}


def test_loop_options_run(tmp_path):
    out = tmp_path / "opts.pth"
    run_cli("-q", "train", *TINY, "--epochs", "2", "--accumulate", "2", "--schedule", "plateau", "--patience", "1",
            "--label-smoothing", "0.1", "--optimizer", "adamw", "--out", out, check=True)
    state = torch.load(out.with_name("opts.last.pth"), weights_only=True)["train_state"]
    assert [row["epoch"] for row in state["history"]] == [1, 2]
    # 512 images / batch 64 = 8 micro-batches an epoch; accumulating 2 makes 4 optimizer steps an epoch
    steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {8}


def test_train_state_saves_and_restores_symmetrically(tmp_path):
    """One epoch through run_epoch, its state saved by the real CheckpointWriter and read back into a fresh model's
    TrainState: every figure and tensor comes back, under the keys every resumable checkpoint has had."""
    pre = fashion_mnist_preset(image_size=16)
    splits = load_data("fashion-mnist", pre, train_limit=64, val_limit=32, augment=False)
    cfg = LoopConfig(epochs=2, batch_size=32, device="cpu", progress=False, optimizer="sgd")  # per-step schedule
    torch.manual_seed(0)
    model = build_resnet("resnet18", 10)
    state, setup = start_run(model, splits, cfg)
    row = run_epoch(state, setup)
    assert state.epoch == 0 and state.history == []  # run_epoch returns the row; the state records it
    assert set(row) == {"epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5"}
    assert row["epoch"] == 1
    assert state.record(row) and (state.epoch, state.history, state.best, state.since_best) == (1, [row], row, 0)

    writer = CheckpointWriter(tmp_path / "m.pth", stage="train", arch="resnet18", stem="imagenet",
                              class_names=splits.class_names, preprocessing=pre, config=cfg, inputs={})
    state.save(writer)
    saved = writer.load_last()
    assert set(saved) == {"model", *TRAIN_STATE_KEYS}
    restored, _ = start_run(build_resnet("resnet18", 10), splits, cfg, resume_state=saved)
    torch.testing.assert_close(restored.model.state_dict(), model.state_dict(), rtol=0, atol=0)
    before, after = state.state_dict(), restored.state_dict()
    assert after["scheduler"] == before["scheduler"] and after["scaler"] == before["scaler"]
    torch.testing.assert_close(after["optimizer"], before["optimizer"], rtol=0, atol=0)
    rest = sorted(TRAIN_STATE_KEYS - {"optimizer", "scheduler", "scaler"})
    assert [after[k] for k in rest] == [before[k] for k in rest]


def test_patience_stops_a_run_that_cannot_improve_and_says_so(tmp_path):
    """--patience 1 over 3 epochs where val top-1 cannot rise: a frozen backbone (its BatchNorm statistics frozen
    too) and a learning rate of 1e-30, far below float32's resolution at the classifier's weights, leave the model
    as it was, so every epoch repeats the first one's val top-1, and only a strictly higher one counts as better."""
    out = tmp_path / "stalled.pth"
    args = [a if a != "1" else "3" for a in TINY]  # --epochs 3
    proc = run_cli("train", *args, "--freeze-backbone", "--lr", "1e-30", "--patience", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = torch.load(out.with_name("stalled.last.pth"), weights_only=True)["train_state"]["history"]
    assert [row["epoch"] for row in history] == [1, 2]  # the third epoch never ran
    assert history[0]["val_top1"] == history[1]["val_top1"]
    reason = "val top-1 has not improved for 1 epoch(s)"
    assert f"early stop: {reason}" in proc.stderr
    manifest = json.loads(out.with_name("stalled.pth.json").read_text())
    assert manifest["early_stop"] == {"after_epoch": 2, "epochs": 3, "patience": 1, "best_epoch": 1, "reason": reason}
    assert manifest["metrics"]["epoch"] == 1
    assert f"stopped early after epoch 2 of 3: {reason}" in proc.stdout


def test_ddp_training_with_torchrun_on_cpu(tmp_path):
    out = tmp_path / "ddp.pth"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = run_cli("-q", "train", *TINY, "--out", out, launcher=torchrun, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(out.with_name("ddp.pth.json").read_text())
    assert manifest["inputs"]["data"]["train_images"] == 512
    report = json.loads(run_cli("-q", "evaluate", "--model", out, "--val-limit", "256", "--json", check=True).stdout)
    assert report["count"] == 256
    assert abs(report["top1"] - manifest["metrics"]["val_top1"]) < 1e-9


@pytest.fixture(scope="module")
def uneven_folder(tmp_path_factory):
    """Three Fashion-MNIST classes with 60 / 15 / 5 training images (val: 10 each)."""
    root = tmp_path_factory.mktemp("uneven")
    images, labels = fashion_arrays("train")
    for split, counts in {"train": {0: 60, 1: 15, 7: 5}, "val": {0: 10, 1: 10, 7: 10}}.items():
        offset = 0 if split == "train" else 100
        for label, count in counts.items():
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for k, i in enumerate(np.flatnonzero(labels == label)[offset:offset + count]):
                Image.fromarray(images[i]).save(folder / f"{k}.png")
    return root


def test_balanced_weights_follow_the_class_counts_and_change_the_loss():
    labels = np.array([0] * 60 + [1] * 15 + [2] * 5)
    weights = class_weights(labels, 3, "balanced")
    assert weights.tolist() == pytest.approx([80 / (3 * 60), 80 / (3 * 15), 80 / (3 * 5)])
    assert class_weights(labels, 3, "none") is None
    # a balanced slice weighs every class 1: the loss is plain cross-entropy
    assert class_weights(np.array([0, 1, 2] * 7), 3).tolist() == pytest.approx([1.0, 1.0, 1.0])

    torch.manual_seed(0)
    logits, targets = torch.randn(80, 3), torch.as_tensor(labels)
    plain = cross_entropy_loss()(logits, targets, None).item()
    weighted = cross_entropy_loss(weight=weights)(logits, targets, None).item()
    per_item = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    w = weights[targets]
    assert weighted == pytest.approx(float((w * per_item).sum() / w.sum()), rel=1e-6)
    assert abs(weighted - plain) > 1e-3


def test_class_weights_are_recorded_by_train(uneven_folder, tmp_path):
    out = tmp_path / "weighted.pth"
    run_cli("-q", "train", "--arch", "resnet18", "--image-size", "16", "--batch-size", "32", "--epochs", "1",
            "--data", uneven_folder, "--class-weights", "balanced", "--out", out, check=True)
    manifest = json.loads(out.with_name("weighted.pth.json").read_text())
    assert manifest["config"]["loop"]["class_weights"] == "balanced"
    assert manifest["class_weight_values"] == pytest.approx({"class0": 80 / 180, "class1": 80 / 45,
                                                             "class7": 80 / 15}, rel=1e-5)


def _initial_resnet18() -> torch.nn.Module:
    torch.manual_seed(0)  # what train does before building the model (seed 0)
    return build_resnet("resnet18", 10)


@pytest.mark.parametrize("flags, trainable", [(["--freeze-backbone"], {"fc"}),
                                              (["--trainable-layers", "1"], {"fc", "layer4"})])
def test_frozen_layers_stay_bit_identical(flags, trainable, tmp_path):
    out = tmp_path / "frozen.pth"
    run_cli("-q", "train", *TINY, *flags, "--out", out, check=True)
    before = _initial_resnet18().state_dict()
    after = load_checkpoint(out).model.state_dict()
    for key, value in before.items():
        same = torch.equal(value, after[key])
        if key.split(".")[0] in trainable and key.endswith("weight"):
            assert not same, f"{key} should have trained"
        elif key.split(".")[0] not in trainable:
            assert same, f"{key} changed although it is frozen"  # weights and BatchNorm statistics alike
    manifest = json.loads(out.with_name("frozen.pth.json").read_text())
    assert set(manifest["trainable"]) == trainable


def test_freezing_options_that_contradict(tmp_path):
    proc = run_cli("train", *TINY, "--freeze-backbone", "--trainable-layers", "2", "--out", tmp_path / "x.pth")
    assert proc.returncode == 2 and "--trainable-layers" in error_line(proc)
    proc = run_cli("train", *TINY, "--trainable-layers", "7", "--out", tmp_path / "x.pth")
    assert proc.returncode == 2 and "0..4" in error_line(proc)
    assert not (tmp_path / "x.pth").exists()


def test_label_smoothing_is_the_loss_the_flag_names():
    logits, y = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]), torch.tensor([0, 2])
    log_p = torch.log_softmax(logits, 1)
    eps = 0.1  # the target is (1 - eps) on the label plus eps spread evenly over the 3 classes
    expected = -((1 - eps) * log_p[[0, 1], y] + eps * log_p.mean(1)).mean()
    assert cross_entropy_loss(eps)(logits, y, None).item() == pytest.approx(expected.item(), rel=1e-6)
    assert cross_entropy_loss(0.0)(logits, y, None).item() == pytest.approx(-log_p[[0, 1], y].mean().item(), rel=1e-6)


def test_plateau_lowers_the_rate_after_its_patience_without_progress():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = _make_scheduler(optimizer, LoopConfig(schedule="plateau", patience=4), steps_per_epoch=1)
    rates = []
    for top1 in (0.5, 0.6, 0.6, 0.6, 0.6, 0.6):  # progress, then none
        scheduler.step(top1)
        rates.append(optimizer.param_groups[0]["lr"])
    # the schedule waits half of --patience (2 epochs) without progress, then cuts by 10
    assert rates == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.1, 0.1])


def test_clip_grad_norm_bounds_the_step():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8) * 100, torch.randint(0, 3, (8,))  # large inputs: a large gradient

    def step(clip: float | None) -> float:
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        cfg = LoopConfig(clip_grad_norm=clip, amp=False, channels_last=False, progress=False)
        train_one_epoch(model, [(x, y)], optimizer, cross_entropy_loss(), device=torch.device("cpu"),
                        scaler=torch.amp.GradScaler("cpu", enabled=False), cfg=cfg)
        return float(torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before))))

    assert step(None) > 1.0  # unclipped, plain SGD at lr 1 moves the weights by the gradient's norm
    assert step(0.01) == pytest.approx(0.01, rel=1e-3)  # clipped: by exactly the bound


def test_clip_grad_norm_and_rotation_run_and_are_recorded(tmp_path):
    out = tmp_path / "clipped.pth"
    run_cli("-q", "train", *TINY, "--clip-grad-norm", "1.0", "--augment", "crop-flip-rotate", "--out", out,
            check=True)
    manifest = json.loads(out.with_name("clipped.pth.json").read_text())
    assert manifest["config"]["loop"]["clip_grad_norm"] == 1.0
    assert manifest["preprocessing"]["train_augment"] == "crop-flip-rotate"
    proc = run_cli("train", *TINY, "--clip-grad-norm", "0", "--out", tmp_path / "y.pth")
    assert proc.returncode == 2 and "--clip-grad-norm" in error_line(proc)


def test_rotation_rotates_and_eval_does_not():
    pre = dataclasses.replace(fashion_mnist_preset(image_size=32), train_augment="crop-flip-rotate")
    names = [type(t).__name__ for t in pre.train_transform().transforms]
    assert "RandomRotation" in names
    assert "RandomRotation" not in [type(t).__name__ for t in pre.eval_transform().transforms]


def test_warmup_cosine_rises_then_falls_to_zero():
    total = 100
    factors = [warmup_cosine(s, total, 0.1) for s in range(total + 1)]
    assert factors[0] < factors[5] < factors[10] == pytest.approx(1.0, abs=0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.0, abs=1e-9)


def test_cpu_bf16_skips_a_step_with_non_finite_gradients_and_counts_it():
    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bfloat16 (AVX512-BF16 / AMX): --cpu-bf16 trains in float32 here")
    torch.manual_seed(0)
    model = build_resnet("resnet18", 10)
    # 32 px, not 16: at 16 px layer4's strided conv sees a 1x1 input, and the CPU's bf16 backward then gives NaN
    # gradients now and then by itself (3 of 40 identical steps here), which would be skipped and counted too
    splits = load_data("fashion-mnist", fashion_mnist_preset(image_size=32), train_limit=128, val_limit=64,
                       augment=False)
    base = cross_entropy_loss()
    calls = []

    def poisoned(logits, y, x):  # the first step's gradients come back NaN; the loss itself stays finite
        calls.append(1)
        if len(calls) == 1:
            logits.register_hook(lambda g: torch.full_like(g, float("nan")))
        return base(logits, y, x)

    cfg = LoopConfig(epochs=1, batch_size=64, device="cpu", cpu_bf16=True, progress=False, schedule="none")
    result = fit(model, splits, cfg, loss_fn=poisoned)
    assert len(calls) == 2 and result.history[0]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    fp32 = fit(build_resnet("resnet18", 10), splits, dataclasses.replace(cfg, cpu_bf16=False))
    assert "skipped_steps" not in fp32.history[0]  # float32 runs carry no guard


class _Saved:
    """A RunWriter keeping what fit hands it (the real CheckpointWriter writes files; here only the calls)."""

    def __init__(self):
        self.best, self.last, self.discarded = [], [], False

    def save_best(self, model, metrics):
        self.best.append(metrics)

    def save_last(self, model, train_state):
        self.last.append(train_state["epoch"])

    def save_stop(self, stop):
        self.stop = stop

    def discard(self):
        self.discarded = True


def test_an_epoch_ending_with_non_finite_statistics_is_a_divergence_and_saves_nothing():
    """Inputs so large that BatchNorm's running variance overflows to inf: every loss stays finite (BatchNorm
    normalizes the batch), so only the weights and buffers show it. Such a model must not be saved as the best."""
    torch.manual_seed(0)
    splits = load_data("fashion-mnist", fashion_mnist_preset(image_size=16), train_limit=128, val_limit=64,
                       augment=False)
    plain = splits.train.transform
    splits.train.transform = lambda img: plain(img) * 1e25  # x^2 overflows float32 in BatchNorm's variance
    writer = _Saved()
    cfg = LoopConfig(epochs=2, batch_size=64, device="cpu", progress=False, schedule="none")
    with pytest.raises(DivergedError, match="epoch 1: .*NaN or inf.*running_var.*lower --lr"):
        fit(build_resnet("resnet18", 10), splits, cfg, writer=writer)
    assert writer.best == [] and writer.last == [] and writer.discarded


def test_a_last_batch_of_one_image_sits_out(tmp_path):
    """201 images in batches of 50 at 32 px: the 1x1 last stage would give BatchNorm one value per channel."""
    out = tmp_path / "m.pth"
    proc = run_cli("train", "--arch", "resnet18", "--image-size", "32", "--train-limit", "201", "--val-limit", "64",
                   "--batch-size", "50", "--epochs", "1", "--schedule", "none", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "leave a last batch of one" in proc.stderr and out.is_file()


class _InterruptedWhileSaving(_Saved):
    """A writer whose resumable checkpoint is in place (``last``) when Ctrl-C comes, before its save returns (as
    when the manifest beside it is still being written)."""

    def __init__(self):
        super().__init__()
        self.epochs: list[int] = []
        self.last = None

    def save_last(self, model, train_state):
        self.epochs.append(train_state["epoch"])
        self.last = Path("killed.last.pth")
        os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_while_a_checkpoint_is_written_names_that_checkpoint():
    """The interrupt waits for the epoch's checkpoints, so its message names the one just written instead of
    saying there is none to resume from."""
    torch.manual_seed(0)
    splits = load_data("fashion-mnist", fashion_mnist_preset(image_size=16), train_limit=128, val_limit=64,
                       augment=False)
    writer = _InterruptedWhileSaving()
    cfg = LoopConfig(epochs=3, batch_size=64, device="cpu", progress=False, schedule="none")
    with pytest.raises(TrainingInterrupted, match=r"checkpoint of epoch 1, killed\.last\.pth, is kept") as caught:
        fit(build_resnet("resnet18", 10), splits, cfg, writer=writer)
    assert caught.value.checkpoint == Path("killed.last.pth") and writer.epochs == [1]
