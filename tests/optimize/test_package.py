"""package: the deployment bundle, its torch-free runner, build_engine.sh and the Triton repository."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

import cli
from optimize import calibrate
from conftest import device_python, fashion_arrays, run_cli
from optimize import package
from optimize.data import FASHION_MNIST_CLASSES
from optimize.artifacts import sha256_file
from optimize.errors import ConfigError, OutputError
from optimize.preprocess import Preprocessing, fashion_mnist_preset, folder_preset, load_image
from optimize.onnx_model import OnnxModel

ONNX_BUNDLE_FILES = {"bundle.json", "build_engine.sh", "labels.txt", "model.onnx", "model.onnx.json",
                     "preprocess.json", "requirements.txt", "runner.py", "model_repository/model/config.pbtxt",
                     "model_repository/model/labels.txt", "model_repository/model/1/model.onnx"}
# What runner.py may import: the standard library it uses, numpy, Pillow and one inference backend.
RUNNER_IMPORTS = {"__future__", "argparse", "ctypes", "importlib", "json", "pathlib", "platform", "subprocess", "sys",
                  "time", "numpy", "PIL", "onnxruntime", "openvino", "tensorrt", "cuda", "pycuda"}


@pytest.fixture(scope="module")
def bundle(exported_onnx, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "bundle"
    proc = run_cli("-q", "package", "--model", exported_onnx, "--out", out, "--json", check=True)
    assert json.loads(proc.stdout)["bundle"] == json.loads((out / "bundle.json").read_text())
    return out


@pytest.fixture(scope="module")
def runner(bundle):
    """The bundle's runner.py imported as a module (it needs numpy and Pillow only)."""
    spec = importlib.util.spec_from_file_location("bundle_runner", bundle / "runner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundle_files_and_manifest(bundle, exported_onnx):
    files = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()}
    check = {f for f in files if f.startswith("check/")}
    assert files - check == ONNX_BUNDLE_FILES
    assert {"check/reference.json", "check/logits.npy", "check/tensors.npy"} <= check
    assert len([f for f in check if f.startswith("check/images/")]) == 256
    acceptance = json.loads((bundle / "bundle.json").read_text())["acceptance_set"]
    assert acceptance["images"] == 256 and acceptance["encoding"] == "png" and acceptance["bytes"] < 1_000_000
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert set(manifest["files"]) == files - {"bundle.json"}
    assert all(sha256_file(bundle / f) == m["sha256"] for f, m in manifest["files"].items())
    assert manifest["source"]["sha256"] == sha256_file(exported_onnx)
    assert manifest["precision"] == "fp32" and manifest["qdq"] is False
    assert (bundle / "labels.txt").read_text().splitlines()[9] == "Ankle boot"
    assert json.loads((bundle / "preprocess.json").read_text())["image_size"] == 16
    assert (bundle / "runner.py").read_bytes() == (package.TEMPLATES / "runner.py").read_bytes()
    assert os.access(bundle / "build_engine.sh", os.X_OK)
    assert not list(bundle.parent.glob(".bundle.*"))  # the temporary folder was renamed into place


def test_runner_imports_neither_torch_nor_edgeopt(bundle):
    tree = ast.parse((bundle / "runner.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= RUNNER_IMPORTS, imported - RUNNER_IMPORTS


def triton_model_config():
    """Triton's ModelConfig message limited to the fields a bundle writes; names, numbers and the DataType enum
    as in Triton's model_config.proto, so that text_format.Parse checks every field name and enum value."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="model_config_subset.proto", package="inference",
                                               syntax="proto3")
    data_type = proto.enum_type.add(name="DataType")
    for number, name in enumerate(["INVALID", "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                                   "INT32", "INT64", "FP16", "FP32", "FP64", "STRING", "BF16"]):
        data_type.value.add(name=f"TYPE_{name}", number=number)
    messages = {
        "ModelInput": [("name", 1, field.TYPE_STRING, None), ("data_type", 2, field.TYPE_ENUM, "DataType"),
                       ("dims", 4, field.TYPE_INT64, "repeated")],
        "ModelOutput": [("name", 1, field.TYPE_STRING, None), ("data_type", 2, field.TYPE_ENUM, "DataType"),
                        ("dims", 3, field.TYPE_INT64, "repeated"), ("label_filename", 4, field.TYPE_STRING, None)],
        "ModelDynamicBatching": [("preferred_batch_size", 1, field.TYPE_INT32, "repeated"),
                                 ("max_queue_delay_microseconds", 2, field.TYPE_UINT64, None)],
        "ModelConfig": [("name", 1, field.TYPE_STRING, None), ("platform", 2, field.TYPE_STRING, None),
                        ("max_batch_size", 4, field.TYPE_INT32, None),
                        ("input", 5, field.TYPE_MESSAGE, "repeated ModelInput"),
                        ("output", 6, field.TYPE_MESSAGE, "repeated ModelOutput"),
                        ("dynamic_batching", 11, field.TYPE_MESSAGE, "ModelDynamicBatching")],
    }
    for message, fields in messages.items():
        m = proto.message_type.add(name=message)
        for name, number, kind, spec in fields:
            words = (spec or "").split()
            f = m.field.add(name=name, number=number, type=kind,
                            label=field.LABEL_REPEATED if "repeated" in words else field.LABEL_OPTIONAL)
            if kind in (field.TYPE_ENUM, field.TYPE_MESSAGE):
                f.type_name = ".inference." + words[-1]
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def parse_triton_config(path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), triton_model_config()())


def test_triton_config_parses_with_the_model_dims(bundle):
    config = parse_triton_config(bundle / "model_repository/model/config.pbtxt")
    assert (config.name, config.platform, config.max_batch_size) == ("model", "onnxruntime_onnx", 64)
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [3, 16, 16])]
    assert [(o.name, list(o.dims), o.label_filename) for o in config.output] == [("logits", [10], "labels.txt")]
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 64]
    model = onnx.load(str(bundle / "model_repository/model/1/model.onnx"), load_external_data=False)
    assert model.graph.input[0].name == "input" and model.graph.output[0].name == "logits"


def odd_images() -> dict[str, Image.Image]:
    """Every mode edgeopt converts, in non-square sizes whose resize and crop round differently."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (29, 17), dtype=np.uint8)
    return {
        "L": Image.fromarray(gray, "L"), "RGB": Image.fromarray(rgb, "RGB"),
        "RGBA": Image.fromarray(rng.integers(0, 256, (31, 20, 4), dtype=np.uint8), "RGBA"),
        "LA": Image.fromarray(gray, "L").convert("LA"), "P": Image.fromarray(rgb, "RGB").convert("P"),
        "CMYK": Image.fromarray(rgb, "RGB").convert("CMYK"), "YCbCr": Image.fromarray(rgb, "RGB").convert("YCbCr"),
        "1": Image.fromarray(gray, "L").convert("1"),
        "I;16": Image.fromarray(rng.integers(0, 65536, (22, 30), dtype=np.uint16)),
        "I": Image.fromarray(rng.integers(0, 4096, (25, 26)).astype(np.int32), "I"),
        "F": Image.fromarray(rng.random((19, 28), dtype=np.float32), "F"),
        "tiny RGB": Image.fromarray(rgb[:5, :9], "RGB"),
    }


@pytest.mark.parametrize("preprocessing", [
    fashion_mnist_preset(image_size=16),
    folder_preset(image_size=20),  # resize to 23, crop 20: odd margins
    Preprocessing(image_size=16, resize_size=19, interpolation="bicubic"),
    Preprocessing(image_size=12, resize_size=14, interpolation="nearest"),
], ids=["fashion-16", "folder-20", "bicubic-19-16", "nearest-14-12"])
def test_runner_preprocessing_gives_our_tensor(runner, preprocessing):
    spec = json.loads(json.dumps(preprocessing.to_dict()))  # as preprocess.json holds it
    transform = preprocessing.eval_transform()
    for mode, img in odd_images().items():
        ours = transform(img).numpy()
        np.testing.assert_allclose(runner.preprocess(img, spec), ours, atol=1e-6, rtol=0, err_msg=mode)


def test_runner_loads_files_as_we_do(runner, tmp_path):
    """EXIF orientation and file decoding: the runner's load_image is ours."""
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 33, 3), dtype=np.uint8)).save(path, exif=exif)
    ours, theirs = load_image(path), runner.load_image(path)
    assert ours.size == theirs.size == (20, 33)
    np.testing.assert_array_equal(np.asarray(theirs), np.asarray(ours))


