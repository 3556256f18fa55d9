"""A stand-in for TensorRT's runtime API with the state the real one keeps (see tests/fakes/README.md).

``__version__`` comes from ``FAKE_TRT_VERSION`` (default 10.3.0). A plan is the JSON of :func:`engine_spec`.
Every execution is recorded in :data:`RUNS` (stream handle, input shape, input address).
"""

from __future__ import annotations

import ctypes
import json
import os

import numpy as np

__version__ = os.environ.get("FAKE_TRT_VERSION", "10.3.0")
RUNS: list[dict] = []  # every execute_async_v3: {"stream", "shape", "input_address"}


class DataType:
    def __init__(self, name: str, np_dtype):
        self.name, self.np_dtype = name, np.dtype(np_dtype)

    def __repr__(self) -> str:
        return f"DataType.{self.name.upper()}"


float32 = DataType("float", np.float32)
float16 = DataType("half", np.float16)
int8 = DataType("int8", np.int8)
DTYPES = {"float32": float32, "float16": float16, "int8": int8}


def nptype(dtype: DataType):
    return dtype.np_dtype.type


class TensorIOMode:
    INPUT, OUTPUT = "INPUT", "OUTPUT"


class LayerInformationFormat:
    ONELINE, JSON = "ONELINE", "JSON"


class Logger:
    VERBOSE, INFO, WARNING, ERROR, INTERNAL_ERROR = range(5)

    def __init__(self, severity=WARNING):
        self.severity = severity


def engine_spec(*, chw=(3, 4, 4), classes: int = 10, profile=(1, 4, 8), input_dtype: str = "float32",
                output_dtype: str = "float32", dla_core: int | None = None, layers: list | None = None) -> bytes:
    """A fake plan: an engine whose logits are the first ``classes`` values of each input row."""
    return json.dumps({"chw": list(chw), "classes": classes, "profile": list(profile), "input_dtype": input_dtype,
                       "output_dtype": output_dtype, "dla_core": dla_core,
                       "layers": layers or ["conv1 + relu", "fc"]}).encode()


class ICudaEngine:
    num_optimization_profiles = 1

    def __init__(self, spec: dict):
        self.spec = spec
        self.names = ("input", "logits")
        self.num_io_tensors = 2

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> str:
        return TensorIOMode.INPUT if name == "input" else TensorIOMode.OUTPUT

    def get_tensor_shape(self, name: str) -> tuple:
        return (-1, *self.spec["chw"]) if name == "input" else (-1, self.spec["classes"])

    def get_tensor_dtype(self, name: str) -> DataType:
        return DTYPES[self.spec["input_dtype" if name == "input" else "output_dtype"]]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple]:
        if name != "input" or profile_index != 0:
            raise ValueError(f"no profile {profile_index} for {name!r}")
        return [(b, *self.spec["chw"]) for b in self.spec["profile"]]

    def create_execution_context(self) -> "IExecutionContext":
        return IExecutionContext(self)

    def create_engine_inspector(self) -> "EngineInspector":
        return EngineInspector(self)


class IExecutionContext:
    """The state a real context keeps: the input shape and each I/O tensor's address."""

    def __init__(self, engine: ICudaEngine):
        self.engine = engine
        self.input_shape: tuple | None = None
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(int(d) for d in shape)
        low, _, high = self.engine.spec["profile"]
        if name != "input" or shape[1:] != tuple(self.engine.spec["chw"]) or not low <= shape[0] <= high:
            return False
        self.input_shape = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        batch = self.input_shape[0] if self.input_shape else -1
        return (batch, *self.engine.spec["chw"]) if name == "input" else (batch, self.engine.spec["classes"])

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine.names or not isinstance(address, int):
            return False
        self.addresses[name] = address
        return True

    def get_tensor_address(self, name: str) -> int:
        return self.addresses.get(name, 0)

    @property
    def all_binding_shapes_specified(self) -> bool:
        return self.input_shape is not None

    def execute_async_v3(self, stream_handle) -> bool:
        if not isinstance(stream_handle, int):
            raise TypeError(f"execute_async_v3 takes the stream's address as an int, not {type(stream_handle)}")
        if self.input_shape is None or set(self.addresses) != set(self.engine.names):
            return False  # TensorRT: "not all shapes are specified" / "address not set"
        spec, rows = self.engine.spec, self.input_shape[0]
        per_row = int(np.prod(spec["chw"]))
        in_dtype, out_dtype = (DTYPES[spec[k]].np_dtype for k in ("input_dtype", "output_dtype"))
        x = np.frombuffer((ctypes.c_byte * (rows * per_row * in_dtype.itemsize)).from_address(
            self.addresses["input"]), in_dtype).reshape(rows, per_row)
        y = np.frombuffer((ctypes.c_byte * (rows * spec["classes"] * out_dtype.itemsize)).from_address(
            self.addresses["logits"]), out_dtype).reshape(rows, spec["classes"])
        y[:] = x[:, :spec["classes"]].astype(out_dtype)
        RUNS.append({"stream": stream_handle, "shape": self.input_shape, "input_address": self.addresses["input"]})
        return True


class EngineInspector:
    def __init__(self, engine: ICudaEngine):
        self.engine = engine
        self.execution_context = None

    def get_engine_information(self, fmt) -> str:
        return json.dumps({"Layers": self.engine.spec["layers"], "Bindings": list(self.engine.names)})


class Runtime:
    def __init__(self, logger: Logger):
        self.logger = logger
        self.DLA_core = -1
        self.num_DLA_cores = 2

    def deserialize_cuda_engine(self, data: bytes):
        try:
            spec = json.loads(bytes(data))
        except ValueError:
            return None  # not a plan of this TensorRT
        if spec.get("dla_core") is not None and spec["dla_core"] != self.DLA_core:
            return None  # a DLA engine loads only on the core the runtime was told
        return ICudaEngine(spec)
