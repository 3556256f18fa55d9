"""One batcher for calibration, inference and the benchmark: numpy batches in the model's input shape.

Example::

    batcher = ImageBatcher(splits.val, batch_size=32, image_size=OnnxModel.read(model_path).image_size)
    for batch, labels in batcher:        # float32 [n, 3, S, S], int64 [n]
        logits = session.run(None, {"input": batch})[0]
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .data import LabeledImages
from .onnx_model import ModelInputError


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
