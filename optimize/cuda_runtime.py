"""The few CUDA runtime calls TensorRT needs from Python, checked against the machine's driver before any work.

:class:`CudaRuntime` works in device 0's *primary* context, the one PyTorch and ONNX Runtime use, so the three
can share a process: through cuda-python's runtime API (``cuda.bindings.runtime``; always the primary context),
else pycuda through ``pycuda.autoprimaryctx`` (never ``autoinit``, which makes a second context and leaves it
current). Every call's status is checked.

Bindings and driver must agree on the CUDA major version: cuda-python 13 (what ``pip install cuda-python`` gives
today) needs a driver for CUDA 13 (R580 or later); on an R535/R550 server or a Jetson every call would fail with
``cudaErrorInsufficientDriver``. So before anything else the driver's CUDA version (``cudaDriverGetVersion``) is
compared with the bindings' (``cudaRuntimeGetVersion``) and with the CUDA major of TensorRT's pip wheels
(``tensorrt-cu12-libs`` / ``-cu13-``). A mismatch falls back to pycuda when it is installed (it is compiled
against the local CUDA), else raises one line naming the extra that matches the driver (:data:`EXTRAS`).

Example::

    cuda = CudaRuntime()                       # EngineError naming the fix when the driver can't run it
    stream, handle = cuda.stream()             # handle: the address TensorRT's execute_async_v3 takes
    owner, ptr = cuda.device_buffer(nbytes)
    host = cuda.pinned((8, 3, 32, 32))
    cuda.to_device(ptr, host, stream); cuda.synchronize(stream)
"""

from __future__ import annotations

import ctypes
import logging
from importlib import metadata
from pathlib import Path

import numpy as np

from .errors import EngineError

logger = logging.getLogger(__name__)

# pip extras per CUDA major (pyproject.toml): TensorRT and cuda-python built for that CUDA; 11 is JetPack 5's
EXTRAS = {12: "tensorrt-cu12", 13: "tensorrt-cu13"}  # pyproject.toml's server extras (Jetsons: install_hint)
# the oldest driver branch for each CUDA major (NVIDIA's CUDA compatibility table)
DRIVER_FOR = {11: "R450", 12: "R525", 13: "R580"}
CUDA_HINT = ("neither cuda-python nor pycuda is installed: pip install 'edgeopt[tensorrt-cu12]' or "
             "'edgeopt[tensorrt-cu13]' (the CUDA major of your driver: nvidia-smi shows it), or pycuda")


def cuda_text(code: int) -> str:
    """``12.4`` for the CUDA version code 12040 (``1000 * major + 10 * minor``)."""
    return f"{code // 1000}.{code % 1000 // 10}"


def on_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists()


def install_hint(driver_major: int) -> str:
    """The pip command that matches a driver of this CUDA major (on a Jetson: the binding beside JetPack's
    TensorRT)."""
    if on_jetson():
        jetpack = {11: "jetpack5", 12: "jetpack6"}.get(driver_major)
        if jetpack:
            return (f"pip install 'edgeopt[{jetpack}]' (cuda-python for CUDA {driver_major}; TensorRT comes with "
                    "JetPack: make the venv with --system-site-packages)")
    extra = EXTRAS.get(driver_major)
    if extra is None:
        return f"install TensorRT and cuda-python built for CUDA {driver_major}"
    return f"pip install 'edgeopt[{extra}]' (TensorRT and cuda-python for CUDA {driver_major})"


def driver_mismatch(what: str, needs: int, driver: int) -> str | None:
    """Why ``what`` (built for CUDA ``needs``) can't run on a driver for CUDA ``driver`` (codes), or None."""
    if driver <= 0:
        return f"{what} finds no NVIDIA driver on this machine (a GPU and its driver are needed)"
    if driver // 1000 >= needs // 1000:
        return None  # minor versions are compatible within a major
    return (f"{what} is built for CUDA {cuda_text(needs)}, but this NVIDIA driver supports CUDA {cuda_text(driver)}: "
            f"{install_hint(driver // 1000)}, or update the driver to {DRIVER_FOR.get(needs // 1000, 'a newer one')} "
            f"or later")


def tensorrt_wheel_cuda() -> int | None:
    """The CUDA major TensorRT's pip wheels were built for (``tensorrt-cu13-libs`` -> 13); None for a TensorRT
    that came another way (JetPack, NVIDIA's tar or deb packages) or none."""
    for major in sorted(EXTRAS, reverse=True):
        for name in (f"tensorrt-cu{major}-libs", f"tensorrt-cu{major}"):
            try:
                metadata.version(name)
                return major
            except metadata.PackageNotFoundError:
                continue
    return None


