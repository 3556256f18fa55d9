#!/usr/bin/env python3
"""Classify images with the model of this bundle, without torch or edgeopt.

Needs numpy + Pillow + onnxruntime for ``model.onnx`` (requirements.txt), numpy + Pillow + openvino for an OpenVINO
``model.xml`` (+ ``model.bin``), or numpy + Pillow + tensorrt 8.5 or later + cuda-python (or pycuda) for a TensorRT
engine (``model.plan``, built on this device by ``build_engine.sh``).
Reads ``preprocess.json`` and ``labels.txt`` beside this file; its preprocessing reproduces edgeopt's eval
transform with Pillow and numpy (any image mode -> RGB, resize the shorter side, center crop, scale to [0, 1],
normalize).

    python runner.py IMAGE_OR_DIR... [--model model.onnx|model.xml|model.plan] [--top-k 5] [--json] [--batch-size 32]
    python runner.py --check [--model model.plan] [--seconds 1] [--rounds 3]

Prints the top-k classes per image (``--json``: a list of {"image", "top_k": [{"index", "class",
"probability"}], "error"}); an unreadable image gets an error entry and exit code 1. Other errors exit 2.

``--check`` proves on this device what the host measured: it runs the model it would serve over the bundle's
acceptance set (``check/``, written by ``cli.py package``) and compares with the host's reference: top-1 on the
set against the host's, agreement with the host's answers, the logits' differences, this machine's preprocessing
against the host's tensors, then latency at batch 1 and images/s at the set's batch sizes (interleaved rounds,
medians and spreads), with the device's facts. Verdict against the budget the bundle carries; exit 1 when it
fails. Writes ``check.json`` and ``check.md`` (beside this file, or in ``--out``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
# JetPack 5.1; TensorRTModel uses names that 8.4 lacks. A copy of optimize/tensorrt_backend.MIN_VERSION (this file
# stays standalone on the device); tests/optimize/test_package.py checks the two, and build_engine.sh's, agree
MIN_TENSORRT = (8, 5)


class RunnerError(Exception):
    """Reported as one line on stderr, exit code 2."""


# -- preprocessing (the same tensor as edgeopt's Preprocessing.eval_transform) ----------------------------

def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB whatever the mode: L/P/LA/RGBA/CMYK/YCbCr and 16-bit or float grayscale."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")
    return img.convert("RGB")


# longer side / shorter side (edgeopt's preprocessing reads it from here): panoramas are ~10:1, a 1 x 1,000,000
# strip would resize to 32 x 32,000,000
MAX_ASPECT_RATIO = 50


def load_image(path) -> Image.Image:
    """Open an image fully decoded as RGB, honouring its EXIF orientation; extreme aspect ratios are refused
    from the header, before decoding (the short-side resize would make them huge)."""
    with Image.open(path) as img:
        w, h = img.size
        if min(w, h) < 1 or max(w, h) > MAX_ASPECT_RATIO * min(w, h):
            raise ValueError(f"{w}x{h} pixels: aspect ratio above {MAX_ASPECT_RATIO}:1")
        img = ImageOps.exif_transpose(img)
        img.load()
        return to_rgb(img)


def preprocess(img: Image.Image, spec: dict) -> np.ndarray:
    """``float32 [3, S, S]``: resize the shorter side to ``resize_size`` (the longer one scaled and truncated,
    as torchvision does), center crop ``image_size`` (torchvision's rounding), /255, normalize."""
    img = to_rgb(img)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = spec["resize_size"], int(spec["resize_size"] * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    if size != (w, h):
        img = img.resize(size, RESAMPLE[spec["interpolation"]])
    side = spec["image_size"]
    top, left = int(round((size[1] - side) / 2.0)), int(round((size[0] - side) / 2.0))
    img = img.crop((left, top, left + side, top + side))
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


# -- backends ----------------------------------------------------------------------------------------------

class OnnxModel:
    """ONNX Runtime: CUDA when onnxruntime-gpu offers it, else the CPU. A graph with a fixed batch size gets
    batches of exactly that size (the last one padded, the padding's rows dropped)."""

    max_batch = None
    min_batch = 1
    backend = "onnxruntime"

    def __init__(self, path: Path):
        import onnxruntime as ort

        wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
        providers = [p for p in wanted if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.facts = {"runtime": f"onnxruntime {ort.__version__}", "providers": self.session.get_providers()}
        inp = self.session.get_inputs()[0]
        self.input = inp.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        self.max_batch = self.fixed_batch

    def infer(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        if self.fixed_batch and n < self.fixed_batch:
            batch = np.concatenate([batch, np.repeat(batch[-1:], self.fixed_batch - n, axis=0)])
        return self.session.run(None, {self.input: batch})[0][:n]


# the cuda-python to install beside this bundle per CUDA major of the driver (requirements.txt says more)
CUDA_PIP = {11: "'cuda-python>=11.4,<12' (JetPack 5)", 12: "'cuda-python>=12.0,<13'", 13: "'cuda-python>=13.0,<14'"}


def tensorrt_wheel_cuda() -> int | None:
    """The CUDA major TensorRT's pip wheels were built for (tensorrt-cu13-libs -> 13); None for JetPack's TensorRT."""
    from importlib import metadata

    for major in (13, 12, 11):
        for name in (f"tensorrt-cu{major}-libs", f"tensorrt-cu{major}"):
            try:
                metadata.version(name)
                return major
            except metadata.PackageNotFoundError:
                continue
    return None


def cuda_text(code: int) -> str:
    """``12.4`` for the CUDA version code 12040."""
    return f"{code // 1000}.{code % 1000 // 10}"


class Cuda:
    """The few CUDA calls TensorRTModel needs, in the device's primary context (the one TensorRT uses): through
    cuda-python's runtime API, else pycuda's ``autoprimaryctx`` (``autoinit`` would make a second context and
    leave it current). cuda-python must be built for the driver's CUDA major (cuda-python 13 fails every call on
    JetPack 5/6 or an R535/R550 driver): if it is not, pycuda (compiled here) takes over when installed, else one
    line names the install. Every call's status is checked (pycuda raises on an error itself)."""

    def __init__(self):
        self.rt = self.pycuda = None
        problem = None
        try:
            try:
                from cuda.bindings import runtime as rt
            except ImportError:
                from cuda import cudart as rt  # cuda-python before 12.6
            self.rt = rt
            driver, built = self.check(rt.cudaDriverGetVersion()), self.check(rt.cudaRuntimeGetVersion())
            self.driver = driver
            if driver <= 0:
                problem = "no NVIDIA driver found on this machine"
            elif driver // 1000 < built // 1000:
                problem = (f"cuda-python is built for CUDA {cuda_text(built)} but this driver supports CUDA "
                           f"{cuda_text(driver)}: pip install "
                           f"{CUDA_PIP.get(driver // 1000, 'cuda-python of that major')}"
                           f" (or pycuda)")
        except ImportError:
            problem = ("a TensorRT engine needs cuda-python ('pip install cuda-python', its major version that of "
                       "this device's CUDA) or pycuda; or run model.onnx")
        if problem:
            try:
                import pycuda.autoprimaryctx  # noqa: F401 - retains the primary context and makes it current
                import pycuda.driver
            except ImportError:
                raise RunnerError(problem) from None
            except Exception as e:  # noqa: BLE001 - pycuda's own errors when cuInit or the context fails
                raise RunnerError(f"{problem}; pycuda could not start either: {e}") from None
            if self.rt is not None:
                print(f"note: {problem}; using pycuda", file=sys.stderr)
            self.rt, self.pycuda = None, pycuda.driver
            self.driver = int(pycuda.driver.get_driver_version())
        wheel = tensorrt_wheel_cuda()
        if wheel is not None and self.driver // 1000 < wheel:
            raise RunnerError(f"TensorRT's pip wheel is built for CUDA {wheel}, but this driver supports CUDA "
                              f"{cuda_text(self.driver)}: pip install tensorrt-cu{self.driver // 1000} (or update the "
                              "driver)")

    def check(self, result):
        """cuda-python returns ``(status, *values)``: raise on an error status, else return the value(s)."""
        status, *values = result
        if int(status) != 0:
            name = self.rt.cudaGetErrorName(status)[1]
            raise RunnerError(f"CUDA call failed: {name.decode() if isinstance(name, bytes) else name}")
        return values[0] if len(values) == 1 else values

    def stream(self):
        """A stream of our own: the default stream would add device-wide synchronizations."""
        if self.pycuda:
            return self.pycuda.Stream()
        return self.check(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking))

    def handle(self, stream) -> int:
        """The stream's address (``int()`` of a cuda-python object is deprecated from cuda-bindings 13)."""
        if self.pycuda:
            return int(stream.handle)
        try:
            from cuda.bindings.utils import get_cuda_native_handle
        except ImportError:
            return int(stream)
        return int(get_cuda_native_handle(stream))

    def facts(self) -> dict:
        """This GPU's name and compute capability, as CUDA names them."""
        if self.pycuda:
            dev = self.pycuda.Context.get_device()
            return {"gpu": dev.name(), "compute_capability": "%d.%d" % dev.compute_capability()}
        props = self.check(self.rt.cudaGetDeviceProperties(self.check(self.rt.cudaGetDevice())))
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return {"gpu": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}

    def pinned(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """Page-locked host memory, which asynchronous copies need."""
        if self.pycuda:
            return self.pycuda.pagelocked_empty(shape, dtype)
        count = int(np.prod(shape))
        nbytes = max(count * np.dtype(dtype).itemsize, 1)
        ptr = self.check(self.rt.cudaMallocHost(nbytes))
        return np.frombuffer((ctypes.c_byte * nbytes).from_address(int(ptr)), dtype, count=count).reshape(shape)

    def device(self, nbytes: int):
        """Device memory; ``int()`` of it is its address."""
        return self.pycuda.mem_alloc(nbytes) if self.pycuda else self.check(self.rt.cudaMalloc(nbytes))

    def to_device(self, dst, host: np.ndarray, stream) -> None:
        if self.pycuda:
            self.pycuda.memcpy_htod_async(dst, host, stream)
        else:
            self.check(self.rt.cudaMemcpyAsync(int(dst), host.ctypes.data, host.nbytes,
                                               self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def to_host(self, host: np.ndarray, src, stream) -> None:
        if self.pycuda:
            self.pycuda.memcpy_dtoh_async(host, src, stream)
        else:
            self.check(self.rt.cudaMemcpyAsync(host.ctypes.data, int(src), host.nbytes,
                                               self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def synchronize(self, stream) -> None:
        if self.pycuda:
            stream.synchronize()
        else:
            self.check(self.rt.cudaStreamSynchronize(stream))


def check_tensorrt(version: str) -> None:
    """Refuse a TensorRT older than :data:`MIN_TENSORRT`."""
    parts = [int(p) if p.isdigit() else 0 for p in (version.split(".") + ["0"])[:2]]
    if tuple(parts) < MIN_TENSORRT:
        raise RunnerError(f"TensorRT {version} is too old: model.plan needs TensorRT "
                          f"{MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} or later (JetPack 5.1 or "
                          "later on a Jetson); or run model.onnx with onnxruntime")


def same_tensorrt(recorded: str, here: str) -> bool:
    """Whether the TensorRT that built a plan (``10.3.0`` from trtexec's banner, or ``10.3.0.26``) is this one."""
    a, b = str(recorded).split("."), str(here).split(".")
    n = min(len(a), len(b))
    return n >= 2 and a[:n] == b[:n]


def plan_manifest(path: Path) -> dict:
    """The manifest beside a plan (``model.plan.json``, written by build_engine.sh or cli.py build-engine), or {}."""
    manifest = path.with_name(path.name + ".json")
    if not manifest.is_file():
        return {}
    try:
        data = json.loads(manifest.read_text())
    except ValueError as e:
        raise RunnerError(f"{manifest} is not JSON ({e}); rebuild the plan with ./build_engine.sh") from None
    return data if isinstance(data, dict) else {}


class TensorRTModel:
    """A TensorRT engine built on this device (TensorRT 8.5 and later), run on a stream of its own with
    asynchronous copies between pinned host buffers and device memory, in the engine's I/O dtypes. The plan's
    manifest (``model.plan.json``) is checked first: a plan built by another TensorRT or on another GPU does not
    load, or loads and computes garbage. The process exit frees the buffers."""

    backend = "tensorrt"

    def __init__(self, path: Path):
        import tensorrt as trt

        check_tensorrt(str(trt.__version__))
        self.cuda = cuda = Cuda()
        engine_facts = plan_manifest(path).get("engine", {})
        here = {"tensorrt": str(trt.__version__), **cuda.facts()}
        self.facts = {"runtime": f"tensorrt {trt.__version__}", "cuda_binding": "pycuda" if cuda.pycuda else
                      "cuda-python", **here, "precision": engine_facts.get("precision"),
                      "unquantized_layers": (engine_facts.get("flags") or {}).get("int8_high_precision")}
        if engine_facts.get("tensorrt") and not same_tensorrt(engine_facts["tensorrt"], here["tensorrt"]):
            raise RunnerError(f"{path.name} was built by TensorRT {engine_facts['tensorrt']}, this device has "
                              f"{here['tensorrt']}: rebuild it here with ./build_engine.sh")
        # the compute capability decides (nvidia-smi, which build_engine.sh asks, names a Jetson Orin "Orin
        # (nvgpu)" where CUDA says "Orin"); another name with the same capability is only worth a note
        built_on = engine_facts.get("compute_capability")
        if built_on and built_on != here["compute_capability"]:
            raise RunnerError(f"{path.name} was built on a {engine_facts.get('gpu') or 'GPU'} (compute capability "
                              f"{built_on}), this device is a {here['gpu']} ({here['compute_capability']}): rebuild "
                              "it here with ./build_engine.sh")
        if engine_facts.get("gpu") and not (engine_facts["gpu"].startswith(here["gpu"])
                                            or here["gpu"].startswith(engine_facts["gpu"])):
            print(f"note: {path.name} was built on a {engine_facts['gpu']}, this is a {here['gpu']} of the same "
                  "compute capability; rebuild it here with ./build_engine.sh if it fails or runs slowly",
                  file=sys.stderr)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        dla_core = (engine_facts.get("flags") or {}).get("dla_core")
        if dla_core is not None:  # a DLA engine loads on the core the runtime names, set before deserializing
            runtime.DLA_core = int(dla_core)
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RunnerError(f"{path} does not load with TensorRT {trt.__version__} on this GPU; rebuild it here "
                              "with ./build_engine.sh")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        smallest, _, largest = self.engine.get_tensor_profile_shape(self.input, 0)
        self.min_batch, self.max_batch = int(smallest[0]), int(largest[0])
        chw = tuple(int(d) for d in self.engine.get_tensor_shape(self.input))[1:]
        classes = int(self.engine.get_tensor_shape(output)[-1])
        self.stream = cuda.stream()
        self.host_in = cuda.pinned((self.max_batch, *chw), trt.nptype(self.engine.get_tensor_dtype(self.input)))
        self.host_out = cuda.pinned((self.max_batch, classes), trt.nptype(self.engine.get_tensor_dtype(output)))
        self.device_in = cuda.device(self.host_in.nbytes)
        self.device_out = cuda.device(self.host_out.nbytes)
        for name, buffer in ((self.input, self.device_in), (output, self.device_out)):
            if not self.context.set_tensor_address(name, int(buffer)):
                raise RunnerError(f"TensorRT refused the device buffer of {name!r}")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Float32 logits of ``batch``; a batch smaller than the engine's smallest (a static DLA engine) is padded."""
        n = len(batch)
        rows = max(n, self.min_batch)
        self.host_in[:n] = batch
        self.host_in[n:rows] = 0
        if not self.context.set_input_shape(self.input, (rows, *batch.shape[1:])):
            raise RunnerError(f"TensorRT refused input shape {(rows, *batch.shape[1:])}")
        self.cuda.to_device(self.device_in, self.host_in[:rows], self.stream)  # only the rows of this batch
        if not self.context.execute_async_v3(self.cuda.handle(self.stream)):
            raise RunnerError("TensorRT execution failed")
        self.cuda.to_host(self.host_out[:rows], self.device_out, self.stream)
        self.cuda.synchronize(self.stream)
        return self.host_out[:n].astype(np.float32)


class OpenVINOModel:
    """OpenVINO on the CPU: the IR (``model.xml`` + ``model.bin``) the host built and measured, run with the host's
    settings from ``model.xml.json`` (the performance hint its build measured; float math FP32)."""

    max_batch = None
    min_batch = 1
    backend = "openvino"

    def __init__(self, path: Path):
        import openvino as ov

        if not path.with_suffix(".bin").is_file():
            raise RunnerError(f"{path.name}'s weights {path.with_suffix('.bin').name} are missing beside it")
        try:
            manifest = json.loads(path.with_name(path.name + ".json").read_text())
        except (OSError, ValueError):
            manifest = {}
        hint = (manifest.get("engine") or {}).get("hint", "LATENCY")
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                      {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": "f32"})
        self.request = compiled.create_infer_request()
        self.facts = {"runtime": f"openvino {ov.get_version()}", "hint": hint}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)


def open_model(path: Path | None):
    """The given model, else ``model.plan`` when TensorRT is importable here, else ``model.xml`` (an OpenVINO
    bundle) when OpenVINO is, else ``model.onnx``."""
    if path is None:
        plan, xml, onnx = HERE / "model.plan", HERE / "model.xml", HERE / "model.onnx"
        path = (plan if plan.is_file() and _importable("tensorrt") else
                xml if xml.is_file() and _importable("openvino") else onnx)
    if not path.is_file():
        raise RunnerError(f"model {path} does not exist; give --model, or build model.plan with ./build_engine.sh")
    if path.suffix.lower() in ENGINE_SUFFIXES:
        if not _importable("tensorrt"):
            raise RunnerError(f"{path.name} needs tensorrt (8.5 or later): on a Jetson it comes with JetPack; or run "
                              "model.onnx with onnxruntime")
        model = TensorRTModel(path)
    elif path.suffix.lower() == ".xml":
        if not _importable("openvino"):
            raise RunnerError(f"{path.name} needs openvino: pip install openvino (x86 or ARM CPUs); or run model.onnx "
                              "with onnxruntime")
        model = OpenVINOModel(path)
    elif not _importable("onnxruntime"):
        raise RunnerError("model.onnx needs onnxruntime: pip install -r requirements.txt")
    else:
        model = OnnxModel(path)
    model.source = path
    return model


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- command line ------------------------------------------------------------------------------------------

def expand(paths, error: type[Exception] = RunnerError) -> list[Path]:
    """Files as given, folders replaced by the image files under them (sorted); ``error`` for a missing path or a
    folder without images (edgeopt's infer uses this too, with its DataError)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise error(f"folder {path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise error(f"image {path} does not exist; check the path")
    return files


def classify(model, files: list[Path], spec: dict, labels: list[str], top_k: int, batch_size: int) -> list[dict]:
    """One result per file, in order: its top-k classes, or the error that kept it from being read."""
    batch_size = min(batch_size, model.max_batch or batch_size)
    results: dict[int, dict] = {}
    for start in range(0, len(files), batch_size):
        tensors, indices = [], []
        for i in range(start, min(start + batch_size, len(files))):
            try:
                tensors.append(preprocess(load_image(files[i]), spec))
                indices.append(i)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
                results[i] = {"image": str(files[i]), "top_k": [], "error": f"cannot read image: {e}"}
        if not tensors:
            continue
        logits = model.infer(np.stack(tensors)).astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        for i, row in zip(indices, probs):
            order = np.argsort(-row, kind="stable")[:top_k]
            results[i] = {"image": str(files[i]), "error": None,
                          "top_k": [{"index": int(c), "class": labels[c] if c < len(labels) else str(int(c)),
                                     "probability": float(row[c])} for c in order]}
    return [results[i] for i in range(len(files))]


# -- the acceptance check (--check) -------------------------------------------------------------------------

def run_all(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits of every row of ``x``, in batches the model takes."""
    batch_size = max(min(batch_size, model.max_batch or batch_size), getattr(model, "min_batch", 1), 1)
    return np.concatenate([model.infer(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def time_model(model, x: np.ndarray, batch_sizes: list[int], seconds: float, rounds: int) -> dict:
    """Latency at batch 1 and images/s per batch size: ``rounds`` rounds in which each batch size gets one window of
    ``seconds`` (order rotated each round), as the host's benchmark times; each figure is the median over the rounds
    with the slowest and fastest beside it. Times ``infer``: copies to and from the device included."""
    batches = {b: np.ascontiguousarray(np.resize(x, (b, *x.shape[1:]))) for b in batch_sizes}
    for b in batch_sizes:  # warm-up
        model.infer(batches[b])
    rates: dict[int, list[float]] = {b: [] for b in batch_sizes}
    latencies: list[float] = []
    for r in range(rounds):
        for b in batch_sizes[r % len(batch_sizes):] + batch_sizes[:r % len(batch_sizes)]:
            runs, start = 0, time.perf_counter()
            while True:
                t0 = time.perf_counter()
                model.infer(batches[b])
                t1 = time.perf_counter()
                runs += 1
                if b == 1:
                    latencies.append(t1 - t0)
                if t1 - start >= seconds:
                    break
            rates[b].append(runs * b / (t1 - start))
    result = {"seconds": seconds, "rounds": rounds, "includes": "copies to and from the device",
              "throughput": {str(b): {"median": float(np.median(v)), "low": float(min(v)), "high": float(max(v))}
                             for b, v in rates.items()}}
    if latencies:
        ms = np.asarray(latencies) * 1e3
        result["latency_ms_b1"] = {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                                   "runs": int(len(ms))}
    return result


def _first_line(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").splitlines()[0].strip()
    except (OSError, IndexError):
        return None


def device_facts(model) -> dict:
    """What this machine is: CPU, OS, Python, the runtime, JetPack and the GPU's clocks where readable."""
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts = {"machine": platform.node(), "arch": platform.machine(), "os": platform.platform(), "cpu": cpu,
             "python": platform.python_version(), "numpy": np.__version__, **getattr(model, "facts", {}),
             "jetpack": _first_line("/etc/nv_tegra_release")}
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if proc.returncode == 0 and proc.stdout.strip():
            facts["nvidia_smi"] = proc.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return facts


def check(model, spec: dict, seconds: float, rounds: int) -> dict:
    """The acceptance check of ``model`` against ``check/reference.json`` (see the module docstring)."""
    folder = HERE / "check"
    try:
        reference = json.loads((folder / "reference.json").read_text())
        host_logits = np.load(folder / "logits.npy")
        host_tensors = np.load(folder / "tensors.npy")
    except (OSError, ValueError) as e:
        raise RunnerError(f"this bundle has no readable acceptance set ({e}); package it again without "
                          "--check-images 0") from None
    entries = reference["images"]
    labels = np.asarray([e["label"] for e in entries])
    x = np.stack([preprocess(load_image(folder / e["file"]), spec) for e in entries]).astype(np.float32)
    parity = float(np.abs(x[:len(host_tensors)] - host_tensors).max())
    logits = run_all(model, x, 32).astype(np.float32)
    predictions = logits.argmax(1)
    host_predictions = np.asarray(reference["host"]["predictions"])
    budget, host = reference["budget"], reference["host"]
    top1 = float((predictions == labels).mean())
    result = {
        "format": "edgeopt-device-check", "version": 1, "model": getattr(model, "path_name", None),
        "backend": model.backend, "images": len(entries), "top1": top1, "host_top1": host["top1"],
        "top1_drop_pt": 100 * (host["top1"] - top1),
        "agreement_with_host": float((predictions == host_predictions).mean()),
        "logit_diff": {"max": float(np.abs(logits - host_logits).max()),
                       "mean": float(np.abs(logits - host_logits).mean())},
        "preprocessing_max_diff": parity, "preprocessing_tolerance": reference["parity"]["tolerance"],
        "budget": budget, "host": {k: host[k] for k in ("model", "precision", "runtime", "machine")},
    }
    if reference.get("fp32"):
        result["agreement_with_fp32"] = float((predictions == np.asarray(reference["fp32"]["predictions"])).mean())
    problems = []
    if parity > reference["parity"]["tolerance"]:
        problems.append(f"preprocessing differs from the host's by {parity:.3g} (tolerance "
                        f"{reference['parity']['tolerance']:.3g}): preprocess.json or this Pillow/numpy differ")
    if result["top1_drop_pt"] > budget["max_accuracy_drop_pt"] + 1e-9:
        problems.append(f"top-1 {100 * top1:.2f}% against the host's {100 * host['top1']:.2f}%: "
                        f"{result['top1_drop_pt']:.2f} pt lost, the budget is {budget['max_accuracy_drop_pt']:g} pt")
    if result["agreement_with_host"] < budget["min_agreement"]:
        problems.append(f"answers agree with the host's on {100 * result['agreement_with_host']:.2f}% of the set, "
                        f"below {100 * budget['min_agreement']:.0f}%: not the model the host measured")
    result["verdict"] = {"passed": not problems, "problems": problems}
    sizes = [b for b in reference["batch_sizes"] if b <= (model.max_batch or b) and b >= getattr(model, "min_batch", 1)]
    result["speed"] = time_model(model, x, sizes or [model.max_batch or 1], seconds, rounds)
    result["device"] = device_facts(model)
    return result


def render_check(result: dict) -> str:
    """check.md: the verdict, the accuracy figures and the speed, as the host's report shows its rows."""
    v, d = result["verdict"], result["device"]
    lines = [f"# Device check: {'passed' if v['passed'] else 'FAILED'}", ""]
    lines += [f"- {p}" for p in v["problems"]]
    lines += ["", f"Device: {d.get('machine')} ({d.get('arch')}), CPU {d.get('cpu')}, {d.get('runtime')}"
              + (f", GPU {d['gpu']} ({d.get('compute_capability')})" if d.get("gpu") else "")
              + (f", {d['jetpack']}" if d.get("jetpack") else "")
              + (f"; nvidia-smi: {d['nvidia_smi']}" if d.get("nvidia_smi") else ""), "",
              "| model | backend | images | top-1 | host top-1 | drop pt | agree with host | max/mean logit diff "
              "| preprocessing diff |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
              f"| {result['model']} | {result['backend']} | {result['images']} | {100 * result['top1']:.2f}% | "
              f"{100 * result['host_top1']:.2f}% | {result['top1_drop_pt']:.2f} | "
              f"{100 * result['agreement_with_host']:.2f}% | {result['logit_diff']['max']:.3g} / "
              f"{result['logit_diff']['mean']:.3g} | {result['preprocessing_max_diff']:.3g} |", ""]
    s = result["speed"]
    lat = s.get("latency_ms_b1")
    lines += [f"Speed ({s['rounds']} rounds of {s['seconds']:g} s windows, {s['includes']}): "
              + (f"batch 1 p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms; " if lat else "")
              + "; ".join(f"b{b} {t['median']:.0f} img/s ({t['low']:.0f}-{t['high']:.0f})"
                          for b, t in s["throughput"].items()), "",
              f"Budget: at most {result['budget']['max_accuracy_drop_pt']:g} pt of top-1 below the host's, answers "
              f"agreeing on at least {100 * result['budget']['min_agreement']:.0f}%. Host: {result['host']['model']} "
              f"({result['host']['precision']}) on {result['host']['runtime']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR")
    parser.add_argument("--model", type=Path, default=None, help="model.onnx, an OpenVINO model.xml or a TensorRT "
                        "model.plan (default: model.plan when TensorRT is installed, else model.xml when OpenVINO is "
                        "and the bundle has one, else model.onnx)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--check", action="store_true", help="the acceptance check against the host's reference")
    parser.add_argument("--seconds", type=float, default=1.0, help="--check: one timing window")
    parser.add_argument("--rounds", type=int, default=3, help="--check: timing rounds")
    parser.add_argument("--out", type=Path, default=None, help="--check: folder for check.json and check.md "
                        "(default: beside this file)")
    args = parser.parse_args(argv)
    if args.check:
        return main_check(args)
    if not args.images:
        parser.error("give images or folders to classify, or --check")
    try:
        spec = json.loads((HERE / "preprocess.json").read_text())
        labels = (HERE / "labels.txt").read_text().splitlines()
        results = classify(open_model(args.model), expand(args.images), spec, labels, max(1, args.top_k),
                           max(1, args.batch_size))
    except (RunnerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if r["error"]:
                print(f"{r['image']}: error: {r['error']}")
                continue
            print(r["image"])
            for c in r["top_k"]:
                print(f"  {c['probability']:7.2%}  {c['class']}")
    return 1 if any(r["error"] for r in results) else 0


def main_check(args: argparse.Namespace) -> int:
    try:
        spec = json.loads((HERE / "preprocess.json").read_text())
        model = open_model(args.model)
        model.path_name = model.source.name
        result = check(model, spec, max(args.seconds, 0.01), max(args.rounds, 1))
    except (RunnerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or HERE
    out.mkdir(parents=True, exist_ok=True)
    (out / "check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "check.md").write_text(render_check(result))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render_check(result), end="")
        print(f"wrote {out / 'check.json'} and {out / 'check.md'}")
    return 0 if result["verdict"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
