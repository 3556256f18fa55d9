"""Shared fixtures: run the real CLI, a tiny trained checkpoint, and a small ImageFolder-style data set."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path(os.environ.get("EDGEOPT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))

# Tiny but real: a ResNet-18 at 16x16 on a 512-image slice trains an epoch in a few seconds on 2 cores. A constant
# lr: with warm-up cosine its 8 steps reach 14% top-1 (one class for 75% of the images), which makes agreement and
# equal-accuracy checks weak; without a schedule 35%.
TINY = ["--arch", "resnet18", "--image-size", "16", "--schedule", "none", "--train-limit", "512", "--val-limit", "256",
        "--batch-size", "64", "--epochs", "1"]
# the same slice for stages that take the image size from the model (distill, prune)
SLICE = ["--train-limit", "512", "--val-limit", "256", "--batch-size", "64"]


def pytest_configure(config):
    """Under pytest-xdist, each worker gets its own share of the cores (its processes and the CLI runs it starts).

    Two workers on two cores, each running PyTorch's and ONNX Runtime's default of one thread per core, put four
    spinning threads on two cores: OpenMP's threads wait on each other and a training step takes many times
    longer. Pinned, every backend sizes itself to the worker's share (edgeopt counts the cores it may use), as
    it would under taskset or a container's cpuset.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or workers < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    share = cores[int(worker[2:]) % workers::workers]
    if share:
        os.sched_setaffinity(0, share)
        os.environ["OMP_NUM_THREADS"] = str(len(share))


def run_cli(*args: str, env: dict | None = None, check: bool | None = None, cwd: Path = ROOT,
            launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python cli.py ARGS`` as a user would; returns the completed process (text output)."""
    full_env = {**os.environ, "EDGEOPT_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = (launcher or [sys.executable]) + [str(ROOT / "cli.py"), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
    if check is True and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_main(*args: str) -> subprocess.CompletedProcess:
    """``cli.main(ARGS)`` in this process, output captured: the CLI's own code path without a new interpreter.

    For probes that end in an error before any real work (bad flags, damaged files, refused outputs): a new
    process spends ~4 s importing torch and torchvision for a check that takes milliseconds. Anything that
    trains, serves or must survive a signal uses :func:`run_cli`.
    """
    import contextlib
    import io

    import cli

    out, err = io.StringIO(), io.StringIO()
    saved = os.environ.get("EDGEOPT_OFFLINE")
    os.environ["EDGEOPT_OFFLINE"] = "1"
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as e:  # argparse rejecting a flag
                code = e.code if isinstance(e.code, int) else 2
    finally:
        if saved is None:
            os.environ.pop("EDGEOPT_OFFLINE", None)
        else:
            os.environ["EDGEOPT_OFFLINE"] = saved
    return subprocess.CompletedProcess(["cli.py", *map(str, args)], code, out.getvalue(), err.getvalue())


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one-line error the CLI prints, asserting there is exactly one and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def in_ci() -> bool:
    """Whether this run is CI's (``CI`` set to anything but empty, ``0`` or ``false``, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_locally_fail_in_ci(reason: str, *, module: bool = False) -> None:
    """Skip a test whose need (PyPI, a declared dependency) may be absent here; fail it under CI, which has it.

    A skip there would let the test pass silently while checking nothing. Only for what CI can reach: PyPI and
    Debian's archive; a test needing any other host would fail every CI run and must not use this.
    ``module``: called at import time, to skip (or fail) the whole test module.
    """
    if in_ci():
        pytest.fail(f"{reason} (CI is set: CI reaches PyPI and installs every dependency, so this is a failure)",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=module)


def device_python(requirements: Path, folder: Path) -> Path:
    """A fresh venv in ``folder`` holding only ``requirements`` (a bundle's requirements.txt: no torch, no edgeopt):
    the device's Python. Skips (fails in CI) when pip cannot install them."""
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-compile",
                          "-r", requirements], capture_output=True, text=True, timeout=600)
    if pip.returncode != 0:
        skip_locally_fail_in_ci(f"cannot install {requirements} into a fresh venv (offline?): "
                                f"{(pip.stderr.strip().splitlines() or ['?'])[-1]}")
    return python


