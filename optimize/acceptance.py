"""A bundle's acceptance set: what lets ``runner.py --check`` prove on the device what the host measured.

``package`` writes into ``check/``:

- ``images/NNNN.png`` (or ``.jpg``): N class-stratified val images as image files, so the device's own decoding
  and preprocessing (Pillow + numpy in runner.py) are what gets tested. Images of up to 64 px are kept as they are
  (lossless PNG); larger ones are written as JPEG at quality 95 (what the host's reference is computed from,
  so the files and the reference agree whatever JPEG did to them).
- ``reference.json``: labels, class names, the host's predictions and top-1 for the bundle's ``model.onnx``
  (ONNX Runtime on the host's CPU) or its OpenVINO ``model.xml`` (OpenVINO on the host's CPU), the FP32 model's
  predictions when the bundled model is INT8, the accuracy
  budget (points of top-1 the device may lose against the host, and the agreement with the host's answers it
  must keep) and the batch sizes to time.
- ``logits.npy``: the host's logits (float32 [N, classes]); ``tensors.npy``: the host's preprocessed tensors of
  the first few images (float32), against which the device's preprocessing is compared.

Example::

    summary = write_acceptance_set(work, bundled_onnx, data="fashion-mnist", count=256, max_accuracy_drop=1.0,
                                   batch_sizes=(1, 8, 32))
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .artifacts import read_manifest, sha256_file, write_json
from .configs import SMALL_IMAGE
from .data import load_data
from .errors import PackageError
from .onnx_model import OnnxModel
from .openvino_backend import available
from .preprocess import Preprocessing, load_image
from .runners import open_runner
from .timing import cpu_facts

logger = logging.getLogger(__name__)

ACCEPTANCE_FORMAT = "edgeopt-acceptance-set"
JPEG_QUALITY = 95  # for sides above configs.SMALL_IMAGE (smaller ones stay lossless PNG)
PARITY_IMAGES = {True: 4, False: 1}  # reference tensors kept (a 224 px one is 600 KB)
# the device may answer differently from the host on this share of images at most, beside the top-1 budget
MIN_AGREEMENT_FLOOR = 0.98


def parity_tolerance(std: tuple[float, ...]) -> float:
    """Largest preprocessing difference accepted: two grey levels after normalization (Pillow builds may round a
    resize differently by one level)."""
    return 2 / 255 / min(std)


def fp32_source(onnx_path: Path) -> Path | None:
    """The FP32 ONNX an INT8 model was calibrated from (its manifest's input, when still there unchanged)."""
    recorded = ((read_manifest(onnx_path) or {}).get("inputs") or {}).get("onnx") or {}
    path = Path(recorded.get("path", ""))
    if recorded.get("path") and path.is_file() and sha256_file(path) == recorded.get("sha256"):
        return path
    return None


def _runner(path: Path):
    return open_runner(path, device="cpu")


def _predict(runner, x: np.ndarray) -> np.ndarray:
    return np.concatenate([runner.infer(x[i:i + 64]) for i in range(0, len(x), 64)])


def _runtime(runner) -> str:
    if runner.backend == "openvino":
        return f"openvino {available()} CPU ({runner.hint} hint, f32 float math)"
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__} CPUExecutionProvider"


def _encoding(entries: list[dict[str, Any]]) -> str:
    """How the written images are encoded, read from the files themselves: each image's own side picks PNG or
    JPEG, so a small model fed large photos gets JPEG files whatever its input size."""
    kinds = {"png" if e["file"].endswith(".png") else f"jpeg quality {JPEG_QUALITY}" for e in entries}
    return " and ".join(sorted(kinds))


