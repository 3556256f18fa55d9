"""Stand-in for ``pycuda.driver`` over host memory; copies and synchronizations are recorded in :data:`CALLS`."""

from __future__ import annotations

import ctypes
import os

import numpy as np

CALLS: list[tuple] = []
_KEEP: list = []


class Stream:
    def __init__(self):
        self._buffer = ctypes.create_string_buffer(8)
        self.handle = ctypes.addressof(self._buffer)

    def synchronize(self):
        CALLS.append(("sync", self.handle))


class DeviceAllocation:
    def __init__(self, nbytes: int):
        self._buffer = ctypes.create_string_buffer(max(int(nbytes), 1))

    def __int__(self) -> int:
        return ctypes.addressof(self._buffer)


def mem_alloc(nbytes: int) -> DeviceAllocation:
    return DeviceAllocation(nbytes)


def pagelocked_empty(shape, dtype) -> np.ndarray:
    return np.empty(shape, dtype)


def memcpy_htod_async(dst, host: np.ndarray, stream: Stream) -> None:
    ctypes.memmove(int(dst), host.ctypes.data, host.nbytes)
    CALLS.append(("HostToDevice", host.nbytes, stream.handle))


def memcpy_dtoh_async(host: np.ndarray, src, stream: Stream) -> None:
    ctypes.memmove(host.ctypes.data, int(src), host.nbytes)
    CALLS.append(("DeviceToHost", host.nbytes, stream.handle))


def get_driver_version() -> int:
    """The driver's CUDA version, as the cuda-python stand-in reports it (pycuda is compiled for the local one)."""
    return int(os.environ.get("FAKE_CUDA_DRIVER", "13000"))


class Device:
    def name(self) -> str:
        return "NVIDIA Fake GPU"

    def compute_capability(self) -> tuple[int, int]:
        return 9, 0


class Context:
    @staticmethod
    def get_device() -> Device:
        return Device()
