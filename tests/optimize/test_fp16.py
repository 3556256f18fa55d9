"""fp16: the FP16 copies strongly typed TensorRT builds from, run here by ONNX Runtime's CPU kernels."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from optimize import calibrate
from optimize.data import load_data
from optimize.fp16 import to_fp16_onnx
from optimize.onnx_model import OnnxModel


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def fp32_onnx(exported_onnx):
    return exported_onnx  # the suite's tiny ResNet-18, exported once per worker


def _head_is_float32(model: onnx.ModelProto) -> onnx.NodeProto:
    """The node writing the logits: float32 weights, no Cast after it (no FP16 round trip of the logits)."""
    onnx.checker.check_model(model, full_check=True)  # includes: nodes topologically sorted
    logits = model.graph.output[0].name
    head = next(n for n in model.graph.node if logits in n.output)
    assert head.op_type == "Gemm", head.op_type
    weights = {i.name: i.data_type for i in model.graph.initializer}
    assert weights[head.input[1]] == weights[head.input[2]] == onnx.TensorProto.FLOAT
    assert not [n for n in model.graph.node if n.op_type == "Cast" and head.output[0] in n.input]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    return head


def test_fp16_copy_keeps_io_and_head_float32_and_top1(fp32_onnx, tmp_path):
    """What TensorRT 10.12+/11 builds fp16 from: float32 I/O, the classifier head in float32, a sorted graph the
    checker accepts, and (run by ONNX Runtime's CPU FP16 kernels) the same top-1 as the FP32 model."""
    info = to_fp16_onnx(fp32_onnx, tmp_path / "m.fp16.onnx")
    model = onnx.load(str(tmp_path / "m.fp16.onnx"))
    head = _head_is_float32(model)
    assert info["fp32_nodes"] == [head.name] and info["io"] == "float32" and not info["qdq"]
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    x = np.random.default_rng(2).standard_normal((32, 3, 16, 16)).astype(np.float32)
    fp16, fp32 = _run(tmp_path / "m.fp16.onnx", x), _run(fp32_onnx, x)
    np.testing.assert_allclose(fp16, fp32, atol=2e-2)
    # the same top-1 wherever FP32's top two are further apart than FP16's error bound allows to swap
    top2 = np.sort(fp32, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 4e-2
    assert fp16.dtype == np.float32 and clear.sum() >= 16 and (fp16.argmax(1) == fp32.argmax(1))[clear].all()


def test_fp16_copy_of_a_qdq_model_keeps_int8_and_halves_the_rest(fp32_onnx, tmp_path):
    """An INT8 engine with FP16 unquantized layers (Model Optimizer's default): opset 19, float16 scales, INT8
    weights unchanged, the head float32; its logits stay close to the Q/DQ model's with float32 around."""
    qdq = tmp_path / "m.int8.onnx"
    calibrate.run(calibrate.CalibConfig(onnx=str(fp32_onnx), out=str(qdq), target="tensorrt", num_images=64,
                                        val_limit=64))
    info = to_fp16_onnx(qdq, tmp_path / "m.int8.fp16.onnx")
    model = onnx.load(str(tmp_path / "m.int8.fp16.onnx"))
    _head_is_float32(model)
    assert info["qdq"] and info["unquantized_layers"] == "fp16" and info["opset"] >= 19
    inits = {i.name: i for i in model.graph.initializer}
    dq_scales = {inits[n.input[1]].data_type for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert dq_scales == {onnx.TensorProto.FLOAT16}
    original = {i.name: i.data_type for i in onnx.load(str(qdq)).graph.initializer}
    assert all(original[name] == inits[name].data_type for name in original if original[name] == onnx.TensorProto.INT8)
    val = load_data("fashion-mnist", OnnxModel.read(qdq).preprocessing()[0], val_limit=256, augment=False,
                    val_only=True).val
    x = np.stack([val[i][0].numpy() for i in range(len(val))]).astype(np.float32)
    half, full = _run(tmp_path / "m.int8.fp16.onnx", x), _run(qdq, x)
    cosine = (half * full).sum(1) / (np.linalg.norm(half, axis=1) * np.linalg.norm(full, axis=1))
    # FP16 rounding before a Quantize moves some values across an INT8 step: close, not equal. The same top-1
    # wherever the Q/DQ model's top two are clearly apart (measured on trained ResNet-18s: 99.3% agreement overall)
    top2 = np.sort(full, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.1
    assert np.median(cosine) > 0.99 and clear.sum() >= 64
    assert (half.argmax(1) == full.argmax(1))[clear].mean() >= 0.98


def test_a_qoperator_model_is_refused(tmp_path):
    from onnx import TensorProto, helper

    from optimize.errors import EngineError

    node = helper.make_node("QLinearConv", ["x", "s", "z", "w", "ws", "wz", "ys", "yz"], ["y"])
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 3, 4, 4])])
    onnx.save(helper.make_model(graph), str(tmp_path / "q.onnx"))
    with pytest.raises(EngineError, match="QOperator"):
        to_fp16_onnx(tmp_path / "q.onnx", tmp_path / "q.fp16.onnx")
