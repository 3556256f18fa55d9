"""TensorRT engine building and running, for TensorRT 8.5 (JetPack 5.1) to 11.x.

Two steps, as in NVIDIA's samples: :meth:`EngineBuilder.create_network` parses the ONNX (every parser error is
logged and raised) and :meth:`EngineBuilder.build` makes the serialized engine for one precision and one
optimization profile. Precision by version:

- 8.5 to 10.11 ("weakly typed"): ``BuilderFlag.FP16`` for fp16; ``BuilderFlag.INT8`` for an explicitly quantized
  (Q/DQ) ONNX, without FP16, so the few layers left unquantized run in FP32 exactly as on the strongly typed
  versions (the INT8 figures of 10.x and 11 stay comparable). 8.x needs ``EXPLICIT_BATCH``; 10.x is
  explicit-batch only.
- 10.12 and later ("strongly typed": the precision flags are deprecated there, and gone in 11): the network takes
  its types from the ONNX. FP16 comes from converting the ONNX (:func:`to_fp16_onnx`: float32 I/O, numerically
  sensitive ops and the classifier head kept in float32), INT8 from the Q/DQ ONNX.
- fp32 engines run true FP32: TF32 is turned off unless asked for (it is on by default on Ampere and later).

:class:`TensorRTRunner` checks an engine's manifest against the running TensorRT version and GPU *before*
deserializing (an engine moves neither between GPUs nor TensorRT versions) and runs batches through device
memory it owns on a stream of its own, with asynchronous copies from pinned host buffers, binding each
execution's input shape and buffer to the context. All CUDA work goes through :mod:`optimize.cuda_runtime`, in
the device's *primary* context (the one PyTorch and ONNX Runtime use), after checking that the CUDA binding and
TensorRT's wheels match the driver.

Nothing here can run without an NVIDIA GPU; ``tests/optimize/test_tensorrt_backend.py`` checks every ``trt.*`` name each
version's path uses against that version's real Python bindings (8.5 against NVIDIA's sources).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .configs import check_profile
from .cuda_runtime import CudaRuntime
from .errors import EngineError

logger = logging.getLogger(__name__)

MIN_VERSION = (8, 5)  # JetPack 5.1; every name used here exists in 8.5, several are missing in 8.4
STRONGLY_TYPED_FROM = (10, 12)  # precision flags deprecated from here on, removed in 11
INSTALL_HINT = ("TensorRT is not installed: on a Jetson it comes with JetPack; on a server 'pip install "
                "\"edgeopt[tensorrt]\"' (tensorrt + cuda-python; NVIDIA GPU and driver needed); '--backend onnxruntime' "
                "works without it")
# op types kept in float32 by the FP16 conversion: reductions, exponentials and normalizations overflow or lose
# too much in half precision (besides ONNX Runtime's own block list of ops without FP16 kernels)
FP16_SENSITIVE_OPS = ("Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Div", "Erf",
                      "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
                      "LayerNormalization", "InstanceNormalization", "GroupNormalization")


def trt_version(trt) -> tuple[int, int]:
    """``(major, minor)`` of an imported TensorRT module."""
    parts = str(trt.__version__).split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def check_version(version: tuple[int, int], found: str) -> None:
    """Refuse TensorRT older than :data:`MIN_VERSION` with the fix."""
    if version < MIN_VERSION:
        raise EngineError(f"TensorRT {found} is too old: edgeopt needs TensorRT 8.5 or later (JetPack 5.1 or "
                          "later on a Jetson; 'pip install \"tensorrt>=8.5\"' on a server)")


def import_tensorrt():
    """The ``tensorrt`` module, 8.5 or later."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(INSTALL_HINT) from e
    check_version(trt_version(trt), str(trt.__version__))
    return trt


@dataclass(frozen=True)
class Profile:
    """One optimization profile over the batch axis."""

    min_batch: int
    opt_batch: int
    max_batch: int

    def __post_init__(self) -> None:
        check_profile(self.min_batch, self.opt_batch, self.max_batch)

    @property
    def static(self) -> bool:
        return self.min_batch == self.opt_batch == self.max_batch


