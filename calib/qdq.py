"""Q/DQ placement for TensorRT's residual fusion.

TensorRT fuses ``Conv -> Add(residual)`` into one INT8 kernel when the Add's *shortcut* input carries Q/DQ and
its conv-branch input does not (the conv's output goes straight into the Add; TensorRT's "Q/DQ layer placement"
guidance). ONNX Runtime's QDQ quantizer puts Q/DQ on both Add inputs; :func:`place_residual_qdq` removes the
pair on the conv branch.

Which input is the conv branch: the one produced by a Conv whose own activation input is used by no other
Conv. A torchvision block's last conv reads its block-private ReLU output; a downsample shortcut conv reads the
block input, which the block's first conv reads too.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import onnx

logger = logging.getLogger(__name__)


def _float_source(tensor: str, producer: dict[str, onnx.NodeProto]) -> str:
    """Follow ``DequantizeLinear <- QuantizeLinear`` back to the float tensor that was quantized."""
    node = producer.get(tensor)
    if node is not None and node.op_type == "DequantizeLinear":
        q = producer.get(node.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            return q.input[0]
    return tensor


def place_residual_qdq(model: onnx.ModelProto) -> int:
    """Drop the Q/DQ pair on the conv-branch input of every residual Add; returns how many Adds changed."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    conv_inputs = defaultdict(int)  # float activation tensor -> how many Convs read it (through Q/DQ or not)
    for node in graph.node:
        if node.op_type == "Conv":
            conv_inputs[_float_source(node.input[0], producer)] += 1

    def conv_branch_index(add: onnx.NodeProto) -> int | None:
        candidates = []
        for k, name in enumerate(add.input):
            src = producer.get(_float_source(name, producer))
            if src is not None and src.op_type == "Conv" and name != _float_source(name, producer):
                shared = conv_inputs[_float_source(src.input[0], producer)] > 1
                candidates.append((k, shared))
        private = [k for k, shared in candidates if not shared]
        return private[0] if len(private) == 1 else None

    changed, dead = 0, set()
    for add in [n for n in graph.node if n.op_type == "Add" and len(n.input) == 2]:
        k = conv_branch_index(add)
        if k is None:
            continue
        dq_out = add.input[k]
        dq = producer[dq_out]
        q = producer[dq.input[0]]
        add.input[k] = q.input[0]
        consumers[dq_out].remove(add)
        if not consumers[dq_out]:
            dead.add(id(dq))
            consumers[q.output[0]].remove(dq)
            if not consumers[q.output[0]]:
                dead.add(id(q))
        changed += 1
    kept = [n for n in graph.node if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for n in graph.node for name in n.input}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:  # the removed pairs' scales and zero points
        graph.initializer.remove(init)
    logger.info("residual Q/DQ: conv-branch pair removed on %d Add node(s)", changed)
    return changed
