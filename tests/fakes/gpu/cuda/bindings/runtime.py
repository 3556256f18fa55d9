"""Stand-in for ``cuda.bindings.runtime`` over host memory (see tests/fakes/README.md).

Calls return ``(status, *values)`` as the real bindings do; a status is a ``cudaError_t``. Copies and
synchronizations are recorded in :data:`CALLS`; allocations live in :data:`BUFFERS` until freed. The driver's
CUDA version is ``FAKE_CUDA_DRIVER`` and the bindings' ``FAKE_CUDA_RUNTIME`` (both read at each call, default 13000).
"""

from __future__ import annotations

import ctypes
import enum
import os
import warnings

CALLS: list[tuple] = []
BUFFERS: dict[int, ctypes.Array] = {}
STREAMS: list["cudaStream_t"] = []
PROPERTIES = {"name": b"NVIDIA Fake GPU", "major": 9, "minor": 0}


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorIllegalAddress = 700


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


cudaStreamNonBlocking = 1


class cudaStream_t:
    """A stream handle; ``int()`` of it is deprecated from cuda-bindings 13 (use utils.get_cuda_native_handle)."""

    def __init__(self, address: int):
        self.address = address

    def __int__(self) -> int:
        if _runtime() >= 13000:
            warnings.warn("int(cuda_obj) is deprecated; use cuda.bindings.utils.get_cuda_native_handle",
                          DeprecationWarning, stacklevel=2)
        return self.address


def _driver() -> int:
    return int(os.environ.get("FAKE_CUDA_DRIVER", "13000"))


def _runtime() -> int:
    return int(os.environ.get("FAKE_CUDA_RUNTIME", "13000"))


def _usable() -> cudaError_t:
    """What every device call returns when the driver is older than the bindings' CUDA major."""
    if _driver() == 0:
        return cudaError_t.cudaErrorNoDevice
    if _driver() // 1000 < _runtime() // 1000:
        return cudaError_t.cudaErrorInsufficientDriver
    return cudaError_t.cudaSuccess


def cudaDriverGetVersion():
    return cudaError_t.cudaSuccess, _driver()


def cudaRuntimeGetVersion():
    return cudaError_t.cudaSuccess, _runtime()


def cudaGetErrorName(status):
    return cudaError_t.cudaSuccess, cudaError_t(int(status)).name.encode()


def cudaGetDevice():
    return _usable(), 0


class cudaDeviceProp:
    def __init__(self):
        self.name = PROPERTIES["name"] + b"\x00" * 8
        self.major, self.minor = PROPERTIES["major"], PROPERTIES["minor"]


def cudaGetDeviceProperties(device):
    return _usable(), cudaDeviceProp()


def cudaStreamCreateWithFlags(flags):
    if _usable():
        return _usable(), None
    buffer = ctypes.create_string_buffer(8)
    BUFFERS[ctypes.addressof(buffer)] = buffer
    STREAMS.append(cudaStream_t(ctypes.addressof(buffer)))
    return cudaError_t.cudaSuccess, STREAMS[-1]


def _alloc(nbytes: int):
    if _usable():
        return _usable(), 0
    buffer = ctypes.create_string_buffer(max(int(nbytes), 1))
    BUFFERS[ctypes.addressof(buffer)] = buffer
    return cudaError_t.cudaSuccess, ctypes.addressof(buffer)


cudaMalloc = cudaMallocHost = _alloc


def _free(ptr):
    BUFFERS.pop(int(ptr), None)
    return (cudaError_t.cudaSuccess,)


cudaFree = cudaFreeHost = _free


def cudaStreamDestroy(stream):
    return (cudaError_t.cudaSuccess,)


def cudaMemcpyAsync(dst, src, nbytes, kind, stream):
    if not isinstance(stream, cudaStream_t):
        raise TypeError(f"cudaMemcpyAsync takes a cudaStream_t, not {type(stream)}")
    ctypes.memmove(int(dst), int(src), int(nbytes))
    CALLS.append((cudaMemcpyKind(kind).name[len("cudaMemcpy"):], int(nbytes), stream.address))
    return (cudaError_t.cudaSuccess,)


def cudaStreamSynchronize(stream):
    CALLS.append(("sync", stream.address))
    return (cudaError_t.cudaSuccess,)