def to_fp16_onnx(src: Path, dst: Path) -> dict[str, Any]:
    """Write an FP16 copy of ``src`` for strongly typed TensorRT; returns what was kept in float32.

    Inputs and outputs stay float32 (callers feed and read float32), ops in :data:`FP16_SENSITIVE_OPS` stay
    float32, and so does the node producing each graph output (the classifier head: logits keep their precision,
    so top-1 ties resolve as in FP32). Weights beyond FP16's range are clamped by the converter.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise EngineError(f"{src} is an INT8 (Q/DQ) model: FP16 conversion takes the FP32 ONNX")
    outputs = {o.name for o in model.graph.output}
    heads = [n.name for n in model.graph.node if n.name and outputs & set(n.output)]
    blocked = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_SENSITIVE_OPS))
    present = sorted({n.op_type for n in model.graph.node} & set(blocked))
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked, node_block_list=heads)
    onnx.save(model, str(dst))
    return {"fp32_nodes": heads, "fp32_op_types": present, "io": "float32"}


def _progress_monitor(trt):
    """A progress monitor logging each build phase (TensorRT 10 and later have the interface)."""

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
        plan, facts = builder.build(network, precision="int8", profile=Profile(1, 8, 64), input_name="input",
                                    input_chw=(3, 32, 32), workspace=2 << 30)
    """

    def __init__(self, verbose: bool = False):
        self.trt = import_tensorrt()
        self.version = trt_version(self.trt)
        self.major = self.version[0]
        self.strongly_typed = self.version >= STRONGLY_TYPED_FROM
        severity = self.trt.Logger.VERBOSE if verbose else self.trt.Logger.WARNING
        self.logger = self.trt.Logger(severity)
        self.builder = self.trt.Builder(self.logger)

    def _network_flags(self) -> int:
        trt = self.trt
        if self.major >= 11:
            return 0  # strongly typed and explicit batch are the only modes (the flag is deprecated, ignored)
        if self.strongly_typed:
            return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if self.major < 10:
            return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        return 0  # 10.0 to 10.11: explicit batch is the only mode

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

    def _set_precision(self, config, precision: str, tf32: bool) -> None:
        trt = self.trt
        if not self.strongly_typed:
            if precision == "fp16":
                config.set_flag(trt.BuilderFlag.FP16)
            if precision == "int8":
                config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ layers run INT8; the rest FP32, as when strongly typed
        if precision == "fp32" and not tf32:
            config.clear_flag(trt.BuilderFlag.TF32)

    def _use_dla(self, config, network, dla_core: int) -> dict[str, Any]:
        """Put the network on DLA core ``dla_core`` with GPU fallback; returns which layers run where."""
        trt = self.trt
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        on_gpu = [network.get_layer(i).name for i in range(network.num_layers)
                  if not config.can_run_on_DLA(network.get_layer(i))]
        if len(on_gpu) == network.num_layers:
            raise EngineError(f"no layer of this network can run on DLA core {dla_core}; drop --dla-core")
        if on_gpu:
            logger.warning("%d of %d layers fall back to the GPU from DLA core %d: %s", len(on_gpu),
                           network.num_layers, dla_core, ", ".join(on_gpu[:8]))
        return {"dla_core": dla_core, "layers": network.num_layers, "dla_layers": network.num_layers - len(on_gpu),
                "gpu_fallback_layers": on_gpu}

    def _load_timing_cache(self, config, timing_cache: Path):
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise EngineError(f"timing cache {timing_cache} was made on another GPU or TensorRT version (a timing "
                              "cache must not move between devices); give another --timing-cache or delete it")
        return cache

    def build(self, network, *, precision: str, profile: Profile, input_name: str, input_chw: tuple[int, int, int],
              workspace: int, timing_cache: Path | None = None, sparse_weights: bool = False,
              dla_core: int | None = None, tf32: bool = False) -> tuple[bytes, dict[str, Any]]:
        """Build the serialized engine; returns it with the facts of the build (placement, typing, TF32)."""
        trt = self.trt
        config = self.builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        self._set_precision(config, precision, tf32)
        if sparse_weights:
            config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        facts: dict[str, Any] = {"strongly_typed": self.strongly_typed,
                                 "tf32": precision == "fp32" and tf32, "device": "gpu"}
        if dla_core is not None:
            facts.update(device="dla", dla=self._use_dla(config, network, dla_core))
        opt_profile = self.builder.create_optimization_profile()
        opt_profile.set_shape(input_name, (profile.min_batch, *input_chw), (profile.opt_batch, *input_chw),
                              (profile.max_batch, *input_chw))
        config.add_optimization_profile(opt_profile)
        if timing_cache is not None:
            self._load_timing_cache(config, timing_cache)
        if hasattr(trt, "IProgressMonitor"):  # 10.0 and later
            config.progress_monitor = _progress_monitor(trt)
        plan = self.builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError("TensorRT failed to build the engine (see the errors above); try a larger "
                              "--workspace or another precision")
        if timing_cache is not None:  # what this build learned, not the cache that was passed in
            timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
        return bytes(plan), facts


@dataclass
class PreparedBatch:
    """A batch ``prepare`` left in device memory of its own: ``run`` binds it to the context each time.

    Attributes:
        images: the images it holds; rows: the rows it runs (padded up to a static DLA engine's batch).
        address: its device memory; owner: what keeps that memory alive.
    """

    images: int
    rows: int
    address: int
    owner: Any


