"""optimize.preprocess: the one image -> tensor definition, its record, and the images it refuses before decoding.

The eval transform is checked against torchvision's tensor functions applied by hand (PIL resizes in 8 bits, so
within one grey level); the bundle's torch-free copy is checked against it in tests/optimize/test_package.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as F

from optimize.errors import ConfigError, DataError
from optimize.preprocess import (FASHION_MNIST_MEAN, IMAGENET_MEAN, MAX_ASPECT_RATIO, Preprocessing, check_image_size,
                                 checked_rgb, fashion_mnist_preset, folder_preset, load_image)

ONE_LEVEL = 1.5 / 255  # PIL rounds the resized image to 8 bits; the tensor path does not


def _photo(height: int = 30, width: int = 45, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _by_hand(img: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """The documented steps on a float tensor: [0, 1], shorter side to resize_size, center crop, unnormalized."""
    x = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 255
    mode = {"bilinear": F.InterpolationMode.BILINEAR, "bicubic": F.InterpolationMode.BICUBIC,
            "nearest": F.InterpolationMode.NEAREST}[pre.interpolation]
    return F.center_crop(F.resize(x, pre.resize_size, interpolation=mode, antialias=True), pre.image_size)


def _unnormalized(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    return x * torch.tensor(pre.std).view(3, 1, 1) + torch.tensor(pre.mean).view(3, 1, 1)


@pytest.mark.parametrize("pre", [folder_preset(image_size=16), fashion_mnist_preset(image_size=16),
                                 Preprocessing(image_size=12, resize_size=14, interpolation="bicubic")],
                         ids=["folder-16", "fashion-16", "bicubic-14-12"])
def test_a_pil_image_becomes_the_documented_tensor(pre):
    img = _photo()
    ours = pre.eval_transform()(img)
    assert ours.shape == (3, pre.image_size, pre.image_size) and ours.dtype == torch.float32
    torch.testing.assert_close(_unnormalized(ours, pre), _by_hand(img, pre), atol=ONE_LEVEL, rtol=0)


def test_without_a_resize_the_tensor_is_exactly_the_normalized_pixels():
    """Fashion-MNIST at its own side: no resampling, so only scaling and the dataset's statistics remain."""
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8)
    ours = fashion_mnist_preset(image_size=16).eval_transform()(Image.fromarray(pixels, "L"))
    expected = (torch.from_numpy(pixels).float() / 255 - FASHION_MNIST_MEAN[0]) / 0.3530
    for channel in ours:  # grayscale replicated to the 3 channels
        torch.testing.assert_close(channel, expected, atol=1e-6, rtol=0)


def test_the_presets_follow_their_datasets():
    folder = folder_preset(image_size=224)
    assert (folder.resize_size, folder.mean, folder.train_augment) == (256, IMAGENET_MEAN, "random-resized-crop")
    fashion = fashion_mnist_preset(image_size=32)
    assert (fashion.resize_size, fashion.mean, fashion.train_augment) == (32, FASHION_MNIST_MEAN, "flip")


@pytest.mark.parametrize("augment", ["flip", "crop-flip", "crop-flip-rotate", "random-resized-crop",
                                     "random-resized-crop-rotate", "none"])
def test_every_training_augmentation_gives_the_models_input(augment):
    pre = Preprocessing(image_size=12, resize_size=14, train_augment=augment)
    torch.manual_seed(0)
    out = pre.train_transform()(_photo(20, 33))
    assert out.shape == (3, 12, 12) and torch.isfinite(out).all()
    steps = [type(t).__name__ for t in pre.train_transform().transforms]
    assert ("RandomRotation" in steps) == augment.endswith("-rotate")
    assert ("RandomResizedCrop" in steps) == augment.startswith("random-resized-crop")


