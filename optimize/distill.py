"""Stage ``distill``: train a ResNet-18 (or -34) student from a teacher's logits.

Loss (Hinton et al., 2015)::

    alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE(student_logits, labels)
    with p = softmax(logits / T), KL averaged over the batch

The teacher's softened distribution is the target, as in the paper; the ``T^2`` factor keeps the soft
term's gradients on the scale of the hard term's as ``T`` changes. The student goes through the shared loop
(:func:`optimize.loop.fit`) with this loss plugged in; the teacher runs in eval mode under ``no_grad`` (and
under the loop's autocast), and when the augmentation lets training inputs recur (flips only, or none) its
logits are kept and reused for an identical input (:class:`TeacherCache`).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import Artifact, check_not_input, prepare_output
from .checkpoint import load_checkpoint
from .configs import DistillConfig
from .data import default_preprocessing, load_data
from .errors import CheckpointError
from .evaluate import check_model_fits_data
from .loop import LossFn, split_class_weights
from .models import build_resnet
from .train import CheckpointWriter, loss_weights_record, train_model, with_augment

logger = logging.getLogger(__name__)

# augmentations under which the same training image comes back as the same input tensor in a later epoch
CACHEABLE_AUGMENTS = ("none", "flip")


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


class TeacherCache:
    """The teacher's logits of inputs it has already seen, keyed by the input's bytes.

    Exact whatever the augmentation: a key is the whole normalized image, so only an identical input reuses a
    result. It pays where inputs recur: with flips only, epoch 2 finds about half its inputs, epoch 3 three quarters
    (the teacher runs on 105k of 180k images in 3 epochs). It holds at most ``max_bytes`` (an estimate: the logits
    plus ~200 bytes of key and dict entry each); once full, later inputs are still looked up, but not added.
    """

    ENTRY_OVERHEAD = 200

    def __init__(self, max_bytes: int = 1 << 29):
        self.max_bytes = max_bytes
        self.rows: dict[bytes, np.ndarray] = {}
        self.hits = 0
        self.misses = 0

    def logits(self, teacher: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """``teacher``'s logits of ``images``, running it (under ``no_grad``) only on the inputs not yet held."""
        flat = images.detach().float().cpu().contiguous().numpy().reshape(len(images), -1)
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]
        new = [i for i, k in enumerate(keys) if k not in self.rows]
        fresh: dict[bytes, np.ndarray] = {}
        if new:
            with torch.no_grad():
                computed = teacher(images[new] if len(new) < len(keys) else images).float().cpu().numpy()
            fresh = {keys[i]: row for i, row in zip(new, computed)}
            if (len(self.rows) + len(fresh)) * (computed[0].nbytes + self.ENTRY_OVERHEAD) <= self.max_bytes:
                self.rows.update(fresh)
        self.hits += len(keys) - len(new)
        self.misses += len(new)
        out = np.stack([fresh[k] if k in fresh else self.rows[k] for k in keys])
        return torch.from_numpy(out).to(images.device)


def distillation_loss(teacher: nn.Module, *, temperature: float, alpha: float,
                      weight: torch.Tensor | None = None, cache: TeacherCache | None = None) -> LossFn:
    """A loss for :func:`optimize.loop.fit` that runs ``teacher`` on each batch's images (those ``cache`` lacks).

    Example::

        fit(student, splits, cfg, loss_fn=distillation_loss(teacher, temperature=4, alpha=0.9))
    """
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    layout: list[tuple[torch.device, torch.memory_format]] = []  # where the teacher was last put

    def loss(student_logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
        wanted = (images.device, torch.channels_last if channels_last else torch.contiguous_format)
        if layout[-1:] != [wanted]:  # the student's device and layout: no reorder per conv
            teacher.to(images.device, memory_format=wanted[1])
            layout[:] = [wanted]

        def run(x: torch.Tensor) -> torch.Tensor:  # x in the student's layout (a cache's subset of rows may not be)
            with torch.no_grad():
                return teacher(x.contiguous(memory_format=wanted[1]))

        teacher_logits = cache.logits(run, images) if cache is not None else run(images)
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
    # inputs recur across epochs only when the augmentation is a flip or nothing: cache the teacher's logits then
    cache = TeacherCache() if preprocessing.train_augment in CACHEABLE_AUGMENTS else None
    loss = distillation_loss(teacher.model, temperature=cfg.temperature, alpha=cfg.alpha, weight=weights, cache=cache)
    result = train_model(student, splits, cfg.loop, writer, cfg.resume, loss_fn=loss)
    if cache is not None:
        logger.info("teacher logits: %d computed, %d reused", cache.misses, cache.hits)
    logger.info("student best val top-1 %.4f at epoch %d", result.best.get("val_top1", float("nan")),
                result.best.get("epoch", 0))
    return Artifact.of(out)

