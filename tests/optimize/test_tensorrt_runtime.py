"""The TensorRT runner and its CUDA runtime against stand-ins that keep the state the real ones keep
(tests/fakes/README.md): an execution context's input shape and addresses, engine dtypes, the DLA core, driver
and binding CUDA versions. ``test_tensorrt_backend.py`` checks the names against each TensorRT release."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest

from conftest import error_line, run_main
from optimize.cuda_runtime import CudaRuntime
from optimize.errors import EngineError
from optimize.runners import open_runner
from optimize.timing import interleaved, time_runs

GPU = {"gpu": "NVIDIA Fake GPU", "compute_capability": "9.0"}


def fake_engine(tmp_path, trt, *, profile=(1, 4, 8), input_dtype="float32", output_dtype="float32",
                dla_core=None, name="model.engine"):
    """A fake plan with the manifest build-engine writes beside it."""
    engine = tmp_path / name
    engine.write_bytes(trt.engine_spec(profile=profile, input_dtype=input_dtype, output_dtype=output_dtype,
                                       dla_core=dla_core))
    (tmp_path / f"{name}.json").write_text(json.dumps({
        "stage": "build-engine", "class_names": [str(i) for i in range(10)],
        "engine": {"backend": "tensorrt", "precision": "fp16", "tensorrt": trt.__version__, **GPU,
                   "profile": dict(zip(("min_batch", "opt_batch", "max_batch"), profile)),
                   "flags": {"dla_core": dla_core}}}))
    return engine


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 4, 4)).astype(np.float32)


def test_interleaved_windows_of_several_batch_sizes_each_run_their_own_batch(fake_gpu, tmp_path):
    """The benchmark's rounds: b1, b8 and an end-to-end infer() at b4 take turns on one execution context. Each
    execution must run the rows its window counts (a runner that set the shape once per prepare ran b8's rows in
    the b1 window after the first round)."""
    fakes = fake_gpu()
    runner = open_runner(fake_engine(tmp_path, fakes.trt), device="cuda")
    prepared = {b: runner.prepare(batch(b, seed=b)) for b in (1, 8)}
    e2e = batch(4, seed=4)

    def window(b):
        return lambda seconds: time_runs(lambda: runner.run(prepared[b]), seconds=seconds, warmup=0)

    windows = {"b1": window(1), "b8": window(8),
               "e2e": lambda seconds: time_runs(lambda: runner.infer(e2e), seconds=seconds, warmup=0)}
    fakes.trt.RUNS.clear()
    interleaved(windows, rounds=3, seconds=0.01)
    shapes = [r["shape"][0] for r in fakes.trt.RUNS]
    assert set(shapes) == {1, 4, 8} and len(shapes) > 9
    # every execution ran the input buffer that holds its own batch
    addresses = {r["shape"][0]: set() for r in fakes.trt.RUNS}
    for r in fakes.trt.RUNS:
        addresses[r["shape"][0]].add(r["input_address"])
    assert all(len(a) == 1 for a in addresses.values()) and len(set().union(*addresses.values())) == 3
    # and what it ran is that batch: the fake engine's logits are the first 10 values of each input row
    np.testing.assert_array_equal(runner.infer(batch(8, seed=8)), batch(8, seed=8).reshape(8, -1)[:, :10])
    np.testing.assert_array_equal(runner.infer(e2e), e2e.reshape(4, -1)[:, :10])


def test_an_int8_engines_row_says_what_its_unquantized_layers_ran_in(fake_gpu, tmp_path):
    fakes = fake_gpu()
    engine = fake_engine(tmp_path, fakes.trt)
    manifest = json.loads(engine.with_name("model.engine.json").read_text())
    manifest["engine"].update(precision="int8", unquantized_layers="fp16")
    engine.with_name("model.engine.json").write_text(json.dumps(manifest))
    assert open_runner(engine, device="cuda").label == "tensorrt int8 cuda (unquantized layers fp16)"


def test_copies_only_the_rows_of_the_batch_on_the_runners_own_stream(fake_gpu, tmp_path):
    fakes = fake_gpu()
    runner = open_runner(fake_engine(tmp_path, fakes.trt), device="cuda")
    fakes.cudart.CALLS.clear()
    runner.infer(batch(3))
    stream = runner.execution._handle
    assert fakes.cudart.CALLS == [("HostToDevice", 3 * 48 * 4, stream), ("DeviceToHost", 3 * 10 * 4, stream),
                                  ("sync", stream)]
    assert fakes.trt.RUNS[-1]["stream"] == stream


def test_buffers_take_the_engines_io_dtypes(fake_gpu, tmp_path):
    """An engine built with half-precision I/O (trtexec --inputIOFormats=fp16:chw --outputIOFormats=fp16:chw)
    reads fp16 input; float32 buffers would hand it garbage."""
    fakes = fake_gpu()
    runner = open_runner(fake_engine(tmp_path, fakes.trt, input_dtype="float16", output_dtype="float16"),
                         device="cuda")
    x = batch(5)
    out = runner.infer(x)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x.astype(np.float16).reshape(5, -1)[:, :10].astype(np.float32))
    assert runner.execution.input_spec()[2] == np.float16
    assert runner.execution.run(runner.prepare(x)) == 5


def test_a_dla_engine_is_deserialized_on_its_core(fake_gpu, tmp_path):
    fakes = fake_gpu(trt_version="8.6.2")
    runner = open_runner(fake_engine(tmp_path, fakes.trt, profile=(4, 4, 4), dla_core=1), device="cuda")
    assert runner.execution.runtime.DLA_core == 1
    np.testing.assert_array_equal(runner.infer(batch(2)), batch(2).reshape(2, -1)[:, :10])  # padded to 4 rows
    assert fakes.trt.RUNS[-1]["shape"][0] == 4


def test_no_deprecated_int_of_a_cuda_bindings_13_handle(fake_gpu, tmp_path):
    fakes = fake_gpu(driver=13000, runtime=13000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        runner = open_runner(fake_engine(tmp_path, fakes.trt), device="cuda")
        runner.infer(batch(2))


def test_a_driver_older_than_cuda_python_is_one_line_naming_the_extra(fake_gpu):
    fake_gpu(driver=12040, runtime=13000)  # an R550 server, cuda-python 13 from a plain 'pip install'
    with pytest.raises(EngineError) as info:
        CudaRuntime()
    message = str(info.value)
    assert "CUDA 13.0" in message and "CUDA 12.4" in message and "edgeopt[tensorrt-cu12]" in message
    assert "\n" not in message


def test_pycuda_takes_over_when_cuda_python_does_not_match_the_driver(fake_gpu, caplog):
    fake_gpu(driver=12040, runtime=13000, pycuda=True)
    with caplog.at_level(logging.WARNING, logger="optimize.cuda_runtime"):
        cuda = CudaRuntime()
    assert cuda.kind == "pycuda" and "tensorrt-cu12" in cuda.fallback and "using pycuda" in caplog.text
    assert cuda.device() == GPU
    import pycuda.autoprimaryctx  # noqa: F401 - imported by CudaRuntime: the primary context, not autoinit's

    assert "pycuda.autoinit" not in __import__("sys").modules


def test_a_tensorrt_wheel_for_a_newer_cuda_than_the_driver_is_refused(fake_gpu):
    fake_gpu(driver=12080, runtime=12080, trt_wheel_cu13=True)  # tensorrt-cu13 beside cuda-python 12
    with pytest.raises(EngineError, match=r"TensorRT's pip wheel \(tensorrt-cu13\).*CUDA 12.8.*tensorrt-cu12"):
        CudaRuntime()
    fake_gpu(driver=13000, runtime=12080, trt_wheel_cu13=True)  # a CUDA 13 driver runs both
    assert CudaRuntime().kind == "cuda-python"


def test_build_engine_says_which_extra_matches_the_driver(fake_gpu, exported_onnx, tmp_path):
    """The CLI on a machine whose driver is older than cuda-python's CUDA: one line, exit 2, no engine."""
    fake_gpu(driver=12020, runtime=13000)
    out = tmp_path / "m.engine"
    proc = run_main("-q", "build-engine", "--onnx", exported_onnx, "--backend", "tensorrt", "--precision", "fp32",
                    "--out", out)
    line = error_line(proc)
    assert proc.returncode == 2 and "edgeopt[tensorrt-cu12]" in line and "CUDA 12.2" in line
    assert not out.exists()


