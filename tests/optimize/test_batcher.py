"""optimize.batcher: every image once, in the model's input shape and dtype, as calibration and the benchmark
read it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from optimize.batcher import ImageBatcher
from optimize.data import LabeledImages
from optimize.errors import ModelInputError
from optimize.onnx_model import OnnxModel
from optimize.preprocess import fashion_mnist_preset

SIDE = 8


def _images(count: int, *, unreadable: tuple[int, ...] = (), side: int = SIDE) -> LabeledImages:
    """``count`` distinct 28x28 grayscale images; each one's label is its index, so a batch names its images."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    source = (lambda i: None if i in unreadable else Image.fromarray(pixels[i], "L"))
    return LabeledImages(source, list(range(count)), [f"img{i}" for i in range(count)],
                         fashion_mnist_preset(image_size=side).eval_transform())


@pytest.mark.parametrize("count, batch_size", [(10, 4), (8, 4), (3, 8), (1, 1)])
def test_batches_cover_every_image_exactly_once_in_order(count, batch_size):
    dataset = _images(count)
    batcher = ImageBatcher(dataset, batch_size=batch_size, image_size=SIDE)
    batches = list(batcher)
    assert len(batches) == len(batcher) == -(-count // batch_size)
    assert [len(y) for _, y in batches[:-1]] == [batch_size] * (len(batches) - 1)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), np.arange(count))
    for x, y in batches:
        assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (len(y), 3, SIDE, SIDE)
        for image, label in zip(x, y):  # the pixels are that image's, preprocessed
            np.testing.assert_array_equal(image, dataset[int(label)][0].numpy())


def test_limit_and_drop_last_keep_only_what_was_asked():
    dataset = _images(11)
    limited = ImageBatcher(dataset, batch_size=4, image_size=SIDE, limit=6)
    assert limited.count == 6 and [y.tolist() for _, y in limited] == [[0, 1, 2, 3], [4, 5]]
    full = ImageBatcher(dataset, batch_size=4, image_size=SIDE, drop_last=True)
    assert len(full) == 2 and [len(y) for _, y in full] == [4, 4]  # ONNX Runtime's calibrators stack equal batches
    assert ImageBatcher(dataset, batch_size=4, image_size=SIDE, limit=50).count == 11


def test_unreadable_images_are_left_out_of_their_batch():
    batcher = ImageBatcher(_images(6, unreadable=(1, 4, 5)), batch_size=3, image_size=SIDE)
    assert [y.tolist() for _, y in batcher] == [[0, 2], [3]]
    assert list(ImageBatcher(_images(2, unreadable=(0, 1)), batch_size=2, image_size=SIDE)) == []


def test_a_dataset_of_another_size_than_the_model_is_refused():
    with pytest.raises(ModelInputError, match=r"preprocessing gives \(3, 16, 16\) but the model takes \(3, 8, 8\)"):
        next(iter(ImageBatcher(_images(4, side=16), batch_size=2, image_size=SIDE)))


def test_batches_feed_a_model_whose_shape_they_were_given(tiny_onnx):
    """The docstring's use: the image size read from the ONNX file, each batch straight into ONNX Runtime."""
    model = OnnxModel.read(tiny_onnx.path)
    session = ort.InferenceSession(str(tiny_onnx.path), providers=["CPUExecutionProvider"])
    batcher = ImageBatcher(_images(5), batch_size=2, image_size=model.image_size)
    logits = [session.run(None, {model.input.name: batch})[0] for batch, _ in batcher]
    assert [out.shape for out in logits] == [(2, 5), (2, 5), (1, 5)]
