"""TensorRT engine building and running, for TensorRT 8.6 / 10.x (builder flags) and 11.x (strongly typed).

Two steps, as in NVIDIA's samples: :meth:`EngineBuilder.create_network` parses the ONNX (every parser error is
logged and raised) and :meth:`EngineBuilder.build` makes the serialized engine for one precision and one
optimization profile. Precision by version:

- 8.6 / 10.x: ``BuilderFlag.FP16``; INT8 with ``BuilderFlag.INT8`` from an explicitly quantized (Q/DQ) ONNX.
  8.6 needs ``EXPLICIT_BATCH``; 10.x is explicit-batch only and deprecates the flag.
- 11.x: strongly typed only (no precision flags, no calibrators): FP16 comes from converting the ONNX to FP16
  first (I/O kept float32), INT8 from the Q/DQ ONNX.

:class:`TensorRTRunner` checks an engine's manifest against the running TensorRT version and GPU *before*
deserializing (an engine moves neither between GPUs nor TensorRT versions) and runs batches through device
memory it owns (pycuda, or cuda-python when pycuda is absent).

Nothing here can run without an NVIDIA GPU; ``tests/test_tensorrt_api.py`` checks every ``trt.*`` name each
version's path uses against that version's real Python bindings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EdgeoptError

logger = logging.getLogger(__name__)

INSTALL_HINT = ("TensorRT is not installed: on a Jetson it comes with JetPack; on a server 'pip install "
                "tensorrt pycuda' (NVIDIA GPU and driver needed); '--backend onnxruntime' works without it")


class EngineError(EdgeoptError):
    """An engine cannot be built or run here."""


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(INSTALL_HINT) from e
    return trt


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


@dataclass(frozen=True)
class Profile:
    """One optimization profile over the batch axis."""

    min_batch: int
    opt_batch: int
    max_batch: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise EngineError(f"batch sizes must satisfy 1 <= --min-batch ({self.min_batch}) <= --opt-batch "
                              f"({self.opt_batch}) <= --max-batch ({self.max_batch})")
        if self.max_batch > 4096:
            raise EngineError(f"--max-batch {self.max_batch} is beyond any device's memory for a classifier; "
                              "use 4096 or less")


def to_fp16_onnx(src: Path, dst: Path) -> Path:
    """FP16 copy of an ONNX model with float32 inputs and outputs (what TensorRT 11 builds FP16 from)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return dst


