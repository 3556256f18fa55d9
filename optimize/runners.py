"""One inference wrapper per backend, all with the same face, picked from the artifact's file and manifest.

- ``.pth`` / ``.pt`` (any checkpoint ``evaluate`` accepts): PyTorch eager, FP32 on the CPU; FP16 / BF16 and
  channels_last on CUDA.
- ``.onnx``: ONNX Runtime, CPU (or CUDA when onnxruntime-gpu is installed and ``device="cuda"``).
- ``.xml`` (an OpenVINO IR and its .bin): OpenVINO on the CPU (``edgeopt[openvino]``).
- ``.engine`` / ``.plan``: TensorRT (:class:`optimize.tensorrt_backend.TensorRTExecution`).

Every runner offers ``infer(batch) -> logits`` (numpy in, numpy out) for inference, and ``prepare(batch)`` +
``run(prepared)`` + ``synchronize()`` for timing: ``prepare`` puts the input where the backend wants it (device
memory, bound buffers) once, ``run`` executes, and ``synchronize`` waits until the device has finished (PyTorch
on CUDA queues its kernels; the others return finished), so what is timed is the model, not the copy or the
loader. :func:`optimize.timing.time_runs` calls it before its clock stops.

Example::

    runner = open_runner("runs/model.onnx", threads=2)
    logits = runner.infer(batch)                  # float32 [n, 3, S, S] -> float32 [n, classes]
    x = runner.prepare(batch)                     # timing: time_runs(lambda: runner.run(x), seconds=1.0,
                                                  #                   synchronize=runner.synchronize)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import openvino_backend as ovb
from .artifacts import read_manifest
from .checkpoint import load_checkpoint
from .configs import available_cores
from .device import require_ort_cuda, resolve_device, resolve_for
from .errors import RunnerError
from .onnx_model import OnnxModel
from .preprocess import Preprocessing
from .tensorrt_backend import TensorRTExecution

logger = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
OPENVINO_SUFFIXES = (".xml",)
TORCH_PRECISIONS = ("fp32", "tf32", "fp16", "bf16")


def float32_math(torch, *, tf32: bool) -> None:
    """Set how PyTorch's CUDA float32 convolutions and matrix products compute: TF32 (10-bit mantissa on tensor
    cores, cuDNN's default for convolutions) or IEEE FP32. Process-wide, so every fp32/tf32 runner sets it before
    each execution: rows of both kinds take turns in one benchmark. torch 2.9+ has ``fp32_precision``; the
    ``allow_tf32`` flags before."""
    cudnn = torch.backends.cudnn
    if hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        mode = "tf32" if tf32 else "ieee"
        # rnn too: the legacy allow_tf32 getter (still read by some code) raises when conv and rnn disagree
        torch.backends.cuda.matmul.fp32_precision = cudnn.conv.fp32_precision = cudnn.rnn.fp32_precision = mode
    else:  # pragma: no cover - torch before 2.9
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def ort_cuda_providers(*, tf32: bool) -> list:
    """ONNX Runtime's providers for a CUDA run: the CUDA provider with TF32 as asked (it defaults to on, which
    would make an "fp32" row TF32), then the CPU one for what CUDA lacks."""
    return [("CUDAExecutionProvider", {"use_tf32": "1" if tf32 else "0"}), "CPUExecutionProvider"]


def backend_of(path: str | Path) -> str:
    """``torch``, ``onnxruntime``, ``openvino`` or ``tensorrt`` from the file name (the manifest confirms engines)."""
    suffix = Path(path).suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix in ONNX_SUFFIXES:
        return "onnxruntime"
    if suffix in ENGINE_SUFFIXES:
        return "tensorrt"
    if suffix in OPENVINO_SUFFIXES:
        return "openvino"
    raise RunnerError(f"{path}: cannot tell the model format from '{suffix}'; give a .pth/.pt checkpoint, an .onnx "
                      "model, an OpenVINO .xml or a TensorRT .engine/.plan")


def default_threads() -> int:
    """CPU threads every backend gets unless told otherwise: all the cores this process may use."""
    return available_cores()


@dataclass
class Runner:
    """What every backend's runner knows about its model; subclasses implement the three methods.

    Attributes:
        path: the artifact.
        backend: ``torch``, ``onnxruntime`` or ``tensorrt``.
        precision: ``fp32`` (IEEE), ``tf32`` (FP32 weights, TF32 math; CUDA), ``fp16``, ``bf16`` or ``int8``.
        device: ``cpu`` or ``cuda``.
        image_size: input side S of ``[n, 3, S, S]``.
        preprocessing / class_names: as recorded by the artifact (None when it records none).
        max_batch: largest batch one :meth:`run` accepts (None: any); :meth:`infer` takes any batch.
        fixed_batch: the only batch size :meth:`run` accepts, when the model's batch axis is static (an ONNX
            exported with a fixed batch); :meth:`infer` splits and pads larger or smaller batches to it. None
            when the batch axis is dynamic.
        threads: CPU threads (None on GPU backends).
        manifest: the artifact's manifest (empty when absent).
    """

    path: Path
    backend: str
    precision: str
    device: str
    image_size: int
    preprocessing: Preprocessing | None = None
    class_names: list[str] | None = None
    max_batch: int | None = None
    threads: int | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    fixed_batch: int | None = None

    @property
    def label(self) -> str:
        """``torch fp16 cuda``-style name of how this runner runs its model."""
        return f"{self.backend} {self.precision} {self.device}"

    def prepare(self, batch: np.ndarray) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, prepared: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait until the device has finished what :meth:`run` queued (nothing to wait for by default)."""

    def infer(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class TorchRunner(Runner):
    """PyTorch eager. FP32 on the CPU; on CUDA also TF32 (FP32 weights, TF32 math), FP16 / BF16 weights and
    inputs, channels_last. ``fp32`` is IEEE FP32 on CUDA too: TF32 is switched off for it (cuDNN's default is on)."""

    def __init__(self, path: str | Path, *, device: str = "cpu", precision: str = "fp32", threads: int | None = None,
                 channels_last: bool = False, trust: bool = False, image_size: int | None = None):
        import torch


        device = resolve_device(device)
        if precision not in TORCH_PRECISIONS:
            raise RunnerError(f"PyTorch precision must be one of {', '.join(TORCH_PRECISIONS)}")
        if device == "cpu" and precision != "fp32":
            raise RunnerError(f"PyTorch {precision} is only offered on CUDA (CPU kernels have no speed-up; TF32 is "
                              "a CUDA tensor-core mode)")
        if device == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
        loaded = load_checkpoint(path, trust=trust)
        if device == "cpu":
            threads = threads or default_threads()
            torch.set_num_threads(threads)
        size = image_size or (loaded.preprocessing.image_size if loaded.preprocessing else None)
        if size is None:
            raise RunnerError(f"{path} records no preprocessing, so its input size is unknown: give --image-size "
                              "(ImageNet's statistics are used)")
        super().__init__(Path(path), "torch", precision, device, size, loaded.preprocessing, loaded.class_names,
                         None, threads if device == "cpu" else None, read_manifest(path) or {})
        self.loaded = loaded
        self._torch = torch
        self._dtype = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
                       "bf16": torch.bfloat16}[precision]
        self._format = torch.channels_last if channels_last else torch.contiguous_format
        self.channels_last = channels_last
        self.model = loaded.model.to(device=device, dtype=self._dtype, memory_format=self._format).eval()

    @property
    def label(self) -> str:
        return super().label + (" channels_last" if self.channels_last else "")

    def prepare(self, batch: np.ndarray):
        x = self._torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        return x.to(device=self.device, dtype=self._dtype, memory_format=self._format)

    def run(self, prepared):
        if self._dtype == self._torch.float32:
            float32_math(self._torch, tf32=self.precision == "tf32")
        with self._torch.inference_mode():
            return self.model(prepared)

    def synchronize(self) -> None:
        if self.device == "cuda":
            self._torch.cuda.synchronize()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.run(self.prepare(batch)).float().cpu().numpy()


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime on the CPU (``threads`` intra-op threads), or CUDA with inputs bound in device memory; on CUDA
    an FP32 model runs IEEE FP32 unless ``tf32`` (then its precision reads ``tf32``)."""

    def __init__(self, path: str | Path, *, device: str = "cpu", threads: int | None = None, tf32: bool = False):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise RunnerError(f"ONNX model {path} does not exist")
        opts = ort.SessionOptions()
        if tf32 and device != "cuda":
            raise RunnerError("TF32 is a CUDA mode: ONNX Runtime on the CPU runs FP32 (drop --tf32 or use --device "
                              "cuda)")
        if device == "cuda":
            require_ort_cuda()
            providers = ort_cuda_providers(tf32=tf32)
        else:
            threads = threads or default_threads()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own untyped errors for unreadable models
            raise RunnerError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}") from e
        model = OnnxModel.read(path, check=False)  # ONNX Runtime has just checked it
        fixed_batch = model.fixed_batch
        preprocessing, class_names = model.recorded_preprocessing()
        size = model.side or (preprocessing.image_size if preprocessing else None)
        if size is None:
            raise RunnerError(f"{path} has no fixed input size and records no preprocessing")
        precision = "tf32" if tf32 and model.precision == "fp32" else model.precision
        super().__init__(path, "onnxruntime", precision, device, size, preprocessing, class_names,
                         fixed_batch, threads if device == "cpu" else None, read_manifest(path) or {}, fixed_batch)
        self.input_name = model.input.name
        self.output_name = model.output.name
        self._ort = ort

    def prepare(self, batch: np.ndarray):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.fixed_batch is not None and len(batch) != self.fixed_batch:
            raise RunnerError(f"{self.path} was exported with a fixed batch of {self.fixed_batch}: it runs batches "
                              f"of exactly {self.fixed_batch}, not {len(batch)} (infer() splits and pads); export it "
                              "with a dynamic batch axis to run others")
        if self.device == "cpu":
            return batch
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, self._ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0))
        binding.bind_output(self.output_name, "cuda")
        return binding

    def run(self, prepared):
        if self.device == "cpu":
            return self.session.run([self.output_name], {self.input_name: prepared})[0]
        self.session.run_with_iobinding(prepared)  # synchronises the CUDA stream before returning
        return prepared

    def infer(self, batch: np.ndarray) -> np.ndarray:
        n = self.fixed_batch
        if n is None or len(batch) == n:
            return self._infer_one(batch)
        chunks = []
        for start in range(0, len(batch), n):  # a static batch axis: chunks of n, the last one zero-padded
            chunk = batch[start:start + n]
            rows = len(chunk)
            if rows < n:
                chunk = np.concatenate([chunk, np.zeros((n - rows, *chunk.shape[1:]), chunk.dtype)])
            chunks.append(self._infer_one(chunk)[:rows])
        return np.concatenate(chunks)

    def _infer_one(self, batch: np.ndarray) -> np.ndarray:
        if self.device == "cpu":
            return self.run(self.prepare(batch))
        return self.run(self.prepare(batch)).copy_outputs_to_cpu()[0]


class OpenVINORunner(Runner):
    """An OpenVINO IR on the CPU plugin: ``threads`` inference threads, float math FP32, the performance hint its
    build measured (LATENCY without a manifest); ``image_size`` reshapes the model (the benchmark's 224 px rows)."""

    def __init__(self, path: str | Path, *, device: str = "cpu", threads: int | None = None,
                 image_size: int | None = None):
        path = Path(path)
        if device != "cpu":
            raise RunnerError(f"{path} is an OpenVINO model: edgeopt runs it on the CPU (use --device cpu)")
        manifest = read_manifest(path) or {}
        engine = manifest.get("engine") or {}
        threads = threads or default_threads()
        hint = engine.get("hint", "LATENCY")  # null in a manifest: OpenVINO's defaults (a peer's model, as shipped)
        self.compiled, side = ovb.compile_model(path, threads=threads, hint=hint, image_size=image_size)
        pre = manifest.get("preprocessing")
        preprocessing = Preprocessing.from_dict(pre, source=f"{path}'s manifest") if pre else None
        size = side or (preprocessing.image_size if preprocessing else None)
        if size is None:
            raise RunnerError(f"{path} has no fixed input size and no build-engine manifest recording its preprocessing")
        precision = engine.get("precision") or ovb.precision_of(path)
        super().__init__(path, "openvino", precision, "cpu", size, preprocessing, manifest.get("class_names"), None,
                         threads, manifest)
        self.hint = hint
        self.request = self.compiled.create_infer_request()

    @property
    def label(self) -> str:
        return super().label + (f" ({self.hint.lower()} hint)" if self.hint else " (OpenVINO's defaults)")

    def prepare(self, batch: np.ndarray):
        return np.ascontiguousarray(batch, dtype=np.float32)

    def run(self, prepared):
        self.request.infer({0: prepared})
        return self.request.get_output_tensor(0).data

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.array(self.run(self.prepare(batch)), dtype=np.float32)  # a copy: the request reuses its buffer


class TensorRTRunner(Runner):
    """A serialized TensorRT engine; the manifest (written by ``build-engine``) must match this GPU and TRT."""

    def __init__(self, path: str | Path, *, device: str = "cuda"):
        path = Path(path)
        manifest = read_manifest(path)
        if not manifest or "engine" not in manifest:
            raise RunnerError(f"{path} has no build-engine manifest ({path.name}.json) telling its TensorRT version, "
                              "GPU and profile; build it with 'cli.py build-engine'")
        if device != "cuda":
            raise RunnerError(f"{path} is a TensorRT engine: it runs on CUDA only (use --device cuda)")
        self.execution = TensorRTExecution(path, manifest)
        self.min_batch = self.execution.min_batch  # a static (DLA) engine pads smaller batches: not timed there
        pre = manifest.get("preprocessing")
        engine = manifest["engine"]
        precision = "tf32" if engine.get("tf32") else engine.get("precision", "fp32")  # an fp32 build with --tf32
        super().__init__(path, "tensorrt", precision, "cuda",
                         int(self.execution.chw[-1]),
                         Preprocessing.from_dict(pre, source=f"{path}'s manifest") if pre else None,
                         manifest.get("class_names"), self.execution.max_batch, None, manifest)

    @property
    def label(self) -> str:
        """``tensorrt int8 cuda (unquantized layers fp16)``: an INT8 engine's other layers are FP16 or FP32."""
        rest = self.manifest.get("engine", {}).get("unquantized_layers")
        return super().label + (f" (unquantized layers {rest})" if rest else "")

    def prepare(self, batch: np.ndarray):
        return self.execution.prepare(batch)

    def run(self, prepared):
        return self.execution.run(prepared)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.execution.infer(batch)


def open_runner(path: str | Path, *, device: str = "cpu", precision: str | None = None, threads: int | None = None,
                channels_last: bool = False, trust: bool = False, image_size: int | None = None,
                tf32: bool = False) -> Runner:
    """The runner for ``path`` on ``device``.

    Args:
        path: ``.pth``/``.pt`` checkpoint, ``.onnx`` model, OpenVINO ``.xml`` or TensorRT ``.engine``/``.plan``.
        device: ``auto``, ``cpu`` or ``cuda`` (:func:`optimize.device.resolve_device`).
        precision: PyTorch only: ``fp32`` (default), ``tf32``, ``fp16`` or ``bf16`` (the last three on CUDA). Other
            formats carry their own.
        threads: CPU threads (default: every core this process may use).
        channels_last: PyTorch only: NHWC memory format.
        trust: allow a pickled whole ``nn.Module`` checkpoint.
        image_size: PyTorch: input side when the checkpoint records no preprocessing; OpenVINO: reshape to it.
        tf32: ONNX Runtime on CUDA only: let an FP32 model use TF32 math (PyTorch: ``precision="tf32"``).

    Raises:
        RunnerError: unknown format, missing backend, a precision the format does not take.
        DeviceError: the device cannot run here (no CUDA device; no CUDA build of ONNX Runtime).
        OnnxModelError: an ONNX model whose input edgeopt cannot feed, or whose recorded preprocessing is damaged.
    """
    backend = backend_of(path)
    if device != "cuda" or backend == "torch":  # ONNX Runtime and TensorRT check their own CUDA
        device = resolve_for(device, [backend])
    if not Path(path).is_file():
        raise RunnerError(f"model {path} does not exist; check the path")
    if backend != "torch" and precision is not None:
        raise RunnerError(f"{path}: an ONNX model's or engine's precision is in the file; a precision applies to "
                          ".pth checkpoints only")
    if backend == "torch":
        return TorchRunner(path, device=device, precision=precision or "fp32", threads=threads,
                           channels_last=channels_last, trust=trust, image_size=image_size)
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(path, device=device, threads=threads, tf32=tf32)
    if backend == "openvino":
        if tf32:
            raise RunnerError(f"{path}: TF32 is a CUDA mode; OpenVINO runs on the CPU")
        return OpenVINORunner(path, device=device, threads=threads, image_size=image_size)
    if tf32:
        raise RunnerError(f"{path}: a TensorRT engine's TF32 is decided at its build (build-engine --tf32)")
    return TensorRTRunner(path, device=device)
