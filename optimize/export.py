"""Stage ``export``: a checkpoint to ONNX with a symbolic batch axis, verified against PyTorch before it lands.

The ONNX graph has one input ``input`` (``batch x 3 x S x S``, float32) and one output ``logits``
(``batch x classes``), the batch axis a named dimension (``batch``), so one file serves every batch size and
TensorRT optimization profile. Before the file is renamed into place it must pass ``onnx.checker`` and agree
with the PyTorch model on real validation images at batch sizes 1, 7 and 32: the same top-1 class for
every image and a max abs logit difference within ``atol``. Class names, preprocessing and the source
checkpoint's sha256 go into the ONNX ``metadata_props`` and the manifest, so later stages need ask nothing.

:func:`export_onnx` is the one way this project writes ONNX (tests and benchmarks included). It uses the
torch.export-based exporter (``dynamo=True``); the TorchScript exporter, deprecated since torch 2.9, runs only
where that one fails (it raises, breaks the contract above, or fails the parity check), with a warning, and the
manifest's ``exporter`` says which one wrote the file and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .artifacts import (Artifact, atomic_path, check_not_input, prepare_output, resolve_data, write_error,
                        write_manifest)
from .checkpoint import LoadedModel, load_checkpoint
from .configs import ExportConfig
from .data import default_preprocessing, load_data
from .errors import ConfigError, EdgeoptError
from .evaluate import check_model_fits_data
from .opsets import DEFAULT_OPSET, DYNAMO_OPSET
from .preprocess import Preprocessing

logger = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "input", "logits", "batch"
VERIFY_BATCHES = (1, 7, 32)


class ExportError(EdgeoptError):
    """The exported model is invalid or does not reproduce the PyTorch model."""


@dataclass(frozen=True)
class ExporterUsed:
    """Which ``torch.onnx`` exporter wrote a file (the manifest's ``exporter``).

    Attributes:
        name: ``dynamo`` (torch.export-based) or ``torchscript`` (the deprecated one, the fallback).
        fallback_reason: why the dynamo exporter's graph was not kept; None when it was.
    """

    name: str
    fallback_reason: str | None = None


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


def verify_onnx(path: Path, model: torch.nn.Module, images: torch.Tensor, atol: float,
                rtol: float = 0.0) -> dict[str, Any]:
    """Compare ONNX Runtime (CPU) with PyTorch at each of :data:`VERIFY_BATCHES`: the same top-1 everywhere, and
    logits within ``atol + rtol * max |PyTorch logit|`` (float32 rounding grows with the logits' size).

    Raises:
        ExportError: non-finite logits on either side (a diverged model), top-1 classes that differ, or logits
            further apart than the limit.
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
        for side, logits in (("PyTorch", expected), ("ONNX Runtime", got)):
            if not np.isfinite(logits).all():
                raise ExportError(f"{side} gives non-finite logits (NaN or inf) at batch {batch}: the model's weights "
                                  "are broken (a diverged training run?); retrain it with a lower --lr")
        diff = float(np.abs(got - expected).max())
        limit = atol + rtol * float(np.abs(expected).max())
        agree = float((got.argmax(1) == expected.argmax(1)).mean())
        results[str(batch)] = {"max_abs_diff": diff, "limit": limit, "top1_agreement": agree}
        if agree < 1.0 or diff > limit:
            raise ExportError(f"ONNX Runtime disagrees with PyTorch at batch {batch}: max abs diff {diff:.2e} "
                              f"(limit {limit:.2e} = --atol {atol:g} + --rtol {rtol:g} x the largest logit), top-1 "
                              f"agreement {agree:.1%}; the model uses an op that exports wrongly, or raise --atol / "
                              "--rtol if the difference is benign")
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


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _global_average_pools(graph: Any) -> None:
    """Turn a ``ReduceMean`` over all spatial axes (keepdims) back into ``GlobalAveragePool``, in place.

    torch.export records ``adaptive_avg_pool2d(x, 1)`` as a mean over the last two axes. The TorchScript exporter
    wrote GlobalAveragePool, which the Q/DQ placement (calib/qdq.py, after Model Optimizer) quantizes as a pooling
    layer and ONNX Runtime runs as QLinearGlobalAveragePool; a ReduceMean would stay float in both.
    """
    from onnx import helper, numpy_helper

    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*graph.input, *graph.value_info)}
    initializers = {i.name: i for i in graph.initializer}
    for node in (n for n in graph.node if n.op_type == "ReduceMean"):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axes = attrs.get("axes")  # an attribute below opset 18, an input from 18 on
        if len(node.input) > 1:
            axes = numpy_helper.to_array(initializers[node.input[1]]) if node.input[1] in initializers else None
        rank = ranks.get(node.input[0], 0)
        spatial = rank >= 3 and axes is not None and sorted(int(a) % rank for a in axes) == list(range(2, rank))
        if spatial and attrs.get("keepdims", 1) == 1:
            node.op_type = "GlobalAveragePool"
            del node.input[1:], node.attribute[:]
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]  # ONNX Runtime warns about unused ones (the axes)
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _check_contract(proto: Any, opset: int, dynamic_batch: bool) -> None:
    """The graph this module promises: ``opset``, one ``input`` and one ``logits``, batch axes named ``batch``."""
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ExportError(f"the graph has opset {got}, not {opset}")
    graph = proto.graph
    if [v.name for v in graph.input] != [INPUT_NAME] or [v.name for v in graph.output] != [OUTPUT_NAME]:
        raise ExportError(f"the graph's inputs / outputs are {[v.name for v in graph.input]} / "
                          f"{[v.name for v in graph.output]}, not {[INPUT_NAME]} / {[OUTPUT_NAME]}")
    axes = [v.type.tensor_type.shape.dim[0].dim_param for v in (graph.input[0], graph.output[0])]
    if dynamic_batch and axes != [BATCH_DIM, BATCH_DIM]:
        raise ExportError(f"the batch axes are named {axes}, not {BATCH_DIM!r}")