@pytest.fixture(scope="session", autouse=True)
def _need_data():
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.exit(f"Fashion-MNIST is missing in {FMNIST}: run 'make test' (installs dataset-fashion-mnist)", 2)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A ResNet-18 trained for 1 epoch on the 512-image slice, via the CLI."""
    out = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    run_cli("-q", "train", *TINY, "--out", out, check=True)
    return out


@pytest.fixture(scope="session")
def student(trained, tmp_path_factory) -> Path:
    """``trained`` distilled into a ResNet-18 for 1 epoch on :data:`SLICE`, via the CLI."""
    out = tmp_path_factory.mktemp("student") / "student.pth"
    proc = run_cli("-q", "distill", "--teacher", trained, "--student", "resnet18", *SLICE, "--epochs", "1",
                   "--out", out, "--json", check=True)
    assert json.loads(proc.stdout)["metrics"]["epoch"] == 1
    return out


@pytest.fixture(scope="session")
def exported_onnx(trained, tmp_path_factory) -> Path:
    """``trained`` exported to ONNX (with its manifest) via the CLI."""
    out = tmp_path_factory.mktemp("exported") / "model.onnx"
    run_cli("-q", "export", "--model", trained, "--out", out, check=True)
    return out


@pytest.fixture(scope="session")
def benchmark_report_dir(trained, exported_onnx, tmp_path_factory) -> Path:
    """``benchmark`` of ``trained`` against ``exported_onnx`` via the CLI: its report folder.

    Session-scoped here rather than in tests/optimize/benchmark/: its report and device-rows tests both read it,
    and under ``--dist loadfile`` a module-scoped fixture would measure again for each file. (A conftest.py in that
    folder would also take the module name ``conftest`` from this one, and every ``from conftest import`` with it.)
    """
    out = tmp_path_factory.mktemp("bench") / "report"
    run_cli("-q", "benchmark", "--baseline", trained, "--models", exported_onnx, "--val-limit", "128",
            "--batch-sizes", "1", "4", "--rounds", "3", "--seconds", "0.05", "--warmup", "1", "--threads", "2",
            "--min-speedup", "0.5", "--out", out, check=True)
    return out


def fashion_arrays(split: str = "train"):
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(FMNIST / f"{prefix}-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FMNIST / f"{prefix}-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    return images, labels


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """Three Fashion-MNIST classes as PNG folders (train 40 / val 12 per class), plus awkward files:
    a CMYK JPEG, an RGBA PNG, a 16-bit PNG (all to be converted) and a corrupt file (to be skipped)."""
    root = tmp_path_factory.mktemp("folder")
    images, labels = fashion_arrays("train")
    names = {0: "tshirt", 1: "trouser", 7: "sneaker"}
    for split, (start, count) in {"train": (0, 40), "val": (40, 12)}.items():
        for label, name in names.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for k, idx in enumerate(np.flatnonzero(labels == label)[start:start + count]):
                Image.fromarray(images[idx], "L").save(folder / f"{k:03d}.png")
    odd = root / "train" / "tshirt"
    base = Image.fromarray(images[np.flatnonzero(labels == 0)[0]], "L")
    base.convert("CMYK").save(odd / "cmyk.jpg")
    base.convert("RGBA").save(odd / "rgba.png")
    Image.fromarray(np.asarray(base, np.uint16) * 257).save(odd / "deep16.png")
    (odd / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return root


FAKES = ROOT / "tests" / "fakes"


def _gpu_module(name: str) -> bool:
    return name in ("tensorrt", "cuda", "pycuda") or name.startswith(("tensorrt.", "cuda.", "pycuda."))


@pytest.fixture
def fake_gpu(monkeypatch):
    """A factory putting NVIDIA's stand-ins (tests/fakes) in place of tensorrt, cuda-python and (when asked)
    pycuda for one test; the real modules, if any, come back afterwards.

    ``fake_gpu(trt_version="10.3.0", driver=13000, runtime=13000, pycuda=False, trt_wheel_cu13=False)`` returns
    the imported fakes as a namespace (``trt``, ``cudart``, ``pycuda``); ``driver`` / ``runtime`` are the CUDA
    versions the driver and cuda-python report (12040 = 12.4). ``env()`` gives the same for a subprocess.
    """
    import importlib
    import types

    saved = {k: v for k, v in sys.modules.items() if _gpu_module(k)}

    def install(*, trt_version: str = "10.3.0", driver: int = 13000, runtime: int = 13000, pycuda: bool = False,
                trt_wheel_cu13: bool = False):
        for name in [k for k in sys.modules if _gpu_module(k)]:
            del sys.modules[name]
        monkeypatch.setenv("FAKE_CUDA_DRIVER", str(driver))
        monkeypatch.setenv("FAKE_CUDA_RUNTIME", str(runtime))
        monkeypatch.setenv("FAKE_TRT_VERSION", trt_version)
        paths = [FAKES / "gpu", *([FAKES / "pycuda"] if pycuda else []),
                 *([FAKES / "trt_cu13_wheel"] if trt_wheel_cu13 else [])]
        for path in paths:
            monkeypatch.syspath_prepend(str(path))
        if not pycuda:
            sys.modules["pycuda"] = None  # import pycuda -> ImportError, even where a real one is installed
        fakes = types.SimpleNamespace(trt=importlib.import_module("tensorrt"),
                                      cudart=importlib.import_module("cuda.bindings.runtime"),
                                      pycuda=importlib.import_module("pycuda.driver") if pycuda else None)
        importlib.import_module("cuda.bindings.utils")
        fakes.env = lambda: {"PYTHONPATH": os.pathsep.join(map(str, paths)), "FAKE_CUDA_DRIVER": str(driver),
                             "FAKE_CUDA_RUNTIME": str(runtime), "FAKE_TRT_VERSION": trt_version}
        return fakes

    yield install
    for name in [k for k in sys.modules if _gpu_module(k)]:
        del sys.modules[name]
    sys.modules.update(saved)


@dataclass(frozen=True)
class TinyOnnx:
    """A tiny conv net exported here as export writes it, and what went in: for the ONNX-reading tests."""

    model: Any  # the torch module, in eval mode: the reference its ONNX files are checked against
    path: Path  # symbolic batch axis, with export's preprocessing and class-name metadata
    fixed_path: Path  # batch axis fixed to FIXED_BATCH, no metadata
    preprocessing: Any
    class_names: list[str]


TINY_SIDE, TINY_CLASSES, FIXED_BATCH = 8, 5, 2


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> TinyOnnx:
    """A conv -> ReLU -> pool -> linear net (8 px, 5 classes) through the real exporter in ~2 s: the ONNX facts a
    stage reads do not need a trained ResNet (the ``exported_onnx`` fixture trains one through the CLI)."""
    # imported here, as cli in run_main: the conftest itself stays torch-free, so tests/test_layers.py is instant
    import torch
    from torch import nn

    from optimize.export import export_onnx
    from optimize.onnx_model import CLASS_NAMES_KEY, PREPROCESSING_KEY
    from optimize.preprocess import fashion_mnist_preset

    folder = tmp_path_factory.mktemp("tiny-onnx")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, TINY_CLASSES)).eval()
    preprocessing = fashion_mnist_preset(image_size=TINY_SIDE)
    class_names = [f"class{i}" for i in range(TINY_CLASSES)]
    metadata = {PREPROCESSING_KEY: json.dumps(preprocessing.to_dict()), CLASS_NAMES_KEY: json.dumps(class_names)}
    example = torch.randn(FIXED_BATCH, 3, TINY_SIDE, TINY_SIDE)
    export_onnx(model, example, folder / "tiny.onnx", metadata=metadata)
    export_onnx(model, example, folder / "fixed.onnx", dynamic_batch=False)
    return TinyOnnx(model, folder / "tiny.onnx", folder / "fixed.onnx", preprocessing, class_names)