def test_none_trains_on_the_eval_tensor():
    pre = Preprocessing(image_size=12, resize_size=14, train_augment="none")
    img = _photo()
    torch.testing.assert_close(pre.train_transform()(img), pre.eval_transform()(img))


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 4, "resize_size": 4}, "image size 4 is too small; use at least 8 pixels"),
    ({"image_size": 9000, "resize_size": 9000}, "image size 9000 is above the 8192 pixels"),
    ({"image_size": 16, "resize_size": 12}, "resize_size 12 is smaller than image_size 16"),
    ({"image_size": 16, "resize_size": 9000}, "resize_size 9000 is above the 8192 pixels"),
    ({"image_size": 16, "resize_size": 16, "std": (1.0, 0.0, 1.0)}, "mean and std need 3 values each, std > 0"),
    ({"image_size": 16, "resize_size": 16, "mean": (0.5, 0.5)}, "mean and std need 3 values each"),
    ({"image_size": 16, "resize_size": 16, "interpolation": "lanczos"}, "interpolation must be one of"),
    ({"image_size": 16, "resize_size": 16, "train_augment": "mixup"}, "train_augment must be one of"),
])
def test_impossible_preprocessing_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Preprocessing(**kwargs)


def test_the_record_says_layout_and_round_trips():
    pre = Preprocessing(image_size=12, resize_size=14, interpolation="nearest", train_augment="crop-flip")
    record = pre.to_dict()
    assert (record["layout"], record["color"], record["channels"]) == ("NCHW", "RGB", 3)
    assert Preprocessing.from_dict(record) == pre
    assert Preprocessing.from_dict({"image_size": 12, "resize_size": 14}) == Preprocessing(12, 14)


@pytest.mark.parametrize("record, message", [
    ([12, 14], "the recorded preprocessing is a list, not a dict"),
    ({"resize_size": 14}, "it has no image_size"),
    ({"image_size": True, "resize_size": 14}, "image_size must be an integer, not True"),
    ({"image_size": 12.0, "resize_size": 14}, "image_size must be an integer, not 12.0"),
    ({"image_size": 12, "resize_size": 14, "mean": [0.5, float("nan"), 0.5]}, "mean must be 3 finite numbers"),
    ({"image_size": 12, "resize_size": 14, "std": "0.2"}, "std must be 3 finite numbers"),
    ({"image_size": 12, "resize_size": 14, "interpolation": 2}, "interpolation must be a string, not 2"),
    ({"image_size": 12, "resize_size": 10}, "resize_size 10 is smaller than image_size 12"),
])
def test_a_damaged_record_is_refused_naming_its_source(record, message):
    with pytest.raises(ConfigError, match=message) as info:
        Preprocessing.from_dict(record, source="model.pth")
    assert str(info.value).startswith("model.pth: ") and str(info.value).endswith("re-save the checkpoint with edgeopt")


def test_elongated_or_empty_images_are_refused_before_the_resize():
    check_image_size(MAX_ASPECT_RATIO, 1)
    check_image_size(10, 10 * MAX_ASPECT_RATIO)
    with pytest.raises(DataError, match=rf"image of 1x{MAX_ASPECT_RATIO + 1} pixels has an aspect ratio of "
                                        rf"{MAX_ASPECT_RATIO + 1}:1, above the {MAX_ASPECT_RATIO}:1"):
        check_image_size(1, MAX_ASPECT_RATIO + 1)
    with pytest.raises(DataError, match="image of 0x5 pixels is empty"):
        check_image_size(0, 5)
    with pytest.raises(DataError, match="crop it first"):
        fashion_mnist_preset(image_size=8).eval_transform()(Image.new("L", (400, 2)))
    assert checked_rgb(Image.new("L", (4, 3), 7)).mode == "RGB"


def test_load_image_refuses_bombs_and_strips_from_the_header(tmp_path, monkeypatch):
    strip = tmp_path / "strip.png"
    Image.new("L", (MAX_ASPECT_RATIO * 2 + 2, 2)).save(strip)
    with pytest.raises(DataError, match="aspect ratio"):
        load_image(strip)
    big = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # Pillow's limit, lowered: > 2x it is a bomb
    with pytest.raises(DataError, match="image is too large to decode safely"):
        load_image(big)


def test_load_image_decodes_any_mode_to_rgb(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.full((5, 7), 65535, np.uint16)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (7, 5) and np.asarray(img).min() == 255
