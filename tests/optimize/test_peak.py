"""The machine's peak and a model's multiply-accumulates (optimize/peak.py), on real ONNX Runtime."""

from __future__ import annotations

import json

import pytest

from optimize.checkpoint import load_checkpoint
from optimize.benchmark.measure import onnx_graph_stats, resized_onnx
from optimize.peak import Peak, cpu_peak, row_efficiency
from optimize.prune import count_macs_params


def test_cpu_peak_is_positive_and_int8_is_measured():
    peak = cpu_peak(1, size=256, seconds=0.2)
    assert peak.macs_per_s["fp32"] > 1e8 and peak.macs_per_s["int8"] > 1e8  # any CPU of this century
    assert peak.as_dict()["threads"] == 1 and "onnxruntime" in peak.library


def test_the_macs_rows_are_measured_with_match_torch_pruning_in_every_form(exported_onnx, trained, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    size = json.loads(exported_onnx.with_name(exported_onnx.name + ".json").read_text())["preprocessing"]["image_size"]
    ours = onnx_graph_stats(exported_onnx)["macs"]
    model = load_checkpoint(trained).model
    theirs, _ = count_macs_params(model, size)
    # Torch-Pruning also counts BatchNorm, ReLU and the residual adds; the convolutions and fc are all but ~1%
    assert 0.97 * theirs <= ours <= theirs
    dynamic = tmp_path / "dynamic.onnx"  # ConvInteger / MatMulInteger: another operator set, the same work
    quantize_dynamic(str(exported_onnx), str(dynamic), weight_type=QuantType.QUInt8)
    assert onnx_graph_stats(dynamic)["macs"] == ours
    double = onnx_graph_stats(resized_onnx(exported_onnx, 2 * size, tmp_path))["macs"]
    theirs_double = count_macs_params(model, 2 * size)[0]
    assert 0.97 * theirs_double <= double <= theirs_double and double > 2 * ours  # the size given is the size counted


@pytest.mark.parametrize("precision, peak_key", [("fp32", "fp32"), ("int8", "int8"), ("fp16", "fp16")])
def test_a_row_is_measured_against_its_own_arithmetic(precision, peak_key):
    peak = Peak("cuda", {"fp32": 1e12, "int8": 4e12, "fp16": 2e12}, (8, 8, 8))
    row = row_efficiency(1000.0, 10**9, precision, peak)  # 1 TMAC/s achieved
    assert row["gmacs_per_s"] == 1000.0
    assert row["peak_fraction"] == pytest.approx(1e12 / peak.macs_per_s[peak_key])
    assert row_efficiency(1000.0, 10**9, "tf32", peak)["peak_fraction"] is None  # not measured: no figure
