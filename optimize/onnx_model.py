"""What edgeopt knows about an ONNX file, read once: :class:`OnnxModel`.

Every stage that takes an ONNX model (calibrate, build-engine, package, the ONNX Runtime runner, the benchmark)
reads it through :meth:`OnnxModel.read`, which parses the file once and keeps the facts they ask about: the
graph's inputs and outputs, the precision (quantized operators, FP16 weights), the op set and operator types,
the ``metadata_props`` where ``export`` records the preprocessing and class names, and the file's sha256. The
checks the stages share are its methods, so each refusal has one text: a single NCHW image input
(:attr:`OnnxModel.input`), a symbolic batch axis (:meth:`OnnxModel.require_dynamic_batch`), a recorded
preprocessing that agrees with the graph (:meth:`OnnxModel.preprocessing`), a graph TensorRT can parse
(:meth:`OnnxModel.tensorrt_issue`).

Example::

    model = OnnxModel.read("runs/model.onnx")    # OnnxModelError: missing, or not a valid ONNX file
    model.require_dynamic_batch()                # a fixed-batch export fits no batch profile
    name, size = model.input.name, model.image_size
    preprocessing, class_names = model.preprocessing()
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from .artifacts import read_manifest
from .errors import ConfigError, ModelInputError, OnnxModelError
from .preprocess import Preprocessing

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})  # explicit quantization: what TensorRT builds INT8 from
QOPERATOR_OPS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"})  # ONNX Runtime only
QUANT_OPS = QDQ_OPS | QOPERATOR_OPS  # an ONNX graph holding any of these is INT8
STANDARD_DOMAINS = ("", "ai.onnx")
PREPROCESSING_KEY = "edgeopt.preprocessing"  # the metadata_props export writes
CLASS_NAMES_KEY = "edgeopt.class_names"


def image_input_dims(path: str | os.PathLike, shape) -> tuple[int | None, int | None]:
    """``(fixed batch, side)`` of an image input ``shape`` that must be ``[n, 3, S, S]``; None where symbolic.

    ``shape`` holds ints (0 or less: unknown), names or None, as the graph and ONNX Runtime's ``get_inputs()``
    give it.

    Raises:
        ModelInputError: another rank or layout (channels-last ``[n, S, S, 3]`` named as such), with what edgeopt
            feeds.
    """
    dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
    side = dims[-1] if len(dims) == 4 and dims[2] == dims[3] else None
    shown = f"[{', '.join('?' if d is None else str(d) for d in shape)}]"
    if len(dims) == 4 and dims[3] == 3 and dims[1] is not None and dims[1] == dims[2]:
        raise ModelInputError(f"{path} takes channels-last (NHWC) input {shown}, but edgeopt feeds images as NCHW "
                              f"[n, 3, {dims[1]}, {dims[1]}]; export the model channels-first")
    if len(dims) != 4 or dims[1] != 3 or dims[2] != dims[3]:
        expected = f"[n, 3, {side or 'S'}, {side or 'S'}]"
        raise ModelInputError(f"{path} takes input {shown}; edgeopt feeds images as NCHW {expected} (3 RGB "
                              "channels, square); export the model with that input")
    return dims[0], side


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: its name and shape (an int per fixed axis, the name of a symbolic one, None
    where the graph says nothing)."""

    name: str
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class OnnxModel:
    """The facts of one ONNX file, read by :meth:`read`.

    Attributes:
        path: the file.
        inputs / outputs: the graph's inputs (initializers left out) and outputs.
        op_types: every operator type in the graph.
        domains: operator domains other than the standard one (``com.microsoft``: ONNX Runtime contrib ops).
        opset: the standard domain's op set version (None when the model imports none).
        fp16_weights: some initializer is FLOAT16.
        metadata: ``metadata_props``, where ``export`` records preprocessing and class names.
        sha256: of the bytes parsed.
    """

    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    op_types: frozenset[str]
    domains: frozenset[str]
    opset: int | None
    fp16_weights: bool
    metadata: Mapping[str, str]
    sha256: str

    @classmethod
    def read(cls, path: str | os.PathLike, *, check: bool = True) -> "OnnxModel":
        """Parse ``path`` once (external weights are not loaded) and keep its facts.

        Args:
            path: the ONNX file.
            check: also run ONNX's checker (the stages do; the runner leaves it to ONNX Runtime, which loaded the
                file already).

        Raises:
            OnnxModelError: the file is missing, or not a valid ONNX model.
        """
        import onnx

        path = Path(path)
        if not path.is_file():
            raise OnnxModelError(f"ONNX model {path} does not exist; write one with 'cli.py export'")
        data = path.read_bytes()
        try:
            model = onnx.load_model_from_string(data)
            if check:  # external weights are checked where they lie: beside the file
                external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
                onnx.checker.check_model(str(path) if external else data)
        except Exception as e:  # noqa: BLE001 - protobuf and checker errors alike mean "not a usable ONNX file"
            raise OnnxModelError(f"{path} is not a valid ONNX model ({type(e).__name__}: "
                                 f"{(str(e).splitlines() or [''])[0]}); export it again") from e
        graph = model.graph
        weights = {t.name for t in graph.initializer}
        return cls(
            path=path,
            inputs=tuple(_spec(v) for v in graph.input if v.name not in weights),
            outputs=tuple(_spec(v) for v in graph.output),
            op_types=frozenset(n.op_type for n in graph.node),
            domains=frozenset(n.domain for n in graph.node if n.domain not in STANDARD_DOMAINS),
            opset=next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), None),
            fp16_weights=any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer),
            metadata=MappingProxyType({p.key: p.value for p in model.metadata_props}),
            sha256=hashlib.sha256(data).hexdigest(),
        )

    # -- precision and operators ------------------------------------------------------------------------------

    @property
    def precision(self) -> str:
        """``int8`` (quantized operators), ``fp16`` (FP16 weights) or ``fp32``."""
        if self.op_types & QUANT_OPS:
            return "int8"
        return "fp16" if self.fp16_weights else "fp32"

    @property
    def is_qdq(self) -> bool:
        """Explicitly quantized with Q/DQ pairs (the INT8 form TensorRT builds from)."""
        return bool(self.op_types & QDQ_OPS)

    def tensorrt_issue(self) -> str | None:
        """Why TensorRT cannot parse this graph (ONNX Runtime-only operators), as ``it is ...``; None when it can."""
        qoperator = sorted(self.op_types & QOPERATOR_OPS)
        if qoperator:
            return f"it is ONNX Runtime's QOperator INT8 form ({', '.join(qoperator)}; 'calibrate --target cpu')"
        if self.domains:
            return (f"it has ONNX Runtime contrib operators ({', '.join(sorted(self.domains))}: an ONNX "
                    "Runtime-optimized model from 'build-engine')")
        return None

    # -- the image input and the logits output ----------------------------------------------------------------

    @property
    def input(self) -> TensorSpec:
        """The single image input ``[batch, 3, S, S]``.

        Raises:
            ModelInputError: several inputs, or another rank or layout.
        """
        if len(self.inputs) != 1:
            raise ModelInputError(f"{self.path} has {len(self.inputs)} inputs; edgeopt handles one image input")
        image_input_dims(self.path, self.inputs[0].shape)
        return self.inputs[0]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the input is fixed to; None when the batch axis is symbolic."""
        return image_input_dims(self.path, self.input.shape)[0]

    @property
    def side(self) -> int | None:
        """S of the ``[batch, 3, S, S]`` input; None when symbolic."""
        return image_input_dims(self.path, self.input.shape)[1]

    @property
    def image_size(self) -> int:
        """S of the ``[batch, 3, S, S]`` input, which must be fixed.

        Raises:
            ModelInputError: not one image input, or S is symbolic.
        """
        if self.side is None:
            raise ModelInputError(f"{self.path} has no fixed input side; edgeopt needs [batch, 3, S, S] with S fixed: "
                                  "export it with 'cli.py export'")
        return self.side

    def require_dynamic_batch(self) -> None:
        """Refuse a model exported with a fixed batch: calibration batches, engine profiles and bundles vary it.

        Raises:
            ModelInputError: the batch axis is fixed (or the input is not one image input).
        """
        if self.fixed_batch is not None:
            raise ModelInputError(f"{self.path} has a fixed batch size ({self.fixed_batch}), so no batch profile fits "
                                  "it; export it with 'cli.py export' (symbolic batch axis)")

    @property
    def output(self) -> TensorSpec:
        """The logits output (the first)."""
        return self.outputs[0]

    @property
    def num_classes(self) -> int | None:
        """The output's last axis (the class count) when fixed, else None."""
        last = self.output.shape[-1] if self.output.shape else None
        return last if isinstance(last, int) else None

    # -- what export recorded ---------------------------------------------------------------------------------

    def recorded_preprocessing(self) -> tuple[Preprocessing | None, list[str] | None]:
        """Preprocessing and class names ``export`` recorded (metadata, else the manifest); (None, None) if none.

        Raises:
            OnnxModelError: the record is damaged (not JSON, wrong types) or disagrees with the graph's input size.
        """
        if PREPROCESSING_KEY in self.metadata:
            source, recorded = f"{self.path} (metadata {PREPROCESSING_KEY})", self._recorded_json(PREPROCESSING_KEY)
            names_source = f"{self.path} (metadata {CLASS_NAMES_KEY})"
            names = self._recorded_json(CLASS_NAMES_KEY) if CLASS_NAMES_KEY in self.metadata else None
        else:
            manifest = read_manifest(self.path) or {}
            if not manifest.get("preprocessing"):
                return None, None
            source, recorded = f"{self.path}'s manifest", manifest["preprocessing"]
            names_source, names = source, manifest.get("class_names")
        try:
            side = self.side
        except ModelInputError:  # another layout: refused where the model is run, not here
            side = None
        claimed = recorded.get("image_size") if isinstance(recorded, dict) else None
        if side is not None and claimed != side and isinstance(claimed, int):  # checked first: the likelier mistake
            raise OnnxModelError(f"{source}: records image_size {claimed} but the graph takes [n, 3, {side}, {side}]; "
                                 "re-export the model with 'cli.py export'")
        try:
            preprocessing = Preprocessing.from_dict(recorded, source=source)
        except ConfigError as e:
            raise OnnxModelError(str(e)) from e
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            raise OnnxModelError(f"{names_source}: class names must be a list of strings; re-export the model with "
                                 "'cli.py export'")
        if names is not None and self.num_classes is not None and len(names) != self.num_classes:
            raise OnnxModelError(f"{names_source}: names {len(names)} classes but the graph outputs "
                                 f"{self.num_classes}; re-export the model with 'cli.py export'")
        return preprocessing, names

    def preprocessing(self) -> tuple[Preprocessing, list[str] | None]:
        """:meth:`recorded_preprocessing`, which must exist.

        Raises:
            OnnxModelError: none recorded, or the record is damaged or disagrees with the graph.
        """
        preprocessing, class_names = self.recorded_preprocessing()
        if preprocessing is None:
            raise OnnxModelError(f"{self.path} records no preprocessing; export it with 'cli.py export' first")
        return preprocessing, class_names

    def _recorded_json(self, key: str) -> Any:
        try:
            return json.loads(self.metadata[key])
        except json.JSONDecodeError as e:
            raise OnnxModelError(f"{self.path}: its metadata {key} is not valid JSON ({e}); re-export the model with "
                                 "'cli.py export'") from e


def _spec(value) -> TensorSpec:
    """An ONNX ValueInfoProto as a :class:`TensorSpec`."""
    return TensorSpec(value.name, tuple(d.dim_value or d.dim_param or None for d in value.type.tensor_type.shape.dim))