def _dynamo_graph(model: torch.nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool) -> Any:
    """The torch.export-based exporter's graph (optimized: BatchNorm folded), at ``opset``, checked."""
    import onnx

    if dynamic_batch and example.shape[0] == 1:
        example = torch.cat([example, example])  # torch.export specializes a dimension its example has as 1
    dynamic_shapes = ({0: torch.export.Dim(BATCH_DIM)},) if dynamic_batch else None
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=max(opset, DYNAMO_OPSET),
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes,
                                verbose=False)
    proto = program.model_proto
    _global_average_pools(proto.graph)
    for node in proto.graph.node:  # the exporter's stack traces: this machine's paths, not for a shipped file
        del node.metadata_props[:]
    if opset < DYNAMO_OPSET:
        proto = onnx.version_converter.convert_version(proto, opset)
    _check_contract(proto, opset, dynamic_batch)
    return proto


def _torchscript_export(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, *,
                        dynamic_batch: bool, fold_batchnorm: bool, source: str) -> None:
    """The deprecated TorchScript exporter; its failures become one :class:`ExportError` line (writes: OSError)."""
    axes = {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if dynamic_batch else None
    with warnings.catch_warnings():
        # it warns that it is deprecated on every call: export_onnx logs why it is used instead
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                              do_constant_folding=fold_batchnorm, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes=axes)
        except RuntimeError as e:
            if write_error(path, e) is not None:
                raise  # a failed write: atomic_path reports it under the output's own name
            raise ExportError(f"torch.onnx.export cannot export {source} at opset {opset}: {_first_line(e)}; try "
                              "another --opset") from e