def _write_images(raw, folder: Path, transform: Callable) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Write each val image of ``raw`` under ``folder/images/``; returns their entries and the host's tensors, made
    from the written files (so a JPEG's losses are in the reference too)."""
    (folder / "images").mkdir(parents=True)
    entries, tensors = [], []
    for i in range(len(raw)):
        img, label = raw[i]
        name = f"images/{i:04d}"
        if max(img.size) <= SMALL_IMAGE:
            name += ".png"
            img.save(folder / name)
        else:
            name += ".jpg"
            img.convert("RGB").save(folder / name, quality=JPEG_QUALITY)
        tensors.append(transform(load_image(folder / name)).numpy())  # the host's tensor, from the written file
        entries.append({"file": name, "label": int(label)})
    return entries, np.stack(tensors).astype(np.float32)


def _fp32_reference(model: OnnxModel, model_path: Path, served: Path | None, x: np.ndarray,
                    labels: np.ndarray) -> dict[str, Any] | None:
    """The FP32 model's predictions on ``x`` beside a quantized bundled model: ``model_path`` itself when it is the
    FP32 ONNX an OpenVINO model was made from, else the source its manifest records; None when that is gone."""
    source = model_path if served is not None and model.precision == "fp32" else fp32_source(model_path)
    if source is None:
        logger.warning("%s is %s and its FP32 source ONNX is not here: the acceptance set has no FP32 "
                       "predictions", model_path, model.precision)
        return None
    fp32_pred = _predict(_runner(source), x).argmax(1)
    return {"model": source.name, "sha256": sha256_file(source), "predictions": fp32_pred.tolist(),
            "top1": float((fp32_pred == labels).mean())}


def _val_images(model: OnnxModel, model_path: Path, data: str, count: int, preprocessing: Preprocessing,
                class_names: list[str]) -> tuple[str, Any]:
    """The data's name and up to ``count`` of its val images, untransformed, after checking the model's classes
    (``class_names``, read with ``preprocessing`` from its metadata) are the data's."""
    splits = load_data(data, preprocessing, val_limit=count, augment=False, val_only=True)
    splits.check_model(model_path, class_names, model.num_classes)
    raw = splits.val.without_transform()
    if not len(raw):
        raise PackageError(f"{splits.name} has no val images for the bundle's acceptance set; give --data with a "
                           "val split, or --check-images 0")
    return splits.name, raw


def _host_reference(host_model: Path, x: np.ndarray, labels: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """``reference.json``'s ``host`` entry for the model runner.py serves (run here on the CPU), and its logits."""
    runner = _runner(host_model)
    logits = _predict(runner, x).astype(np.float32)
    predictions = logits.argmax(1)
    return {"model": host_model.name, "sha256": sha256_file(host_model), "precision": runner.precision,
            "runtime": _runtime(runner), "machine": cpu_facts(),
            "top1": float((predictions == labels).mean()), "predictions": predictions.tolist()}, logits


def _summary(folder: Path, reference: dict[str, Any]) -> dict[str, Any]:
    """What :func:`write_acceptance_set` returns (and logs) about the set written in ``folder``."""
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    host_top1 = reference["host"]["top1"]
    logger.info("acceptance set: %d images (%s), host top-1 %.2f%%, %.0f KB", len(reference["images"]),
                reference["encoding"], 100 * host_top1, size / 1024)
    return {"images": len(reference["images"]), "bytes": size, "encoding": reference["encoding"],
            "host_top1": host_top1, "budget": reference["budget"]}


def write_acceptance_set(work: Path, model_path: Path, *, data: str, count: int, max_accuracy_drop: float,
                         batch_sizes: tuple[int, ...], served: Path | None = None) -> dict[str, Any]:
    """Write ``work/check/`` for the bundled ``model_path`` (see the module docstring); returns its summary.

    ``served``: the bundled model runner.py serves when it is not ``model_path`` (an OpenVINO ``model.xml``): the
    host's reference is its logits, and ``model_path`` (the ONNX it was made from) gives the FP32 predictions.

    Raises:
        PackageError: the data has no val images, or the model's classes are not the data's.
    """
    model = OnnxModel.read(model_path)
    preprocessing, class_names = model.preprocessing()
    data_name, raw = _val_images(model, model_path, data, count, preprocessing, class_names)
    folder = work / "check"
    small = preprocessing.image_size <= SMALL_IMAGE
    entries, x = _write_images(raw, folder, preprocessing.eval_transform())
    labels = np.asarray([e["label"] for e in entries])
    host, logits = _host_reference(served or model_path, x, labels)
    fp32 = None if host["precision"] == "fp32" else _fp32_reference(model, model_path, served, x, labels)
    np.save(folder / "logits.npy", logits)
    np.save(folder / "tensors.npy", x[:PARITY_IMAGES[small]])
    reference = {
        "format": ACCEPTANCE_FORMAT, "version": 1, "data": data_name, "images": entries,
        "class_names": class_names, "encoding": _encoding(entries),
        "host": host, "fp32": fp32,
        "budget": {"max_accuracy_drop_pt": max_accuracy_drop,
                   "min_agreement": min(MIN_AGREEMENT_FLOOR, 1 - 2 * max_accuracy_drop / 100)},
        "parity": {"images": int(len(x[:PARITY_IMAGES[small]])), "tolerance": parity_tolerance(preprocessing.std)},
        "batch_sizes": sorted(set(batch_sizes)),
    }
    write_json(folder / "reference.json", reference)
    return _summary(folder, reference)
