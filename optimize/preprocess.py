"""The one preprocessing definition of edgeopt.

Training, evaluation, calibration, benchmarking and inference all turn an image into a tensor here. A
:class:`Preprocessing` is recorded in every checkpoint and manifest, so a later stage rebuilds exactly the
transform the model was trained with instead of asking the user again.

Eval transform: any image mode -> RGB (grayscale replicated to 3 channels, 16-bit scaled to 8-bit, alpha and
CMYK converted) -> resize the shorter side to ``resize_size`` -> center crop ``image_size`` -> float in [0, 1]
-> normalize with ``mean``/``std``.

The shorter side is resized, so an image's memory after the resize grows with its aspect ratio, not its pixel
count: a 1 x 1,000,000 strip (2 KB as a PNG) becomes 32 x 32,000,000. Images more elongated than
:data:`MAX_ASPECT_RATIO` are refused (:func:`check_image_size`) before they are decoded or resized.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps
from torchvision import transforms as T

# the bundle's runner (torch-free, copied into every bundle) holds the image decoding both sides share
from .bundle.runner import MAX_ASPECT_RATIO, to_rgb
from .configs import AUGMENTS, FASHION_MNIST_AUGMENT, FASHION_MNIST_SIZE, FOLDER_AUGMENT, FOLDER_SIZE
from .errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Fashion-MNIST's own pixel statistics over the 60k training images, replicated to the 3 channels.
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)

ROTATION_DEGREES = 15  # the seeds' RandomRotation(15)
MAX_SIDE = 8192  # image_size / resize_size above this are damaged metadata, not a classifier's input
_INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                   "nearest": T.InterpolationMode.NEAREST}


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor (``3 x image_size x image_size``, float32, NCHW).

    Attributes:
        image_size: side of the square crop the model sees.
        resize_size: the shorter side is resized to this before the center crop (``>= image_size``).
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by after subtracting the mean.
        interpolation: resampling filter for the resize.
        train_augment: training-time augmentation: ``flip`` (horizontal flip only), ``crop-flip`` (pad-and-crop
            + horizontal flip, for small images), ``random-resized-crop`` (+ flip, for photos), either with ``-rotate`` (+ a random rotation
            of up to 15 degrees, as the seeds do) or ``none``.
    """

    image_size: int
    resize_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    train_augment: str = "random-resized-crop"

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ConfigError(f"image size {self.image_size} is too small; use at least 8 pixels")
        if self.image_size > MAX_SIDE:
            raise ConfigError(f"image size {self.image_size} is above the {MAX_SIDE} pixels edgeopt supports")
        if self.resize_size < self.image_size:
            raise ConfigError(f"resize_size {self.resize_size} is smaller than image_size {self.image_size}")
        if self.resize_size > MAX_SIDE:
            raise ConfigError(f"resize_size {self.resize_size} is above the {MAX_SIDE} pixels edgeopt supports")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("mean and std need 3 values each, std > 0")
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}")
        if self.train_augment not in AUGMENTS:
            raise ConfigError(f"train_augment must be one of {AUGMENTS}")

    # -- recording -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["channels"] = 3
        d["layout"] = "NCHW"
        d["color"] = "RGB"
        return d

    @classmethod
    def from_dict(cls, d: Any, *, source: str | None = None) -> "Preprocessing":
        """Rebuild a recorded preprocessing, checking every field's type and range (it may be hand-edited).

        Args:
            d: what :meth:`to_dict` wrote (extra keys such as ``layout`` are ignored).
            source: where ``d`` was read from (a file, a metadata key), named in the error.

        Raises:
            ConfigError: ``d`` is not a dict, lacks ``image_size`` / ``resize_size``, or holds a wrong type or value.
        """
        where = f"{source}: " if source else ""
        fix = "; re-export the model or re-save the checkpoint with edgeopt"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}the recorded preprocessing is a {type(d).__name__}, not a dict{fix}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        try:
            for key in ("image_size", "resize_size"):
                if key not in kwargs:
                    raise ConfigError(f"it has no {key}")
                if not isinstance(kwargs[key], int) or isinstance(kwargs[key], bool):
                    raise ConfigError(f"{key} must be an integer, not {kwargs[key]!r}")
            for key in ("mean", "std"):
                if key in kwargs:
                    value = kwargs[key]
                    if (not isinstance(value, (list, tuple)) or len(value) != 3
                            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                       for x in value)):
                        raise ConfigError(f"{key} must be 3 finite numbers, not {value!r}")
                    kwargs[key] = tuple(float(x) for x in value)
            for key in ("interpolation", "train_augment"):
                if key in kwargs and not isinstance(kwargs[key], str):
                    raise ConfigError(f"{key} must be a string, not {kwargs[key]!r}")
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{where}the recorded preprocessing is invalid: {e}{fix}") from e

    # -- transforms ------------------------------------------------------------------------------------
    def eval_transform(self) -> T.Compose:
        """PIL image (any mode) -> normalized float tensor, deterministic."""
        return T.Compose([
            T.Lambda(checked_rgb),
            T.Resize(self.resize_size, interpolation=_INTERPOLATIONS[self.interpolation], antialias=True),
            T.CenterCrop(self.image_size),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])

    def train_transform(self) -> T.Compose:
        """PIL image (any mode) -> normalized float tensor with the recorded augmentation."""
        interp = _INTERPOLATIONS[self.interpolation]
        augment = self.train_augment.removesuffix("-rotate")
        if augment == "random-resized-crop":
            geometric = [T.RandomResizedCrop(self.image_size, interpolation=interp, antialias=True),
                         T.RandomHorizontalFlip()]
        elif augment == "crop-flip":
            geometric = [T.Resize(self.resize_size, interpolation=interp, antialias=True),
                         T.CenterCrop(self.image_size),
                         T.RandomCrop(self.image_size, padding=max(1, self.image_size // 8)),
                         T.RandomHorizontalFlip()]
        else:
            geometric = [T.Resize(self.resize_size, interpolation=interp, antialias=True),
                         T.CenterCrop(self.image_size)]
            if augment == "flip":
                geometric.append(T.RandomHorizontalFlip())
        if self.train_augment.endswith("-rotate"):
            geometric.append(T.RandomRotation(ROTATION_DEGREES, interpolation=interp))
        return T.Compose([T.Lambda(checked_rgb), *geometric, T.ToTensor(), T.Normalize(self.mean, self.std)])


def fashion_mnist_preset(*, image_size: int = FASHION_MNIST_SIZE) -> Preprocessing:
    """28x28 grayscale clothing: upscale to ``image_size``, no crop margin, horizontal flips.

    Flips only: pad-and-crop costs a short run dearly (ResNet-18, 20k images, 1 epoch: 79.7% with crop-flip,
    86.6% with none; ResNet-50: 81.5% none, 82.7% flip); long runs (the ``full`` preset) add crop-flip.
    """
    return Preprocessing(image_size=image_size, resize_size=image_size, mean=FASHION_MNIST_MEAN,
                         std=FASHION_MNIST_STD, train_augment=FASHION_MNIST_AUGMENT)


def folder_preset(*, image_size: int = FOLDER_SIZE) -> Preprocessing:
    """Photos: ImageNet statistics, resize to image_size/0.875 then center crop (torchvision's eval preset)."""
    return Preprocessing(image_size=image_size, resize_size=int(round(image_size / 0.875)),
                         mean=IMAGENET_MEAN, std=IMAGENET_STD, train_augment=FOLDER_AUGMENT)


def check_image_size(width: int, height: int) -> None:
    """Refuse an image whose short-side resize would be huge (see :data:`MAX_ASPECT_RATIO`).

    Raises:
        DataError: one side is 0 or more than :data:`MAX_ASPECT_RATIO` times the other.
    """
    if min(width, height) < 1:
        raise DataError(f"image of {width}x{height} pixels is empty")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise DataError(f"image of {width}x{height} pixels has an aspect ratio of "
                        f"{max(width, height) / min(width, height):.0f}:1, above the {MAX_ASPECT_RATIO}:1 edgeopt "
                        "resizes (its short-side resize would take gigabytes); crop it first")


def checked_rgb(img: Image.Image) -> Image.Image:
    """:func:`to_rgb` after :func:`check_image_size`: the first step of every transform."""
    check_image_size(*img.size)
    return to_rgb(img)


def load_image(path) -> Image.Image:
    """Open an image file fully decoded as RGB, honouring its EXIF orientation.

    Raises:
        DataError: the image has more pixels than Pillow's decompression-bomb limit, or an extreme aspect ratio
            (checked from the header, before decoding).
    """
    try:
        opened = Image.open(path)
    except Image.DecompressionBombError as e:
        raise DataError(f"image is too large to decode safely ({e})") from e
    with opened as img:
        check_image_size(*img.size)
        img = ImageOps.exif_transpose(img)
        img.load()
        return to_rgb(img)