def _save(proto: Any, path: Path, metadata: dict[str, str] | None) -> None:
    """Write ``proto`` as one file (initializers inside: a ResNet is far from protobuf's 2 GB) with ``metadata``."""
    import onnx

    onnx.helper.set_model_props(proto, metadata or {})
    onnx.save(proto, str(path))


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | Path, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, fold_batchnorm: bool = True, metadata: dict[str, str] | None = None,
                check: Callable[[Path], None] | None = None, source: str = "the model") -> ExporterUsed:
    """Write ``model`` to ``path`` as one self-contained ONNX file: input ``input``, output ``logits``.

    The torch.export-based exporter first; the deprecated TorchScript one only where that one raises, writes a
    graph that breaks the contract (``opset``, names, batch axis) or fails ``check``, with a warning naming the
    reason. What it silences (the C++ graph dump on stdout, the TorchScript exporter's deprecation warning) it
    silences for this call only.

    Args:
        model: the module, in eval mode.
        example: one input batch (its batch size does not matter when ``dynamic_batch``).
        path: file to write.
        opset: ONNX opset of the file (below 18 the dynamo exporter's graph is converted down).
        dynamic_batch: name the batch axis ``batch`` (symbolic) instead of fixing it to the example's.
        fold_batchnorm: False keeps BatchNormalization nodes; only the TorchScript exporter can (the dynamo
            exporter's optimizer always folds them into the convolutions), so it writes such a file.
        metadata: ONNX ``metadata_props`` to set.
        check: called with ``path`` once written; an :class:`ExportError` it raises on the dynamo exporter's file
            means "fall back" (export passes the parity check against PyTorch).
        source: what ``model`` is, for messages.

    Returns:
        The exporter whose file is at ``path``, and why it is not the dynamo one.

    Raises:
        ExportError: the TorchScript exporter failed too, or its file failed ``check``.
        OSError: writing ``path`` failed.
    """
    import onnx

    path = Path(path)
    reason = None if fold_batchnorm else "BatchNormalization kept (fold_batchnorm=False): the dynamo exporter folds it"
    if reason is None:
        try:
            with _stdout_silenced():
                proto = _dynamo_graph(model, example, opset, dynamic_batch)
        except Exception as e:  # noqa: BLE001 - torch.export and onnxscript fail in many types; each means fall back
            reason = f"{type(e).__name__}: {_first_line(e)}"[:500]
        else:
            _save(proto, path, metadata)
            try:
                if check is not None:
                    check(path)
            except ExportError as e:
                reason = str(e)
            else:
                return ExporterUsed("dynamo")
        logger.warning("the torch.export-based ONNX exporter failed on %s (%s); using the deprecated TorchScript "
                       "exporter instead", source, reason)
    with _stdout_silenced():
        _torchscript_export(model, example, path, opset, dynamic_batch=dynamic_batch, fold_batchnorm=fold_batchnorm,
                            source=source)
    if metadata:
        _save(onnx.load(str(path)), path, metadata)
    if check is not None:
        check(path)
    return ExporterUsed("torchscript", reason)


def _torchscript_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.torchscript.pt")


def run(cfg: ExportConfig) -> Artifact:
    """Export ``cfg.model`` to ONNX, verify it, and write it with its manifest (and optional TorchScript)."""
    check_not_input(cfg.out, {"--model": cfg.model})
    if cfg.torchscript:
        check_not_input(_torchscript_path(Path(cfg.out)), {"--model": cfg.model})
    out = prepare_output(cfg.out)
    loaded = load_checkpoint(cfg.model, arch=cfg.arch, trust=cfg.trust_checkpoint)
    cfg = replace(cfg, data=resolve_data(cfg.data, cfg.model))  # the manifest records the data used
    if cfg.image_size and loaded.preprocessing and cfg.image_size != loaded.preprocessing.image_size:
        raise ConfigError(f"--image-size {cfg.image_size}: {cfg.model} records {loaded.preprocessing.image_size} px "
                          "preprocessing, the size it was trained at, and the export keeps it; drop --image-size, "
                          "or retrain at that size")
    preprocessing = loaded.preprocessing or default_preprocessing(cfg.data, cfg.image_size)
    splits = load_data(cfg.data, preprocessing, val_limit=max(VERIFY_BATCHES), augment=False, val_only=True)
    check_model_fits_data(loaded, splits)
    class_names = loaded.class_names or splits.class_names
    model = loaded.model.eval()
    images = torch.stack([splits.val[i][0] for i in range(len(splits.val))])

    verification: dict[str, Any] = {}
    with atomic_path(out) as tmp:
        exporter = export_onnx(model, images[:1], tmp, opset=cfg.opset, source=cfg.model,
                               metadata=onnx_metadata(loaded, preprocessing, class_names),
                               check=lambda path: verification.update(verify_onnx(path, model, images, cfg.atol,
                                                                                 cfg.rtol)))
    logger.info("exported %s: ONNX Runtime matches PyTorch (max abs diff %.2e, top-1 agreement %.0f%%)", out,
                verification["max_abs_diff"], 100 * verification["top1_agreement"])

    extra: dict[str, Any] = {"arch": loaded.arch, "input": {"name": INPUT_NAME, "shape": [BATCH_DIM, 3,
                             preprocessing.image_size, preprocessing.image_size], "dtype": "float32"},
                             "output": {"name": OUTPUT_NAME, "shape": [BATCH_DIM, len(class_names)]},
                             "opset": cfg.opset, "exporter": dataclasses.asdict(exporter)}
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
