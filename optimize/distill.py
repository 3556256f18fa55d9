"""Stage ``distill``: train a ResNet-18 (or -34) student from a teacher's logits.

Loss (Hinton et al., 2015)::

    alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE(student_logits, labels)
    with p = softmax(logits / T), KL averaged over the batch

The teacher's softened distribution is the target, as in the paper; the ``T^2`` factor keeps the soft
term's gradients on the scale of the hard term's as ``T`` changes. The student goes through the shared loop
(:func:`optimize.loop.fit`) with this loss plugged in; the teacher runs in eval mode under ``no_grad`` (and
under the loop's AMP autocast on CUDA).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import Artifact, check_not_input, prepare_output
from .checkpoint import load_checkpoint
from .data import default_preprocessing, load_data
from .configs import DistillConfig
from .errors import CheckpointError
from .evaluate import check_model_fits_data
from .loop import LossFn, split_class_weights
from .models import build_resnet
from .train import CheckpointWriter, loss_weights_record, train_model, with_augment

logger = logging.getLogger(__name__)

def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
            temperature: float, alpha: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The distillation loss of one batch (see the module docstring); ``weight``: class weights of the label term."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean", log_target=True)
    if weight is not None and weight.device != student_logits.device:
        weight = weight.to(student_logits.device)
    hard = F.cross_entropy(student_logits.float(), targets, weight=weight)
    return alpha * t * t * soft + (1.0 - alpha) * hard


def distillation_loss(teacher: nn.Module, *, temperature: float, alpha: float,
                      weight: torch.Tensor | None = None) -> LossFn:
    """A loss for :func:`optimize.loop.fit` that runs ``teacher`` on each batch's images.

    Example::

        fit(student, splits, cfg, loss_fn=distillation_loss(teacher, temperature=4, alpha=0.9))
    """
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    layout: list[tuple[torch.device, bool]] = []  # where the teacher was last put: (device, channels_last)

    def loss(student_logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        wanted = (images.device, images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous())
        if layout[-1:] != [wanted]:  # the student's device and layout: no reorder per conv
            teacher.to(images.device, memory_format=torch.channels_last if wanted[1] else torch.contiguous_format)
            layout[:] = [wanted]
        with torch.no_grad():
            teacher_logits = teacher(images)
        return kd_loss(student_logits, teacher_logits, targets, temperature=temperature, alpha=alpha, weight=weight)

    return loss


def student_stem(teacher_stem: str | None) -> str:
    """The student's stem when none is asked for: its teacher's, but torchvision's layout for an imagenet-os16 one.

    The unstrided last stage is a training-accuracy choice for the teacher (+1.6 pt at 32 px); on the student it
    would quadruple layer4's MACs in the model that gets deployed.
    """
    if teacher_stem == "imagenet-os16":
        return "imagenet"
    return teacher_stem or "imagenet"


def run(cfg: DistillConfig) -> Artifact:
    """Distill ``cfg.teacher`` into a fresh (or ``student_init``) student; return the best checkpoint."""
    check_not_input(cfg.out, {"--teacher": cfg.teacher, "--student-init": cfg.student_init})
    out = prepare_output(cfg.out)
    # any checkpoint the foundation loads can teach (TorchScript too): it only has to run forward
    teacher = load_checkpoint(cfg.teacher, arch=cfg.teacher_arch, trust=cfg.trust_checkpoint)
    preprocessing = with_augment(teacher.preprocessing or default_preprocessing(cfg.data, cfg.image_size),
                                 cfg.augment)
    splits = load_data(cfg.data, preprocessing, train_limit=cfg.train_limit, val_limit=cfg.val_limit)
    check_model_fits_data(teacher, splits)
    stem = cfg.stem or student_stem(teacher.stem)

    torch.manual_seed(cfg.loop.seed)
    if cfg.student_init:
        init = load_checkpoint(cfg.student_init)
        if init.arch != cfg.student:
            raise CheckpointError(f"--student-init {cfg.student_init} holds a {init.arch}, not --student "
                                  f"{cfg.student}; pass --student {init.arch}")
        check_model_fits_data(init, splits)
        student, stem = init.model, init.stem or stem
    else:
        student = build_resnet(cfg.student, splits.num_classes, stem=stem)

    inputs = {"data": splits.describe(), "teacher": teacher.describe()}
    if cfg.student_init:
        inputs["student_init"] = {"path": cfg.student_init, "sha256": init.sha256}
    weights = split_class_weights(splits, cfg.loop)
    writer = CheckpointWriter(out, stage="distill", arch=cfg.student, stem=stem, class_names=splits.class_names,
                              preprocessing=preprocessing, config=cfg, inputs=inputs,
                              extra=loss_weights_record(splits, cfg.loop, weights))
    loss = distillation_loss(teacher.model, temperature=cfg.temperature, alpha=cfg.alpha, weight=weights)
    result = train_model(student, splits, cfg.loop, writer, cfg.resume, loss_fn=loss)
    logger.info("student best val top-1 %.4f at epoch %d", result.best.get("val_top1", float("nan")),
                result.best.get("epoch", 0))
    return Artifact.of(out)

