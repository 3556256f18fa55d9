"""TensorRT engine building and running, for TensorRT 8.5 (JetPack 5.1) to 11.x.

Two steps, as in NVIDIA's samples: :meth:`EngineBuilder.create_network` parses the ONNX (every parser error is
logged and raised) and :meth:`EngineBuilder.build` makes the serialized engine for one precision and one
optimization profile. Precision by version:

- 8.5 to 10.11 ("weakly typed"): ``BuilderFlag.FP16`` for fp16; ``BuilderFlag.INT8`` for an explicitly quantized
  (Q/DQ) ONNX, with ``FP16`` beside it so the layers left unquantized (residual Adds, pooling, the head) run
  FP16 as Model Optimizer's default INT8 models do (``int8_high_precision="fp32"``: INT8 alone, those layers
  FP32). 8.x needs ``EXPLICIT_BATCH``; 10.x is explicit-batch only.
- 10.12 and later ("strongly typed": the precision flags are deprecated there, and gone in 11): the network takes
  its types from the ONNX. FP16 comes from converting the ONNX (:func:`optimize.fp16.to_fp16_onnx`: float32 I/O,
  numerically sensitive ops and the classifier head kept in float32), INT8 from the Q/DQ ONNX, converted the
  same way for FP16 unquantized layers (opset 19, float16 scales).
- fp32 engines run true FP32: TF32 is turned off unless asked for (it is on by default on Ampere and later).
- DLA (Jetson): explicitly quantized INT8 runs on DLA from TensorRT 10.0 on (:func:`check_dla`), and needs FP16
  for the layers it leaves unquantized; where each layer ended up is read from the built engine
  (:func:`dla_placement`), not asked before the build.

:class:`TensorRTExecution` checks an engine's manifest against the running TensorRT version and GPU *before*
deserializing (an engine moves neither between GPUs nor TensorRT versions) and runs batches through device
memory it owns on a stream of its own, with asynchronous copies from pinned host buffers, binding each
execution's input shape and buffer to the context. All CUDA work goes through :mod:`optimize.cuda_runtime`, in
the device's *primary* context (the one PyTorch and ONNX Runtime use), after checking that the CUDA binding and
TensorRT's wheels match the driver.

Nothing here can run without an NVIDIA GPU; ``tests/optimize/test_tensorrt_backend.py`` checks every ``trt.*`` name each
version's path uses against that version's real Python bindings (8.5 against NVIDIA's sources).
"""

from __future__ import annotations

import json
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
DLA_QDQ_FROM = (10, 0)  # explicit (Q/DQ) INT8 on DLA; before it DLA took INT8 only from calibrators
STRONGLY_TYPED_FROM = (10, 12)  # precision flags deprecated from here on, removed in 11
INSTALL_HINT = ("TensorRT is not installed: on a Jetson it comes with JetPack; on a server pip install "
                "'edgeopt[tensorrt-cu13]' (driver R580 or later) or 'edgeopt[tensorrt-cu12]' (R525 to R575), as "
                "nvidia-smi's CUDA Version says; '--backend onnxruntime' works without it")


def trt_version(trt) -> tuple[int, int]:
    """``(major, minor)`` of an imported TensorRT module."""
    parts = str(trt.__version__).split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def check_version(version: tuple[int, int], found: str) -> None:
    """Refuse TensorRT older than :data:`MIN_VERSION` with the fix."""
    if version < MIN_VERSION:
        raise EngineError(f"TensorRT {found} is too old: edgeopt needs TensorRT {MIN_VERSION[0]}.{MIN_VERSION[1]} or "
                          "later (JetPack 5.1 or later on a Jetson; the README's TensorRT table on a server)")


