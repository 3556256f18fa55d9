"""Stage ``export``: a checkpoint to ONNX with a symbolic batch axis, verified against PyTorch before it lands.

The ONNX graph has one input ``input`` (``batch x 3 x S x S``, float32) and one output ``logits``
(``batch x classes``), the batch axis a named dimension (``batch``), so one file serves every batch size and
TensorRT optimization profile. Before the file is renamed into place it must pass ``onnx.checker`` and agree
with the PyTorch model on real validation images at batch sizes 1, 7 and 32: the same top-1 class for
every image and a max abs logit difference within ``atol``. Class names, preprocessing and the source
checkpoint's sha256 go into the ONNX ``metadata_props`` and the manifest, so later stages need ask nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .artifacts import (Artifact, atomic_path, check_not_input, prepare_output, resolve_data, write_error,
                        write_manifest)
from .checkpoint import LoadedModel, load_checkpoint
from .data import default_preprocessing, load_data
from .errors import ConfigError, EdgeoptError
from .evaluate import check_model_fits_data
from .preprocess import Preprocessing
from .prune import make_permanent

logger = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "input", "logits", "batch"
VERIFY_BATCHES = (1, 7, 32)


class ExportError(EdgeoptError):
    """The exported model is invalid or does not reproduce the PyTorch model."""


@dataclass(frozen=True)
class ExportConfig:
    """Options of ``cli.py export``.

    Attributes:
        model: checkpoint to export (pruned or not; any format ``evaluate`` accepts).
        out: ONNX file to write.
        opset: ONNX opset (17 suits TensorRT 8.6 and later, and ONNX Runtime).
        atol: largest max-abs logit difference between ONNX Runtime and PyTorch accepted.
        data: where the verification images come from (the val split); None: the data ``model``'s manifest
            records (fashion-mnist when it records none).
        image_size: input side when the checkpoint records no preprocessing.
        torchscript: also write a traced TorchScript file beside the ONNX (``<out stem>.torchscript.pt``).
        arch / trust_checkpoint: how to load ``model``.
    """

    model: str
    out: str
    opset: int = 17
    atol: float = 1e-3
    data: str | None = None
    image_size: int | None = None
    torchscript: bool = False
    arch: str | None = None
    trust_checkpoint: bool = False

    def __post_init__(self) -> None:
        low, high = opset_range()
        if not low <= self.opset <= high:
            raise ConfigError(f"--opset {self.opset}: torch {torch.__version__}'s ONNX exporter writes opsets {low} to "
                              f"{high}; give one of those (17 suits TensorRT 8.6 and later, and ONNX Runtime)")


def opset_range() -> tuple[int, int]:
    """The opsets ``torch.onnx.export`` (TorchScript exporter) can write and the installed ``onnx`` knows."""
    import onnx

    try:
        from torch.onnx import _constants  # private: the exporter's own limits, with fallbacks if it moves
    except ImportError:
        _constants = None
    low = getattr(_constants, "ONNX_MIN_OPSET", 7)
    high = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", getattr(_constants, "ONNX_MAX_OPSET", 17))
    return low, min(high, onnx.defs.onnx_opset_version())


def onnx_metadata(loaded: LoadedModel, preprocessing: Preprocessing, class_names: list[str]) -> dict[str, str]:
    """What an engine built from the ONNX needs to preprocess and label (ONNX metadata_props are strings)."""
    return {
        "edgeopt.class_names": json.dumps(class_names),
        "edgeopt.preprocessing": json.dumps(preprocessing.to_dict()),
        "edgeopt.mean": json.dumps(list(preprocessing.mean)),
        "edgeopt.std": json.dumps(list(preprocessing.std)),
        "edgeopt.image_size": str(preprocessing.image_size),
        "edgeopt.source_sha256": loaded.sha256,
        "edgeopt.arch": loaded.arch or "unknown",
    }


def verify_onnx(path: Path, model: torch.nn.Module, images: torch.Tensor, atol: float) -> dict[str, Any]:
    """Compare ONNX Runtime (CPU) with PyTorch at each of :data:`VERIFY_BATCHES`.

    Raises:
        ExportError: a batch's top-1 classes differ or its logits differ by more than ``atol``.
    """
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    results = {}
    for batch in VERIFY_BATCHES:
        x = images[:batch]
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        diff = float(np.abs(got - expected).max())
        agree = float((got.argmax(1) == expected.argmax(1)).mean())
        results[str(batch)] = {"max_abs_diff": diff, "top1_agreement": agree}
        if agree < 1.0 or diff > atol:
            raise ExportError(f"ONNX Runtime disagrees with PyTorch at batch {batch}: max abs diff {diff:.2e} "
                              f"(limit --atol {atol:g}), top-1 agreement {agree:.1%}; the model uses an op that "
                              "exports wrongly, or raise --atol if the difference is benign")
    return {"batches": results, "max_abs_diff": max(r["max_abs_diff"] for r in results.values()),
            "top1_agreement": min(r["top1_agreement"] for r in results.values())}


@contextlib.contextmanager
def _stdout_silenced() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null: on failure the exporter prints its whole graph there from C++."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as sink:
            os.dup2(sink.fileno(), 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _export(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, source: str) -> None:
    """Run ``torch.onnx.export``; its failures become one :class:`ExportError` line (writes fail as OSError)."""
    with warnings.catch_warnings(), _stdout_silenced():
        # the TorchScript-based exporter warns that it is deprecated; it stays the path without onnxscript
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}})
        except RuntimeError as e:
            if write_error(path, e) is not None:
                raise  # a failed write: atomic_path reports it under the output's own name
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportError(f"torch.onnx.export cannot export {source} at opset {opset}: {reason}; try another "
                              "--opset") from e


def _torchscript_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.torchscript.pt")


def run(cfg: ExportConfig) -> Artifact:
    """Export ``cfg.model`` to ONNX, verify it, and write it with its manifest (and optional TorchScript)."""
    import onnx

    check_not_input(cfg.out, {"--model": cfg.model})
    if cfg.torchscript:
        check_not_input(_torchscript_path(Path(cfg.out)), {"--model": cfg.model})
    out = prepare_output(cfg.out)
    loaded = load_checkpoint(cfg.model, arch=cfg.arch, trust=cfg.trust_checkpoint)
    cfg = replace(cfg, data=resolve_data(cfg.data, cfg.model))  # the manifest records the data used
    preprocessing = loaded.preprocessing or default_preprocessing(cfg.data, cfg.image_size)
    splits = load_data(cfg.data, preprocessing, val_limit=max(VERIFY_BATCHES), augment=False, val_only=True)
    check_model_fits_data(loaded, splits)
    class_names = loaded.class_names or splits.class_names
    model = loaded.model.eval()
    if loaded.kind != "torchscript":
        make_permanent(model)  # pruning leftovers (a trusted pickle may still carry masks)
    images = torch.stack([splits.val[i][0] for i in range(len(splits.val))])

    with atomic_path(out) as tmp:
        _export(model, images[:1], tmp, cfg.opset, cfg.model)
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, onnx_metadata(loaded, preprocessing, class_names))
        onnx.save(proto, str(tmp))
        verification = verify_onnx(tmp, model, images, cfg.atol)
    logger.info("exported %s: ONNX Runtime matches PyTorch (max abs diff %.2e, top-1 agreement %.0f%%)", out,
                verification["max_abs_diff"], 100 * verification["top1_agreement"])

    extra: dict[str, Any] = {"arch": loaded.arch, "input": {"name": INPUT_NAME, "shape": [BATCH_DIM, 3,
                             preprocessing.image_size, preprocessing.image_size], "dtype": "float32"},
                             "output": {"name": OUTPUT_NAME, "shape": [BATCH_DIM, len(class_names)]},
                             "opset": cfg.opset}
    if cfg.torchscript:
        ts_path = _torchscript_path(out)
        with atomic_path(ts_path) as tmp:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=FutureWarning)
                torch.jit.trace(model, images[:1]).save(str(tmp))
        write_manifest(ts_path, stage="export", config=cfg, inputs={"model": loaded.describe()},
                       preprocessing=preprocessing.to_dict(), class_names=class_names, extra={"arch": loaded.arch})
        extra["torchscript"] = ts_path.name
    write_manifest(out, stage="export", config=cfg, inputs={"model": loaded.describe()},
                   preprocessing=preprocessing.to_dict(), class_names=class_names,
                   metrics={"verification": verification}, extra=extra)
    return Artifact.of(out)
