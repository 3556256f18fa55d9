"""Stage ``infer``: classify image files with any model edgeopt writes, using the preprocessing it records.

The model is opened with :func:`optimize.runners.open_runner` (a ``.pth`` checkpoint, an ``.onnx`` model or a
TensorRT engine), so every backend is fed the tensor :meth:`Preprocessing.eval_transform` makes from the
preprocessing the artifact recorded, batched by the batcher calibration and the benchmark use
(:class:`optimize.batcher.ImageBatcher`). Folders are expanded to the image files under them; a file that cannot
be decoded becomes an error entry in the results instead of stopping the run. ``serve`` shares the scoring.

Example::

    results = run(InferConfig(model="runs/model.int8.onnx", images=("photos/",), top_k=3))
    best = {r.image: r.top_k[0].name for r in results if not r.error}   # unreadable files carry r.error
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from .batcher import ImageBatcher
from .bundle.runner import expand
from .configs import InferConfig
from .data import LabeledImages
from .errors import DataError, NonFiniteOutputError
from .preprocess import Preprocessing, folder_preset, load_image
from .runners import Runner, RunnerError, backend_of, open_runner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassScore:
    """One class of a prediction: its index, name and softmax probability."""

    index: int
    name: str
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "class": self.name, "probability": self.probability}


@dataclass(frozen=True)
class ImageResult:
    """The top-k classes of one image, or why it could not be classified (``error``)."""

    image: str
    top_k: list[ClassScore] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "top_k": [c.to_dict() for c in self.top_k], "error": self.error}


def expand_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders replaced by the image files under them (sorted).

    Raises:
        DataError: a path does not exist, or a folder holds no image file.
    """
    return expand(paths, error=DataError)


def model_inputs(runner: Runner, image_size: int | None = None) -> tuple[Preprocessing, list[str] | None]:
    """The preprocessing and class names the runner's artifact records; for one that records none (a plain
    torchvision state_dict) and an ``image_size``, ImageNet's preset at that size.

    Raises:
        RunnerError: no preprocessing recorded and no image size given, or an image size the artifact's recorded
            preprocessing contradicts.
    """
    if runner.preprocessing is None:
        if image_size is None:
            raise RunnerError(f"{runner.path} records no preprocessing, so images cannot be prepared for it: give "
                              "--image-size (ImageNet's statistics are used), or use a checkpoint written by edgeopt "
                              "or a model exported from one")
        logger.info("%s records no preprocessing: ImageNet's statistics at %d px (--image-size)", runner.path,
                    image_size)
        return folder_preset(image_size=image_size), runner.class_names
    if image_size is not None and image_size != runner.preprocessing.image_size:
        raise RunnerError(f"--image-size {image_size}: {runner.path} records {runner.preprocessing.image_size} px "
                          "preprocessing; drop --image-size")
    return runner.preprocessing, runner.class_names


def image_tensor(transform: Callable, source) -> np.ndarray:
    """``float32 [3, S, S]`` from an image file or file object, through the model's eval transform."""
    return transform(load_image(source)).numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable for large logits)."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(logits: np.ndarray, class_names: Sequence[str] | None, k: int) -> list[list[ClassScore]]:
    """The ``k`` most probable classes of each row of ``logits`` (names are indices when none are recorded).

    Raises:
        NonFiniteOutputError: a logit is NaN or inf: a broken model's answer is no answer (and NaN is no JSON).
    """
    if not np.isfinite(logits).all():
        rows = int((~np.isfinite(logits).all(axis=1)).sum())
        raise NonFiniteOutputError(f"the model answered NaN or inf for {rows} of {len(logits)} image(s): its weights "
                                   "are broken (a diverged training run?); retrain it with a lower --lr")
    probs = softmax(logits)
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[ClassScore(int(i), class_names[i] if class_names else str(int(i)), float(row[i])) for i in idx]
            for row, idx in zip(probs, order)]


def _image_files(files: list[Path], transform: Callable) -> tuple[LabeledImages, dict[int, str]]:
    """``files`` as a dataset labelled by position (so batches say which files they hold), and the errors of
    those that could not be read, filled in as the batcher reaches them."""
    errors: dict[int, str] = {}

    def load(i: int) -> Image.Image | None:
        try:
            return load_image(files[i])
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file; all mean "unreadable"
            logger.debug("cannot read %s: %s", files[i], e)
            errors[i] = f"cannot read image: {e}"
            return None  # the batcher leaves it out

    return LabeledImages(load, range(len(files)), [str(f) for f in files], transform), errors


def run(cfg: InferConfig) -> list[ImageResult]:
    """Classify every image of ``cfg.images``; results in input order, one per image file."""
    files = expand_images(cfg.images)
    runner = open_runner(cfg.model, device=cfg.device, threads=cfg.threads, trust=cfg.trust_checkpoint,
                         image_size=cfg.image_size if backend_of(cfg.model) == "torch" else None)
    preprocessing, class_names = model_inputs(runner, cfg.image_size)
    dataset, errors = _image_files(files, preprocessing.eval_transform())
    batch_size = min(cfg.batch_size, runner.max_batch or cfg.batch_size)
    logger.info("classifying %d image(s) with %s (%s), batches of %d", len(files), runner.path, runner.label,
                batch_size)
    results: dict[int, ImageResult] = {}
    for batch, indices in ImageBatcher(dataset, batch_size=batch_size, image_size=runner.image_size):
        for i, scores in zip(indices, top_k(runner.infer(batch), class_names, cfg.top_k)):
            results[i] = ImageResult(str(files[i]), scores)
    return [results.get(i) or ImageResult(str(files[i]), error=errors[i]) for i in range(len(files))]
