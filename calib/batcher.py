"""One batcher for calibration and ONNX inference: numpy batches in the model's input shape.

Example::

    batcher = ImageBatcher(splits.val, batch_size=32, image_size=onnx_input_size(model_path))
    for batch, labels in batcher:        # float32 [n, 3, S, S], int64 [n]
        logits = session.run(None, {"input": batch})[0]
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx

from optimize.data import LabeledImages
from optimize.errors import EdgeoptError


class ModelInputError(EdgeoptError):
    """An ONNX model's input is not what edgeopt's batcher can feed."""


def image_input_dims(path, shape) -> tuple[int | None, int | None]:
    """``(fixed batch, side)`` of an image input ``shape`` that must be ``[n, 3, S, S]``; None where symbolic.

    ``shape`` holds ints (0 or less: unknown) or names, as ONNX Runtime's ``get_inputs()`` and the graph give it.

    Raises:
        ModelInputError: another rank or layout (channels-last ``[n, S, S, 3]`` named as such), with what edgeopt
            feeds.
    """
    dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
    side = dims[-1] if len(dims) == 4 and dims[2] == dims[3] else None
    shown = f"[{', '.join('?' if d is None else str(d) for d in shape)}]"
    if len(dims) == 4 and dims[3] == 3 and dims[1] is not None and dims[1] == dims[2]:
        raise ModelInputError(f"{path} takes channels-last (NHWC) input {shown}, but edgeopt feeds images as NCHW "
                              f"[n, 3, {dims[1]}, {dims[1]}]; export the model channels-first")
    if len(dims) != 4 or dims[1] != 3 or dims[2] != dims[3]:
        expected = f"[n, 3, {side or 'S'}, {side or 'S'}]"
        raise ModelInputError(f"{path} takes input {shown}; edgeopt feeds images as NCHW {expected} (3 RGB "
                              "channels, square); export the model with that input")
    return dims[0], side


def model_image_input(model: onnx.ModelProto, path) -> tuple[str, int | None, bool]:
    """A loaded ONNX model's single image input: ``(name, side or None when symbolic, batch axis is symbolic)``.

    Raises:
        ModelInputError: not one input of ``[batch, 3, S, S]``.
    """
    inputs = [i for i in model.graph.input if i.name not in {init.name for init in model.graph.initializer}]
    if len(inputs) != 1:
        raise ModelInputError(f"{path} has {len(inputs)} inputs; edgeopt handles one image input")
    dims = inputs[0].type.tensor_type.shape.dim
    _, side = image_input_dims(path, [d.dim_value or d.dim_param for d in dims])
    return inputs[0].name, side, bool(dims[0].dim_param)


def onnx_input(path: str) -> tuple[str, int, bool]:
    """The ONNX model's single image input: ``(name, side, batch axis is symbolic)``; the side must be fixed.

    Raises:
        ModelInputError: not ``[batch, 3, S, S]`` with a fixed S.
    """
    name, side, dynamic = model_image_input(onnx.load(str(path), load_external_data=False), path)
    if side is None:
        raise ModelInputError(f"{path} has no fixed input side; edgeopt needs [batch, 3, S, S] with S fixed: export "
                              "it with 'cli.py export'")
    return name, side, dynamic


class ImageBatcher:
    """Iterate a dataset as ``(float32 [n, 3, S, S], int64 labels [n])`` batches.

    Args:
        dataset: items ``(tensor [3, S, S], label)`` from the shared preprocessing.
        batch_size: images per batch (the last one may be smaller).
        image_size: the model's input side; a dataset of another size is refused.
        limit: stop after this many images (None: all).
        drop_last: only full batches (ONNX Runtime's calibrators stack batches, so they must be equal).
    """

    def __init__(self, dataset: LabeledImages, *, batch_size: int, image_size: int, limit: int | None = None,
                 drop_last: bool = False):
        self.dataset, self.batch_size, self.image_size = dataset, batch_size, image_size
        self.count = len(dataset) if limit is None else min(limit, len(dataset))
        if drop_last:
            self.count -= self.count % batch_size

    def __len__(self) -> int:
        return -(-self.count // self.batch_size)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, self.count, self.batch_size):
            items = [self.dataset[i] for i in range(start, min(start + self.batch_size, self.count))]
            items = [it for it in items if it is not None]
            if not items:
                continue
            batch = np.stack([x.numpy() for x, _ in items]).astype(np.float32, copy=False)
            if batch.shape[1:] != (3, self.image_size, self.image_size):
                raise ModelInputError(f"preprocessing gives {batch.shape[1:]} but the model takes "
                                      f"(3, {self.image_size}, {self.image_size})")
            yield batch, np.asarray([y for _, y in items], dtype=np.int64)
