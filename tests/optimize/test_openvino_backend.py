"""OpenVINO beside ONNX Runtime: build-engine, the runner, the benchmark's pick across runtimes, the bundle.

Real OpenVINO and NNCF (``edgeopt[openvino]``, which ``make test`` installs), a tiny ResNet-18 at 16 px.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import device_python, error_line, fashion_arrays, run_cli, skip_locally_fail_in_ci

if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None:
    skip_locally_fail_in_ci("openvino / nncf are not installed: pip install 'edgeopt[openvino]'", module=True)

from optimize import openvino_backend as ovb  # noqa: E402
from optimize.configs import BenchmarkConfig  # noqa: E402
from optimize.onnx_model import OnnxModel  # noqa: E402
from optimize.runners import OnnxRuntimeRunner, open_runner  # noqa: E402

BUILD_FAST = ("--compare-rounds", "1", "--compare-seconds", "0.05")


@pytest.fixture(scope="module")
def ov_models(exported_onnx, tmp_path_factory):
    """``exported_onnx`` built for OpenVINO FP32 and INT8 (NNCF on 128 training images), via the CLI."""
    folder = tmp_path_factory.mktemp("openvino")
    fp32, int8 = folder / "model.ov.xml", folder / "model.int8.ov.xml"
    run_cli("-q", "build-engine", "--onnx", exported_onnx, "--backend", "openvino", "--out", fp32, *BUILD_FAST,
            check=True)
    run_cli("-q", "build-engine", "--onnx", exported_onnx, "--backend", "openvino", "--precision", "int8",
            "--calib-data", "fashion-mnist", "--num-images", "128", "--calib-val-limit", "256", "--out", int8,
            *BUILD_FAST, check=True)
    return fp32, int8


def _val_batch(size: int, n: int = 64) -> np.ndarray:
    """``n`` val images cropped to ``size`` px (at most 28), three channels, normalised about 0."""
    pixels, _ = fashion_arrays("val")
    x = (pixels[:n, :size, :size].astype(np.float32) / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1))


def test_fp32_is_onnx_runtime_fp32_and_records_its_build(ov_models, exported_onnx):
    fp32, _ = ov_models
    manifest = json.loads(fp32.with_name(fp32.name + ".json").read_text())
    engine = manifest["engine"]
    assert manifest["stage"] == "build-engine" and engine["backend"] == "openvino" and engine["precision"] == "fp32"
    assert engine["hint"] in ("LATENCY", "THROUGHPUT") and engine["hint_comparison"]["kept"] == engine["hint"]
    assert engine["inference_precision"] == "f32" and fp32.with_suffix(".bin").is_file()
    assert manifest["inputs"]["onnx"]["path"] == str(exported_onnx) and manifest["class_names"][9] == "Ankle boot"
    ours, theirs = open_runner(fp32, threads=1), OnnxRuntimeRunner(exported_onnx, threads=1)
    assert (ours.backend, ours.precision, ours.image_size) == ("openvino", "fp32", theirs.image_size)
    x = _val_batch(ours.image_size)
    a, b = ours.infer(x), theirs.infer(x)
    # FP32 both: no BF16 on a CPU that has it (the f32 inference precision hint)
    np.testing.assert_allclose(a, b, atol=1e-3 + 1e-4 * float(np.abs(b).max()), rtol=0)
    assert (a.argmax(1) == b.argmax(1)).all()
    assert ours.infer(x[:5]).shape == (5, b.shape[1])  # any batch: the batch axis stays dynamic


def test_int8_from_nncf_agrees_with_fp32(ov_models, exported_onnx):
    _, int8 = ov_models
    manifest = json.loads(int8.with_name(int8.name + ".json").read_text())
    calib = manifest["metrics"]["calibration"]
    assert calib["from"] == "NNCF post-training quantization" and calib["num_images"] == 128
    assert calib["val_images"] == 256 and 0.8 <= calib["agreement_with_fp32"] <= 1.0  # the INT8 tests' bound
    runner = open_runner(int8, threads=1)
    assert runner.precision == "int8"
    x = _val_batch(runner.image_size, 128)
    agree = (runner.infer(x).argmax(1) == OnnxRuntimeRunner(exported_onnx, threads=1).infer(x).argmax(1)).mean()
    assert agree >= 0.8
    # INT8 weights: the IR's weights are a quarter of the FP32 one's, give or take the float head and scales
    assert int8.with_suffix(".bin").stat().st_size < 0.4 * int8.with_name("model.ov.bin").stat().st_size


def test_nncf_quantizes_a_copy_and_leaves_its_input_as_it_was(exported_onnx):
    """build-engine converts the ONNX once: the same model is NNCF's input and the FP32 reference its INT8 figures
    compare against, which holds only while NNCF leaves that model untouched."""
    model = ovb.convert(exported_onnx)
    x = _val_batch(OnnxModel.read(exported_onnx).image_size, 16)
    before = ovb.infer_function(model, threads=1)(x)
    int8 = ovb.quantize(model, [x[i:i + 1] for i in range(len(x))], count=len(x))
    kinds = [op.get_type_name() for op in model.get_ordered_ops()]
    assert "FakeQuantize" in [op.get_type_name() for op in int8.get_ordered_ops()] and "FakeQuantize" not in kinds
    np.testing.assert_array_equal(ovb.infer_function(model, threads=1)(x), before)


@pytest.mark.parametrize("args, expect", [
    (["--precision", "fp16"], "--precision fp16 is not offered for --backend openvino"),
    (["--backend", "onnxruntime", "--nncf-preset", "mixed"], "--nncf-preset and --nncf-model-type are OpenVINO"),
    (["--out", "{tmp}/model.onnx"], "an OpenVINO model is an .xml"),
    (["--precision", "int8"], "needs --calib-data"),
])
def test_build_refuses_what_it_cannot_honour(exported_onnx, tmp_path, args, expect):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = ["build-engine", "--onnx", exported_onnx, "--backend", "openvino", "--out", tmp_path / "m.xml"]
    proc = run_cli(*base, *args)
    assert proc.returncode == 2 and expect in error_line(proc), proc.stderr
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_build_refuses_onnx_runtime_qoperator_int8(exported_onnx, tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from optimize.artifacts import write_manifest

    class Reader:
        def __init__(self):
            self.batches = iter([{"input": _val_batch(16, 8)}])

        def get_next(self):
            return next(self.batches, None)

    qop = tmp_path / "qop.onnx"
    quantize_static(str(exported_onnx), str(qop), Reader(), quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    import onnx

    model, src = onnx.load(str(qop)), onnx.load(str(exported_onnx))
    onnx.helper.set_model_props(model, {p.key: p.value for p in src.metadata_props})
    onnx.save(model, str(qop))
    write_manifest(qop, stage="calibrate", config={})
    proc = run_cli("build-engine", "--onnx", qop, "--backend", "openvino", "--precision", "int8", "--out",
                   tmp_path / "m.xml")
    assert proc.returncode == 2 and "QOperator" in error_line(proc), proc.stderr


def test_benchmark_times_both_runtimes_and_every_row_against_the_peak(ov_models, exported_onnx, trained, tmp_path):
    fp32, int8 = ov_models
    out = tmp_path / "report"
    run_cli("-q", "benchmark", "--baseline", trained, "--models", exported_onnx, fp32, int8, "--val-limit", "128",
            "--batch-sizes", "1", "8", "--rounds", "2", "--seconds", "0.05", "--threads", "1", "--out", out,
            check=True)
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["model.ov.xml"]["backend"] == rows["model.int8.ov.xml"]["backend"] == "openvino"
    assert rows["model.ov.xml"]["file_bytes"] > fp32.stat().st_size  # the .bin counted: what a deployment copies
    assert rows["model.int8.ov.xml"]["int8_gate"]["sibling"] == "model.ov.xml"  # same runtime's FP32 first
    peak = report["environment"]["peak"]
    assert peak["macs_per_s"]["fp32"] > 0 and peak["macs_per_s"]["int8"] > 0 and peak["threads"] == 1
    for r in report["rows"]:
        for b in ("1", "8"):
            assert r["gmacs_per_s"][b] > 0 and 0 < r["peak_fraction"][b] <= 1.5, (r["name"], b, r["peak_fraction"])
    text = (out / "report.md").read_text()
    assert "## Against this machine's peak" in text and "- OpenVINO: 20" in text


def test_the_final_pick_crosses_runtimes():
    from optimize.benchmark.gates import final_artifact
    from optimize.benchmark.measure import Row
    from optimize.timing import Spread

    def row(name: str, backend: str, img_per_s: float, top1: float) -> Row:
        r = Row(name=name, path=name, role="model", backend=backend, precision="int8", top1=top1)
        spread = Spread.of([img_per_s * f for f in (0.99, 1.0, 1.01)])
        r.throughput["8"], r.throughput_spread["8"] = spread.median, spread.to_dict()
        return r

    base = row("teacher.pth", "torch", 100.0, 0.90)
    base.role = "baseline"
    cfg = BenchmarkConfig(models=("x",), out="unused", max_accuracy_drop=1.0)
    ort, ov = row("model.int8.ort.onnx", "onnxruntime", 1000.0, 0.900), row("model.int8.ov.xml", "openvino", 1500.0,
                                                                              0.899)
    assert final_artifact([base, ort, ov], base, cfg)["artifact"] == "model.int8.ov.xml"
    ov.top1 = 0.885  # 1.5 pt below the baseline: out of budget, however fast
    assert final_artifact([base, ort, ov], base, cfg)["artifact"] == "model.int8.ort.onnx"


@pytest.fixture(scope="module")
def ov_bundle(ov_models, exported_onnx, tmp_path_factory):
    _, int8 = ov_models
    out = tmp_path_factory.mktemp("ovbundle") / "bundle"
    run_cli("-q", "package", "--model", int8, "--out", out, "--check-images", "64", check=True)
    return out


def test_package_serves_the_ir_with_its_own_requirements(ov_bundle):
    manifest = json.loads((ov_bundle / "bundle.json").read_text())
    assert manifest["serves"] == {"file": "model.xml", "precision": "int8"}
    assert {"model.xml", "model.bin", "model.xml.json", "model.onnx"} <= set(manifest["files"])
    requirements = (ov_bundle / "requirements.txt").read_text()
    assert "openvino>=" in requirements and "\nonnxruntime" not in requirements
    reference = json.loads((ov_bundle / "check" / "reference.json").read_text())
    assert reference["host"]["model"] == "model.xml" and reference["host"]["precision"] == "int8"
    assert reference["host"]["runtime"].startswith("openvino") and reference["fp32"]["model"] == "model.onnx"


def test_bundle_runner_checks_the_ir_in_a_fresh_venv(ov_bundle, tmp_path_factory, tmp_path):
    python = device_python(ov_bundle / "requirements.txt", tmp_path_factory.mktemp("ovdevice"))
    env = {"PATH": "/usr/bin:/bin"}
    for module in ("torch", "onnxruntime"):
        assert subprocess.run([python, "-c", f"import {module}"], capture_output=True, env=env).returncode != 0
    proc = subprocess.run([python, ov_bundle / "runner.py", "--check", "--seconds", "0.05", "--rounds", "2", "--out",
                           tmp_path], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["backend"] == "openvino" and result["device"]["runtime"].startswith("openvino")
    assert result["verdict"]["passed"] and result["agreement_with_host"] == 1.0
    assert result["logit_diff"]["max"] < 1e-4 and 0.8 <= result["agreement_with_fp32"] <= 1.0


def test_infer_and_serve_run_the_ir(ov_models, exported_onnx, tmp_path):
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from optimize import infer, serve

    fp32, _ = ov_models
    pixels, _ = fashion_arrays("val")
    png = tmp_path / "0.png"
    Image.fromarray(pixels[0], "L").save(png)
    ours = infer.run(infer.InferConfig(model=str(fp32), images=(str(png),), top_k=3))[0]
    theirs = infer.run(infer.InferConfig(model=str(exported_onnx), images=(str(png),), top_k=3))[0]
    assert [c.index for c in ours.top_k] == [c.index for c in theirs.top_k]
    np.testing.assert_allclose([c.probability for c in ours.top_k], [c.probability for c in theirs.top_k], atol=1e-4)
    with TestClient(serve.create_app(serve.ServeConfig(model=str(fp32)))) as client:
        assert client.get("/metadata").json()["backend"] == "openvino"
        buffer = io.BytesIO()
        Image.fromarray(pixels[0], "L").save(buffer, format="PNG")
        got = client.post("/predict", files=[("file", ("0.png", buffer.getvalue(), "image/png"))],
                          params={"top_k": 3})
        assert got.status_code == 200
        assert [c["index"] for c in got.json()["predictions"][0]["top_k"]] == [c.index for c in ours.top_k]