def test_the_real_cuda_python_here_reports_no_driver():
    """This machine's cuda-python (torch brings cuda-bindings) without a GPU: a reason, not a crash."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        pytest.skip("cuda-python is not installed here")
    if runtime.cudaDriverGetVersion()[1] > 0:
        pytest.skip("this machine has an NVIDIA driver")
    with pytest.raises(EngineError, match="no NVIDIA driver"):
        CudaRuntime()


def test_qdq_int8_on_dla_before_tensorrt_10_is_refused_before_calibration(fake_gpu, exported_onnx, tmp_path):
    """JetPack 6.0's TensorRT 8.6 runs explicitly quantized INT8 on the GPU only: refused before calibrating."""
    fake_gpu(trt_version="8.6.1")
    out = tmp_path / "m.engine"
    proc = run_main("-q", "build-engine", "--onnx", exported_onnx, "--backend", "tensorrt", "--precision", "int8",
                    "--dla-core", "0", "--min-batch", "8", "--opt-batch", "8", "--max-batch", "8",
                    "--calib-data", "fashion-mnist", "--out", out)
    line = error_line(proc)
    assert proc.returncode == 2 and "TensorRT 8.6" in line and "DLA takes it from TensorRT 10.0" in line
    assert not list(tmp_path.iterdir())  # no engine, no calibration cache: nothing ran


def test_dla_placement_is_read_from_the_built_engine():
    """The engine inspector's layers of a DLA build (as trtexec's profile names them): DLA subgraphs are
    ForeignNodes between copies to and from DLA memory; the rest ran on the GPU."""
    from optimize.tensorrt_backend import dla_placement

    info = json.dumps({"Layers": ["input to nvm", "{ForeignNode[/conv1/Conv.../layer4/layer4.1/relu_1/Relu]}",
                                  "/avgpool/GlobalAveragePool", "Reformatting CopyNode for Input Tensor 0 to fc",
                                  {"Name": "fc", "LayerType": "Gemm"}, "logits from nvm", "logits copy finish"],
                       "Bindings": ["input", "logits"]})
    found = dla_placement(info)
    assert (found["dla_subgraphs"], found["gpu_layers"]) == (1, 2)
    assert found["gpu_layer_names"] == ["/avgpool/GlobalAveragePool", "fc"]


def test_the_bundle_runner_reads_tensorrts_wheel_as_the_cuda_runtime_does(fake_gpu):
    """runner.py must stay torch- and edgeopt-free, so it keeps its own copy of the wheel lookup: the two agree."""
    import importlib.util

    from optimize import cuda_runtime
    from optimize.package import TEMPLATES

    spec = importlib.util.spec_from_file_location("bundle_runner_copy", TEMPLATES / "runner.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    assert runner.tensorrt_wheel_cuda() == cuda_runtime.tensorrt_wheel_cuda()  # no wheel here: both None
    fake_gpu(trt_wheel_cu13=True)
    assert runner.tensorrt_wheel_cuda() == cuda_runtime.tensorrt_wheel_cuda() == 13
