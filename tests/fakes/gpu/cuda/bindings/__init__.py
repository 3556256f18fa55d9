"""Stand-in for ``cuda.bindings``: the version is that of ``FAKE_CUDA_RUNTIME`` (e.g. 13000 -> 13.0.0)."""

import os

_code = int(os.environ.get("FAKE_CUDA_RUNTIME", "13000"))
__version__ = f"{_code // 1000}.{_code % 1000 // 10}.0"
