"""calibrate: INT8 ONNX for TensorRT (symmetric Q/DQ) and for the CPU (the faster measured form)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import error_line, run_cli, run_main
from optimize.export import export_onnx

CALIB = ["--num-images", "128", "--val-limit", "256"]


@pytest.fixture(scope="module")
def fp32_onnx(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    run_cli("-q", "export", "--model", trained, "--out", out, check=True)
    return out


def _calibrate(onnx_path, out, *args):
    proc = run_cli("-q", "calibrate", "--onnx", onnx_path, "--out", out, *CALIB, "--json", *args, check=True)
    return json.loads(proc.stdout)["metrics"]


def test_tensorrt_target_is_symmetric_per_channel_qdq_with_residual_placement(fp32_onnx, tmp_path):
    out = tmp_path / "model.int8.onnx"
    m = _calibrate(fp32_onnx, out, "--target", "tensorrt", "--method", "entropy")
    model = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        zero_point = inits[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any()  # symmetric INT8: zero points 0
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    for conv in convs:
        w = producer[conv.input[1]]
        assert w.op_type == "DequantizeLinear" and inits[w.input[1]].size == inits[w.input[0]].shape[0]  # per-channel
        if len(conv.input) > 2:
            assert conv.input[2] in inits and inits[conv.input[2]].dtype == np.float32  # bias left in float
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    assert len(adds) == 8  # ResNet-18's residual adds
    for add in adds:
        kinds = sorted(producer[i].op_type for i in add.input)
        assert kinds == ["Conv", "DequantizeLinear"], kinds  # conv branch raw, shortcut quantized
    assert m["form"] == "qdq-tensorrt" and 0 <= m["top1_int8"] <= 1 and m["val_images"] == 256
    assert 0.8 <= m["agreement_with_fp32"] <= 1.0
    props = {p.key for p in model.metadata_props}
    assert "edgeopt.preprocessing" in props and "edgeopt.class_names" in props

    cache = json.loads((tmp_path / "model.int8.calib.json").read_text())
    assert cache["method"] == "entropy" and cache["num_images"] == 128 and cache["ort"]
    assert cache["preprocessing"]["image_size"] == 16


def test_cache_is_reused_and_refused_for_another_model(fp32_onnx, trained, tmp_path):
    first = tmp_path / "a.int8.onnx"
    _calibrate(fp32_onnx, first, "--method", "minmax")
    cache = tmp_path / "a.int8.calib.json"
    again = tmp_path / "b.int8.onnx"
    proc = run_cli("-q", "calibrate", "--onnx", fp32_onnx, "--out", again, *CALIB, "--method", "minmax",
                   "--cache", cache, check=True)
    assert "calibrating" not in proc.stderr

    def scales(path):
        return {i.name: numpy_helper.to_array(i).tolist() for i in onnx.load(str(path)).graph.initializer
                if i.name.endswith("_scale")}
    assert scales(first) == scales(again)

    other = tmp_path / "other.onnx"
    run_cli("-q", "export", "--model", trained, "--out", other, "--opset", "18", check=True)
    proc = run_cli("-q", "calibrate", "--onnx", other, "--out", tmp_path / "c.onnx", *CALIB, "--method", "minmax",
                   "--cache", cache)
    assert proc.returncode == 2 and "another ONNX file" in error_line(proc)
    assert not (tmp_path / "c.onnx").exists()


def test_cpu_target_measures_both_forms_and_keeps_the_faster(fp32_onnx, tmp_path):
    out = tmp_path / "cpu.int8.onnx"
    m = _calibrate(fp32_onnx, out, "--target", "cpu", "--method", "percentile", "--timing-seconds", "0.3")
    assert set(m["candidates"]) == {"qoperator-u8s8", "qdq-s8s8"}
    speeds = {form: c["img_per_s_b8"] for form, c in m["candidates"].items()}
    assert m["form"] == max(speeds, key=speeds.get)
    assert all(c["img_per_s_b1"] > 0 for c in m["candidates"].values()) and m["fp32"]["img_per_s_b1"] > 0
    assert m["fp32"]["img_per_s_b8"] > 0 and m["int8_faster_than_fp32"] == (m["candidates"][m["form"]]["speedup_vs_fp32"] > 1)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ("QLinearConv" in ops) if m["form"] == "qoperator-u8s8" else ("QuantizeLinear" in ops)


def test_calibrate_bad_inputs(fp32_onnx, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    fixed = tmp_path / "fixed.onnx"
    export_onnx(torch.nn.Conv2d(3, 4, 3).eval(), torch.randn(1, 3, 16, 16), fixed, dynamic_batch=False)
    for path, expect in ((junk, "not a valid ONNX"), (fixed, "fixed batch"), (tmp_path / "none.onnx", "does not exist")):
        proc = run_main("-q", "calibrate", "--onnx", path, "--out", tmp_path / "x.onnx", *CALIB)
        assert proc.returncode == 2 and expect in error_line(proc), proc.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_calibration_folder_with_fewer_images_than_asked(image_folder, tmp_path):
    ckpt = tmp_path / "folder.pth"
    run_cli("-q", "train", "--data", image_folder, "--arch", "resnet18", "--image-size", "16", "--epochs", "1",
            "--out", ckpt, check=True)
    fp32 = tmp_path / "folder.onnx"
    run_cli("-q", "export", "--model", ckpt, "--data", image_folder, "--out", fp32, check=True)
    proc = run_cli("calibrate", "--onnx", fp32, "--data", image_folder, "--num-images", "500", "--out",
                   tmp_path / "a.onnx", check=True)
    assert "only 123 training images" in proc.stderr
    proc = run_cli("-q", "calibrate", "--onnx", fp32, "--data", image_folder, "--num-images", "500",
                   "--batch-size", "200", "--out", tmp_path / "b.onnx")
    assert proc.returncode == 2 and "less than one batch" in error_line(proc)
    assert not (tmp_path / "b.onnx").exists()
