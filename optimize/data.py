"""Data sets: the embedded Fashion-MNIST default and user folders in ImageFolder form.

``--data fashion-mnist`` reads Debian's ``dataset-fashion-mnist`` files from
``/usr/share/datasets/fashion-mnist/`` (or ``$EDGEOPT_FASHION_MNIST``); when they are absent it downloads the
same files with torchvision for users who are online. ``--data DIR`` reads ``DIR/train/<class>/*`` and
``DIR/val/<class>/*``. ``train_limit`` / ``val_limit`` take a deterministic, class-stratified subset.

Both return a :class:`DataSplits` whose datasets yield ``(tensor, label)`` with the transforms of one
:class:`~optimize.preprocess.Preprocessing`, so every stage sees the same tensors.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .bundle.runner import IMAGE_EXTENSIONS
from .configs import FASHION_MNIST, FASHION_MNIST_SIZE, FOLDER_SIZE
from .errors import DataError
from .preprocess import Preprocessing, fashion_mnist_preset, folder_preset, load_image

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class DataSplits:
    """The two splits of a data set, with what later stages need to know about it.

    Attributes:
        train: training split (training transform applied when built with ``augment=True``).
        val: validation split (eval transform).
        class_names: index -> name, shared by both splits.
        name: ``fashion-mnist`` or the folder's path, as recorded in manifests.
        fingerprint: sha256 of the source's :func:`data_fingerprint` and of the images taken from it.
    """

    train: "LabeledImages"
    val: "LabeledImages"
    class_names: list[str]
    name: str
    fingerprint: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict:
        return {"data": self.name, "sha256": self.fingerprint, "train_images": len(self.train),
                "val_images": len(self.val), "num_classes": self.num_classes}

    def check_model(self, model: str | Path, class_names: Sequence[str] | None,
                    num_classes: int | None = None) -> None:
        """Refuse a model whose classes differ from this data's (count, then names and order), naming both.

        Every stage that feeds a model this data asks here (evaluate and the training stages, calibrate, the
        benchmark), so a mismatch reads the same wherever it is found.

        Args:
            model: the model's path, for the message.
            class_names: the names the model records (None or empty: compared by count only).
            num_classes: the model's output count, when known.

        Raises:
            DataError: another class count, or other names or order.
        """
        if num_classes is not None and num_classes != self.num_classes:
            raise DataError(f"{model} predicts {num_classes} classes but {self.name} has {self.num_classes}; use "
                            "data with the model's classes, or retrain for these")
        if class_names and list(class_names) != self.class_names:
            raise DataError(f"{model} was trained on classes {list(class_names)[:5]}... but {self.name} has "
                            f"{self.class_names[:5]}...; class folders must match the model's (same names, same "
                            "order)")


class LabeledImages(Dataset):
    """Images with integer labels; ``source`` loads item ``i`` as a PIL image (any mode)."""

    def __init__(self, source: Callable[[int], Image.Image], labels: Sequence[int], ids: Sequence[str],
                 transform: Callable | None = None):
        self._source = source
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ids = list(ids)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def without_transform(self) -> "LabeledImages":
        """The same images and labels yielding decoded PIL images (end-to-end timing, raw access)."""
        return LabeledImages(self._source, self.labels, self.ids, None)

    def __getitem__(self, i: int):
        img = self._source(i)
        if img is None:  # an image that could not be decoded; dropped by skip_unreadable_collate
            return None
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def skip_unreadable_collate(batch):
    """Default collate, minus items an unreadable image turned into ``None`` (already warned about)."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.utils.data.default_collate(batch)


def stratified_indices(labels: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    """A deterministic, class-stratified subset of ``limit`` indices (all of them when ``limit`` is None).

    Each class is shuffled with ``seed``; classes are then taken round-robin, so every class gets
    ``limit // num_classes`` items (one more for the first ``limit % num_classes``) while it has them.
    """
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    if limit <= 0:
        raise DataError(f"a limit of {limit} images selects nothing; use a positive number")
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order: list[int] = []
    for rank in range(max(len(p) for p in per_class)):
        order.extend(p[rank] for p in per_class if rank < len(p))
        if len(order) >= limit:
            break
    return np.sort(np.asarray(order[:limit], dtype=np.int64))


# -- Fashion-MNIST --------------------------------------------------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), validating its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}; reinstall the data (apt-get install --reinstall "
                        "dataset-fashion-mnist)") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} bytes of data, found "
                        f"{len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_dir(download: bool = True) -> Path:
    """Folder holding the four Fashion-MNIST IDX files; downloads them when absent and allowed."""
    folder = Path(os.environ.get("EDGEOPT_FASHION_MNIST", FASHION_MNIST_DIR))
    wanted = [s for pair in _FMNIST_FILES.values() for s in pair]
    if all(_find_idx(folder, s) for s in wanted):
        return folder
    cache = Path(os.environ.get("EDGEOPT_CACHE", Path.home() / ".cache" / "edgeopt")) / "FashionMNIST" / "raw"
    if all(_find_idx(cache, s) for s in wanted):
        return cache
    if not download or os.environ.get("EDGEOPT_OFFLINE"):
        reason = "downloading is switched off (EDGEOPT_OFFLINE)" if download else "downloading was not asked for"
    else:
        try:
            from torchvision.datasets import FashionMNIST

            logger.info("Fashion-MNIST not found in %s; downloading it to %s", folder, cache.parent.parent)
            FashionMNIST(root=str(cache.parent.parent), train=True, download=True)
            FashionMNIST(root=str(cache.parent.parent), train=False, download=True)
            return cache
        except Exception as e:  # noqa: BLE001 - any network or disk failure ends in the same advice
            reason = f"the download failed ({type(e).__name__}: {e})"
    raise DataError(
        f"Fashion-MNIST is not in {folder} and {reason}; install it with 'apt-get install dataset-fashion-mnist' "
        "(Debian/Ubuntu), set EDGEOPT_FASHION_MNIST to a folder holding the four *-ubyte.gz files, or go online")