@pytest.fixture(scope="module")
def bundle_python(bundle, tmp_path_factory) -> Path:
    """A fresh venv holding only the bundle's requirements.txt (no torch, no edgeopt): the device's Python."""
    python = device_python(bundle / "requirements.txt", tmp_path_factory.mktemp("device"))
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    return python


def on_device(python: Path, folder: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    """``runner.py ARGS`` of ``folder`` with the device's Python."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([python, folder / "runner.py", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_runner_in_a_fresh_venv_without_torch_matches_infer(bundle, bundle_python, exported_onnx, tmp_path, capsys):
    python = bundle_python

    pixels, _ = fashion_arrays("val")
    images = [tmp_path / f"{i}.png" for i in range(4)]
    for i, path in enumerate(images[:3]):
        Image.fromarray(pixels[i], "L").save(path)
    Image.fromarray(np.stack([pixels[3][:, :20]] * 3, axis=-1), "RGB").convert("RGBA").save(images[3])
    proc = on_device(python, bundle, *images, "--top-k", "3", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    theirs = json.loads(proc.stdout)

    assert cli.main(["-q", "infer", "--model", str(exported_onnx), *map(str, images), "--top-k", "3", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in theirs] == [r["image"] for r in ours] == list(map(str, images))
    for a, b in zip(theirs, ours):
        assert [(c["index"], c["class"]) for c in a["top_k"]] == [(c["index"], c["class"]) for c in b["top_k"]]
        np.testing.assert_allclose([c["probability"] for c in a["top_k"]],
                                   [c["probability"] for c in b["top_k"]], atol=1e-6)


# -- runner.py --check: the acceptance set on the device ---------------------------------------------------

CHECK_FAST = ("--seconds", "0.05", "--rounds", "2")


def test_check_passes_on_the_bundle_it_came_with(bundle, bundle_python, tmp_path):
    proc = on_device(bundle_python, bundle, "--check", *CHECK_FAST, "--out", tmp_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["verdict"] == {"passed": True, "problems": []} and result["images"] == 256
    assert result["agreement_with_host"] == 1.0 and result["top1"] == result["host_top1"]
    assert result["logit_diff"]["max"] < 1e-4  # the same ONNX on the same runtime, through Pillow + numpy
    assert result["preprocessing_max_diff"] <= result["preprocessing_tolerance"]
    speed = result["speed"]
    assert set(speed["throughput"]) == {"1", "8", "32"} and speed["latency_ms_b1"]["p50"] > 0
    assert all(t["low"] <= t["median"] <= t["high"] for t in speed["throughput"].values())
    assert result["device"]["runtime"].startswith("onnxruntime") and "Device check: passed" in proc.stdout
    assert (tmp_path / "check.md").read_text().startswith("# Device check: passed")


def test_check_fails_on_another_model_with_the_same_classes(bundle, bundle_python, tmp_path):
    """Another model (same input, same ten classes: the bundle's with its classifier weights redrawn) is not
    what the host measured: exit 1 and the reason."""
    other = onnx.load(str(bundle / "model.onnx"))
    head = next(n for n in other.graph.node if n.op_type == "Gemm")
    weights = next(i for i in other.graph.initializer if i.name == head.input[1])
    drawn = np.random.default_rng(7).standard_normal(tuple(weights.dims)).astype(np.float32)
    weights.CopyFrom(onnx.numpy_helper.from_array(drawn * 0.1, weights.name))
    onnx.save(other, str(tmp_path / "other.onnx"))
    proc = on_device(bundle_python, bundle, "--check", "--model", tmp_path / "other.onnx", *CHECK_FAST, "--out",
                     tmp_path, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "check.json").read_text())
    assert not result["verdict"]["passed"] and result["agreement_with_host"] < 0.9
    assert "not the model the host measured" in proc.stdout


def test_check_fails_when_the_preprocessing_is_altered(bundle, bundle_python, tmp_path):
    altered = tmp_path / "bundle"
    shutil.copytree(bundle, altered, ignore=shutil.ignore_patterns("model_repository"))
    spec = json.loads((altered / "preprocess.json").read_text())
    spec["mean"] = [0.5, 0.5, 0.5]  # an edit on the device, or a bundle from another run
    (altered / "preprocess.json").write_text(json.dumps(spec))
    proc = on_device(bundle_python, altered, "--check", *CHECK_FAST, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "preprocessing differs from the host's" in (altered / "check.md").read_text()


def test_check_runs_a_tensorrt_plan_through_the_same_face(bundle, fake_gpu, tmp_path):
    """--check on model.plan (the stand-in TensorRT, whose engine answers the first ten input values instead of
    the model's logits): the plan is run, timed and described, and, not being the host's model, fails."""
    fakes = fake_gpu(trt_version="10.3.0")
    folder = tmp_path / "bundle"
    shutil.copytree(bundle, folder, ignore=shutil.ignore_patterns("model_repository", "model.onnx"))
    (folder / "model.plan").write_bytes(fakes.trt.engine_spec(chw=(3, 16, 16), profile=(1, 8, 32)))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}, **fakes.env()}
    proc = subprocess.run([sys.executable, folder / "runner.py", "--check", *CHECK_FAST], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads((folder / "check.json").read_text())
    assert result["backend"] == "tensorrt" and result["model"] == "model.plan"
    assert result["device"]["gpu"] == "NVIDIA Fake GPU" and result["device"]["runtime"] == "tensorrt 10.3.0"
    assert set(result["speed"]["throughput"]) == {"1", "8", "32"}
    assert "not the model the host measured" in " ".join(result["verdict"]["problems"])


def test_check_without_an_acceptance_set_says_so(exported_onnx, tmp_path):
    out = tmp_path / "bare"
    package.run(package.PackageConfig(model=str(exported_onnx), out=str(out), check_images=0))
    assert not (out / "check").exists() and json.loads((out / "bundle.json").read_text())["acceptance_set"] is None
    proc = subprocess.run([sys.executable, out / "runner.py", "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: this bundle has no readable acceptance set")


# -- runner.py's TensorRT path, with stand-ins for tensorrt and cuda-python ---------------------------------

def test_the_tensorrt_floor_is_one_fact(bundle, runner):
    """runner.py keeps a copy (it runs without edgeopt); build_engine.sh is rendered from it: all three agree."""
    from optimize.tensorrt_backend import MIN_VERSION

    assert runner.MIN_TENSORRT == MIN_VERSION
    script = (bundle / "build_engine.sh").read_text()
    assert f'[ "$major" -lt {MIN_VERSION[0]} ] || {{ [ "$major" = {MIN_VERSION[0]} ] && [ "$minor" -lt ' \
           f'{MIN_VERSION[1]} ]; }}' in script


def test_runner_refuses_tensorrt_before_8_5(bundle, runner, tmp_path):
    runner.check_tensorrt("8.5.2.2")
    runner.check_tensorrt("10.3.0")
    with pytest.raises(runner.RunnerError, match="TensorRT 8.4.3.1 is too old.*8.5 or later.*JetPack 5.1"):
        runner.check_tensorrt("8.4.3.1")
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.py").write_text('__version__ = "8.4.3.1"\n')
    (tmp_path / "model.plan").write_bytes(b"engine")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, bundle / "runner.py", tmp_path / "x.png", "--model",
                           tmp_path / "model.plan"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: TensorRT 8.4.3.1 is too old"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_runner_tensorrt_copies_only_the_batch_on_its_own_stream(runner, fake_gpu, tmp_path):
    fakes = fake_gpu(trt_version="8.5.2.2")
    (tmp_path / "model.plan").write_bytes(fakes.trt.engine_spec(profile=(2, 4, 8)))
    model = runner.TensorRTModel(tmp_path / "model.plan")
    assert (model.min_batch, model.max_batch) == (2, 8)
    batch = np.random.default_rng(0).standard_normal((3, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(model.infer(batch), batch.reshape(3, 48)[:, :10])
    np.testing.assert_array_equal(model.infer(batch[:1]), batch[:1].reshape(1, 48)[:, :10])  # padded to 2 rows
    stream = model.cuda.handle(model.stream)
    assert [(r["stream"], r["shape"][0]) for r in fakes.trt.RUNS] == [(stream, 3), (stream, 2)]
    assert fakes.cudart.CALLS == [("HostToDevice", 3 * 192, stream), ("DeviceToHost", 3 * 40, stream),
                                  ("sync", stream), ("HostToDevice", 2 * 192, stream), ("DeviceToHost", 2 * 40, stream),
                                  ("sync", stream)]
    fakes.cudart.cudaStreamSynchronize = lambda stream: (fakes.cudart.cudaError_t.cudaErrorIllegalAddress,)
    with pytest.raises(runner.RunnerError, match="CUDA call failed: cudaErrorIllegalAddress"):
        model.infer(batch)


def test_runner_tensorrt_reads_the_engines_dtypes_and_dla_core(runner, fake_gpu, tmp_path):
    """fp16 I/O (trtexec --inputIOFormats=fp16:chw) and a DLA engine, whose core the runtime must know first."""
    fakes = fake_gpu(trt_version="8.6.2")
    plan = tmp_path / "model.plan"
    plan.write_bytes(fakes.trt.engine_spec(profile=(4, 4, 4), input_dtype="float16", output_dtype="float16",
                                           dla_core=1))
    with pytest.raises(runner.RunnerError, match="does not load"):  # no manifest naming the core
        runner.TensorRTModel(plan)
    (tmp_path / "model.plan.json").write_text(json.dumps({"engine": {"tensorrt": "8.6.2", "flags": {"dla_core": 1}}}))
    model = runner.TensorRTModel(plan)
    x = np.random.default_rng(1).standard_normal((3, 3, 4, 4)).astype(np.float32)
    out = model.infer(x)
    assert out.dtype == np.float32 and fakes.trt.RUNS[-1]["shape"][0] == 4
    np.testing.assert_array_equal(out, x.astype(np.float16).reshape(3, 48)[:, :10].astype(np.float32))


@pytest.mark.parametrize("recorded, message", [
    ({"tensorrt": "10.3.0", "gpu": "NVIDIA Fake GPU", "compute_capability": "9.0"}, None),  # trtexec: 3 parts
    ({"tensorrt": "10.3.0", "gpu": "NVIDIA Fake GPU (nvgpu)", "compute_capability": "9.0"}, None),  # nvidia-smi's
    ({"tensorrt": "8.6.1", "gpu": "NVIDIA Fake GPU"}, "built by TensorRT 8.6.1, this device has 10.3.0.26"),
    ({"tensorrt": "10.3.0.26", "gpu": "Orin", "compute_capability": "8.7"},
     r"built on a Orin \(compute capability 8.7\), this device is a NVIDIA Fake GPU \(9.0\)"),
])
def test_runner_checks_the_plans_manifest_before_loading(runner, fake_gpu, tmp_path, recorded, message):
    fakes = fake_gpu(trt_version="10.3.0.26")
    (tmp_path / "model.plan").write_bytes(fakes.trt.engine_spec())
    (tmp_path / "model.plan.json").write_text(json.dumps({"engine": recorded}))
    if message is None:
        assert runner.TensorRTModel(tmp_path / "model.plan").max_batch == 8
        return
    with pytest.raises(runner.RunnerError, match=message + ".*build_engine.sh"):
        runner.TensorRTModel(tmp_path / "model.plan")


@pytest.mark.parametrize("driver, runtime, pycuda, wheel, expect", [
    # JetPack 6 (CUDA 12.6) with cuda-python 13 from a plain pip install: one line naming the install, exit 2
    (12060, 13000, False, False, "CUDA 13.0 but this driver supports CUDA 12.6: pip install 'cuda-python>=12.0,<13'"),
    (12060, 13000, True, False, None),  # pycuda installed: it runs the plan instead (a note on stderr)
    # an R550 server with cuda-python 12 but TensorRT's CUDA 13 wheel
    (12040, 12040, False, True, "TensorRT's pip wheel is built for CUDA 13, but this driver supports CUDA 12.4: "
                                "pip install tensorrt-cu12"),
])
def test_runner_with_a_driver_older_than_its_cuda_packages(bundle, fake_gpu, tmp_path, driver, runtime, pycuda,
                                                            wheel, expect):
    fakes = fake_gpu(trt_version="10.3.0", driver=driver, runtime=runtime, pycuda=pycuda, trt_wheel_cu13=wheel)
    (tmp_path / "model.plan").write_bytes(fakes.trt.engine_spec(chw=(3, 16, 16)))
    Image.new("RGB", (20, 16)).save(tmp_path / "x.png")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}, **fakes.env()}
    proc = subprocess.run([sys.executable, bundle / "runner.py", tmp_path / "x.png", "--model",
                           tmp_path / "model.plan"], env=env, capture_output=True, text=True, timeout=60)
    if expect:
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert expect in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    assert "using pycuda" in proc.stderr and "x.png" in proc.stdout


@pytest.mark.parametrize("version", ["8.5", "10.16", "11.1"])
def test_runner_uses_only_tensorrt_names_of_each_version(version):
    """Every ``trt.*`` name and engine, context and runtime method runner.py uses is in that version's bindings
    (the names read from NVIDIA's sources and wheels by tests/fixtures/extract_tensorrt_api.py)."""
    fixture = Path(__file__).parents[1] / "fixtures" / f"tensorrt_{version}_api.json"
    assert fixture.is_file(), f"{fixture.name} is missing: extract it with tests/fixtures/extract_tensorrt_api.py"
    api = json.loads(fixture.read_text())

    def members(name: str) -> set[str]:
        names = set(api["classes"].get(name, [])) | set(api["enums"].get(name, []))
        return names.union(*(members(base) for base in api["bases"].get(name, [])))

    objects = {"self.engine": "ICudaEngine", "self.context": "IExecutionContext", "runtime": "Runtime"}
    module = set(api["classes"]) | set(api["enums"]) | set(api["functions"]) | set(api["python"])
    used = set()
    for node in ast.walk(ast.parse((package.TEMPLATES / "runner.py").read_text())):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "trt":
            assert node.attr in module, f"trt.{node.attr} is not in TensorRT {version}"
        elif isinstance(node, ast.Attribute) and ast.unparse(node.value) in objects:
            used.add((objects[ast.unparse(node.value)], node.attr))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and ast.unparse(node.value.value) == "trt":
            used.add((node.value.attr, node.attr))
    assert {("Runtime", "deserialize_cuda_engine"), ("ICudaEngine", "num_io_tensors"),
            ("IExecutionContext", "execute_async_v3"), ("Logger", "WARNING"), ("TensorIOMode", "INPUT")} <= used
    assert {(cls, attr) for cls, attr in used if attr not in members(cls)} == set()

# -- build_engine.sh with a stand-in trtexec ---------------------------------------------------------------

FAKE_TRTEXEC = """#!/bin/sh
if [ "$1" = "--help" ]; then
  echo "&&&& RUNNING TensorRT.trtexec [TensorRT v$FAKE_TRT_VERSION] # trtexec --help"
  exit 0
fi
printf '%s\\n' "$@" > "$FAKE_TRT_ARGS"
for a in "$@"; do case "$a" in --saveEngine=*) printf plan > "${a#--saveEngine=}";; esac; done
"""


def build_engine(bundle: Path, version: str, *args: str, tmp_path: Path, out: Path | None = None,
                 trtexec: str | None = None, gpu: str | None = None, **env_vars: str):
    """Run the bundle's build_engine.sh with a fake trtexec claiming TensorRT ``version`` (or ``trtexec``) and,
    with ``gpu``, a fake nvidia-smi printing it (else none); ``env_vars`` (DLA_CORE, MIN_BATCH...) go to its
    environment (CHECK=1 and CHECK_PYTHON to try the acceptance check). Returns the process and the arguments
    trtexec got (None when it was not run)."""
    fake = tmp_path / "trtexec"
    fake.write_text(FAKE_TRTEXEC)
    fake.chmod(0o755)
    record = tmp_path / "trtexec.args"
    record.unlink(missing_ok=True)
    env = {**os.environ, "TRTEXEC": trtexec or str(fake), "FAKE_TRT_VERSION": version, "FAKE_TRT_ARGS": str(record),
           "NVIDIA_SMI": "", "CHECK": "0", **env_vars}  # a fake plan runs nowhere: the check is tested on its own
    if gpu is not None:
        smi = tmp_path / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\nprintf '%s\\n' '{gpu}'\n")
        smi.chmod(0o755)
        env["NVIDIA_SMI"] = str(smi)
    if out is not None:
        env["OUT"] = str(out)
    proc = subprocess.run(["bash", bundle / "build_engine.sh", *args], env=env, capture_output=True, text=True)
    return proc, record.read_text().splitlines() if record.exists() else None


PRECISION_FLAGS = {"--fp16", "--int8", "--stronglyTyped"}


@pytest.fixture(scope="module")
def bundle_fp16(exported_onnx, tmp_path_factory) -> Path:
    """The FP32 model packaged for fp16: with model.fp16.onnx, what strongly typed TensorRT builds fp16 from."""
    out = tmp_path_factory.mktemp("dist16") / "bundle"
    run_cli("-q", "package", "--model", exported_onnx, "--out", out, "--precision", "fp16", check=True)
    assert (out / "model.fp16.onnx").is_file()
    return out


@pytest.mark.parametrize("version, precision, expect, onnx_file", [
    ("8502", "fp32", [], "model.onnx"),                       # JetPack 5.1
    ("8601", "fp16", ["--fp16"], "model.onnx"),
    ("100300", "fp16", ["--fp16"], "model.onnx"),             # JetPack 6: builder flags up to 10.11
    ("101200", "fp16", ["--stronglyTyped"], "model.fp16.onnx"),  # 10.12+: strongly typed, the flags deprecated
    ("101200", "fp32", ["--stronglyTyped"], "model.onnx"),
    ("110400", "fp16", [], "model.fp16.onnx"),                # strongly typed only: --stronglyTyped is a no-op
    ("110400", "fp32", [], "model.onnx"),
])
def test_build_engine_sh_flags(bundle_fp16, tmp_path, version, precision, expect, onnx_file):
    proc, args = build_engine(bundle_fp16, version, precision, tmp_path=tmp_path, out=tmp_path / "model.plan")
    assert proc.returncode == 0, proc.stderr
    assert {f"--onnx={onnx_file}", f"--saveEngine={tmp_path / 'model.plan'}", "--minShapes=input:1x3x16x16",
            "--optShapes=input:8x3x16x16", "--maxShapes=input:64x3x16x16",
            "--memPoolSize=workspace:2048"} <= set(args)
    assert PRECISION_FLAGS & set(args) == set(expect)
    assert not [a for a in args if a.startswith("--timingCacheFile")]  # no nvidia-smi: no cache


def test_build_engine_sh_fp16_on_a_strongly_typed_tensorrt_needs_the_fp16_onnx(bundle, tmp_path):
    proc, args = build_engine(bundle, "110400", "fp16", tmp_path=tmp_path, out=tmp_path / "model.plan")
    assert proc.returncode == 2 and "model.fp16.onnx is not in this bundle" in proc.stderr and args is None


def test_build_engine_sh_names_the_timing_cache_after_the_gpu(bundle, tmp_path):
    """A timing cache must not travel between devices: its name carries the GPU, compute capability, TensorRT."""
    _, args = build_engine(bundle, "100300", "fp16", tmp_path=tmp_path, out=tmp_path / "model.plan",
                           gpu="NVIDIA GeForce RTX 4090, 8.9")
    assert "--timingCacheFile=timing.NVIDIA_GeForce_RTX_4090_8.9.trt100300.cache" in args
    _, args = build_engine(bundle, "100300", "fp16", tmp_path=tmp_path, out=tmp_path / "model.plan", gpu="")
    assert not [a for a in args if a.startswith("--timingCacheFile")]  # nvidia-smi printed nothing


FAKE_CHECK = """#!/bin/sh
# stands in for 'python3 runner.py --check --model PLAN --out DIR': the verdict of $FAKE_CHECK_PASSED
printf '{"verdict": {"passed": %s, "problems": []}}' "$FAKE_CHECK_PASSED" > check.json
printf '# Device check: %s\\n' "$FAKE_CHECK_PASSED" > check.md
[ "$FAKE_CHECK_PASSED" = true ]
"""


@pytest.mark.parametrize("passed", [True, False])
def test_build_engine_sh_installs_only_a_plan_that_passes_the_check(bundle_fp16, tmp_path, passed):
    """A plan that loses the host's accuracy is kept aside as model.plan.rejected with the reason; Triton's plan
    stays; exit 1. One that passes is installed, its manifest saying it was checked."""
    fake = tmp_path / "check-python"
    fake.write_text(FAKE_CHECK)
    fake.chmod(0o755)
    triton = bundle_fp16 / "model_repository/model/1/model.plan"
    for leftover in ("model.plan", "model.plan.json", "model.plan.rejected", "model.plan.rejected.json",
                     "model.plan.rejected.reason", "check.json", "check.md"):
        (bundle_fp16 / leftover).unlink(missing_ok=True)
    proc, args = build_engine(bundle_fp16, "100300", "fp16", tmp_path=tmp_path, CHECK="1", CHECK_PYTHON=str(fake),
                              FAKE_CHECK_PASSED="true" if passed else "false")
    assert args is not None  # trtexec ran
    if passed:
        assert proc.returncode == 0, proc.stderr
        assert json.loads((bundle_fp16 / "model.plan.json").read_text())["check"] == "passed"
        assert (bundle_fp16 / "model.plan").is_file() and not (bundle_fp16 / "model.plan.rejected").exists()
        return
    assert proc.returncode == 1 and "failed the acceptance check" in proc.stderr
    assert not (bundle_fp16 / "model.plan").exists() and not (bundle_fp16 / "model.plan.json").exists()
    assert (bundle_fp16 / "model.plan.rejected").read_bytes() == b"plan"
    assert json.loads((bundle_fp16 / "model.plan.rejected.json").read_text())["check"] == "failed"
    assert (bundle_fp16 / "model.plan.rejected.reason").read_text().startswith("# Device check: false")
    assert not triton.exists()  # an ONNX bundle: Triton runs model.onnx and got no plan


def test_build_engine_sh_without_a_verdict_installs_unchecked(bundle_fp16, tmp_path):
    """A Python that cannot run runner.py (no numpy on the device) gives no verdict: installed, said unchecked."""
    proc, _ = build_engine(bundle_fp16, "100300", "fp16", tmp_path=tmp_path, CHECK="1", CHECK_PYTHON="false")
    assert proc.returncode == 0 and "installed unchecked" in proc.stderr
    assert json.loads((bundle_fp16 / "model.plan.json").read_text())["check"] == "not run"
    for leftover in ("model.plan", "model.plan.json"):
        (bundle_fp16 / leftover).unlink()


@pytest.mark.parametrize("version, precision, trtexec, message", [
    ("8401", "fp32", None, "TensorRT 8.4 found; 8.5 or later is needed: JetPack 5.1 or later"),
    ("7203", "fp16", None, "TensorRT 7.2 found"),
    ("110400", "fp16", None, "model.fp16.onnx is not in this bundle"),  # strongly typed: FP16 must be in the ONNX
    ("100300", "int8", None, "Q/DQ"),                                    # no INT8 from a float ONNX without scales
    ("100300", "fp8", None, "precision must be"),
    ("100300", "fp32", "/nonexistent/trtexec", "trtexec not found"),
])
def test_build_engine_sh_refuses(bundle, tmp_path, version, precision, trtexec, message):
    proc, args = build_engine(bundle, version, precision, tmp_path=tmp_path, out=tmp_path / "model.plan",
                              trtexec=trtexec)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert args is None and not (tmp_path / "model.plan").exists()


@pytest.mark.parametrize("precision, env, message", [
    ("fp32", {"MIN_BATCH": "8", "OPT_BATCH": "8", "MAX_BATCH": "8"}, "DLA has no FP32"),
    ("fp16", {}, "DLA needs a static batch: MIN_BATCH, OPT_BATCH and MAX_BATCH equal (got 1/8/64)"),
    ("fp16", {"MIN_BATCH": "8", "OPT_BATCH": "8", "MAX_BATCH": "16"}, "(got 8/8/16)"),
])
def test_build_engine_sh_refuses_what_dla_cannot_run(bundle, tmp_path, precision, env, message):
    proc, args = build_engine(bundle, "8502", precision, tmp_path=tmp_path, DLA_CORE="0", **env)
    assert proc.returncode == 2 and message in proc.stderr and "DLA_CORE=" in proc.stderr, proc.stderr
    assert args is None


def test_build_engine_sh_builds_for_dla(bundle, tmp_path):
    proc, args = build_engine(bundle, "8502", "fp16", tmp_path=tmp_path, out=tmp_path / "model.plan", DLA_CORE="1",
                              MIN_BATCH="4", OPT_BATCH="4", MAX_BATCH="4")
    assert proc.returncode == 0, proc.stderr
    assert {"--useDLACore=1", "--allowGPUFallback", "--fp16", "--maxShapes=input:4x3x16x16"} <= set(args)


def fake_engine(tmp_path: Path, onnx_path: Path, precision: str = "fp16", batches: tuple[int, int, int] = (1, 4, 16),
                dla_core: int | None = None) -> Path:
    """An engine file with the manifest build-engine writes (packaging reads the manifest, never the plan), and
    the timing cache its build used (which no bundle may ship)."""
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"serialized engine")
    (tmp_path / "timing.cache").write_bytes(b"this GPU's timings")
    (tmp_path / "model.engine.json").write_text(json.dumps({
        "stage": "build-engine",
        "config": {"workspace": "1G", "calib_method": "entropy", "timing_cache": str(tmp_path / "timing.cache")},
        "inputs": {"onnx": {"path": str(onnx_path), "sha256": sha256_file(onnx_path)}},
        "engine": {"backend": "tensorrt", "precision": precision, "tensorrt": "10.3.0", "gpu": "Orin",
                   "profile": dict(zip(("min_batch", "opt_batch", "max_batch"), batches)),
                   "flags": {"sparse_weights": False, "dla_core": dla_core}}}))
    return engine


def test_package_an_engine(exported_onnx, tmp_path):
    engine = fake_engine(tmp_path, exported_onnx)
    out = tmp_path / "bundle"
    artifact = package.run(package.PackageConfig(model=str(engine), out=str(out)))
    assert artifact.path == out and artifact.manifest["precision"] == "fp16"
    assert {"model.plan", "model.plan.json", "model.fp16.onnx", "model_repository/model/1/model.plan"} <= set(
        artifact.manifest["files"])
    assert not [f for f in artifact.manifest["files"] if "cache" in f]  # timing caches stay with their GPU
    fp16 = onnx.load(str(out / "model.fp16.onnx"))
    assert any(t.data_type == TensorProto.FLOAT16 for t in fp16.graph.initializer)
    assert fp16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # I/O stays float32
    config = parse_triton_config(out / "model_repository/model/config.pbtxt")
    assert (config.platform, config.max_batch_size) == ("tensorrt_plan", 16)
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]
    assert "built by the TensorRT version of the Triton container" in (
        out / "model_repository/model/config.pbtxt").read_text()

    proc, args = build_engine(out, "110400", tmp_path=tmp_path)  # TensorRT 11: FP16 ONNX, no precision flag
    assert proc.returncode == 0, proc.stderr
    assert {"--onnx=model.fp16.onnx", "--maxShapes=input:16x3x16x16",
            "--memPoolSize=workspace:1024"} <= set(args) and not PRECISION_FLAGS & set(args)
    assert (out / "model_repository/model/1/model.plan").read_bytes() == b"plan"  # Triton gets the new engine
    assert "Triton loads it only if its own TensorRT is 11.4" in proc.stdout
    proc, args = build_engine(out, "100300", tmp_path=tmp_path)
    assert proc.returncode == 0 and {"--onnx=model.onnx", "--fp16"} <= set(args)
    (out / "model_repository/model/1/model.plan").write_bytes(b"Triton's plan")
    proc, _ = build_engine(out, "100300", tmp_path=tmp_path, MIN_BATCH="2")  # Triton sends batches from 1
    assert proc.returncode == 0 and "left as it was" in proc.stdout
    assert (out / "model_repository/model/1/model.plan").read_bytes() == b"Triton's plan"

    with pytest.raises(ConfigError, match="built for batch 1/4/16"):
        package.run(package.PackageConfig(model=str(engine), out=str(tmp_path / "b2"), max_batch=32))
    with pytest.raises(package.PackageError, match="sha256"):
        package.run(package.PackageConfig(model=str(engine), out=str(tmp_path / "b3"), onnx=str(engine)))


def test_package_a_dla_engine(exported_onnx, tmp_path):
    """DLA: fp16/int8 on a static batch. A profile that does not start at 1 cannot serve Triton's batches of 1 to
    max_batch_size, so the Triton repository runs the ONNX instead."""
    engine = fake_engine(tmp_path, exported_onnx, batches=(8, 8, 8), dla_core=1)
    out = tmp_path / "bundle"
    manifest = package.run(package.PackageConfig(model=str(engine), out=str(out))).manifest
    assert manifest["triton"]["platform"] == "onnxruntime_onnx"
    assert "model_repository/model/1/model.onnx" in manifest["files"]
    config_text = (out / "model_repository/model/config.pbtxt").read_text()
    assert "profile starts at batch 8" in config_text
    assert parse_triton_config(out / "model_repository/model/config.pbtxt").max_batch_size == 8

    proc, args = build_engine(out, "8502", tmp_path=tmp_path)  # the bundle builds for DLA core 1 by default
    assert proc.returncode == 0, proc.stderr
    assert {"--useDLACore=1", "--allowGPUFallback", "--fp16", "--minShapes=input:8x3x16x16"} <= set(args)
    assert not list((out / "model_repository/model/1").glob("*.plan"))  # nothing copied into Triton's repository
    proc, args = build_engine(out, "8502", "fp32", tmp_path=tmp_path)
    assert proc.returncode == 2 and "DLA has no FP32" in proc.stderr
    proc, args = build_engine(out, "8502", "fp32", tmp_path=tmp_path, DLA_CORE="")  # the GPU takes fp32
    assert proc.returncode == 0 and not [a for a in args if "DLA" in a]

    with pytest.raises(ConfigError, match="DLA core 1, which has no FP32; give --precision fp16 or int8"):
        package.run(package.PackageConfig(model=str(engine), out=str(tmp_path / "b2"), precision="fp32"))
    dynamic = fake_engine(tmp_path, exported_onnx, batches=(1, 4, 16), dla_core=0)
    with pytest.raises(ConfigError, match="equal --min-batch, --opt-batch and --max-batch"):
        package.run(package.PackageConfig(model=str(dynamic), out=str(tmp_path / "b3")))


def tiny_onnx(path: Path, *, qdq: bool) -> Path:
    """A Fashion-MNIST-labelled 1x1-conv classifier on 8x8 inputs with export's metadata; ``qdq``: its input
    quantized and dequantized (explicit quantization), with a calibrate-style manifest and cache."""
    nodes = [helper.make_node("Conv", ["x", "weight"], ["features"]),
             helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["logits"])]
    initializers = [helper.make_tensor("weight", TensorProto.FLOAT, [10, 3, 1, 1],
                                       np.random.default_rng(0).standard_normal(30).tolist())]
    if qdq:
        nodes[:0] = [helper.make_node("QuantizeLinear", ["input", "scale", "zero"], ["q"]),
                     helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["x"])]
        initializers += [helper.make_tensor("scale", TensorProto.FLOAT, [], [0.05]),
                         helper.make_tensor("zero", TensorProto.INT8, [], [0])]
    else:
        nodes[0].input[0] = "input"
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # ORT reads IR 8
    helper.set_model_props(model, {"edgeopt.preprocessing": json.dumps(fashion_mnist_preset(image_size=8).to_dict()),
                                   "edgeopt.class_names": json.dumps(FASHION_MNIST_CLASSES)})
    onnx.save(model, str(path))
    if qdq:
        path.with_name("tiny.calib.json").write_text("{}")
        path.with_name(path.name + ".json").write_text(json.dumps({"stage": "calibrate",
                                                                   "calibration_cache": "tiny.calib.json"}))
    return path