def driver_cuda_version() -> int:
    """The CUDA version the installed NVIDIA driver supports (12040 for 12.4), read from ``libcuda`` itself, so it
    answers without any binding installed; 0 without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    version = ctypes.c_int(0)
    return version.value if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0 else 0


def native_handle(obj) -> int:
    """The address inside a cuda-python object: ``int(obj)`` is deprecated from cuda-bindings 13 (12.9 has the
    replacement too)."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def _import_cuda_python():
    """``cuda.bindings.runtime`` (cuda-python 12.6+), ``cuda.cudart`` (before), or None."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart
        return cudart
    except ImportError:
        return None


def _import_pycuda(problem: str | None):
    """``pycuda.driver`` with the primary context retained and current, or None when pycuda is not installed.

    Raises:
        EngineError: pycuda is installed but cannot start (its ``cuInit`` or the primary context failed).
    """
    try:
        import pycuda.autoprimaryctx  # noqa: F401 - retains and pushes the primary context
        import pycuda.driver as driver
    except ImportError:
        return None
    except Exception as e:  # noqa: BLE001 - pycuda raises its own error types when the driver fails
        raise EngineError(f"{problem + '; ' if problem else ''}pycuda could not start: {e}") from e
    return driver


class CudaRuntime:
    """Streams, device and pinned memory and asynchronous copies on device 0's primary context.

    Attributes:
        kind: ``cuda-python`` or ``pycuda``.
        driver: the driver's CUDA version code (12040 for 12.4).
        fallback: why cuda-python was passed over for pycuda (None when it was not).

    Raises:
        EngineError: no binding, or none that this driver can run (naming the extra to install).
    """

    def __init__(self):
        self.fallback = None
        rt = _import_cuda_python()
        problem = None
        if rt is not None:
            self.kind, self._rt = "cuda-python", rt
            self.driver = self._check(rt.cudaDriverGetVersion())
            runtime = self._check(rt.cudaRuntimeGetVersion())
            problem = driver_mismatch(f"cuda-python {_bindings_version(runtime)}", runtime, self.driver)
        if rt is None or problem:
            driver = _import_pycuda(problem)
            if driver is None:
                raise EngineError(problem or CUDA_HINT)
            if problem:
                logger.warning("%s; using pycuda instead", problem)
            self.fallback = problem
            self.kind, self._rt = "pycuda", driver
            self.driver = int(driver.get_driver_version())
        wheel = tensorrt_wheel_cuda()
        if wheel is not None:
            problem = driver_mismatch(f"TensorRT's pip wheel (tensorrt-cu{wheel})", wheel * 1000, self.driver)
            if problem:
                raise EngineError(problem)

    def _check(self, result):
        """cuda-python returns ``(status, *values)``: raise on a non-zero status, return the values."""
        status, *values = result if isinstance(result, tuple) else (result,)
        if int(status) != 0:
            name = self._rt.cudaGetErrorName(status)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
            hint = ""
            if "InsufficientDriver" in name:
                hint = f": the driver is older than cuda-python's CUDA; {install_hint(self.driver // 1000)}"
            raise EngineError(f"CUDA call failed: {name}{hint}")
        return values[0] if len(values) == 1 else values

    def device(self) -> dict[str, str]:
        """Name and compute capability of the device in use."""
        if self.kind == "pycuda":
            dev = self._rt.Context.get_device()
            return {"gpu": dev.name(), "compute_capability": "%d.%d" % dev.compute_capability()}
        props = self._check(self._rt.cudaGetDeviceProperties(self._check(self._rt.cudaGetDevice())))
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return {"gpu": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}

    def stream(self):
        """A new non-blocking stream: ``(stream object, its address for execute_async_v3)``."""
        if self.kind == "pycuda":
            stream = self._rt.Stream()
            return stream, int(stream.handle)
        stream = self._check(self._rt.cudaStreamCreateWithFlags(self._rt.cudaStreamNonBlocking))
        return stream, native_handle(stream)

    def device_buffer(self, nbytes: int):
        """Device memory: ``(owner, address)``."""
        if self.kind == "pycuda":
            owner = self._rt.mem_alloc(nbytes)
            return owner, int(owner)
        ptr = self._check(self._rt.cudaMalloc(nbytes))
        return ptr, int(ptr)

    def pinned(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        """Page-locked host memory (asynchronous copies need it), as a numpy array."""
        if self.kind == "pycuda":
            return self._rt.pagelocked_empty(shape, dtype)
        nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        ptr = int(self._check(self._rt.cudaMallocHost(nbytes)))
        return np.frombuffer((ctypes.c_byte * nbytes).from_address(ptr), dtype=dtype,
                             count=int(np.prod(shape))).reshape(shape)

    def to_device(self, dst_ptr: int, host: np.ndarray, stream) -> None:
        if self.kind == "pycuda":
            self._rt.memcpy_htod_async(dst_ptr, host, stream)
        else:
            self._check(self._rt.cudaMemcpyAsync(dst_ptr, host.ctypes.data, host.nbytes,
                                                 self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def to_host(self, host: np.ndarray, src_ptr: int, stream) -> None:
        if self.kind == "pycuda":
            self._rt.memcpy_dtoh_async(host, src_ptr, stream)
        else:
            self._check(self._rt.cudaMemcpyAsync(host.ctypes.data, src_ptr, host.nbytes,
                                                 self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def synchronize(self, stream) -> None:
        if self.kind == "pycuda":
            stream.synchronize()
        else:
            self._check(self._rt.cudaStreamSynchronize(stream))

    def free(self, device_owners: list, pinned: list[np.ndarray], stream) -> None:
        """Release what :meth:`device_buffer`, :meth:`pinned` and :meth:`stream` gave (pycuda frees its own)."""
        if self.kind == "pycuda":
            return
        for owner in device_owners:
            self._rt.cudaFree(owner)
        for host in pinned:
            self._rt.cudaFreeHost(host.ctypes.data)
        self._rt.cudaStreamDestroy(stream)


def _bindings_version(runtime_code: int) -> str:
    """cuda-python's version when it says, else the CUDA version it implements."""
    try:
        from cuda import bindings
        return str(bindings.__version__)
    except (ImportError, AttributeError):
        return f"for CUDA {cuda_text(runtime_code)}"


def device_facts() -> dict[str, str]:
    """Name and compute capability of the GPU in use (raises :class:`EngineError` when no binding can run)."""
    return CudaRuntime().device()