def _empty_split() -> LabeledImages:
    return LabeledImages(lambda i: None, [], [])


def load_fashion_mnist(preprocessing: Preprocessing, *, train_limit: int | None = None,
                       val_limit: int | None = None, augment: bool = True, val_only: bool = False) -> DataSplits:
    folder = fashion_mnist_dir()
    splits = {"train": _empty_split()}
    for split, (img_stem, lbl_stem) in _FMNIST_FILES.items():
        if val_only and split == "train":
            continue
        img_path, lbl_path = _find_idx(folder, img_stem), _find_idx(folder, lbl_stem)
        images, labels = _read_idx(img_path), _read_idx(lbl_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{img_path} and {lbl_path} do not belong together ({images.shape} vs {labels.shape})")
        limit = train_limit if split == "train" else val_limit
        keep = stratified_indices(labels, limit)
        transform = (preprocessing.train_transform() if (split == "train" and augment)
                     else preprocessing.eval_transform())
        imgs = images[keep]
        splits[split] = LabeledImages(lambda i, a=imgs: Image.fromarray(a[i], mode="L"), labels[keep],
                                      [f"{split}/{i}" for i in keep], transform)
    return DataSplits(splits["train"], splits["val"], list(FASHION_MNIST_CLASSES), FASHION_MNIST,
                      _taken_fingerprint(FASHION_MNIST, splits))


# -- ImageFolder-style folders -------------------------------------------------------------------------

def display_name(name: str | Path) -> str:
    """``name`` as text any file or terminal takes: bytes that are not UTF-8 (which Python reads from the file
    system as lone surrogates, PEP 383) become ``\\xNN``; a folder ``b"caf\\xe9"`` is shown as ``caf\\xe9``."""
    return str(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _decodable(paths: list[Path], labels: list[int]) -> tuple[list[Path], list[int]]:
    """The images that decode in full, warning once about each one that does not.

    ``verify()`` at scan time reads headers and chunk checksums only; a file with garbled pixel data passes it and
    fails on decode. Stages that index images directly (the export check batch, accuracy samples) need every item.
    """
    kept_paths, kept_labels = [], []
    for path, label in zip(paths, labels):
        try:
            load_image(path)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad pixel data; all mean "skip it"
            logger.warning("skipping unreadable image %s: %s", display_name(path), e)
            continue
        kept_paths.append(path)
        kept_labels.append(label)
    return kept_paths, kept_labels


def _list_classes(split_dir: Path) -> list[str]:
    """The class folder names of one split, sorted (their order is the label order)."""
    if not split_dir.is_dir():
        raise DataError(f"{display_name(split_dir)} is missing; a data folder needs train/ and val/ subfolders with "
                        "one folder of images per class")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{display_name(split_dir)} has no class folders; put each class's images in "
                        f"{display_name(split_dir)}/<class>/")
    return classes


def _scan_split(split_dir: Path, class_names: list[str] | None) -> tuple[list[str], list[Path], list[int]]:
    classes = _list_classes(split_dir)
    if class_names is not None and classes != class_names:
        extra, missing = set(classes) - set(class_names), set(class_names) - set(classes)
        raise DataError(f"{display_name(split_dir)} has other classes than train/: extra "
                        f"{sorted(map(display_name, extra))}, missing {sorted(map(display_name, missing))}; "
                        "give both splits the same class folders")
    paths, labels, unreadable = [], [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        good = []
        for path in files:
            try:
                with Image.open(path) as img:
                    img.verify()
                good.append(path)
            except Exception:  # noqa: BLE001 - PIL raises many types for a bad file; all mean "skip it"
                unreadable.append(path)
        if not good:
            raise DataError(f"class folder {display_name(split_dir / name)} has no readable images "
                            f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
        paths += good
        labels += [label] * len(good)
    if unreadable:
        logger.warning("skipped %d unreadable image(s) in %s, e.g. %s", len(unreadable), display_name(split_dir),
                       display_name(unreadable[0]))
    return classes, paths, labels


def _safe_loader(paths: list[Path]) -> Callable[[int], Image.Image | None]:
    def load(i: int) -> Image.Image | None:
        try:
            return load_image(paths[i])
        except Exception as e:  # noqa: BLE001 - a truncated file passes verify() and fails on decode
            logger.warning("skipping unreadable image %s: %s", display_name(paths[i]), e)
            return None
    return load


def load_folder(root: Path, preprocessing: Preprocessing, *, train_limit: int | None = None,
                val_limit: int | None = None, augment: bool = True, val_only: bool = False) -> DataSplits:
    """Read ``root/train/<class>/*`` and ``root/val/<class>/*`` (see :func:`load_data`).

    Class folders and files may have names that are not UTF-8: they are read as they are and shown (class names,
    ids, manifests) with their odd bytes as ``\\xNN``.
    """
    shown = display_name(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"--data {shown} is a file, not a folder; pass 'fashion-mnist' or a folder with train/ and "
                        "val/ (unpack an archive first)")
    if not root.is_dir():
        raise DataError(f"data folder {shown} does not exist; pass 'fashion-mnist' or a folder with train/ and val/")
    classes = _list_classes(root / "train")
    if len(classes) < 2:
        raise DataError(f"{shown} has one class ({display_name(classes[0])}); a classifier needs at least 2 classes: "
                        f"give {shown}/train/ and {shown}/val/ one folder of images per class")
    if val_only:  # class names (and their order) still come from train/, but its images are not read
        train_paths, train_labels = [], []
    else:
        _, train_paths, train_labels = _scan_split(root / "train", classes)
    _, val_paths, val_labels = _scan_split(root / "val", classes)
    splits = {"train": _empty_split()}
    for split, paths, labels, limit in (("train", train_paths, train_labels, train_limit),
                                        ("val", val_paths, val_labels, val_limit)):
        if val_only and split == "train":
            continue
        keep = stratified_indices(np.asarray(labels), limit)
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        if val_only:  # no training loop to skip bad items: the caller may index any of them
            paths, labels = _decodable(paths, labels)
            if not paths:
                raise DataError(f"none of the images selected in {shown}/{split}/ decode; replace them (see the "
                                "warnings above)")
        transform = (preprocessing.train_transform() if (split == "train" and augment)
                     else preprocessing.eval_transform())
        splits[split] = LabeledImages(_safe_loader(paths), labels,
                                      [display_name(p.relative_to(root)) for p in paths], transform)
    return DataSplits(splits["train"], splits["val"], [display_name(c) for c in classes], shown,
                      _taken_fingerprint(str(root), splits))


def data_fingerprint(data: str) -> str:
    """sha256 identifying a data source, taken without decoding an image: the one rule for "is it the same data".

    The pipeline takes it before every stage to skip those whose inputs are unchanged, and every
    :class:`DataSplits` records it (with the subset taken) in the manifests.

    - Fashion-MNIST: the bytes of its four IDX files (about 30 MB: cheap, and the same on every machine).
    - A folder: the relative path, size and modification time (ns) of every file under it, so an image added,
      removed or replaced in place, even by one of the same size, changes it; reading every image of an
      ImageNet-size folder would take minutes. A missing folder has the fingerprint of an empty one.
    """
    digest = hashlib.sha256()
    if data == FASHION_MNIST:
        folder = fashion_mnist_dir()
        for stem in sorted(s for pair in _FMNIST_FILES.values() for s in pair):
            digest.update(f"{stem}\0".encode() + hashlib.sha256(_find_idx(folder, stem).read_bytes()).digest())
        return digest.hexdigest()
    root = Path(data)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        st = f.stat()
        digest.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _taken_fingerprint(data: str, splits: dict[str, LabeledImages]) -> str:
    """:attr:`DataSplits.fingerprint`: the source's :func:`data_fingerprint` and the ids of the images taken."""
    digest = hashlib.sha256(data_fingerprint(data).encode())
    for split, images in splits.items():
        digest.update(f"{split}:{len(images)}\n".encode() + "\n".join(images.ids).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def default_preprocessing(data: str, image_size: int | None = None) -> Preprocessing:
    """The preset for a data source: 32 px Fashion-MNIST statistics, or 224 px ImageNet statistics."""
    if data == FASHION_MNIST:
        return fashion_mnist_preset(image_size=image_size or FASHION_MNIST_SIZE)
    return folder_preset(image_size=image_size or FOLDER_SIZE)


def load_data(data: str, preprocessing: Preprocessing, *, train_limit: int | None = None,
              val_limit: int | None = None, augment: bool = True, val_only: bool = False) -> DataSplits:
    """Load ``fashion-mnist`` or an ImageFolder-style folder with ``preprocessing``'s transforms.

    ``val_only``: leave the training split empty (evaluation, export checks, accuracy figures).
    """
    kwargs = dict(train_limit=train_limit, val_limit=val_limit, augment=augment, val_only=val_only)
    if data == FASHION_MNIST:
        return load_fashion_mnist(preprocessing, **kwargs)
    return load_folder(Path(data), preprocessing, **kwargs)