def test_package_a_qdq_onnx_builds_int8(tmp_path):
    model = tiny_onnx(tmp_path / "tiny.onnx", qdq=True)
    out = tmp_path / "bundle"
    manifest = package.run(package.PackageConfig(model=str(model), out=str(out), name="tiny-int8")).manifest
    assert (manifest["precision"], manifest["qdq"], manifest["calibration_cache"]) == ("int8", True, "tiny.calib.json")
    assert (out / "tiny.calib.json").is_file()
    config = parse_triton_config(out / "model_repository/tiny-int8/config.pbtxt")
    assert [list(o.dims) for o in config.output] == [[10]] and [list(i.dims) for i in config.input] == [[3, 8, 8]]
    _, args = build_engine(out, "8601", tmp_path=tmp_path, out=tmp_path / "model.plan")
    assert {"--int8", "--fp16", "--minShapes=input:1x3x8x8"} <= set(args)  # unquantized layers FP16 by default
    _, args = build_engine(out, "8601", tmp_path=tmp_path, out=tmp_path / "model.plan", INT8_HIGH_PRECISION="fp32")
    assert "--int8" in args and "--fp16" not in args
    # the FP16 copy strongly typed TensorRT builds from: INT8 layers as they were, the rest float16, I/O float32
    fp16 = onnx.load(str(out / "model.fp16.onnx"))
    onnx.checker.check_model(fp16, full_check=True)
    assert fp16.opset_import[0].version >= 19 and fp16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    scales = {i.name: i.data_type for i in fp16.graph.initializer if i.name == "scale"}
    assert scales == {"scale": TensorProto.FLOAT16}
    assert {n.op_type for n in fp16.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}


