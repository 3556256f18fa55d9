"""``cuda.bindings.utils.get_cuda_native_handle``: the address inside a CUDA object (cuda-bindings 12.9 / 13)."""


def get_cuda_native_handle(obj) -> int:
    return obj.address
