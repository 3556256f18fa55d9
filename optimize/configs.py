"""Every stage's config, each option declared once: its default, choices, and the help its flag shows.

Each stage module re-exports its config (``train.TrainConfig`` is this module's) and takes it in ``run(cfg)``;
``cli.py`` builds each subcommand's flags from these classes (:mod:`optimize.options`) and the pipeline builds them
from a recipe's keys. The module imports neither torch nor onnx, so ``cli.py --help`` is instant; checks that need
them import them when a config is made.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import MISSING, dataclass, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .opsets import DEFAULT_OPSET, check_opset
from .options import Options, option

FASHION_MNIST = "fashion-mnist"  # the default data's name (optimize.data reads it from Debian's package)

# -- the choices, one home each ---------------------------------------------------------------------------------

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # torchvision's ResNets
# imagenet: torchvision's 7x7/2 conv + 3x3/2 max-pool. cifar: one 3x3/1 conv and no pool, which keeps 16x the
# resolution in the body: better on 32 px images, but 13x slower to train on a 2-core CPU (measured).
# imagenet-os16: the imagenet stem with the last stage's stride removed (output stride 16, as DeepLab calls it), so
# layer4 sees 2x2 instead of 1x1 at 32 px: ResNet-50, 60k Fashion-MNIST images, 3 epochs: 90.60% vs 89.01% top-1
# for 1.03x the training time here (docs/RESULTS.md, recipe-frontier). The weights are the same shapes as
# imagenet's, so a plain state_dict cannot tell them apart: only edgeopt checkpoints record it.
STEMS = ("imagenet", "cifar", "imagenet-os16")
STUDENTS = ("resnet18", "resnet34")
AUGMENTS = ("flip", "crop-flip", "crop-flip-rotate", "random-resized-crop", "random-resized-crop-rotate", "none")
# the training augmentation and the input side each data preset records (optimize/preprocess.py), named here for
# --help
FASHION_MNIST_AUGMENT, FASHION_MNIST_SIZE = "flip", 32
FOLDER_AUGMENT, FOLDER_SIZE = "random-resized-crop", 224
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("warmup-cosine", "cosine", "step", "plateau", "none")
CLASS_WEIGHTS = ("none", "balanced")
DEVICES = ("auto", "cpu", "cuda")
PRUNE_METHODS = ("l1-unstructured", "l1-channel", "2:4")
CALIB_METHODS = ("entropy", "minmax", "percentile")
CALIB_TARGETS = ("tensorrt", "cpu")
# the percentile method's cut: calibrate passes it to calib.ranges (whose RangeOptions default is the same value, a
# test holds them together), and --help reads it here without importing numpy
CALIB_PERCENTILE = 99.999
# the cpu target times each INT8 form and FP32 at these batches and keeps the form fastest at CALIB_CHOOSING_BATCH
# (the manifest's img_per_s_b<batch> keys, and speedup_vs_fp32 at the choosing batch)
CALIB_TIMED_BATCHES = (1, 8)
CALIB_CHOOSING_BATCH = 8
CPU_FORMS = ("qoperator-u8s8", "qdq-s8s8")
BACKENDS = ("onnxruntime", "openvino", "tensorrt")
NNCF_PRESETS = ("performance", "mixed")  # OpenVINO INT8: symmetric activations / asymmetric ones
NNCF_MODEL_TYPES = ("cnn", "transformer")
PRECISIONS = ("fp32", "fp16", "int8")
INT8_HIGH_PRECISIONS = ("fp16", "fp32")  # what a TensorRT INT8 engine runs its unquantized layers in
SEARCH_TARGETS = ("cpu", "tensorrt")
SPACES = ("compression", "training")
OBJECTIVES = ("throughput", "latency")

_TRITON_NAME = re.compile(r"^[A-Za-z0-9_-]+$")

# -- defaults that code works out, each stated once: the code reads them here and --help prints them from here -----

# 2e-3 for AdamW: 87.0% vs 86.6% for 1e-3 (ResNet-18, 20k images, 1 epoch, warm-up cosine)
TRAIN_LR = {"adamw": 2e-3, "sgd": 0.05}
# fine-tuning starts from trained weights: half the training default (AdamW 1e-3 gave 89.67% where 2e-4 gave
# 89.30%, l1-channel 0.5 of a 90.43% ResNet-18, 1 epoch, KD alpha 0.5)
FINETUNE_LR = {"adamw": 1e-3, "sgd": 0.01}
WEIGHT_DECAY = {"adamw": 0.05, "sgd": 5e-4}  # AdamW's decoupled decay, SGD's L2
_OPTIMIZER_NAMES = {"adamw": "AdamW", "sgd": "SGD"}
PRUNE_AMOUNT = 0.5  # --amount without a value (2:4 always removes half of each group of 4)
# DataLoader workers without --workers: none when the CPU trains on this few cores (worker processes would take
# the cores the training steps need), else half the cores, at least 1 and at most WORKERS_CAP
FEW_CORES, WORKERS_CAP = 2, 8


def per_optimizer(values: dict[str, float]) -> str:
    """``2e-3 AdamW, 0.05 SGD``: a default that depends on --optimizer, as --help states it."""
    return ", ".join(f"{_number(v)} {_OPTIMIZER_NAMES[k]}" for k, v in values.items())


def _number(value: float) -> str:
    """``2e-3`` below 0.01 (how learning rates are written), else ``0.05``."""
    if value >= 0.01:
        return f"{value:g}"
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def available_cores() -> int:
    """The CPU cores this process may use: its affinity mask (taskset, a container's cpuset), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_workers(device_type: str, cores: int | None = None) -> int:
    """DataLoader worker processes when --workers is not given (see :data:`FEW_CORES`).

    Args:
        device_type: ``cpu`` or ``cuda``: what trains.
        cores: the machine's CPU cores; the ones this process may use when None.
    """
    cores = available_cores() if cores is None else cores
    if device_type == "cpu" and cores <= FEW_CORES:
        return 0
    return min(WORKERS_CAP, max(1, cores // 2))


# the batch profile (min / opt / max) build-engine defaults to, and package when nothing records one
DEFAULT_BATCHES = (1, 8, 64)
# the acceptance set: sides up to SMALL_IMAGE stay lossless PNG, above JPEG; images in it by default, small images
# / large ones (a 224 px JPEG is ~20-40 KB)
SMALL_IMAGE = 64
ACCEPTANCE_COUNT = {True: 256, False: 64}


def acceptance_count(image_size: int) -> int:
    """Images in a bundle's acceptance set without --check-images."""
    return ACCEPTANCE_COUNT[image_size <= SMALL_IMAGE]


WORKERS_DEFAULT_TEXT = f"0 when a CPU trains on <= {FEW_CORES} cores, else half the cores, 1 to {WORKERS_CAP}"

# -- shared argument groups (Polygraphy-style): the same flag means the same thing in every subcommand --------

DATA_HELP = "'fashion-mnist' or a folder with train/ and val/, one subfolder per class"


def data_field(*, recorded: bool = False, default: str | None = FASHION_MNIST) -> Any:
    if recorded:
        return option(None, help=DATA_HELP, group="data",
                      default_text="the data the model's manifest records, else fashion-mnist")
    return option(default, help=DATA_HELP, group="data", default_text=None if default else "the recipe's")


def image_size_field(default_text: str = f"{FASHION_MNIST_SIZE} for fashion-mnist, {FOLDER_SIZE} for folders") -> Any:
    return option(None, help="input side in pixels", group="data", default_text=default_text)


def train_limit_field() -> Any:
    return option(None, help="use a class-stratified subset of N training images", metavar="N", group="data")


def val_limit_field(default: int | None = None, help: str = "use a class-stratified subset of N val images") -> Any:
    return option(default, help=help, metavar="N", group="data", default_text=None if default else "all of them")


def model_field(help: str = "edgeopt checkpoint, torchvision ResNet state_dict or TorchScript file",
                flag: str | None = None) -> Any:
    return option(help=help, group="model loading", flag=flag)


def arch_field(help: str = "architecture of a plain state_dict", flag: str | None = None) -> Any:
    return option(None, help=help, choices=ARCHS, group="model loading", flag=flag,
                  default_text="guessed from its keys")


def trust_field() -> Any:
    return option(False, help="allow a pickled whole nn.Module (unpickling runs code from the file)",
                  group="model loading")


def device_field(default: str = "auto") -> Any:
    return option(default, help="auto: CUDA when this machine can run it, else the CPU", choices=DEVICES,
                  group="device")


# the largest batch one inference call may take, asked of a benchmark (--batch-sizes) or of an engine's profile
# (--max-batch): one fact, since the benchmark times an engine at its batch sizes and a profile is built for the
# batches that will be served and timed. 4096 images at 224 px are 2.5 GB of float32 input alone
MAX_BATCH = 4096
# more threads than this only adds contention (a few per core is the most any backend uses well)
MAX_THREADS = 4 * (os.cpu_count() or 1)


def threads_field() -> Any:
    return option(None, help="CPU threads", group="device", default_text="every core this process may use",
                  bounds=(1, MAX_THREADS))


def out_field(help: str, default: Any = MISSING) -> Any:
    return option(default, help=help, group="output")


def progress_field(default: bool = True) -> Any:
    return option(default, help="show progress bars", cli=False)


def _check(*checks: tuple[bool, str]) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def accuracy_drop_check(value: Any) -> tuple[bool, str]:
    """The one rule for every --max-accuracy-drop (benchmark, package, search), as a :func:`_check` pair."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value < 100
    return ok, f"--max-accuracy-drop must be top-1 points in [0, 100), not {value}"


def check_distillation(temperature: float, alpha: float) -> None:
    _check((temperature > 0, f"--temperature must be positive (got {temperature})"),
           (0.0 <= alpha <= 1.0, f"--alpha must be in [0, 1] (got {alpha})"))


# -- training ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoopConfig(Options):
    """Options of the shared training loop: the same flags for train, distill and prune's fine-tuning."""

    epochs: int = option(10, help="passes over the training split", group="training loop")
    batch_size: int = option(128, help="images per step per process", group="training loop", bounds=(1, None))
    # AdamW: on the short CPU budgets measured here it reached 51% top-1 where SGD at 0.05 / 0.01 reached 13% / 29%
    # (ResNet-50, 6k images, 1 epoch)
    optimizer: str = option("adamw", help="adamw, or sgd (momentum, nesterov)", choices=OPTIMIZERS,
                            group="training loop")
    lr: float | None = option(None, help="peak learning rate", group="training loop",
                              default_text=f"{per_optimizer(TRAIN_LR)}; prune's fine-tuning: "
                                           f"{per_optimizer(FINETUNE_LR)}")
    momentum: float = option(0.9, help="SGD momentum", group="training loop")
    weight_decay: float | None = option(None, help="AdamW's decoupled decay or SGD's L2", group="training loop",
                                        default_text=per_optimizer(WEIGHT_DECAY))
    schedule: str = option("warmup-cosine", choices=SCHEDULES, group="training loop",
                           help="warmup-cosine: per step, linear warm-up then cosine to 0; cosine: per epoch to 0; "
                                "step: x gamma every step-size epochs; plateau: x 0.1 when val top-1 stalls")
    warmup: float = option(0.1, help="fraction of the steps warming up (warmup-cosine)", group="training loop")
    step_size: int = option(10, help="epochs between decays for --schedule step", group="training loop")
    gamma: float = option(0.1, help="decay factor for --schedule step", group="training loop")
    patience: int = option(0, help="stop after N epochs without val improvement (0: off)", group="training loop")
    accumulate: int = option(1, help="micro-batches per optimizer step", group="training loop")
    label_smoothing: float = option(0.0, help="cross-entropy label smoothing in [0, 1)", group="training loop")
    class_weights: str = option("none", choices=CLASS_WEIGHTS, group="training loop",
                                help="balanced: weigh each class's loss by n / (classes * its count) in the "
                                     "training split (uneven folders; recorded in the manifest)")
    clip_grad_norm: float | None = option(None, metavar="MAX", group="training loop",
                                          help="clip the gradients' global L2 norm to MAX before each step")
    device: str = device_field()
    amp: bool = option(True, group="training loop",
                       help="float16 mixed precision with grad scaling on CUDA (the CPU trains in float32 unless "
                            "--cpu-bf16)")
    # ResNet-50 trained 1.5x faster here (245 vs 159 img/s, channels_last both). Off by default: non-finite
    # gradients appear now and then, not reproducibly, so a bf16 run is not bit-for-bit repeatable (a resumed run
    # may differ from an unbroken one). Where: a ResNet-18 on 16 px images (layer4's strided conv over a 1x1 input)
    # got NaN gradients in 3 of 40 identical steps (same weights and batch; 1 of 40 NCHW), 0 of 40 at 32 px; the
    # 32 px demo's 3-epoch teacher and student skipped none.
    cpu_bf16: bool = option(False, group="training loop",
                            help="bfloat16 autocast when training on a CPU with native bf16 (AVX512-BF16/AMX; "
                                 "float32 elsewhere): ~1.5x faster; steps with non-finite gradients are skipped and "
                                 "counted")
    channels_last: bool = option(True, help="NHWC memory format (1.2x faster ResNet-50 training on a CPU here)",
                                 group="training loop")
    seed: int = option(0, help="seeds weights, shuffling and augmentation; a resumed run continues the sequence",
                       group="training loop")
    workers: int | None = option(None, help="DataLoader worker processes", group="training loop",
                                 default_text=WORKERS_DEFAULT_TEXT)
    progress: bool = progress_field()

    def check(self) -> None:
        _check((self.epochs >= 1, f"--epochs must be at least 1 (got {self.epochs})"),
               (self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})"),
               (self.lr is None or self.lr > 0, f"--lr must be positive (got {self.lr})"),
               (self.step_size >= 1, "--step-size must be at least 1"),
               (self.patience >= 0, "--patience must be 0 (off) or more"),
               (self.accumulate >= 1, f"--accumulate must be at least 1 (got {self.accumulate})"),
               (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
               (0 <= self.warmup < 1, f"--warmup must be in [0, 1) (got {self.warmup})"),
               (self.clip_grad_norm is None or self.clip_grad_norm > 0,
                f"--clip-grad-norm must be positive (got {self.clip_grad_norm})"),
               (self.workers is None or self.workers >= 0, "--workers must be 0 or more"))

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else TRAIN_LR[self.optimizer]

    @property
    def decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else WEIGHT_DECAY[self.optimizer]


_AUGMENT_HELP = "training augmentation; -rotate adds a random rotation of up to 15 degrees"


@dataclass(frozen=True)
class TrainConfig(Options):
    """Options of ``cli.py train``: train a ResNet (the teacher) on the data."""

    out: str = out_field("checkpoint to write (its folder is created), e.g. runs/teacher.pth")
    arch: str = option("resnet50", help="torchvision ResNet to train", choices=ARCHS)
    data: str = data_field()
    image_size: int | None = image_size_field()
    stem: str = option("imagenet", choices=STEMS,
                       help="imagenet: torchvision's 7x7/2 conv + max-pool; cifar: 3x3/1 conv, no pool (better on "
                            "small images, ~13x slower); imagenet-os16: imagenet with an unstrided last stage "
                            "(+1.6 pt ResNet-50 teacher at 32 px for 3-10% more training time)")
    pretrained: bool = option(False, help="start from torchvision's ImageNet weights (needs the network)")
    freeze_backbone: bool = option(False, help="train only the new classifier (transfer learning on a small folder)")
    trainable_layers: int | None = option(None, metavar="N", default_text="everything",
                                          help="train the classifier and the last N of the 4 residual stages")
    augment: str | None = option(None, help=_AUGMENT_HELP, choices=AUGMENTS,
                                 default_text=f"{FASHION_MNIST_AUGMENT} for fashion-mnist, {FOLDER_AUGMENT} for "
                                              "folders")
    train_limit: int | None = train_limit_field()
    val_limit: int | None = val_limit_field()
    resume: bool = option(False, help="continue from <out>.last.pth after a kill")
    loop: LoopConfig = option(help="the shared training loop", default_factory=LoopConfig)


@dataclass(frozen=True)
class DistillConfig(Options):
    """Options of ``cli.py distill``: logit distillation of a teacher into a ResNet-18/34 student."""

    teacher: str = model_field("teacher checkpoint (edgeopt, torchvision state_dict, TorchScript, trusted pickle)",
                               flag="--teacher")
    out: str = out_field("student checkpoint to write, e.g. runs/student.pth")
    student: str = option("resnet18", help="the student's ResNet", choices=STUDENTS)
    teacher_arch: str | None = arch_field("architecture of a plain state_dict teacher")
    trust_checkpoint: bool = trust_field()
    student_init: str | None = option(None, help="start the student from this checkpoint instead of from scratch")
    temperature: float = option(4.0, help="softening temperature T", group="distillation")
    alpha: float = option(0.9, help="weight of the teacher term (1 - alpha weighs the labels)", group="distillation")
    data: str = data_field()
    image_size: int | None = image_size_field("the teacher's recorded preprocessing")
    stem: str | None = option(None, help="the student's stem", choices=STEMS,
                              default_text="the teacher's (imagenet for an imagenet-os16 one), else imagenet")
    augment: str | None = option(None, help=_AUGMENT_HELP, choices=AUGMENTS,
                                 default_text="the one the teacher's preprocessing records")
    train_limit: int | None = train_limit_field()
    val_limit: int | None = val_limit_field()
    resume: bool = option(False, help="continue from <out>.last.pth after a kill")
    loop: LoopConfig = option(help="the shared training loop", default_factory=LoopConfig)

    def check(self) -> None:
        check_distillation(self.temperature, self.alpha)


@dataclass(frozen=True)
class PruneConfig(Options):
    """Options of ``cli.py prune``: global L1 pruning (unstructured, channel or 2:4), then fine-tuning."""

    model: str = model_field("checkpoint to prune (a ResNet: edgeopt checkpoint, torchvision state_dict or "
                             "trusted pickle)")
    out: str = out_field("pruned checkpoint to write, e.g. runs/pruned.pth")
    method: str = option("l1-unstructured", help="what is removed: single weights, whole channels, or 2 of every 4",
                         choices=PRUNE_METHODS)
    amount: float | None = option(None, default_text=f"{PRUNE_AMOUNT:g}; not for 2:4 (always half of each group of 4)",
                                  help="fraction in [0, 1) of prunable weights (unstructured) or channels (channel) "
                                       "to remove")
    finetune_epochs: int = option(0, help="fine-tuning epochs after each pruning round (0: none)")
    steps: int = option(1, help="reach --amount in this many prune + fine-tune rounds")
    teacher: str | None = option(None, help="distil from this checkpoint while fine-tuning", group="distillation")
    temperature: float = option(4.0, help="softening temperature T", group="distillation")
    alpha: float = option(0.9, help="weight of the teacher term (1 - alpha weighs the labels)", group="distillation")
    round_to: int = option(8, help="l1-channel: keep channel counts multiples of this (tensor-core friendly)")
    # Torch-Pruning's per-layer cap. Not binding at amount 0.5 on the demo's ResNet-18 (0.6 / 0.75 / 0.9 gave the
    # same network); it matters at higher amounts.
    max_layer_amount: float = option(0.75, help="l1-channel: remove at most this fraction of any one layer's "
                                                "channels, so global ranking can never nearly empty a layer")
    # measured: 86.0% vs 85.4% before fine-tuning, 2.92x vs 2.95x fewer MACs; off until a fine-tuned comparison
    # says otherwise
    isomorphic: bool = option(False, help="l1-channel: rank channels only against groups of the same structure "
                                          "(Torch-Pruning's isomorphic pruning)")
    # measured on a 91.2% ResNet-18 at amount 0.5: 17.1% right after pruning, 85.4% after re-estimating from 2048
    # images, in seconds
    bn_images: int = option(2048, help="l1-channel: training images that re-estimate the BatchNorm statistics after "
                                       "each round (0: off)")
    include_stem_and_fc: bool = option(False, help="l1-unstructured: also prune the first conv and the classifier")
    arch: str | None = arch_field()
    trust_checkpoint: bool = trust_field()
    data: str = data_field()
    train_limit: int | None = train_limit_field()
    val_limit: int | None = val_limit_field()
    loop: LoopConfig = option(help="the shared training loop (its epochs: --finetune-epochs)",
                              default_factory=LoopConfig, exclude=("epochs",))

    def check(self) -> None:
        _check((not (self.method == "2:4" and self.amount is not None),
                "--method 2:4 always keeps 2 of every 4 weights; drop --amount"),
               (self.amount is None or 0.0 <= self.amount < 1.0, f"--amount must be in [0, 1) (got {self.amount})"),
               (self.finetune_epochs >= 0 and self.steps >= 1 and self.round_to >= 1,
                "--finetune-epochs must be >= 0, --steps and --round-to >= 1"),
               (0.0 < self.max_layer_amount < 1.0,
                f"--max-layer-amount must be in (0, 1) (got {self.max_layer_amount})"),
               (self.amount is None or self.amount <= self.max_layer_amount,
                f"--amount {self.amount} is above --max-layer-amount {self.max_layer_amount}; no layer may lose "
                "that much, so the amount cannot be reached: raise --max-layer-amount"),
               (self.bn_images >= 0, f"--bn-images must be 0 (off) or more (got {self.bn_images})"),
               (not (self.method == "2:4" and self.steps != 1), "--method 2:4 is one round; drop --steps"))
        check_distillation(self.temperature, self.alpha)

    @property
    def target(self) -> float:
        return PRUNE_AMOUNT if self.amount is None else self.amount

    @property
    def finetune_loop(self) -> LoopConfig:
        """The loop fine-tuning runs: ``finetune_epochs`` epochs, and without ``lr`` the fine-tuning default."""
        lr = self.loop.lr if self.loop.lr is not None else FINETUNE_LR[self.loop.optimizer]
        return replace(self.loop, epochs=max(1, self.finetune_epochs), lr=lr)


@dataclass(frozen=True)
class EvalConfig(Options):
    """Options of ``cli.py evaluate``."""

    model: str = model_field()
    data: str = data_field()
    arch: str | None = arch_field()
    image_size: int | None = image_size_field("the checkpoint's recorded preprocessing")
    val_limit: int | None = val_limit_field()
    batch_size: int = option(256, help="images per forward pass", bounds=(1, None))
    device: str = device_field()
    trust_checkpoint: bool = trust_field()
    plot: str | None = option(None, metavar="PNG", group="output",
                              help="also save the confusion matrix as a PNG, and the first conv layer's feature maps "
                                   "for one val image as <PNG stem>.conv1.png")
    progress: bool = progress_field()


# -- export and engines -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportConfig(Options):
    """Options of ``cli.py export``: ONNX with a symbolic batch axis, verified against PyTorch."""

    model: str = model_field("checkpoint to export (pruned or not; any format evaluate accepts)")
    out: str = out_field("ONNX file to write, e.g. runs/model.onnx")
    opset: int = option(DEFAULT_OPSET, help=f"ONNX opset ({DEFAULT_OPSET} suits TensorRT 8.6 and later, and ONNX "
                                            "Runtime)")
    atol: float = option(1e-3, help="largest logit difference between ONNX Runtime and PyTorch accepted, plus "
                                    "--rtol times the largest logit")
    rtol: float = option(1e-3, help="the part of the accepted difference that grows with the logits (a model with "
                                    "logits of 20 gets 1e-3 + 20 x 1e-3)")
    data: str | None = data_field(recorded=True)
    image_size: int | None = image_size_field("the checkpoint's recorded preprocessing")
    torchscript: bool = option(False, help="also write a traced TorchScript file, <out stem>.torchscript.pt")
    arch: str | None = arch_field()
    trust_checkpoint: bool = trust_field()

    def check(self) -> None:
        _check((math.isfinite(self.atol) and self.atol > 0, f"--atol must be a finite number above 0, not {self.atol}"),
               (math.isfinite(self.rtol) and self.rtol >= 0, f"--rtol must be a finite number of 0 or more, not "
                                                             f"{self.rtol}"))
        check_opset(self.opset)


@dataclass(frozen=True)
class CalibConfig(Options):
    """Options of ``cli.py calibrate``: INT8 Q/DQ for TensorRT, or the fastest measured form for the CPU."""

    onnx: str = option(help="FP32 ONNX model written by export (its metadata gives the preprocessing)")
    out: str = out_field("INT8 ONNX model to write, e.g. runs/model.int8.onnx")
    # with an existing cache and no recorded data that is here, quantize from the cache alone, without accuracy
    data: str | None = data_field(recorded=True)
    num_images: int = option(512, help="class-stratified calibration images (from the training split)")
    method: str = option("entropy", help=f"entropy (KL), minmax or percentile ({CALIB_PERCENTILE:g}th)",
                         choices=CALIB_METHODS)
    target: str = option("tensorrt", help="tensorrt: symmetric S8S8 Q/DQ; cpu: the faster measured form",
                         choices=CALIB_TARGETS)
    cache: str | None = option(None, help="calibration cache to reuse (no data read), or to write if missing",
                               default_text="<out stem>.calib.json")
    val_limit: int | None = val_limit_field(help="val images for the INT8-vs-FP32 accuracy figures")
    batch_size: int = option(32, help="images per calibration / evaluation batch", bounds=(1, None))
    timing_seconds: float = option(2.0, help=f"cpu target: time each form this long at batch "
                                             f"{' and '.join(map(str, CALIB_TIMED_BATCHES))} (chosen by batch "
                                             f"{CALIB_CHOOSING_BATCH})")
    form: str | None = option(None, choices=CPU_FORMS, default_text="both, the faster is kept",
                              help="cpu target: write this INT8 form without comparing (tensorrt has one form)")

    def check(self) -> None:
        _check((self.num_images >= 1 and self.batch_size >= 1, "--num-images and --batch-size must be at least 1"),
               (self.form is None or self.target == "cpu",
                f"--form {self.form!r} needs --target cpu (--target tensorrt has one form, qdq-tensorrt)"))


def check_profile(min_batch: int, opt_batch: int, max_batch: int) -> None:
    """The batch profile's rule (build-engine, package, TensorRT's optimization profile)."""
    _check((1 <= min_batch <= opt_batch <= max_batch,
            f"batch sizes must satisfy 1 <= --min-batch ({min_batch}) <= --opt-batch ({opt_batch}) <= --max-batch "
            f"({max_batch})"),
           (max_batch <= MAX_BATCH, f"--max-batch {max_batch} is beyond any device's memory for a classifier; use "
                                    f"{MAX_BATCH} or less"))


def parse_size(text: str | int) -> int:
    """``2G`` / ``512M`` / ``1073741824`` -> bytes (the --workspace flag)."""
    if isinstance(text, int):
        return text
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)
    except ValueError as e:
        raise ConfigError(f"--workspace: cannot read size {text!r}; write e.g. 2G, 512M or a byte count") from e


@dataclass(frozen=True)
class BuildConfig(Options):
    """Options of ``cli.py build-engine``: ONNX Runtime or OpenVINO (CPU, fp32/int8), or TensorRT 8.5 to 11
    (fp32/fp16/int8)."""

    onnx: str = option(help="FP32 ONNX from export (or an INT8 one from calibrate)")
    out: str = out_field("engine to write: runs/model.engine (TensorRT), runs/model.ort.onnx (ONNX Runtime), "
                         "runs/model.ov.xml (OpenVINO; its weights in the .bin beside it)")
    backend: str = option("onnxruntime", help="the runtime the engine is for", choices=BACKENDS)
    precision: str = option("fp32", help="fp16: TensorRT only", choices=PRECISIONS)
    calib_data: str | None = option(None, help="int8 from an FP32 ONNX: calibration data ('fashion-mnist' or a "
                                               "folder)", group="int8 calibration")
    calib_cache: str | None = option(None, help="int8: calibration cache to reuse or write", group="int8 calibration",
                                     default_text="<out stem>.calib.json")
    calib_method: str = option("entropy", help="int8: calibration method", choices=CALIB_METHODS,
                               group="int8 calibration")
    num_images: int = option(512, help="int8: calibration images", group="int8 calibration")
    calib_val_limit: int | None = option(None, metavar="N", group="int8 calibration", default_text="the whole split",
                                         help="int8: val images for the INT8-vs-FP32 accuracy figures")
    min_batch: int = option(DEFAULT_BATCHES[0], help="smallest batch of the optimization profile",
                            group="batch profile")
    opt_batch: int = option(DEFAULT_BATCHES[1], help="the batch the engine is tuned for", group="batch profile")
    max_batch: int = option(DEFAULT_BATCHES[2], help="largest batch of the optimization profile",
                            group="batch profile")
    workspace: str = option("2G", help="TensorRT workspace pool limit", group="tensorrt")
    timing_cache: str | None = option(None, help="TensorRT timing cache file to load and update", group="tensorrt")
    sparse_weights: bool = option(False, help="TensorRT: use 2:4 sparse tensor cores (prune with --method 2:4 "
                                              "first)", group="tensorrt")
    dla_core: int | None = option(None, group="tensorrt",
                                  help="TensorRT: build for this DLA core (Jetson; fp16/int8, min = opt = max batch), "
                                       "falling back to the GPU layer by layer")
    tf32: bool = option(False, help="TensorRT fp32: allow TF32 math (off: fp32 means FP32)", group="tensorrt")
    int8_high_precision: str = option("fp16", choices=INT8_HIGH_PRECISIONS, group="tensorrt",
                                      help="TensorRT int8: the precision of the layers left unquantized (residual "
                                           "Adds, pooling, the head's input); fp16 as NVIDIA Model Optimizer's "
                                           "default, fp32 to keep them exact")
    nncf_preset: str = option("performance", choices=NNCF_PRESETS, group="openvino",
                              help="OpenVINO int8: NNCF's preset (performance: symmetric activations; mixed: "
                                   "asymmetric, for activations that are not ReLU outputs)")
    nncf_model_type: str = option("cnn", choices=NNCF_MODEL_TYPES, group="openvino",
                                  help="OpenVINO int8: NNCF's model type (transformer keeps attention's softmax and "
                                       "layer norms float)")
    compare_rounds: int = option(5, group="onnxruntime",
                                 help="rounds timing the optimized model against its input at --opt-batch (ONNX "
                                      "Runtime), or the LATENCY hint against THROUGHPUT (OpenVINO); the faster is "
                                      "kept (0: keep the optimized one / LATENCY unmeasured)")
    compare_seconds: float = option(0.3, help="one window of that timing", group="onnxruntime")
    threads: int | None = threads_field()

    def check(self) -> None:
        cpu = self.backend in ("onnxruntime", "openvino")
        _check((not (cpu and self.precision == "fp16"),
                f"--precision fp16 is not offered for --backend {self.backend}: CPU kernels have no FP16 speed-up; "
                "use fp32 or int8, or --backend tensorrt"),
               (self.backend == "openvino" or (self.nncf_preset == "performance" and self.nncf_model_type == "cnn"),
                "--nncf-preset and --nncf-model-type are OpenVINO options (NNCF's INT8); drop them or use --backend "
                "openvino"),
               (not (cpu and (self.sparse_weights or self.dla_core is not None or self.timing_cache or self.tf32
                              or self.int8_high_precision != "fp16")),
                "--sparse-weights, --dla-core, --timing-cache, --tf32 and --int8-high-precision are TensorRT options "
                "(the CPU runtimes' INT8 keeps its float layers FP32); drop them or use --backend tensorrt"),
               (self.compare_rounds >= 0 and self.compare_seconds > 0,
                "--compare-rounds must be >= 0 and --compare-seconds > 0"),
               (not self.tf32 or self.precision == "fp32", f"--tf32 applies to --precision fp32 only, not "
                                                           f"{self.precision}"))
        check_profile(self.min_batch, self.opt_batch, self.max_batch)
        if self.dla_core is not None:
            static = self.min_batch == self.opt_batch == self.max_batch
            _check((self.dla_core >= 0, "--dla-core must be 0 or more (a Jetson Orin/Xavier has cores 0 and 1)"),
                   (self.precision != "fp32", "--dla-core needs --precision fp16 or int8: DLA has no FP32"),
                   (static, f"--dla-core needs a static batch: --min-batch, --opt-batch and --max-batch equal (got "
                            f"{self.min_batch}/{self.opt_batch}/{self.max_batch}); DLA takes no dynamic shapes"))
        parse_size(self.workspace)


# -- deployment -------------------------------------------------------------------------------------------------

_RUNTIME_MODEL_HELP = ".pth/.pt checkpoint, .onnx model (export, calibrate, build-engine) or TensorRT .engine/.plan"


@dataclass(frozen=True)
class InferConfig(Options):
    """Options of ``cli.py infer``: classify image files and folders."""

    model: str = model_field(_RUNTIME_MODEL_HELP)
    images: tuple[str, ...] = option((), positional=True, metavar="IMAGE_OR_DIR",
                                     help="image files, or folders searched recursively")
    top_k: int = option(5, help="classes reported per image, most probable first")
    batch_size: int = option(32, help="images per inference (an engine's max batch caps it)", bounds=(1, None))
    image_size: int | None = option(None, bounds=(8, None), default_text="the model's recorded preprocessing",
                                    help="for a checkpoint that records no preprocessing (a plain torchvision "
                                         "state_dict): its input side, with ImageNet's statistics")
    device: str = device_field("cpu")
    threads: int | None = threads_field()
    trust_checkpoint: bool = trust_field()

    def check(self) -> None:
        _check((bool(self.images), "give at least one image file or folder"),
               (self.top_k >= 1 and self.batch_size >= 1, "--top-k and --batch-size must be at least 1"))


@dataclass(frozen=True)
class PackageConfig(Options):
    """Options of ``cli.py package``: a deployment bundle (model, runner.py, build_engine.sh, Triton repository)."""

    model: str = model_field("ONNX model (export, calibrate, build-engine) or TensorRT engine")
    out: str = out_field("bundle folder to write, e.g. dist/bundle")
    name: str | None = option(None, help="Triton model name (letters, digits, '_' and '-')",
                              default_text="the model file's stem, other characters replaced by '_'")
    onnx: str | None = option(None, help="an engine's source ONNX, when it moved since build-engine")
    precision: str | None = option(None, help="what build_engine.sh builds unless told", choices=PRECISIONS,
                                   default_text="the engine's precision, else the ONNX's")
    min_batch: int | None = option(None, help="smallest batch of build_engine.sh's profile", group="batch profile",
                                   default_text=f"the engine's profile, else {DEFAULT_BATCHES[0]}")
    opt_batch: int | None = option(None, help="the batch build_engine.sh tunes for", group="batch profile",
                                   default_text=f"the engine's profile, else {DEFAULT_BATCHES[1]}")
    max_batch: int | None = option(None, help="Triton max_batch_size and the profile's largest batch",
                                   group="batch profile",
                                   default_text=f"the engine's profile, else {DEFAULT_BATCHES[2]}")
    data: str | None = data_field(recorded=True)
    check_images: int | None = option(None, metavar="N", group="acceptance set",
                                      help="val images in the bundle's acceptance set, for 'runner.py --check' on the "
                                           "device (0: none)",
                                      default_text=f"{ACCEPTANCE_COUNT[True]} up to {SMALL_IMAGE} px, "
                                                   f"{ACCEPTANCE_COUNT[False]} above")
    max_accuracy_drop: float = option(1.0, group="acceptance set",
                                      help="the device check's budget: top-1 points its model may lose against the "
                                           "host's on the acceptance set")
    check_batch_sizes: tuple[int, ...] = option((1, 8, 32), group="acceptance set",
                                                help="batch sizes the device check times (within the profile)")
    force: bool = option(False, help="replace a non-empty --out", group="output")

    def check(self) -> None:
        _check((self.name is None or bool(_TRITON_NAME.match(self.name)),
                f"--name {self.name!r}: use letters, digits, '_' and '-' only (a folder name in the Triton "
                "repository)"),
               (self.check_images is None or self.check_images >= 0, "--check-images must be 0 or more"),
               accuracy_drop_check(self.max_accuracy_drop),
               (bool(self.check_batch_sizes) and min(self.check_batch_sizes) >= 1,
                "--check-batch-sizes must be positive integers"))


@dataclass(frozen=True)
class ServeConfig(Options):
    """Options of ``cli.py serve``: POST /predict (images -> top-k JSON), GET /health, GET /metadata."""

    model: str = model_field(_RUNTIME_MODEL_HELP)
    host: str = option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    port: int = option(8000, help="0: any free port (printed at start)")
    top_k: int = option(5, help="classes per image unless the request asks ?top_k=N")
    max_batch: int = option(32, help="most images per inference (the model's own largest batch caps it)")
    max_wait_ms: float = option(5.0, help="how long the first image of a batch waits for others")
    max_queue: int = option(1024, help="images waiting at most; beyond, 503")
    max_upload_bytes: int = option(10 << 20, help="largest request body (all images together); beyond, 413")
    max_images: int = option(64, help="most images per request")
    max_pixels: int = option(40_000_000, help="largest decoded image (width x height); beyond, 413")
    timeout_s: float = option(30.0, flag="--timeout",
                              help="seconds a connection with an incomplete request (slow headers or body) may stay "
                                   "silent before it is closed (408 when nothing was answered yet)")
    device: str = device_field("cpu")
    threads: int | None = threads_field()
    trust_checkpoint: bool = trust_field()

    def check(self) -> None:
        _check((min(self.top_k, self.max_batch, self.max_queue, self.max_upload_bytes, self.max_images,
                    self.max_pixels) >= 1,
                "--top-k, --max-batch, --max-queue, --max-upload-bytes, --max-images and --max-pixels must be at "
                "least 1"),
               (self.max_wait_ms >= 0 and 0 <= self.port <= 65535,
                "--max-wait-ms must be >= 0 and --port within 0..65535"),
               (self.timeout_s > 0, f"--timeout must be above 0 seconds (got {self.timeout_s})"))


# -- benchmark, pipeline, search --------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchmarkConfig(Options):
    """Options of ``cli.py benchmark``: accuracy, latency, throughput and speedups against a baseline."""

    out: str = out_field("folder for report.md, report.json and the plots")
    models: tuple[str, ...] = option((), metavar="ARTIFACT",
                                     help=".pth / .onnx / .engine files to compare, in pipeline order; the final "
                                          "artifact is the fastest within --max-accuracy-drop of the baseline")
    baseline: str | None = option(None, help="the reference artifact, e.g. the original teacher checkpoint",
                                  default_text="the first of --models")
    data: str | None = data_field(recorded=True)
    batch_sizes: tuple[int, ...] = option((1, 8, 32), help="throughput at each; latency percentiles at batch 1")
    device: str = device_field("cpu")
    threads: int | None = threads_field()
    # in each round every artifact gets one window per batch size, the artifacts taking turns (rotated each round)
    # so the machine's drift hits all alike (optimize.timing)
    rounds: int = option(5, help="timing rounds; figures are medians over the rounds, spreads their range",
                         group="timing")
    seconds: float = option(0.4, help="one timing window: per artifact, batch size and round", group="timing")
    warmup: int = option(3, help="untimed runs before an artifact's first window", group="timing")
    val_limit: int | None = val_limit_field()
    input_size: int | None = option(None, help="speed-only run at this input side (e.g. 224): random inputs, no "
                                               "accuracy")
    max_accuracy_drop: float = option(1.0, group="budgets",
                                      help="your accuracy budget in top-1 points: the final artifact against the "
                                           "baseline, an INT8 artifact against its FP32/FP16 sibling")
    min_speedup: float = option(1.0, group="budgets",
                                help="your speed budget: the final artifact's throughput at the reference batch in "
                                     "multiples of the baseline's")
    e2e_batch: int = option(8, help="batch size of the end-to-end figure (decoded image -> preprocessing -> model)")
    tf32: bool = option(False, help="--device cuda: also time FP32 checkpoints and ONNX models with TF32 math, as "
                                    "rows of their own labelled tf32 (the fp32 rows are IEEE FP32 either way)")
    device_results: tuple[str, ...] = option((), metavar="CHECK_JSON",
                                             help="check.json files of 'runner.py --check' on devices: rows of their "
                                                  "own in the report, marked with the machine; without --models "
                                                  "and --baseline, the report in --out is redrawn with them")
    trust_checkpoint: bool = trust_field()
    progress: bool = progress_field()

    def check(self) -> None:
        _check((bool(self.models or self.baseline or self.device_results),
                "give at least one model to benchmark (--models) or a --baseline (or --device-results to add to a "
                "report)"),
               (bool(self.batch_sizes) and min(self.batch_sizes) >= 1, "--batch-sizes must be positive integers"),
               (max(self.batch_sizes, default=1) <= MAX_BATCH,
                f"--batch-sizes above {MAX_BATCH} images are no deployment batch, and their inputs alone "
                "take gigabytes at 224 px; time the batch sizes you will serve"),
               (self.seconds > 0 and self.warmup >= 0 and self.e2e_batch >= 1 and self.rounds >= 1,
                "--seconds must be > 0, --rounds >= 1, --warmup >= 0 and --e2e-batch >= 1"),
               accuracy_drop_check(self.max_accuracy_drop),
               (self.min_speedup > 0, f"--min-speedup must be > 0, not {self.min_speedup}"),
               (self.input_size is None or self.input_size >= 8, "--input-size must be at least 8 pixels"),
               (not self.tf32 or self.device != "cpu", "--tf32 is a CUDA mode; use it with --device cuda (or auto)"))

    @property
    def reference_batch(self) -> int:
        """The batch size speedups and budgets are read at: 8 when measured, else the largest."""
        return 8 if 8 in self.batch_sizes else max(self.batch_sizes)


# each pipeline stage's config (a recipe stage's keys are its fields, and the shared loop's for training stages)
STAGE_CONFIGS: dict[str, type] = {
    "teacher": TrainConfig, "distill": DistillConfig, "prune": PruneConfig, "export": ExportConfig,
    "calibrate": CalibConfig, "build-engine": BuildConfig, "benchmark": BenchmarkConfig,
}


@dataclass(frozen=True)
class GpuCheckConfig(Options):
    """Options of ``cli.py gpu-check``: every GPU backend over a pipeline run's artifacts."""

    runs: str = option("runs/demo", help="a pipeline's output folder (make demo writes runs/demo)")
    out: str | None = option(None, help="folder for the engines and reports", group="output",
                             default_text="RUNS/gpu-check")
    data: str = data_field()
    seconds: float = option(2.0, help="one benchmark timing window (per artifact, batch size and round): a GPU's "
                                      "clocks settle over seconds, and sub-second windows measured their ramp")
    rounds: int = option(3, help="benchmark timing rounds (medians over them)")
    val_limit: int | None = val_limit_field(2000, help="val images for the accuracy figures")
    tf32: bool = option(True, help="also time TF32 rows beside the FP32 ones (labelled tf32)")
    allow_no_tensorrt: bool = option(False, help="run without TensorRT or a CUDA binding for it, the report saying "
                                                 "TensorRT was not checked (else that is an error: a GPU check that "
                                                 "skipped TensorRT must not read as a pass)")

    def check(self) -> None:
        _check((self.seconds > 0 and self.rounds >= 1, "--seconds must be > 0 and --rounds >= 1"))

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.runs) / "gpu-check"


# the pipeline's presets: recipes a --config file is merged over (optimize.pipeline runs them)
PRESETS: dict[str, dict[str, Any]] = {
    # about 3 minutes on 2 CPU cores: every stage runs, on a slice
    "quick": {
        "train_limit": 2000, "val_limit": 1000,
        "stages": {
            "teacher": {"arch": "resnet50", "epochs": 1},
            "distill": {"student": "resnet18", "epochs": 1, "alpha": 0.5},
            "prune": {"method": "l1-channel", "amount": 0.5, "finetune_epochs": 1, "lr": 1e-3, "alpha": 0.5},
            "export": {"opset": DEFAULT_OPSET},
            "calibrate": {"target": "cpu", "num_images": 256, "timing_seconds": 0.5},
            "build-engine": {"onnxruntime": ["fp32", "int8"], "tensorrt": ["fp16", "int8"], "max_batch": 64},
            "benchmark": {"batch_sizes": [1, 8, 32], "rounds": 3, "seconds": 0.15, "warmup": 1, "input_sizes": [224]},
        },
    },
    # about 30 minutes on 2 CPU cores: all 60k training images, the full 10k val split; bfloat16 autocast where
    # the CPU computes it natively (1.5x faster training; float32 elsewhere, then ~40 min); the figures that chose
    # these settings are in docs/RESULTS.md (demo-models)
    "standard": {
        "stages": {
            # imagenet-os16: 90.60% vs 89.01% for the imagenet stem, same epochs (RESULTS.md, recipe-frontier)
            "teacher": {"arch": "resnet50", "stem": "imagenet-os16", "epochs": 3, "cpu_bf16": True},
            # the student of an imagenet-os16 teacher keeps torchvision's layout (distill's default). alpha 0.1: with
            # a teacher below the scratch ResNet-18, a light teacher term wins: 91.37% vs 90.92% for alpha 0.5
            # (teacher 90.27%, scratch 91.19%); with the 89.01% imagenet-stem teacher 91.22% vs 90.43%
            "distill": {"student": "resnet18", "epochs": 3, "alpha": 0.1, "temperature": 4.0,
                        "cpu_bf16": True},
            # fine-tuning lr 1e-3 + alpha 0.5: 89.67% vs 89.30% for lr 2e-4 + alpha 0.9 (student 90.43%)
            "prune": {"method": "l1-channel", "amount": 0.5, "finetune_epochs": 1, "lr": 1e-3, "alpha": 0.5,
                      "cpu_bf16": True},
            "export": {"opset": DEFAULT_OPSET},
            "calibrate": {"target": "cpu", "num_images": 512, "timing_seconds": 1.0},
            # openvino: built only where edgeopt[openvino] is installed; the benchmark then picks across runtimes
            "build-engine": {"onnxruntime": ["fp32", "int8"], "openvino": ["fp32", "int8"],
                             "tensorrt": ["fp16", "int8"], "max_batch": 64},
            # min_speedup: the demo's own budget (the final artifact >= 20x the teacher at batch 8), a recipe value
            "benchmark": {"batch_sizes": [1, 8, 32], "rounds": 5, "seconds": 0.4, "min_speedup": 20,
                          "input_sizes": [224]},
        },
    },
    # for a GPU: all data, the cifar stem (32x32 through the first stage), long SGD runs with pad-and-crop
    # augmentation, aimed at the dataset's own table (ResNet-18 >= 94.9%; the ResNet-50 teacher >= 95.0%);
    # a CPU would take days (`--device cuda` is asked for, so a CPU-only machine gets a clear error at once)
    "full": {
        "device": "cuda",
        "stages": {
            "teacher": {"arch": "resnet50", "stem": "cifar", "augment": "crop-flip", "epochs": 40,
                        "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "label_smoothing": 0.1,
                        "warmup": 0.05},
            "distill": {"student": "resnet18", "augment": "crop-flip", "epochs": 40, "alpha": 0.5,
                        "temperature": 4.0, "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "warmup": 0.05},
            "prune": {"method": "l1-channel", "amount": 0.5, "steps": 2, "finetune_epochs": 8,
                      "optimizer": "sgd", "lr": 0.01, "weight_decay": 5e-4},
            "export": {"opset": DEFAULT_OPSET},
            "calibrate": {"target": "cpu", "num_images": 1024},
            "build-engine": {"onnxruntime": ["fp32", "int8"], "tensorrt": ["fp32", "fp16", "int8"],
                             "max_batch": 256},
            "benchmark": {"batch_sizes": [1, 8, 32, 128], "rounds": 5, "seconds": 0.6, "input_sizes": [224]},
        },
    },
}


@dataclass(frozen=True)
class RecipeCommon(Options):
    """The top-level keys of a pipeline recipe, shared by the stages (flags of ``pipeline`` override them)."""

    data: str = data_field()
    image_size: int | None = image_size_field("the data's preset")
    train_limit: int | None = train_limit_field()
    val_limit: int | None = val_limit_field()
    device: str = device_field()
    teacher: str | None = option(None, help="an existing teacher checkpoint: the teacher stage is left out")
    student: str | None = option(None, help="an existing distilled student: the distill stage is left out")


@dataclass(frozen=True)
class PipelineConfig(Options):
    """Options of ``cli.py pipeline``: teacher, distill, prune, export, calibrate, build-engine, benchmark."""

    out: str = out_field("folder for every artifact, the reports and pipeline.json", default="runs")
    preset: str = option("standard", choices=tuple(PRESETS),
                         help="quick: ~3 min slice; standard: ~30 min on 2 CPU cores; full: a GPU, the dataset's "
                              "anchors; the recipe a --config file is merged over")
    recipe: str | None = option(None, flag="--config", aliases=("--recipe",), metavar="RECIPE.yaml",
                                help="YAML recipe naming each stage's options, merged over --preset")
    # top-level recipe keys given on the command line (the fields of RecipeCommon)
    overrides: tuple[tuple[str, Any], ...] = option((), help="recipe keys set on the command line", cli=False)
    force: bool = option(False, help="rerun every stage even when unchanged")
    progress: bool = progress_field()


@dataclass(frozen=True)
class SearchConfig(Options):
    """Options of ``cli.py search``: the fastest compression recipe within an accuracy budget, measured."""

    teacher: str = option(help="the original model: the accuracy baseline, shared by all trials")
    out: str = out_field("folder for the study, trials/, report.md and best.yaml", default="runs/search")
    data: str | None = data_field(recorded=True)
    student: str | None = option(None, help="a distilled student to prune (compression space)",
                                 default_text="distilled once into OUT/student.pth with the preset's options")
    max_accuracy_drop: float = option(1.0, help="budget: top-1 points below the teacher")
    target: str = option("cpu", choices=SEARCH_TARGETS,
                         help="where trials are measured: cpu (ONNX Runtime) or tensorrt (engines on the GPU)")
    trials: int = option(20, help="finished trials the study holds in all (every process sharing it)")
    storage: str | None = option(None, help="optuna storage URL shared by every search process (postgresql://... "
                                            "for a fleet)", default_text="sqlite:///OUT/study.db")
    study_name: str = option("edgeopt-search", help="the study's name in --storage")
    space: str = option("compression", choices=SPACES,
                        help="compression: prune/KD/calibration/INT8 form; training: lr, batch size, weight decay, "
                             "label smoothing of the student")
    objective: str = option("throughput", choices=OBJECTIVES,
                            help="throughput: img/s at --batch (maximized); latency: p50 ms at batch 1 (minimized)")
    batch: int = option(8, help="target batch size for --objective throughput")
    resume: bool = option(False, help="continue (or join) the study in --storage; without it an existing study is "
                                      "refused")
    preset: str = option("standard", choices=tuple(PRESETS),
                         help="pipeline preset whose options a trial's recipe is merged over")
    image_size: int | None = image_size_field("the data's preset")
    train_limit: int | None = train_limit_field()
    val_limit: int | None = val_limit_field()
    rounds: int = option(3, help="each trial's benchmark: timing rounds", group="timing")
    seconds: float = option(0.3, help="each trial's benchmark: one timing window", group="timing")
    seed: int = option(0, help="the sampler's seed")
    minutes: float | None = option(None, help="time budget of this process: no trial is started that would end "
                                              "after it (at the mean duration of its trials so far)")
    heartbeat: int = option(60, help="seconds between a running trial's heartbeats in the storage")
    grace_period: int = option(300, help="seconds without a heartbeat before another process fails a trial (other "
                                         "hosts)")
    progress: bool = progress_field(False)

    def check(self) -> None:
        _check(accuracy_drop_check(self.max_accuracy_drop),
               (self.trials >= 1, f"--trials must be at least 1 (got {self.trials})"),
               (self.batch >= 1 and self.rounds >= 1 and self.seconds > 0,
                "--batch and --rounds must be >= 1 and --seconds > 0"),
               (self.minutes is None or self.minutes > 0, f"--minutes must be > 0 (got {self.minutes})"),
               (self.heartbeat >= 1 and self.grace_period > self.heartbeat,
                "--heartbeat must be >= 1 s and --grace-period longer than --heartbeat"),
               (not (self.student and self.space == "training"),
                "--space training trains the student in every trial; drop --student"))

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(Path(self.out) / 'study.db').resolve()}"

    @property
    def timed_batch(self) -> int:
        return 1 if self.objective == "latency" else self.batch