@pytest.mark.parametrize("version, precision, high, flags, onnx_file", [
    ("8502", "fp32", "fp16", {"--int8"}, "model.onnx"),  # TensorRT refuses Q/DQ nodes without --int8
    ("100300", "fp16", "fp16", {"--int8", "--fp16"}, "model.onnx"),
    ("100300", "int8", "fp16", {"--int8", "--fp16"}, "model.onnx"),  # unquantized layers FP16 (Model Optimizer's)
    ("100300", "int8", "fp32", {"--int8"}, "model.onnx"),  # ... or FP32 when asked
    ("101200", "int8", "fp16", {"--stronglyTyped"}, "model.fp16.onnx"),
    ("110400", "fp32", "fp16", set(), "model.onnx"),      # strongly typed: the Q/DQ nodes say INT8, the rest FP32
    ("110400", "fp16", "fp16", set(), "model.fp16.onnx"),  # INT8 layers, the rest FP16
    ("110400", "int8", "fp16", set(), "model.fp16.onnx"),
    ("110400", "int8", "fp32", set(), "model.onnx"),
])
def test_build_engine_sh_on_a_qdq_bundle(tmp_path, version, precision, high, flags, onnx_file):
    out = tmp_path / "bundle"
    package.run(package.PackageConfig(model=str(tiny_onnx(tmp_path / "tiny.onnx", qdq=True)), out=str(out),
                                      precision="fp16" if precision == "fp16" else None))
    assert (out / "model.fp16.onnx").is_file()
    proc, args = build_engine(out, version, precision, tmp_path=tmp_path, out=tmp_path / "model.plan",
                              INT8_HIGH_PRECISION=high)
    assert proc.returncode == 0, proc.stderr
    assert PRECISION_FLAGS & set(args) == flags and f"--onnx={onnx_file}" in args
    assert ("those layers run INT8" in proc.stdout) == (precision != "int8")
    recorded = json.loads((tmp_path / "model.plan.json").read_text())["engine"]  # what runner.py checks
    major = int(version) // (10000 if int(version) >= 100000 else 1000)  # trtexec's banner: 8502, 100300, 110400
    assert recorded["precision"] == precision and recorded["tensorrt"].startswith(f"{major}.")
    assert recorded["flags"]["int8_high_precision"] == (high if precision == "int8" else None)


