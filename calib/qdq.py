"""Where TensorRT wants Q/DQ nodes: the placement of :func:`plan` and the residual clean-up of :func:`finish`.

TensorRT's explicit quantization fuses ``DQ -> Conv(+bias) -> ReLU -> (+ residual) -> ...`` into one INT8 kernel
when Q/DQ sit on the *inputs* of the weighted layers and nowhere else (the developer guide's "Q/DQ layer
placement recommendations"): quantize the inputs of Conv / Gemm; don't quantize the outputs of weighted layers
(TensorRT decides the output precision when it fuses the next layer's Q); don't simulate the BN / ReLU fusions
(no Q/DQ between Conv and its ReLU); on a residual Add quantize the *shortcut* input and leave the conv-branch
input float, so the Add fuses into the conv that feeds it. Extra Q/DQ pairs cost accuracy (every one rounds) and
speed (they break fusions: the INT8 engine ends up slower than the FP16 one).

NVIDIA Model Optimizer's ONNX INT8 PTQ is the reference implementation of those rules; this module reaches the
same set of quantized activation tensors on ResNets (``make test-modelopt`` checks it against Model Optimizer
itself) with ONNX Runtime's own quantizer and no dependency on Model Optimizer (its ONNX extra pins onnx and
onnxruntime-gpu versions of its own and pulls gigabytes of CUDA wheels). The rules:

1. Nodes to quantize: every Conv whose channels suit TensorRT's INT8 kernels (:func:`conv_is_quantizable`);
   every Gemm / MatMul large enough for tensor cores (N and K >= 16: a 10-class head stays float); every residual
   Add (both inputs computed, one of them on a conv branch, :func:`residual_inputs`); pooling nodes that are not
   part of a conv's fused kernel (:data:`BACKBONE_PATHS`) and feed or follow a Conv / Gemm, quantized or not (so
   a ResNet's stem MaxPool after a BN-folded conv and its GlobalAveragePool get Q/DQ on their inputs).
2. No output quantization for any op type, and ReLU / copy ops never quantized (they are not in the node list).
3. After ONNX Runtime placed the pairs, :func:`finish` removes the pair on each residual Add's conv-branch input.

Which Add input is the conv branch (Model Optimizer's rule): trace each input back along :data:`BACKBONE_PATHS`
to the Conv whose kernel computes it (its "backbone"). If
both inputs have different backbones, the conv branch is the one farther from their lowest common ancestor (a
basic block's two convs vs the downsample conv's one); if only one input has a backbone, it is the conv branch
unless it *is* the common ancestor.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from dataclasses import dataclass, field

import onnx

logger = logging.getLogger(__name__)

POOL_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
COPY_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose")
# The chains TensorRT fuses into a Conv kernel, read backwards from the tensor that leaves the kernel (Model
# Optimizer's list); BiasAdd / ConstMul (Add / Mul by a constant) may be absent, copy ops are skipped. A MaxPool
# belongs to the kernel only behind ReLU *and* BatchNormalization: after a BN-folded stem it is a node of its own.
BACKBONE_PATHS = (("BiasAdd", "ConstMul", "Conv"), ("Relu", "BiasAdd", "ConstMul", "Conv"),
                  ("BatchNormalization", "BiasAdd", "Conv"), ("Relu", "BatchNormalization", "BiasAdd", "Conv"),
                  ("MaxPool", "Relu", "BatchNormalization", "BiasAdd", "Conv"))
OPTIONAL_IN_PATH = ("BiasAdd", "ConstMul")
MIN_GEMM_DIM = 16  # TensorRT's INT8 GEMM kernels want N and K of 16 or more; smaller heads stay float


class _Graph:
    """Producers, consumers and constants of an ONNX graph, by tensor name."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.constants = set(self.initializers)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.alias: dict[str, str] = {}  # Identity of a constant -> that constant (unfolded exports have them)
        for node in self.graph.node:
            if node.op_type == "Constant":
                self.constants.update(node.output)
            elif node.op_type == "Identity" and node.input[0] in self.constants:
                self.constants.add(node.output[0])
                self.alias[node.output[0]] = self.alias.get(node.input[0], node.input[0])
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.inputs = {i.name for i in self.graph.input} - set(self.initializers)

    def variable_inputs(self, node: onnx.NodeProto) -> list[str]:
        return [name for name in node.input if name and name not in self.constants]

    def kind(self, node: onnx.NodeProto) -> str:
        """The op type, with Add / Mul by a constant named as the bias / scale they fuse as."""
        if node.op_type in ("Add", "Mul") and len(self.variable_inputs(node)) == 1:
            return "BiasAdd" if node.op_type == "Add" else "ConstMul"
        return node.op_type

    def parents(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        return [self.producer[name] for name in self.variable_inputs(node) if name in self.producer]

    def shape(self, name: str) -> list[int] | None:
        name = self.alias.get(name, name)
        if name in self.initializers:
            return list(self.initializers[name].dims)
        return None


def backbone(g: _Graph, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """The Conv whose fused kernel produces ``node``'s output (one of :data:`BACKBONE_PATHS`), or None."""
    for path in BACKBONE_PATHS:
        conv = _match_backwards(g, node, path)
        if conv is not None:
            return conv
    return None


def _match_backwards(g: _Graph, node: onnx.NodeProto, path: tuple[str, ...]) -> onnx.NodeProto | None:
    kind = g.kind(node)
    if kind in COPY_OPS:
        parents = g.parents(node)
        return _match_backwards(g, parents[0], path) if len(parents) == 1 else None
    if kind != path[0]:
        return _match_backwards(g, node, path[1:]) if path[0] in OPTIONAL_IN_PATH else None
    if len(path) == 1:
        return node
    for parent in g.parents(node):
        found = _match_backwards(g, parent, path[1:])
        if found is not None:
            return found
    return None


def _ancestor_distances(g: _Graph, node: onnx.NodeProto) -> dict[str, int]:
    """Shortest distance (in nodes) from ``node`` to each of its ancestors, keyed by output[0] name."""
    dist = {node.output[0]: 0}
    queue = deque([node])
    while queue:
        cur = queue.popleft()
        for parent in g.parents(cur):
            key = parent.output[0]
            if key not in dist:
                dist[key] = dist[cur.output[0]] + 1
                queue.append(parent)
    return dist


def residual_inputs(g: _Graph, add: onnx.NodeProto) -> tuple[int, int] | None:
    """``(conv_branch_index, shortcut_index)`` of a residual Add, or None when ``add`` is not one."""
    if add.op_type != "Add" or len(add.input) != 2 or any(name in g.constants or name not in g.producer
                                                          for name in add.input):
        return None
    p0, p1 = g.producer[add.input[0]], g.producer[add.input[1]]
    b0, b1 = backbone(g, p0), backbone(g, p1)
    if b0 is None and b1 is None:
        return None
    d0, d1 = _ancestor_distances(g, p0), _ancestor_distances(g, p1)
    common = set(d0) & set(d1)
    lca = min(common, key=lambda k: (d0[k] + d1[k], d0[k])) if common else None
    if b0 is not None and b1 is not None:
        if b0 is b1:
            return None
        conv = 0 if (d0[lca] if lca else 0) > (d1[lca] if lca else 0) else 1
    else:
        conv = 0 if b0 is not None else 1
        if lca is not None and lca == (b0 or b1).output[0]:
            return None  # the branch's own conv is the common ancestor: a ConvNeXt-style add, not a residual
    return conv, 1 - conv


def conv_is_quantizable(g: _Graph, conv: onnx.NodeProto) -> bool:
    """TensorRT's INT8 conv kernels want 16+ input and output channels; fewer work when one of them is a
    multiple of 8 and the conv is the first layer or the other side has 16+ (square kernels, group 1), or for a
    grouped conv with output channels a multiple of 8 and kernels of 3 or more (Model Optimizer's rule)."""
    shape = g.shape(conv.input[1]) if len(conv.input) > 1 else None
    if not shape or len(shape) < 3:
        return False  # weights computed at run time
    out_ch, in_ch = shape[0], shape[1]
    if out_ch >= 16 and in_ch >= 16:
        return True
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    group, kernel = attrs.get("group", 1), list(attrs.get("kernel_shape", shape[2:]))
    if group == 1:
        return ((out_ch % 8 == 0 or in_ch % 8 == 0) and len(set(kernel)) == 1
                and (conv.input[0] in g.inputs or out_ch >= 16 or in_ch >= 16))
    return out_ch % 8 == 0 and all(k >= 3 for k in kernel)


def gemm_is_quantizable(g: _Graph, node: onnx.NodeProto) -> bool:
    """A Gemm / MatMul with a constant weight whose N and K are 16 or more (smaller ones gain nothing)."""
    dims = g.shape(node.input[1]) if len(node.input) > 1 else None
    if not dims or len(dims) != 2:
        return False
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    k, n = (dims[1], dims[0]) if trans_b else (dims[0], dims[1])
    return min(k, n) >= MIN_GEMM_DIM


@dataclass
class Plan:
    """What :func:`plan` decided for one graph.

    Attributes:
        nodes: names of the nodes ONNX Runtime's quantizer should quantize (inputs only).
        op_types: their op types.
        residual: for each residual Add's name, the input name on its conv branch (left float by :func:`finish`).
        excluded: Conv / Gemm nodes left in float, with the reason.
    """

    nodes: list[str] = field(default_factory=list)
    op_types: list[str] = field(default_factory=list)
    residual: dict[str, str] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)


def _name_nodes(model: onnx.ModelProto) -> None:
    """ONNX Runtime's quantizer selects nodes by name: give unnamed ones a unique name."""
    taken = {n.name for n in model.graph.node if n.name}
    for k, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{k}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def plan(model: onnx.ModelProto) -> Plan:
    """Decide which nodes to quantize in the FP32 ``model`` (named in place where nodes have no name)."""
    _name_nodes(model)
    g = _Graph(model)
    result = Plan()
    chosen: set[str] = set()
    weighted: set[str] = set()  # Conv / Gemm nodes, quantized or not: pooling next to them is quantized
    for node in g.graph.node:
        if node.op_type == "Conv":
            weighted.add(node.name)
            if conv_is_quantizable(g, node):
                chosen.add(node.name)
            else:
                result.excluded[node.name] = "channels unsuited to TensorRT's INT8 conv kernels"
        elif node.op_type in ("Gemm", "MatMul"):
            weighted.add(node.name)
            if gemm_is_quantizable(g, node):
                chosen.add(node.name)
            else:
                result.excluded[node.name] = f"N or K under {MIN_GEMM_DIM}, or no constant weight"
        elif node.op_type == "Add":
            sides = residual_inputs(g, node)
            if sides is not None:
                chosen.add(node.name)
                result.residual[node.name] = node.input[sides[0]]

    neighbours = chosen | weighted  # Model Optimizer decides pooling before it drops the small Gemm / Conv

    def feeds(tensor: str) -> bool:
        for consumer in g.consumers.get(tensor, []):
            if consumer.name in neighbours or (consumer.op_type in COPY_OPS and feeds(consumer.output[0])):
                return True
        return False

    def follows(node: onnx.NodeProto) -> bool:
        for parent in g.parents(node):
            if parent.name in neighbours or (parent.op_type in COPY_OPS and follows(parent)):
                return True
        return False

    for node in g.graph.node:
        if node.op_type in POOL_OPS and backbone(g, node) is None and (feeds(node.output[0]) or follows(node)):
            chosen.add(node.name)
    result.nodes = [n.name for n in g.graph.node if n.name in chosen]
    result.op_types = sorted({n.op_type for n in g.graph.node if n.name in chosen})
    return result


def quantizer_options(model: onnx.ModelProto) -> dict:
    """``extra_options`` for ONNX Runtime's ``quantize_static``: symmetric INT8, float biases, no output Q/DQ,
    and pooling quantized even when its input was not already (ONNX Runtime's default skips such MaxPools)."""
    return {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
            "ForceQuantizeNoInputCheck": True,
            "OpTypesToExcludeOutputQuantization": sorted({n.op_type for n in model.graph.node})}


def _float_source(g: _Graph, tensor: str) -> str:
    """Follow ``DequantizeLinear <- QuantizeLinear`` back to the float tensor that was quantized."""
    dq = g.producer.get(tensor)
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = g.producer.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            return q.input[0]
    return tensor


def finish(model: onnx.ModelProto, residual: dict[str, str]) -> int:
    """Leave each residual Add's conv-branch input float (drop its Q/DQ pair when nothing else reads it);
    returns how many Add inputs changed."""
    g = _Graph(model)
    changed = 0
    for node in g.graph.node:
        float_name = residual.get(node.name)
        if float_name is None:
            continue
        for k, name in enumerate(node.input):
            if name != float_name and _float_source(g, name) == float_name:
                node.input[k] = float_name
                changed += 1
    _drop_dead_nodes(model)
    logger.info("residual Q/DQ: conv-branch input left float on %d Add node(s)", changed)
    return changed


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove Q/DQ nodes whose outputs nobody reads, then the initializers nobody uses."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for n in graph.node for name in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(out in used for out in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {name for n in graph.node for name in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


@dataclass(frozen=True)
class Placement:
    """What a Q/DQ ONNX quantizes, for reports and tests.

    Attributes:
        activations: float activation tensors that pass through a Q/DQ pair (weights excluded).
        pairs: number of activation QuantizeLinear nodes.
        by_consumer: how many quantized activation tensors each op type reads.
    """

    activations: frozenset[str]
    pairs: int
    by_consumer: dict[str, int]


def placement(model: onnx.ModelProto) -> Placement:
    """Read the Q/DQ placement of a quantized ``model``."""
    g = _Graph(model)
    quantized, pairs = set(), 0
    counts: dict[str, int] = defaultdict(int)
    for q in g.graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in g.constants:
            continue
        pairs += 1
        quantized.add(q.input[0])
        for dq in g.consumers.get(q.output[0], []):
            for consumer in g.consumers.get(dq.output[0], []):
                counts[consumer.op_type] += 1
    return Placement(frozenset(quantized), pairs, dict(sorted(counts.items())))