class TensorRTRunner:
    """Run a built engine: ``input_spec()``, ``output_spec()``, ``infer(batch)``; ``prepare`` + ``run`` to time.

    The input shape and tensor addresses belong to the execution context, not to a batch: every execution binds
    the rows and device buffer it runs (:meth:`_bind`, skipped when the context already holds them), so timing
    windows of several batch sizes can take turns on one context (NVIDIA's ``common_runtime.py`` likewise sets
    shapes and addresses per inference). Buffers take the engine's I/O dtypes (an engine built with
    ``--inputIOFormats=fp16:chw`` reads half-precision input); callers give and get float32.

    Args:
        engine_path: the ``.engine`` file.
        manifest: its manifest (TensorRT version, GPU, profile, DLA core); checked before deserializing.
    """

    def __init__(self, engine_path: str | Path, manifest: dict[str, Any]):
        trt = import_tensorrt()
        self.cuda = CudaRuntime()
        here = {"tensorrt": str(trt.__version__), **self.cuda.device()}
        built = manifest.get("engine", {})
        for key in ("tensorrt", "gpu", "compute_capability"):
            if built.get(key) != here[key]:
                raise EngineError(f"{engine_path} was built for {key} {built.get(key)!r}, this machine has "
                                  f"{here[key]!r}: rebuild on this device (build_engine.sh or 'cli.py build-engine')")
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        dla_core = (built.get("flags") or {}).get("dla_core")
        if dla_core is not None:  # a DLA engine loads on the core the runtime names, which must be set first
            self.runtime.DLA_core = int(dla_core)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise EngineError(f"{engine_path} does not deserialize; rebuild it on this device")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        smallest, _, largest = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(smallest[0]), int(largest[0])
        self.chw = tuple(int(d) for d in self.engine.get_tensor_shape(self.input_name))[1:]
        self.classes = int(self.engine.get_tensor_shape(self.output_name)[-1])
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.output_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self._stream, self._handle = self.cuda.stream()
        self._in_owner, self._in = self.cuda.device_buffer(self._input_bytes(self.max_batch))
        self._out_owner, self._out = self.cuda.device_buffer(self.max_batch * self.classes * self.output_dtype.itemsize)
        self._host_in = self.cuda.pinned((self.max_batch, *self.chw), self.input_dtype)
        self._host_out = self.cuda.pinned((self.max_batch, self.classes), self.output_dtype)
        self._prepared_owners: list = []
        self._bound: tuple[int, int] | None = None  # (rows, input address) the context holds
        if not self.context.set_tensor_address(self.output_name, self._out):
            raise EngineError(f"TensorRT refused the device buffer of {self.output_name!r}")

    def _input_bytes(self, rows: int) -> int:
        return rows * int(np.prod(self.chw)) * self.input_dtype.itemsize

    def input_spec(self) -> tuple[str, tuple, np.dtype]:
        return self.input_name, (-1, *self.chw), self.input_dtype

    def output_spec(self) -> tuple[str, tuple, np.dtype]:
        return self.output_name, (-1, self.classes), self.output_dtype

    def _rows(self, batch: np.ndarray) -> int:
        """Rows to run for ``batch``: its size, padded up to the profile's minimum (a static DLA engine)."""
        if len(batch) > self.max_batch:
            raise EngineError(f"batch of {len(batch)} is above the engine's --max-batch {self.max_batch}")
        return max(len(batch), self.min_batch)

    def _stage(self, batch: np.ndarray, rows: int, address: int) -> None:
        """Queue the copy of ``batch`` (in the engine's input dtype, zero rows up to ``rows``) to ``address``."""
        n = len(batch)
        self._host_in[:n] = batch
        self._host_in[n:rows] = 0
        self.cuda.to_device(address, self._host_in[:rows], self._stream)  # only the rows run

    def _bind(self, rows: int, address: int) -> None:
        """Give the context this execution's input shape and buffer (unless it holds them already)."""
        if self._bound == (rows, address):
            return
        self._bound = None
        if not self.context.set_input_shape(self.input_name, (rows, *self.chw)):
            raise EngineError(f"TensorRT refused input shape {(rows, *self.chw)} for {self.input_name!r}")
        if not self.context.set_tensor_address(self.input_name, address):
            raise EngineError(f"TensorRT refused the device buffer of {self.input_name!r}")
        self._bound = (rows, address)

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self._handle):  # our stream: the default one adds device syncs
            raise EngineError("TensorRT execution failed")

    def prepare(self, batch: np.ndarray) -> PreparedBatch:
        """Copy ``batch`` once into device memory of its own, for timing :meth:`run`."""
        rows = self._rows(batch)
        owner, address = self.cuda.device_buffer(self._input_bytes(rows))
        self._prepared_owners.append(owner)
        self._stage(batch, rows, address)
        self.cuda.synchronize(self._stream)
        return PreparedBatch(images=len(batch), rows=rows, address=address, owner=owner)

    def run(self, prepared: PreparedBatch) -> int:
        """Execute on the batch ``prepare`` left in device memory, with its shape, and wait for it to finish."""
        self._bind(prepared.rows, prepared.address)
        self._execute()
        self.cuda.synchronize(self._stream)
        return prepared.images

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Float32 logits of ``batch`` (copied in, run, copied out on this runner's stream)."""
        rows = self._rows(batch)
        self._stage(batch, rows, self._in)
        self._bind(rows, self._in)
        self._execute()
        self.cuda.to_host(self._host_out[:rows], self._out, self._stream)
        self.cuda.synchronize(self._stream)
        return self._host_out[:len(batch)].astype(np.float32)

    def __del__(self):
        if hasattr(self, "_host_out"):
            self.cuda.free([self._in_owner, self._out_owner, *self._prepared_owners],
                           [self._host_in, self._host_out], self._stream)