def test_build_engine_sh_rewrites_the_plans_manifest(bundle_fp16, tmp_path):
    """The bundle's model.plan.json described the host's engine; after a build on the device it describes this
    one, with the GPU nvidia-smi names, which runner.py compares with the GPU it runs on."""
    (bundle_fp16 / "model.plan.json").write_text('{"engine": {"tensorrt": "10.3.0.26", "gpu": "host GPU"}}')
    proc, _ = build_engine(bundle_fp16, "100300", "fp16", tmp_path=tmp_path, out=bundle_fp16 / "model.plan",
                           gpu="Orin (nvgpu), 8.7")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((bundle_fp16 / "model.plan.json").read_text())
    assert manifest["engine"] == {"backend": "tensorrt", "tensorrt": "10.3.0", "gpu": "Orin (nvgpu)",
                                  "compute_capability": "8.7", "precision": "fp16",
                                  "profile": {"min_batch": 1, "opt_batch": 8, "max_batch": 64},
                                  "flags": {"dla_core": None, "int8_high_precision": None}}
    assert manifest["onnx"] == "model.onnx"
    (bundle_fp16 / "model.plan").unlink()
    (bundle_fp16 / "model.plan.json").unlink()


@pytest.mark.parametrize("version, env, message", [
    ("8601", {}, "DLA takes it from TensorRT 10.0"),  # JetPack 6.0: Q/DQ INT8 on the GPU only
    ("100300", {"INT8_HIGH_PRECISION": "fp32"}, "DLA has no FP32 for the unquantized layers"),
])
def test_build_engine_sh_refuses_qdq_int8_dla_it_cannot_build(tmp_path, version, env, message):
    out = tmp_path / "bundle"
    package.run(package.PackageConfig(model=str(tiny_onnx(tmp_path / "tiny.onnx", qdq=True)), out=str(out)))
    proc, args = build_engine(out, version, "int8", tmp_path=tmp_path, DLA_CORE="0", MIN_BATCH="8", OPT_BATCH="8",
                              MAX_BATCH="8", **env)
    assert proc.returncode == 2 and message in proc.stderr and args is None, proc.stderr
    proc, args = build_engine(out, "100300", "int8", tmp_path=tmp_path, out=tmp_path / "model.plan", DLA_CORE="0",
                              MIN_BATCH="8", OPT_BATCH="8", MAX_BATCH="8")
    assert proc.returncode == 0 and {"--int8", "--fp16", "--useDLACore=0"} <= set(args), proc.stderr