def _progress_monitor(trt):
    """A progress monitor logging each build phase (TensorRT 10 and later have the interface)."""
    if not hasattr(trt, "IProgressMonitor"):
        raise EngineError(f"TensorRT {trt.__version__} has no build progress monitor")

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            logger.info("TensorRT: %s (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name, step):
            return True  # returning False would cancel the build

        def phase_finish(self, phase_name):
            logger.debug("TensorRT: %s done", phase_name)

    return _Monitor()


class EngineBuilder:
    """Parse an ONNX model and build a serialized TensorRT engine.

    Example::

        builder = EngineBuilder()
        network, parser = builder.create_network("runs/model.int8.onnx")
        plan = builder.build(network, precision="int8", profile=Profile(1, 8, 64), input_name="input",
                             input_chw=(3, 32, 32), workspace=2 << 30)
    """

    def __init__(self, verbose: bool = False):
        self.trt = import_tensorrt()
        self.major = trt_major(self.trt)
        severity = self.trt.Logger.VERBOSE if verbose else self.trt.Logger.WARNING
        self.logger = self.trt.Logger(severity)
        self.builder = self.trt.Builder(self.logger)

    def _network_flags(self) -> int:
        trt = self.trt
        if self.major >= 11:
            return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if self.major < 10:
            return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        return 0  # 10.x: explicit batch is the only mode

    def create_network(self, onnx_path: str | Path):
        """Parse ``onnx_path``; log every parser error and raise if any; log the I/O shapes."""
        trt = self.trt
        network = self.builder.create_network(self._network_flags())
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(Path(onnx_path).read_bytes()):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            for err in errors:
                logger.error("TensorRT ONNX parser: %s", err)
            raise EngineError(f"TensorRT could not parse {onnx_path}: {errors[0] if errors else 'unknown error'}")
        for i in range(network.num_inputs):
            t = network.get_input(i)
            logger.info("input %s %s %s", t.name, tuple(t.shape), t.dtype)
        for i in range(network.num_outputs):
            t = network.get_output(i)
            logger.info("output %s %s %s", t.name, tuple(t.shape), t.dtype)
        return network, parser

    def build(self, network, *, precision: str, profile: Profile, input_name: str, input_chw: tuple[int, int, int],
              workspace: int, timing_cache: Path | None = None, sparse_weights: bool = False,
              dla_core: int | None = None) -> bytes:
        """Build the serialized engine; the precision comes from flags (8.6/10) or the ONNX itself (11)."""
        trt = self.trt
        config = self.builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        if self.major < 11:
            if precision in ("fp16", "int8"):
                config.set_flag(trt.BuilderFlag.FP16)  # int8: layers without Q/DQ may run in FP16
            if precision == "int8":
                config.set_flag(trt.BuilderFlag.INT8)
        if sparse_weights:
            config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        if dla_core is not None:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = dla_core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        opt_profile = self.builder.create_optimization_profile()
        opt_profile.set_shape(input_name, (profile.min_batch, *input_chw), (profile.opt_batch, *input_chw),
                              (profile.max_batch, *input_chw))
        config.add_optimization_profile(opt_profile)
        cache = None
        if timing_cache is not None:
            cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
        if hasattr(trt, "IProgressMonitor"):  # 8.6 has none
            config.progress_monitor = _progress_monitor(trt)
        plan = self.builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError("TensorRT failed to build the engine (see the errors above); try a larger "
                              "--workspace or another precision")
        if cache is not None:
            timing_cache.write_bytes(memoryview(cache.serialize()))
        return bytes(plan)


def device_facts() -> dict[str, Any]:
    """Name and compute capability of GPU 0 (pycuda, else cuda-python)."""
    try:
        import pycuda.autoinit  # noqa: F401 - creates the context
        import pycuda.driver as cuda

        dev = cuda.Device(0)
        return {"gpu": dev.name(), "compute_capability": "%d.%d" % dev.compute_capability()}
    except ImportError:
        from cuda.bindings import runtime as cudart

        err, props = cudart.cudaGetDeviceProperties(0)
        _check(err)
        return {"gpu": props.name.decode().rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}


def _check(err) -> None:
    code = err[0] if isinstance(err, tuple) else err
    if int(code) != 0:
        raise EngineError(f"CUDA call failed with error {code}")


class _DeviceBuffer:
    """Device memory through pycuda, or cuda-python when pycuda is absent; freed with the object."""

    def __init__(self, nbytes: int):
        try:
            import pycuda.autoinit  # noqa: F401
            import pycuda.driver as cuda

            self._cuda, self._kind = cuda, "pycuda"
            self.alloc = cuda.mem_alloc(nbytes)
            self.ptr = int(self.alloc)
        except ImportError:
            from cuda.bindings import runtime as cudart

            self._cuda, self._kind = cudart, "cuda-python"
            err, self.ptr = cudart.cudaMalloc(nbytes)
            _check(err)

    def upload(self, host: np.ndarray) -> None:
        if self._kind == "pycuda":
            self._cuda.memcpy_htod(self.alloc, host)
        else:
            _check(self._cuda.cudaMemcpy(self.ptr, host.ctypes.data, host.nbytes,
                                         self._cuda.cudaMemcpyKind.cudaMemcpyHostToDevice))

    def download(self, host: np.ndarray) -> None:
        if self._kind == "pycuda":
            self._cuda.memcpy_dtoh(host, self.alloc)
        else:
            _check(self._cuda.cudaMemcpy(host.ctypes.data, self.ptr, host.nbytes,
                                         self._cuda.cudaMemcpyKind.cudaMemcpyDeviceToHost))

    def synchronize(self) -> None:
        """Wait for all work queued on the device."""
        if self._kind == "pycuda":
            self._cuda.Context.synchronize()
        else:
            _check(self._cuda.cudaDeviceSynchronize())

    def __del__(self):
        if getattr(self, "_kind", None) == "cuda-python":
            self._cuda.cudaFree(self.ptr)


class TensorRTRunner:
    """Run a built engine: ``input_spec()``, ``output_spec()``, ``infer(batch)``.

    Args:
        engine_path: the ``.engine`` file.
        manifest: its manifest (TensorRT version, GPU, profile); checked before deserializing.
    """

    def __init__(self, engine_path: str | Path, manifest: dict[str, Any]):
        trt = import_tensorrt()
        here = {"tensorrt": str(trt.__version__), **device_facts()}
        built = manifest.get("engine", {})
        for key in ("tensorrt", "gpu", "compute_capability"):
            if built.get(key) != here[key]:
                raise EngineError(f"{engine_path} was built for {key} {built.get(key)!r}, this machine has "
                                  f"{here[key]!r}: rebuild on this device (build_engine.sh or 'cli.py build-engine')")
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise EngineError(f"{engine_path} does not deserialize; rebuild it on this device")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.max_batch = int(built["profile"]["max_batch"])
        self.chw = tuple(int(d) for d in self.engine.get_tensor_shape(self.input_name))[1:]
        self.classes = int(self.engine.get_tensor_shape(self.output_name)[-1])
        self._in = _DeviceBuffer(self.max_batch * int(np.prod(self.chw)) * 4)
        self._out = _DeviceBuffer(self.max_batch * self.classes * 4)
        self.context.set_tensor_address(self.input_name, self._in.ptr)
        self.context.set_tensor_address(self.output_name, self._out.ptr)

    def input_spec(self) -> tuple[str, tuple, np.dtype]:
        return self.input_name, (-1, *self.chw), np.dtype(np.float32)

    def output_spec(self) -> tuple[str, tuple, np.dtype]:
        return self.output_name, (-1, self.classes), np.dtype(np.float32)

    def prepare(self, batch: np.ndarray) -> int:
        """Copy ``batch`` into the engine's input buffer once (for timing ``run``); returns its size."""
        if len(batch) > self.max_batch:
            raise EngineError(f"batch of {len(batch)} is above the engine's --max-batch {self.max_batch}")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        self.context.set_input_shape(self.input_name, tuple(batch.shape))
        self._in.upload(batch)
        return len(batch)

    def run(self, prepared: int) -> int:
        """Execute on the input ``prepare`` left in device memory and wait for it to finish."""
        if not self.context.execute_async_v3(0):
            raise EngineError("TensorRT execution failed")
        self._in.synchronize()
        return prepared

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) > self.max_batch:
            raise EngineError(f"batch of {len(batch)} is above the engine's --max-batch {self.max_batch}")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        self.context.set_input_shape(self.input_name, tuple(batch.shape))
        self._in.upload(batch)
        if not self.context.execute_async_v3(0):
            raise EngineError("TensorRT execution failed")
        out = np.empty((len(batch), self.classes), dtype=np.float32)
        self._out.download(out)  # synchronous copy on the default stream: waits for the execution
        return out