def import_tensorrt():
    """The ``tensorrt`` module, 8.5 or later."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(INSTALL_HINT) from e
    check_version(trt_version(trt), str(trt.__version__))
    return trt


def check_dla(version: tuple[int, int], precision: str, dla_core: int | None, int8_high_precision: str) -> None:
    """Refuse a DLA build this TensorRT cannot make as asked, before any work (calibration included)."""
    if dla_core is None or precision != "int8":
        return
    if version < DLA_QDQ_FROM:
        raise EngineError(f"TensorRT {version[0]}.{version[1]} runs explicitly quantized (Q/DQ) INT8 on the GPU only; "
                          "DLA takes it from TensorRT 10.0 (JetPack 6.1): build --precision fp16 for DLA, or INT8 "
                          "without --dla-core")
    if int8_high_precision != "fp16":
        raise EngineError("--dla-core with --precision int8 needs --int8-high-precision fp16: DLA has no FP32 for "
                          "the unquantized layers (they would fall back to the GPU)")


def dla_placement(engine_information: str) -> dict[str, Any]:
    """Where a built DLA engine runs its layers, from the engine inspector's JSON.

    TensorRT reports each DLA subgraph as one ``{ForeignNode[first...last]}`` layer (trtexec's profile prints the
    same), with copies to and from DLA memory (``... to nvm`` / ``... from nvm`` / ``copy finish``) around it;
    every other compute layer runs on the GPU. Reformatting copies count as neither.
    """
    layers = json.loads(engine_information).get("Layers", [])
    dla, gpu = [], []
    for layer in layers:
        name = layer if isinstance(layer, str) else str(layer.get("Name", ""))
        kind = "" if isinstance(layer, str) else str(layer.get("LayerType", ""))
        if name.startswith("{ForeignNode[") or "DLA" in kind.upper():
            dla.append(name)
        elif not (name.endswith((" to nvm", " from nvm", " copy finish")) or name.startswith("Reformatting")):
            gpu.append(name)
    return {"dla_subgraphs": len(dla), "gpu_layers": len(gpu), "gpu_layer_names": gpu[:32],
            "read_from": "engine inspector (after the build)"}


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

    def _set_precision(self, config, precision: str, tf32: bool, int8_high_precision: str) -> None:
        trt = self.trt
        if not self.strongly_typed:
            if precision == "fp16" or (precision == "int8" and int8_high_precision == "fp16"):
                config.set_flag(trt.BuilderFlag.FP16)
            if precision == "int8":
                config.set_flag(trt.BuilderFlag.INT8)  # the Q/DQ layers run INT8, the rest FP16 (or FP32)
        if (precision == "fp32" and not tf32) or (precision == "int8" and int8_high_precision == "fp32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # FP32 layers are FP32, not TF32 (on by default from Ampere)

    def _use_dla(self, config, dla_core: int) -> None:
        """Put the network on DLA core ``dla_core``, layers DLA can't run falling back to the GPU; layer details
        kept in the engine so :meth:`placement` can read where each ended up."""
        trt = self.trt
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED

    def placement(self, plan: bytes, dla_core: int) -> dict[str, Any]:
        """Where the built engine runs its layers (:func:`dla_placement`), read back from the plan."""
        trt = self.trt
        runtime = trt.Runtime(self.logger)
        runtime.DLA_core = dla_core
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineError(f"the engine just built for DLA core {dla_core} does not deserialize here")
        inspector = engine.create_engine_inspector()
        found = dla_placement(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        if not found["dla_subgraphs"]:
            raise EngineError(f"no layer of this network runs on DLA core {dla_core} at this precision; drop "
                              "--dla-core")
        if found["gpu_layers"]:
            logger.warning("%d layer(s) fall back from DLA core %d to the GPU: %s", found["gpu_layers"], dla_core,
                           ", ".join(found["gpu_layer_names"][:8]))
        return {"dla_core": dla_core, **found}

    def _load_timing_cache(self, config, timing_cache: Path):
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise EngineError(f"timing cache {timing_cache} was made on another GPU or TensorRT version (a timing "
                              "cache must not move between devices); give another --timing-cache or delete it")
        return cache

    def build(self, network, *, precision: str, profile: Profile, input_name: str, input_chw: tuple[int, int, int],
              workspace: int, timing_cache: Path | None = None, sparse_weights: bool = False,
              dla_core: int | None = None, tf32: bool = False,
              int8_high_precision: str = "fp16") -> tuple[bytes, dict[str, Any]]:
        """Build the serialized engine; returns it with the facts of the build (placement, typing, TF32)."""
        trt = self.trt
        check_dla(self.version, precision, dla_core, int8_high_precision)
        config = self.builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        self._set_precision(config, precision, tf32, int8_high_precision)
        if sparse_weights:
            config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        facts: dict[str, Any] = {"strongly_typed": self.strongly_typed,
                                 "tf32": precision == "fp32" and tf32, "device": "gpu"}
        if dla_core is not None:
            self._use_dla(config, dla_core)
            facts["device"] = "dla"
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
        plan = bytes(plan)
        if dla_core is not None:
            facts["dla"] = self.placement(plan, dla_core)
        return plan, facts


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


class TensorRTExecution:
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