def test_package_an_int8_engine_remakes_its_qdq_onnx_from_the_cache(tmp_path):
    """An INT8 engine built from an FP32 ONNX: the device needs the Q/DQ ONNX, made again from the cache."""
    fp32 = tiny_onnx(tmp_path / "fp32.onnx", qdq=False)
    calibrate.run(calibrate.CalibConfig(onnx=str(fp32), out=str(tmp_path / "scratch.onnx"), num_images=32,
                                        val_limit=10, cache=str(tmp_path / "model.calib.json")))
    engine = fake_engine(tmp_path, fp32, precision="int8")  # build-engine's cache: <engine stem>.calib.json
    out = tmp_path / "bundle"
    manifest = package.run(package.PackageConfig(model=str(engine), out=str(out))).manifest
    assert (manifest["precision"], manifest["qdq"], manifest["calibration_cache"]) == ("int8", True, "model.calib.json")
    assert OnnxModel.read(out / "model.onnx").precision == "int8" and (out / "model.calib.json").is_file()
    _, args = build_engine(out, "100300", tmp_path=tmp_path, out=tmp_path / "model.plan")
    assert {"--onnx=model.onnx", "--int8"} <= set(args)


def test_output_folder_rules(exported_onnx, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("keep me unless --force")
    with pytest.raises(OutputError, match="--force"):
        package.run(package.PackageConfig(model=str(tiny_onnx(tmp_path / "tiny.onnx", qdq=True)), out=str(out)))
    with pytest.raises(ConfigError, match="Q/DQ"):  # fails after the temporary folder was made
        package.run(package.PackageConfig(model=str(exported_onnx), out=str(out), precision="int8", force=True))
    assert (out / "old.txt").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    package.run(package.PackageConfig(model=str(tmp_path / "tiny.onnx"), out=str(out), force=True))
    assert not (out / "old.txt").exists() and (out / "bundle.json").exists()
    checkpoint = tmp_path / "student.pth"
    checkpoint.write_bytes(b"a checkpoint")
    with pytest.raises(package.PackageError, match="export it first"):
        package.run(package.PackageConfig(model=str(checkpoint), out=str(tmp_path / "b")))


def test_a_model_with_external_weights_is_bundled_whole(exported_onnx, tmp_path):
    """An ONNX keeping its weights in a side file (save_as_external_data): the bundle's model.onnx holds them, and
    the bundle's own check runs it."""
    source = tmp_path / "src" / "ext.onnx"
    source.parent.mkdir()
    onnx.save(onnx.load(str(exported_onnx)), str(source), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    assert (source.parent / "ext.onnx.data").stat().st_size > source.stat().st_size
    out = tmp_path / "bundle"
    package.run(package.PackageConfig(model=str(source), out=str(out), check_images=32))
    bundled = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in bundled.graph.initializer)
    assert not list(out.glob("*.data"))
    proc = subprocess.run([sys.executable, out / "runner.py", "--check", *CHECK_FAST], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
