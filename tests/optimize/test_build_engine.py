"""build-engine with the ONNX Runtime backend (TensorRT is checked by test_tensorrt_api.py)."""

from __future__ import annotations

import json
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import error_line, run_cli, run_main
from optimize.export import export_onnx
from optimize.timing import Race, Spread, race


@pytest.fixture(scope="module")
def fp32_onnx(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "model.onnx"
    run_cli("-q", "export", "--model", trained, "--out", out, check=True)
    return out


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_onnxruntime_fp32_engine_matches_the_onnx(fp32_onnx, tmp_path):
    out = tmp_path / "model.ort.onnx"
    proc = run_cli("-q", "build-engine", "--onnx", fp32_onnx, "--backend", "onnxruntime", "--precision", "fp32",
                   "--min-batch", "1", "--opt-batch", "4", "--max-batch", "16", "--out", out, "--json", check=True)
    manifest = json.loads((tmp_path / "model.ort.onnx.json").read_text())
    engine = manifest["engine"]
    assert engine["backend"] == "onnxruntime" and engine["precision"] == "fp32"
    assert engine["profile"] == {"min_batch": 1, "opt_batch": 4, "max_batch": 16}
    assert manifest["inputs"]["onnx"]["sha256"] == json.loads((fp32_onnx.parent / "model.onnx.json").read_text())["sha256"]
    assert json.loads(proc.stdout)["out"] == str(out)
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(fp32_onnx, x), atol=1e-4)
    # the optimized graph was timed against its input in this run, and the faster by median is the file written
    c = engine["comparison"]
    assert c["batch"] == 4 and c["rounds"] == 5 and len(c["optimized_img_per_s"]["rounds"]) == 5
    faster = "input" if c["input_img_per_s"]["median"] > c["optimized_img_per_s"]["median"] else "optimized"
    assert engine["kept"] == faster and c["verdict"] in ("faster", "slower", "within noise")
    fused = any(n.domain == "com.microsoft" for n in onnx.load(str(out)).graph.node)  # FusedConv: ORT's own ops
    assert fused == (faster == "optimized")


def test_the_slower_form_is_not_kept():
    """A measured pair where the optimization cost speed: the input is kept, and the manifest says why."""
    from optimize.build_engine import kept_facts

    def faster_form(optimized: Spread, original: Spread) -> dict:
        return kept_facts(Race.of({"optimized": optimized, "input": original}))

    slower = faster_form(Spread.of([900.0, 950.0, 1000.0]), Spread.of([1100.0, 1150.0, 1200.0]))
    assert slower["kept"] == "input" and slower["verdict"] == "slower" and slower["ratio"] < 1
    noise = faster_form(Spread.of([1000.0, 1060.0, 1200.0]), Spread.of([1050.0, 1100.0, 1150.0]))
    assert noise["kept"] == "input" and noise["verdict"] == "within noise"
    assert faster_form(Spread.of([1300.0]), Spread.of([1100.0]))["kept"] == "optimized"


def test_the_race_keeps_the_faster_run_and_breaks_ties_as_told():
    """The one race build-engine and OpenVINO's hint choice run: real runs, interleaved, the faster kept."""
    timed = race({"slow": lambda: time.sleep(0.008), "fast": lambda: time.sleep(0.002)}, batch=4, rounds=3,
                 seconds=0.04)
    assert timed.kept == "fast" and list(timed.spreads) == ["slow", "fast"]
    assert all(len(s.rounds) == 3 for s in timed.spreads.values())
    assert timed.comparison["verdict"] == "slower" and timed.comparison["ratio"] < 0.5  # slow / fast
    assert 4 / 0.008 / 2 < timed.spreads["fast"].median <= 4 / 0.002  # img/s: batch / seconds a run
    tie = {"optimized": Spread.of([1000.0]), "input": Spread.of([1000.0])}
    assert Race.of(tie).kept == "optimized" and Race.of(tie, ties="input").kept == "input"
    assert Race.of(tie).comparison["verdict"] == "within noise"


def test_compare_rounds_zero_keeps_the_optimized_graph_unmeasured(fp32_onnx, tmp_path):
    out = tmp_path / "model.ort.onnx"
    run_cli("-q", "build-engine", "--onnx", fp32_onnx, "--compare-rounds", "0", "--out", out, check=True)
    engine = json.loads((tmp_path / "model.ort.onnx.json").read_text())["engine"]
    assert engine["kept"] == "optimized" and engine["comparison"] is None
    assert any(n.domain == "com.microsoft" for n in onnx.load(str(out)).graph.node)


def test_onnxruntime_int8_engine_from_calibration_data(fp32_onnx, tmp_path):
    out = tmp_path / "model.int8.ort.onnx"
    run_cli("-q", "build-engine", "--onnx", fp32_onnx, "--precision", "int8", "--calib-data", "fashion-mnist",
            "--num-images", "64", "--calib-val-limit", "256", "--out", out, check=True)
    manifest = json.loads((tmp_path / "model.int8.ort.onnx.json").read_text())
    calibration = manifest["metrics"]["calibration"]
    assert calibration["target"] == "cpu" and calibration["form"] in calibration["candidates"]
    assert (tmp_path / "model.int8.ort.calib.json").exists()
    assert calibration["val_images"] == 256 and calibration["agreement_with_fp32"] >= 0.9
    assert abs(calibration["top1_drop_pt"]) <= 3.0

    # the engine written, run here on the same 256 val images: it must agree with the FP32 model, not only run
    from optimize.data import load_data
    from optimize.onnx_model import OnnxModel

    val = load_data("fashion-mnist", OnnxModel.read(fp32_onnx).preprocessing()[0], val_limit=256, augment=False,
                    val_only=True).val
    x = np.stack([val[i][0].numpy() for i in range(len(val))]).astype(np.float32)
    labels = np.asarray([val[i][1] for i in range(len(val))])
    fp32, int8 = _run(fp32_onnx, x), _run(out, x)
    assert int8.shape == (256, 10)
    fp32_top1, int8_top1 = fp32.argmax(1), int8.argmax(1)
    assert (fp32_top1 == labels).mean() == calibration["top1_fp32"]  # the manifest's figures are of these images
    agreement = (int8_top1 == fp32_top1).mean()
    # the 1-epoch model favours a few classes: agreeing must beat always answering FP32's most frequent class
    assert agreement >= 0.9 and agreement > np.bincount(fp32_top1).max() / len(fp32_top1), agreement
    assert abs(agreement - calibration["agreement_with_fp32"]) <= 0.02
    assert abs((int8_top1 == labels).mean() - calibration["top1_int8"]) <= 0.02
    # and the logits themselves stay close (a wrong scale or zero point breaks this before it moves top-1)
    cosine = (fp32 * int8).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1))
    assert cosine.min() > 0.98, cosine.min()


