"""FP16 copies of ONNX models, for strongly typed TensorRT (10.12 and later), which takes precision from the graph.

:func:`to_fp16_onnx` converts an FP32 model (an FP16 engine) or a Q/DQ model (an INT8 engine whose unquantized
layers run FP16, as NVIDIA Model Optimizer's ``high_precision_dtype=fp16`` makes them). What stays float32:

- the graph's inputs and outputs (callers feed and read float32): a Cast after each input, the outputs written
  by float32 nodes or a final Cast;
- ops that overflow or lose too much in half precision (:data:`FP16_SENSITIVE_OPS`, plus ONNX Runtime's own block
  list of ops without FP16 kernels, so ONNX Runtime can run the copy in tests);
- the node producing each graph output (the classifier head): its weights, its arithmetic and its output, so the
  logits are FP32 and top-1 ties resolve as in FP32 (no FP16 round trip after it).

A Q/DQ model moves to opset 19 (QuantizeLinear / DequantizeLinear take float16 scales from 19 on), with its scales
in float16 like the rest; INT8 stays INT8. Casts are inserted next to the tensors they convert, so the graph
stays topologically sorted and ``onnx.checker`` accepts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import EngineError

# op types kept in float32: reductions, exponentials and normalizations overflow or lose too much in FP16
FP16_SENSITIVE_OPS = ("Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Div", "Erf",
                      "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
                      "LayerNormalization", "InstanceNormalization", "GroupNormalization", "Cast")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
QDQ_FP16_OPSET = 19  # QuantizeLinear / DequantizeLinear take float16 inputs and scales from opset 19
FP16_MAX = float(np.finfo(np.float16).max)


def _blocked_ops() -> set[str]:
    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        DEFAULT_OP_BLOCK_LIST = []
    return set(DEFAULT_OP_BLOCK_LIST) | set(FP16_SENSITIVE_OPS)


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 tensors of ``model`` (graph inputs, initializers, node outputs)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    found = {i.name for i in g.initializer if i.data_type == TensorProto.FLOAT}
    for vi in [*g.input, *g.value_info, *g.output]:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            found.add(vi.name)
    for node in g.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and value.data_type == TensorProto.FLOAT:
                found.add(node.output[0])
    return found


def _prepared(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool, int]:
    """A copy of ``model`` to edit in place (moved to opset 19 first when it is Q/DQ), whether it is Q/DQ, and the
    opset it came with."""
    qdq = any(n.op_type in QDQ_OPS for n in model.graph.node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if qdq and opset < QDQ_FP16_OPSET:
        model = onnx.version_converter.convert_version(model, QDQ_FP16_OPSET)
    return onnx.ModelProto.FromString(model.SerializeToString()), qdq, opset


def _consumers(nodes: list[onnx.NodeProto]) -> dict[str, list[int]]:
    """Tensor name -> indices of the nodes reading it."""
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    return consumers


def _halve(g: onnx.GraphProto, originals: list[onnx.NodeProto], floats: set[str], keep: set[int]) -> set[str]:
    """Turn to float16 the initializers read only by FP16 nodes and the FP16 nodes' Constants (in place); returns
    the float tensors that are float16 in the copy. Initializers that a kept node reads stay and get Casts."""
    consumers = _consumers(originals)
    half: set[str] = set()
    for init in g.initializer:
        readers = consumers.get(init.name, [])
        if init.name in floats and readers and all(i not in keep for i in readers):
            array = np.clip(numpy_helper.to_array(init), -FP16_MAX, FP16_MAX).astype(np.float16)
            init.CopyFrom(numpy_helper.from_array(array, init.name))
            half.add(init.name)
    for i, node in enumerate(originals):
        if i in keep:
            continue
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16),
                                                            attr.t.name))
        half.update(out for out in node.output if out in floats)
    return half


def _with_casts(originals: list[onnx.NodeProto], keep: set[int], floats: set[str], half: set[str],
                outputs: set[str]) -> list[onnx.NodeProto]:
    """``originals`` (edited in place) with a Cast before each input whose precision differs from its node's, one
    per tensor and precision, placed where first needed so the graph stays sorted; FP16 nodes writing a graph
    output write ``<name>_fp16`` and a final Cast gives back the float32 output."""
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            casts[key] = f"{name}_as_{'fp16' if to == TensorProto.FLOAT16 else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [casts[key]], to=to, name=f"{casts[key]}_cast"))
        return casts[key]

    renamed_outputs: dict[str, str] = {}
    for i, node in enumerate(originals):
        want = TensorProto.FLOAT if i in keep else TensorProto.FLOAT16
        for k, name in enumerate(node.input):
            if not name or name not in floats:
                continue
            have = TensorProto.FLOAT16 if name in half else TensorProto.FLOAT
            if have != want:
                node.input[k] = cast(name, want)
        for k, name in enumerate(node.output):
            if name in outputs and name in half:  # an FP16 node writing a graph output: cast back after it
                node.output[k] = renamed_outputs[name] = f"{name}_fp16"
        nodes.append(node)
    for name, inner in renamed_outputs.items():
        nodes.append(helper.make_node("Cast", [inner], [name], to=TensorProto.FLOAT, name=f"{name}_as_fp32_cast"))
    return nodes


def convert(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The FP16 copy of ``model`` (see the module docstring) and what was kept float32."""
    model, qdq, opset = _prepared(model)
    g = model.graph
    floats = _float_tensors(model)
    outputs = {o.name for o in g.output}
    blocked = _blocked_ops()
    originals = [onnx.NodeProto.FromString(n.SerializeToString()) for n in g.node]
    keep = {i for i, n in enumerate(originals) if n.op_type in blocked or outputs & set(n.output)}  # stay FP32
    half = _halve(g, originals, floats, keep)
    nodes = _with_casts(originals, keep, floats, half, outputs)
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    kept = [originals[i] for i in sorted(keep)]
    return model, {"fp32_nodes": [n.name for n in kept if outputs & set(n.output)],
                   "fp32_op_types": sorted({n.op_type for n in kept} & blocked - {"Cast"}),
                   "io": "float32", "qdq": qdq, "unquantized_layers": "fp16" if qdq else None,
                   "opset": max(opset, QDQ_FP16_OPSET) if qdq else opset}


def to_fp16_onnx(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Write the FP16 copy of ``src`` (FP32 or Q/DQ) to ``dst``; returns what was kept float32.

    Raises:
        EngineError: ``src`` is a QOperator INT8 model (QLinearConv), which has nothing float to convert.
    """
    model = onnx.load(str(src))
    if any(n.op_type.startswith("QLinear") or n.op_type in ("ConvInteger", "MatMulInteger") for n in model.graph.node):
        raise EngineError(f"{src} is an ONNX Runtime QOperator INT8 model: FP16 conversion takes the FP32 or the "
                          "Q/DQ ONNX")
    converted, info = convert(model)
    onnx.save(converted, str(dst))
    return info
