"""optimize.onnx_model: the facts of an ONNX file exported here, and the one refusal text of each shared check."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import FIXED_BATCH, TINY_CLASSES, TINY_SIDE
from optimize.artifacts import write_manifest
from optimize.errors import ModelInputError, OnnxModelError
from optimize.onnx_model import CLASS_NAMES_KEY, PREPROCESSING_KEY, OnnxModel, TensorSpec, image_input_dims
from optimize.preprocess import fashion_mnist_preset


def test_an_exported_model_reads_as_what_export_wrote(tiny_onnx):
    model = OnnxModel.read(tiny_onnx.path)
    assert model.inputs == (TensorSpec("input", ("batch", 3, TINY_SIDE, TINY_SIDE)),)
    assert model.outputs == (TensorSpec("logits", ("batch", TINY_CLASSES)),)
    assert model.input == model.inputs[0] and model.output == model.outputs[0]  # the weights are not inputs
    assert model.opset == 17 and {"Conv", "Relu", "Gemm"} <= model.op_types and model.domains == frozenset()
    assert (model.precision, model.is_qdq, model.tensorrt_issue()) == ("fp32", False, None)
    assert (model.fixed_batch, model.side, model.image_size, model.num_classes) == (None, TINY_SIDE, TINY_SIDE,
                                                                                    TINY_CLASSES)
    assert model.sha256 == hashlib.sha256(tiny_onnx.path.read_bytes()).hexdigest()
    model.require_dynamic_batch()
    assert model.preprocessing() == (tiny_onnx.preprocessing, tiny_onnx.class_names)


def test_a_fixed_batch_export_is_refused_where_batches_vary(tiny_onnx):
    model = OnnxModel.read(tiny_onnx.fixed_path)
    assert model.input.shape == (FIXED_BATCH, 3, TINY_SIDE, TINY_SIDE) and model.fixed_batch == FIXED_BATCH
    with pytest.raises(ModelInputError, match=rf"fixed batch size \({FIXED_BATCH}\), so no batch profile fits"):
        model.require_dynamic_batch()
    assert model.recorded_preprocessing() == (None, None)
    with pytest.raises(OnnxModelError, match="records no preprocessing; export it with 'cli.py export' first"):
        model.preprocessing()


def test_a_missing_or_damaged_file_is_one_error(tmp_path):
    with pytest.raises(OnnxModelError, match=r"absent\.onnx does not exist; write one with 'cli.py export'"):
        OnnxModel.read(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07 not protobuf at all \xff\xff")
    with pytest.raises(OnnxModelError, match=r"junk\.onnx is not a valid ONNX model \(.*\); export it again"):
        OnnxModel.read(tmp_path / "junk.onnx")


def _graph_model(path, *, input_shape, nodes=(), initializers=(), domain_opsets=(), output="x") -> OnnxModel:
    """A hand-built graph (written unchecked: only the facts are read) with one input ``x``."""
    graph = helper.make_graph(list(nodes), "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], list(initializers))
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(d, 1) for d in domain_opsets)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return OnnxModel.read(path, check=False)


def test_precision_and_what_tensorrt_cannot_parse_come_from_the_operators(tmp_path):
    shape = ["n", 3, 8, 8]
    scale = numpy_helper.from_array(np.float32(0.1), "s")
    qdq = _graph_model(tmp_path / "qdq.onnx", input_shape=shape, initializers=[scale], output="d",
                       nodes=[helper.make_node("QuantizeLinear", ["x", "s"], ["q"]),
                              helper.make_node("DequantizeLinear", ["q", "s"], ["d"])])
    assert (qdq.precision, qdq.is_qdq, qdq.tensorrt_issue()) == ("int8", True, None)
    qop = _graph_model(tmp_path / "qop.onnx", input_shape=shape, output="y",
                       nodes=[helper.make_node("QLinearConv", ["x"] * 8, ["y"])])
    assert qop.precision == "int8" and not qop.is_qdq
    assert "ONNX Runtime's QOperator INT8 form (QLinearConv" in qop.tensorrt_issue()
    contrib = _graph_model(tmp_path / "ort.onnx", input_shape=shape, output="y", domain_opsets=["com.microsoft"],
                           nodes=[helper.make_node("FusedConv", ["x"], ["y"], domain="com.microsoft")])
    assert contrib.domains == {"com.microsoft"} and "contrib operators (com.microsoft" in contrib.tensorrt_issue()
    half = _graph_model(tmp_path / "fp16.onnx", input_shape=shape,
                        initializers=[numpy_helper.from_array(np.ones(3, np.float16), "w")])
    assert half.precision == "fp16" and half.inputs == (TensorSpec("x", ("n", 3, 8, 8)),)


@pytest.mark.parametrize("shape, message", [
    (["n", 8, 8, 3], r"channels-last \(NHWC\) input \[n, 8, 8, 3\].*NCHW \[n, 3, 8, 8\]"),
    ([1, 3, 8], r"takes input \[1, 3, 8\]; edgeopt feeds images as NCHW \[n, 3, S, S\]"),
    (["n", 1, 8, 8], r"takes input \[n, 1, 8, 8\]; edgeopt feeds images as NCHW \[n, 3, 8, 8\]"),
    (["n", 3, 8, 6], r"\(3 RGB channels, square\)"),
])
def test_inputs_edgeopt_cannot_feed_are_refused_with_the_layout_it_feeds(tmp_path, shape, message):
    model = _graph_model(tmp_path / "m.onnx", input_shape=shape)
    with pytest.raises(ModelInputError, match=message):
        model.input  # noqa: B018 - the property is the check


def test_image_input_dims_reads_fixed_and_symbolic_axes():
    assert image_input_dims("m.onnx", ["batch", 3, 224, 224]) == (None, 224)
    assert image_input_dims("m.onnx", [4, 3, 0, None]) == (4, None)  # get_inputs() gives None or 0 when unknown
    with pytest.raises(ModelInputError, match=r"m\.onnx takes input \[\?, 3, 8, 8, 1\]"):  # unknown axes as ?
        image_input_dims("m.onnx", [None, 3, 8, 8, 1])


def test_a_symbolic_side_has_no_image_size(tmp_path):
    model = _graph_model(tmp_path / "m.onnx", input_shape=["n", 3, "h", "w"])
    assert model.side is None
    with pytest.raises(ModelInputError, match="no fixed input side"):
        model.image_size  # noqa: B018
    two = _graph_model(tmp_path / "two.onnx", input_shape=["n", 3, 8, 8],
                       nodes=[helper.make_node("Identity", ["x"], ["x2"])])
    two_inputs = OnnxModel(**{**two.__dict__, "inputs": two.inputs * 2})
    with pytest.raises(ModelInputError, match="has 2 inputs; edgeopt handles one image input"):
        two_inputs.input  # noqa: B018


def _with_metadata(tiny_onnx, path, **changes: str | None) -> OnnxModel:
    """The tiny export with metadata entries replaced (None: removed)."""
    proto = onnx.load(str(tiny_onnx.path))
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(changes)
    del proto.metadata_props[:]
    helper.set_model_props(proto, {k: v for k, v in props.items() if v is not None})
    onnx.save(proto, str(path))
    return OnnxModel.read(path)


@pytest.mark.parametrize("changes, message", [
    ({PREPROCESSING_KEY: json.dumps(fashion_mnist_preset(image_size=16).to_dict())},
     r"records image_size 16 but the graph takes \[n, 3, 8, 8\]"),
    ({CLASS_NAMES_KEY: json.dumps(["a", "b"])}, "names 2 classes but the graph outputs 5"),
    ({CLASS_NAMES_KEY: json.dumps([1, 2, 3, 4, 5])}, "class names must be a list of strings"),
    ({PREPROCESSING_KEY: "{not json"}, f"its metadata {PREPROCESSING_KEY} is not valid JSON"),
    ({PREPROCESSING_KEY: json.dumps({"image_size": 8})},
     "the recorded preprocessing is invalid: it has no resize_size"),
])
def test_a_damaged_or_disagreeing_record_is_refused_naming_where_it_lies(tiny_onnx, tmp_path, changes, message):
    model = _with_metadata(tiny_onnx, tmp_path / "m.onnx", **changes)
    with pytest.raises(OnnxModelError, match=message) as info:
        model.recorded_preprocessing()
    assert "m.onnx" in str(info.value) and "re-export" in str(info.value)


def test_without_metadata_the_manifest_records_the_preprocessing(tiny_onnx, tmp_path):
    path = tmp_path / "m.onnx"
    model = _with_metadata(tiny_onnx, path, **{PREPROCESSING_KEY: None, CLASS_NAMES_KEY: None})
    assert model.recorded_preprocessing() == (None, None)
    write_manifest(path, stage="export", config={}, preprocessing=tiny_onnx.preprocessing.to_dict(),
                   class_names=tiny_onnx.class_names)
    assert model.preprocessing() == (tiny_onnx.preprocessing, tiny_onnx.class_names)
    write_manifest(path, stage="export", config={}, preprocessing={**tiny_onnx.preprocessing.to_dict(),
                                                                   "image_size": 32, "resize_size": 32})
    with pytest.raises(OnnxModelError, match=r"m\.onnx's manifest: records image_size 32"):
        model.preprocessing()
