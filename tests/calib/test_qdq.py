"""calib.qdq: the Q/DQ placement TensorRT wants, checked on tiny real ResNet-18 / ResNet-50 calibrated by the CLI.

The rules (TensorRT's Q/DQ placement guidance, as NVIDIA Model Optimizer applies it): Q/DQ on the inputs of the
weighted layers only; no output quantization of Conv / Add / Gemm (a Conv output is quantized only where it is the
shortcut of a residual Add: the downsample conv); nothing quantized right before a ReLU; each residual Add has
exactly one quantized input, its shortcut; graph outputs stay float. ``make test-modelopt`` compares the same
placement against Model Optimizer itself.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper

from calib import qdq
from conftest import run_cli
from optimize.export import export_onnx

CALIB = ["--target", "tensorrt", "--json"]
# calibration and agreement images per case: the ResNet-50 one checks the placement, one batch of 16 suffices
IMAGES = {"resnet18": ["--num-images", "64", "--val-limit", "128"],
          "resnet50": ["--num-images", "16", "--batch-size", "16", "--val-limit", "32"]}


def _maps(model):
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = defaultdict(list)
    for n in model.graph.node:
        for name in n.input:
            consumers[name].append(n)
    return producer, consumers


def assert_tensorrt_placement(model: onnx.ModelProto) -> None:
    """Every placement rule of the module docstring, on a quantized model."""
    producer, consumers = _maps(model)
    constants = {i.name for i in model.graph.initializer}
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants):
        readers = [c for dq in consumers[q.output[0]] for c in consumers[dq.output[0]]]
        assert readers and all(r.op_type != "Relu" for r in readers), f"{q.input[0]} is quantized before a ReLU"
        src = producer.get(q.input[0])
        if src is not None and src.op_type in ("Add", "Gemm", "MatMul"):
            raise AssertionError(f"output of {src.op_type} {src.name} is quantized")
        if src is not None and src.op_type == "Conv":
            assert all(r.op_type == "Add" for r in readers), f"conv output {q.input[0]} quantized for {readers}"
    for out in model.graph.output:
        assert producer[out.name].op_type != "DequantizeLinear", f"graph output {out.name} is quantized"
    for add in (n for n in model.graph.node if n.op_type == "Add"):
        kinds = sorted(producer[i].op_type for i in add.input)
        assert kinds.count("DequantizeLinear") == 1, f"residual {add.name} has inputs {kinds}"
    for gemm in (n for n in model.graph.node if n.op_type == "Gemm"):  # a 10-class head stays float
        assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in gemm.input)


@pytest.fixture(scope="module")
def resnet50_onnx(tmp_path_factory):
    """A ResNet-50 trained for 2 steps at 8 px: the placement depends on the graph (53 convs, 16 residual Adds), not
    on the image size or the training. With 16 calibration images the case takes 32 s of CPU here instead of 50 s
    at 16 px on 256 images; the dynamo export of ResNet-50 (13 s whatever the size) is most of what is left."""
    folder = tmp_path_factory.mktemp("r50")
    run_cli("-q", "train", "--arch", "resnet50", "--image-size", "8", "--train-limit", "64", "--val-limit", "32",
            "--batch-size", "32", "--epochs", "1", "--out", folder / "r50.pth", check=True)
    run_cli("-q", "export", "--model", folder / "r50.pth", "--out", folder / "r50.onnx", check=True)
    return folder / "r50.onnx"


@pytest.mark.parametrize("arch, convs, adds", [("resnet18", 20, 8), ("resnet50", 53, 16)])
def test_calibrate_places_qdq_where_tensorrt_fuses(arch, convs, adds, exported_onnx, request, tmp_path):
    """ResNet-18: the image, 8 block inputs, 8 mid-block ReLU outputs, 3 downsample shortcuts (20 tensors read by
    the 20 convs and the 8 Adds), plus the stem ReLU before MaxPool and the last ReLU before GlobalAveragePool =
    22 pairs, as Model Optimizer places them (ResNet-50: 53 + 2 = 55); the previous placement had 42."""
    pairs = convs + 2
    src = exported_onnx if arch == "resnet18" else request.getfixturevalue("resnet50_onnx")
    out = tmp_path / "model.int8.onnx"
    proc = run_cli("-q", "calibrate", "--onnx", src, "--out", out, *CALIB, *IMAGES[arch], check=True)
    metrics = json.loads(proc.stdout)["metrics"]
    model = onnx.load(str(out))
    assert_tensorrt_placement(model)
    placed = qdq.placement(model)
    assert placed.pairs == pairs
    assert placed.by_consumer == {"Add": adds, "Conv": convs, "GlobalAveragePool": 1, "MaxPool": 1}
    assert metrics["form"] == "qdq-tensorrt"
    assert metrics["candidates"]["qdq-tensorrt"]["qdq"]["activation_pairs"] == pairs
    assert metrics["agreement_with_fp32"] >= 0.85  # 1-epoch 8-16 px models: the figure that matters is in RESULTS.md
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert all(not v.any() for k, v in inits.items() if k.endswith("_zero_point"))  # symmetric
    assert all(inits[c.input[2]].dtype == np.float32
               for c in model.graph.node if c.op_type == "Conv" and len(c.input) > 2)


def _resnet_onnx(path, *, fold_bn: bool, num_classes: int = 10, size: int = 16) -> onnx.ModelProto:
    model = torchvision.models.resnet18(num_classes=num_classes).eval()
    export_onnx(model, torch.randn(1, 3, size, size), path, fold_batchnorm=fold_bn)
    return onnx.load(str(path))


def test_residual_rule_traces_through_unfolded_batchnorm(tmp_path):
    """With BN not folded the Add reads BatchNormalization outputs on both sides of a downsample block: the conv
    branch is the one farther from the common ancestor (two convs), not whichever input a Conv feeds directly."""
    model = _resnet_onnx(tmp_path / "bn.onnx", fold_bn=False)
    assert any(n.op_type == "BatchNormalization" for n in model.graph.node)
    plan = qdq.plan(model)
    producer, _ = _maps(model)
    assert "MaxPool" not in plan.op_types  # Conv -> BN -> ReLU -> MaxPool: one fused kernel
    assert len(plan.residual) == 8
    for add in (n for n in model.graph.node if n.op_type == "Add"):
        conv_side = plan.residual[add.name]
        shortcut = next(i for i in add.input if i != conv_side)
        bn = producer[conv_side]
        assert bn.op_type == "BatchNormalization"
        conv = producer[bn.input[0]]
        # the conv branch's conv reads the block's private ReLU output, never the block input the shortcut holds
        assert producer[conv.input[0]].op_type == "Relu" and conv.input[0] != shortcut
        if producer[shortcut].op_type == "BatchNormalization":  # downsample: its conv reads the block input
            first = producer[producer[conv.input[0]].input[0]]
            assert producer[producer[shortcut].input[0]].input[0] == producer[first.input[0]].input[0]


def test_large_head_is_quantized_small_head_is_not(tmp_path):
    """N = 1000 classes: the Gemm's input (through Flatten) gets Q/DQ; N = 10 stays float. The pooling next to the
    head is quantized either way, and so is the MaxPool after a BN-folded stem (not part of the conv's kernel)."""
    big = qdq.plan(_resnet_onnx(tmp_path / "big.onnx", fold_bn=True, num_classes=1000))
    small = qdq.plan(_resnet_onnx(tmp_path / "small.onnx", fold_bn=True))
    assert "Gemm" in big.op_types and "Gemm" not in small.op_types
    assert any("N or K" in why for why in small.excluded.values())
    for plan in (big, small):
        assert {"GlobalAveragePool", "MaxPool"} <= set(plan.op_types)


def _conv_graph(in_ch: int, out_ch: int, *, first: bool, kernel: int = 3, group: int = 1) -> onnx.ModelProto:
    nodes, inits = [], []
    x = "input"
    if not first:  # a conv behind a 32-channel conv: not the first layer
        inits.append(numpy_helper.from_array(np.ones((in_ch, 32, 1, 1), np.float32), "w0"))
        nodes.append(helper.make_node("Conv", ["input", "w0"], ["h"], name="pre"))
        x = "h"
    inits.append(numpy_helper.from_array(np.ones((out_ch, in_ch // group, kernel, kernel), np.float32), "w"))
    nodes.append(helper.make_node("Conv", [x, "w"], ["y"], name="conv", group=group, kernel_shape=[kernel, kernel]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                         ["n", 32 if not first else in_ch, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph)


@pytest.mark.parametrize("in_ch, out_ch, first, group, kernel, expected", [
    (3, 64, True, 1, 7, True),      # the stem: 3 input channels, but the first layer and 64 out
    (16, 16, False, 1, 3, True),
    (12, 12, False, 1, 3, False),   # a pruned layer with 12 channels: TensorRT has no INT8 kernel worth it
    (8, 12, False, 1, 3, False),    # 8 in is a multiple of 8, but neither side has 16 and it is not the first layer
    (24, 8, False, 1, 3, True),     # 8 out and 24 in
    (8, 8, False, 8, 3, True),      # depthwise 3x3 with 8 outputs
    (8, 8, False, 8, 1, False),     # depthwise 1x1
])
def test_small_convs_stay_float_as_tensorrt_kernels_require(in_ch, out_ch, first, group, kernel, expected):
    model = _conv_graph(in_ch, out_ch, first=first, group=group, kernel=kernel)
    assert ("conv" in qdq.plan(model).nodes) is expected
