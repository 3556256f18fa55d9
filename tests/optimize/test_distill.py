"""The distill command (optimize/distill.py) on tiny ResNets and a Fashion-MNIST slice."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import SLICE, error_line, run_cli
from optimize.checkpoint import load_checkpoint, save_checkpoint
from optimize.data import FASHION_MNIST_CLASSES
from optimize.distill import TeacherCache, kd_loss
from optimize.models import build_resnet
from optimize.preprocess import fashion_mnist_preset


def test_kd_loss_matches_a_hand_computation():
    s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    t = torch.tensor([[1.0, 1.5, 0.0], [-2.0, 0.5, 2.5]])
    y = torch.tensor([0, 2])
    T, alpha = 4.0, 0.9
    expected = 0.0
    for i in range(2):
        ps = [float(v) for v in torch.softmax(s[i] / T, 0)]
        pt = [float(v) for v in torch.softmax(t[i] / T, 0)]
        kl = sum(p * (torch.log(torch.tensor(p)) - torch.log(torch.tensor(q))).item() for p, q in zip(pt, ps))
        ce = -torch.log_softmax(s[i], 0)[y[i]].item()
        expected += (alpha * T * T * kl + (1 - alpha) * ce) / 2
    assert kd_loss(s, t, y, temperature=T, alpha=alpha).item() == pytest.approx(expected, rel=1e-5)
    # alpha 0 is plain cross-entropy; identical logits leave only the label term
    assert kd_loss(s, t, y, temperature=T, alpha=0.0).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    assert kd_loss(s, s, y, temperature=T, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_the_distillation_loss_listens_to_its_teacher():
    from optimize.distill import distillation_loss

    torch.manual_seed(0)
    teachers = [build_resnet("resnet18", 10).eval() for _ in range(2)]  # two different random teachers
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    s = torch.randn(4, 10)
    losses = []
    for teacher in teachers:
        with torch.no_grad():
            t = teacher(x)
        loss = distillation_loss(teacher, temperature=4.0, alpha=0.9)(s, y, x)
        assert loss.item() == pytest.approx(kd_loss(s, t, y, temperature=4.0, alpha=0.9).item(), rel=1e-5)
        losses.append(loss.item())
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)  # another teacher, another loss


def test_distill_records_teacher_and_evaluates(student, trained):
    manifest = json.loads(student.with_name("student.pth.json").read_text())
    assert manifest["stage"] == "distill"
    assert manifest["inputs"]["teacher"]["sha256"] == load_checkpoint(trained).sha256
    assert manifest["config"]["temperature"] == 4.0 and manifest["config"]["alpha"] == 0.9
    teacher_manifest = json.loads(trained.with_name("teacher.pth.json").read_text())
    assert manifest["preprocessing"] == teacher_manifest["preprocessing"]  # the teacher's, not a default
    report = json.loads(run_cli("-q", "evaluate", "--model", student, "--val-limit", "256", "--json",
                                check=True).stdout)
    assert report["top1"] == pytest.approx(manifest["metrics"]["val_top1"])


def test_distill_from_a_torchscript_teacher(trained, tmp_path):
    scripted = tmp_path / "teacher.ts"
    torch.jit.trace(load_checkpoint(trained).model, torch.randn(1, 3, 16, 16)).save(str(scripted))
    out = tmp_path / "s.pth"
    run_cli("-q", "distill", "--teacher", scripted, *SLICE, "--image-size", "16", "--epochs", "1", "--out", out,
            check=True)
    assert load_checkpoint(out).arch == "resnet18"


def test_distill_teacher_with_other_classes(trained, image_folder, tmp_path):
    proc = run_cli("-q", "distill", "--teacher", trained, "--data", image_folder, "--epochs", "1",
                   "--out", tmp_path / "s.pth")
    assert proc.returncode == 2 and "classes" in error_line(proc)
    assert not (tmp_path / "s.pth").exists()


def test_student_of_an_os16_teacher_gets_torchvision_layout(tmp_path):
    """The unstrided last stage is the teacher's training choice: the student follows any other stem, not that one."""
    torch.manual_seed(0)
    teacher = save_checkpoint(tmp_path / "os16.pth", build_resnet("resnet18", 10, stem="imagenet-os16"),
                              arch="resnet18", stem="imagenet-os16", class_names=FASHION_MNIST_CLASSES,
                              preprocessing=fashion_mnist_preset(image_size=16))
    out = tmp_path / "s.pth"
    run_cli("-q", "distill", "--teacher", teacher, *SLICE, "--epochs", "1", "--out", out, check=True)
    assert load_checkpoint(out).stem == "imagenet"
    assert json.loads(out.with_name("s.pth.json").read_text())["stem"] == "imagenet"


def test_teacher_cache_reuses_logits_of_identical_inputs_only():
    torch.manual_seed(0)
    teacher = build_resnet("resnet18", 10).eval()
    a, b = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        ref_a, ref_b, ref_flipped = teacher(a), teacher(b), teacher(a.flip(-1))
    seen: list[int] = []
    teacher.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    cache = TeacherCache()
    torch.testing.assert_close(cache.logits(teacher, a), ref_a)
    # seen inputs, new ones and flipped copies of seen ones (new inputs): the teacher runs on the 6 new ones only
    out = cache.logits(teacher, torch.cat([a[:3], b[:3], a[:3].flip(-1)]))
    assert seen == [6, 6]
    torch.testing.assert_close(out[:3], ref_a[:3])
    torch.testing.assert_close(out[3:6], ref_b[:3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[6:], ref_flipped[:3], rtol=1e-4, atol=1e-5)
    assert (cache.hits, cache.misses) == (3, 12)
    # a full cache still answers what it holds and computes the rest without keeping it
    full = TeacherCache(max_bytes=6 * (10 * 4 + TeacherCache.ENTRY_OVERHEAD))  # 6 rows of 10 float32 logits
    full.logits(teacher, a)
    full.logits(teacher, b)
    assert len(full.rows) == 6
    torch.testing.assert_close(full.logits(teacher, b), ref_b, rtol=1e-4, atol=1e-5)
    assert seen[-2:] == [6, 6] and full.hits == 0