@pytest.mark.parametrize("args, expect", [
    (["--precision", "int8"], "--calib-data"),
    (["--min-batch", "8", "--opt-batch", "4"], "--min-batch"),
    (["--precision", "fp16"], "fp16"),
    (["--sparse-weights"], "TensorRT options"),
    (["--max-batch", "100000"], "--max-batch"),
])
def test_build_engine_bad_options(fp32_onnx, tmp_path, args, expect):
    out = tmp_path / "x.onnx"
    proc = run_main("-q", "build-engine", "--onnx", fp32_onnx, "--out", out, *args)
    assert proc.returncode == 2 and expect in error_line(proc)
    assert not out.exists()


def test_build_engine_bad_models(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_text("not onnx")
    fixed = tmp_path / "fixed.onnx"
    export_onnx(torch.nn.Conv2d(3, 4, 3).eval(), torch.randn(1, 3, 16, 16), fixed, dynamic_batch=False)
    for path, expect in ((junk, "not a valid ONNX"), (fixed, "fixed batch")):
        proc = run_cli("-q", "build-engine", "--onnx", path, "--out", tmp_path / "x.onnx")
        assert proc.returncode == 2 and expect in error_line(proc)


@pytest.mark.parametrize("args, expect", [
    (["--dla-core", "0", "--precision", "fp32", "--min-batch", "4", "--opt-batch", "4", "--max-batch", "4"],
     "DLA has no FP32"),
    (["--dla-core", "0", "--precision", "fp16"], "static batch"),
    (["--dla-core", "-1", "--precision", "fp16", "--min-batch", "4", "--opt-batch", "4", "--max-batch", "4"],
     "0 or more"),
    (["--tf32", "--precision", "fp16"], "--tf32 applies to --precision fp32"),
])
def test_tensorrt_dla_and_tf32_option_errors(fp32_onnx, tmp_path, args, expect):
    """DLA takes static shapes and FP16/INT8 only (TensorRT's DLA restrictions): refused before any work."""
    out = tmp_path / "x.engine"
    proc = run_cli("-q", "build-engine", "--onnx", fp32_onnx, "--backend", "tensorrt", "--out", out, *args)
    assert proc.returncode == 2 and expect in error_line(proc)
    assert not out.exists()


def test_tensorrt_refuses_onnx_it_cannot_use(fp32_onnx, tmp_path):
    """A QOperator model (QLinearConv) TensorRT can't parse; a CPU-placed Q/DQ model would build slower than FP16;
    any Q/DQ model asked for fp16 needs --precision int8. All refused with the fix, TensorRT installed or not."""
    cpu = tmp_path / "cpu.int8.onnx"
    proc = run_cli("-q", "calibrate", "--onnx", fp32_onnx, "--out", cpu, "--target", "cpu", "--num-images", "64",
                   "--val-limit", "64", "--timing-seconds", "0.2", "--json", check=True)
    form = json.loads(proc.stdout)["metrics"]["form"]
    expect = "QOperator" if form == "qoperator-u8s8" else "quantized for the CPU"
    proc = run_cli("-q", "build-engine", "--onnx", cpu, "--backend", "tensorrt", "--precision", "int8",
                   "--out", tmp_path / "a.engine")
    assert proc.returncode == 2 and expect in error_line(proc)
    trt = tmp_path / "trt.int8.onnx"
    run_cli("-q", "calibrate", "--onnx", fp32_onnx, "--out", trt, "--target", "tensorrt", "--num-images", "64",
            "--val-limit", "64", check=True)
    proc = run_cli("-q", "build-engine", "--onnx", trt, "--backend", "tensorrt", "--precision", "fp16",
                   "--out", tmp_path / "b.engine")
    assert proc.returncode == 2 and "--precision int8" in error_line(proc)
    assert not list(tmp_path.glob("*.engine"))


def test_tensorrt_older_than_8_5_is_refused_with_the_fix(fp32_onnx, tmp_path):
    """JetPack 5.1's TensorRT 8.5 is the floor; an older one (here a stand-in module reporting 8.4.3, since no
    TensorRT installs on this machine) gets one line naming the version and the way up."""
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "tensorrt.py").write_text("__version__ = '8.4.3.1'\n")
    proc = run_cli("-q", "build-engine", "--onnx", fp32_onnx, "--backend", "tensorrt", "--precision", "fp16",
                   "--out", tmp_path / "x.engine", env={"PYTHONPATH": str(fake)})
    line = error_line(proc)
    assert proc.returncode == 2 and "TensorRT 8.4.3.1 is too old" in line and "JetPack 5.1" in line
