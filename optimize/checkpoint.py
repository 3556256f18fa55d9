"""Our self-describing checkpoint format, and loading every checkpoint a user may arrive with.

An edgeopt checkpoint is a plain dict of tensors and primitives (so it loads with ``weights_only=True``)::

    {"format": "edgeopt-checkpoint", "version": 1, "arch": "resnet18", "stem": "imagenet",
     "num_classes": 10, "class_names": [...], "preprocessing": {...}, "state_dict": {...},
     "metrics": {...}, "train_state": {...}   # only in the resumable "<out>.last.pth"}

:func:`load_checkpoint` also accepts a plain torchvision ResNet state_dict (optionally nested under "model" or
"state_dict", optionally with DataParallel's "module." prefix or one wrapper attribute's prefix such as a PyTorch
Lightning module's "model."), a TorchScript file (forward only), and - only with ``trust=True`` - a pickled whole
``nn.Module``.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .artifacts import atomic_path, read_manifest, sha256_file
from .errors import CheckpointError, ConfigError
from .models import ARCHS, STEMS, guess_arch, model_from_state_dict
from .preprocess import Preprocessing

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "edgeopt-checkpoint"
CHECKPOINT_VERSION = 1
TRUST_HINT = "--trust-checkpoint"


@dataclass
class LoadedModel:
    """A model and everything known about it.

    Attributes:
        model: the module, in eval mode, on the CPU.
        kind: ``edgeopt``, ``state_dict``, ``torchscript`` or ``pickled-module``.
        arch / stem: the ResNet it is, when known (None for TorchScript or foreign modules).
        num_classes / class_names / preprocessing: when recorded (class_names and preprocessing may be None).
        trainable: False for TorchScript and foreign modules, which can only serve as a teacher.
    """

    model: nn.Module
    kind: str
    path: Path
    sha256: str
    arch: str | None = None
    stem: str | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    preprocessing: Preprocessing | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def trainable(self) -> bool:
        return self.arch is not None

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "kind": self.kind, "arch": self.arch}


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DistributedDataParallel / DataParallel."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def save_checkpoint(path: str | Path, model: nn.Module, *, arch: str, stem: str, class_names: list[str],
                    preprocessing: Preprocessing, metrics: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write an edgeopt checkpoint atomically (temp file + rename) and return its path."""
    state_dict = {k: v.detach().cpu() for k, v in fold_prune_masks(unwrap(model).state_dict()).items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": arch,
        "stem": stem,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "preprocessing": preprocessing.to_dict(),
        "state_dict": state_dict,
        "metrics": dict(metrics or {}),
    }
    if extra:
        payload.update(extra)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # through a file object: given a path, torch.save names the archive's records after the (random) temp
        # file, and the same weights hashed differently on every run
        torch.save(payload, f)
    return Path(path)


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any("/code/__torch__" in n or n.endswith("constants.pkl") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


# what torch.save writes first: a zip archive (PyTorch 1.6 and later), or a pickle (b"\x80" and its protocol) whose
# first object is the legacy format's magic number
ZIP_HEADER = b"PK\x03\x04"
LEGACY_MAGIC = b"\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _read(path: Path, trust: bool) -> Any:
    """``torch.load`` with our error messages; weights_only unless the user trusts the file. A file that starts
    like nothing torch.save writes is named as such first: unpickling it would fail with a message about pickled
    objects and nudge the user towards trusting bytes that are no checkpoint at all."""
    with open(path, "rb") as fh:
        head = fh.read(32)
    if not (head.startswith(ZIP_HEADER) or (head.startswith(b"\x80") and LEGACY_MAGIC in head)):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it starts with bytes torch.save never writes); "
                              "give a .pth written by torch.save, or copy the file again")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise CheckpointError(
                f"{path} contains pickled Python objects (a whole nn.Module?), and unpickling runs code from the "
                f"file; re-save it as a state_dict, or pass {TRUST_HINT} if you trust where it came from") from e
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({e}); give a .pth written by torch.save") from e
    except Exception as e:  # noqa: BLE001 - torch.load fails on a damaged file with many error types
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint ({type(e).__name__}: {detail}); "
                              "copy it again or re-save it") from e


def fold_prune_masks(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with torch.nn.utils.prune's leftovers (``w_orig`` + ``w_mask``) folded into plain weights ``w``.

    The one place masks are folded: :func:`save_checkpoint` writes every edgeopt checkpoint through it (so none
    carries masks, whoever pruned the model) and the loader passes foreign state_dicts and pickled modules through
    it (a model pruned with torch.nn.utils.prune and saved without ``prune.remove``). Same rule as
    ``prune.remove``: the effective weight is ``w_orig * w_mask``.
    """
    out = {}
    for key, value in sd.items():
        if key.endswith("_orig") and key[:-5] + "_mask" in sd:
            out[key[:-5]] = value * sd[key[:-5] + "_mask"]
        elif not (key.endswith("_mask") and key[:-5] + "_orig" in sd):
            out[key] = value
    return out


def _as_state_dict(obj: Any, source: str = "") -> dict[str, torch.Tensor] | None:
    """The tensor dict inside ``obj`` (plain, or nested under "model" / "state_dict", as PyTorch Lightning saves
    it), prefixes stripped: DataParallel's ``module.`` and one common wrapper prefix (:func:`strip_wrapper`)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return _as_state_dict(obj[key], source)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            sd = {k.removeprefix("module."): v for k, v in obj.items()}
            return fold_prune_masks(strip_wrapper(sd, source))
    return None


def strip_wrapper(sd: dict[str, torch.Tensor], source: str = "") -> dict[str, torch.Tensor]:
    """``sd`` without the attribute name a training wrapper put in front of every key: a PyTorch Lightning module
    holding the ResNet as ``self.model`` saves ``model.conv1.weight``; ``net.``, ``backbone.``, ``encoder.`` likewise.

    Stripped only when every key shares that one first component and the rest is a torchvision ResNet's keys (the
    prefix is logged); anything else is returned as it is, for the loader to name what it found.
    """
    while sd and guess_arch(sd) is None:
        prefixes = {k.split(".", 1)[0] for k in sd}
        if len(prefixes) != 1 or not all("." in k for k in sd):
            return sd
        prefix = prefixes.pop() + "."
        stripped = {k[len(prefix):]: v for k, v in sd.items()}
        if guess_arch(stripped) is None and len({k.split(".", 1)[0] for k in stripped}) != 1:
            return sd
        logger.info("%s: weights under the prefix '%s' (a training wrapper's attribute): loaded without it",
                    source or "checkpoint", prefix)
        sd = stripped
    return sd


def _recorded_preprocessing(recorded: Any, source: str) -> Preprocessing | None:
    """``Preprocessing.from_dict`` of what a checkpoint or manifest records, as a :class:`CheckpointError`."""
    if recorded is None:
        return None
    try:
        return Preprocessing.from_dict(recorded, source=source)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


def _check_edgeopt_fields(obj: Mapping, path: Path) -> None:
    """Refuse a hand-made or damaged edgeopt checkpoint with what is wrong, before anything indexes it."""
    damaged = f"{path} is a damaged edgeopt checkpoint"
    fix = "re-save it with edgeopt (train, distill or prune)"
    missing = [k for k in ("arch", "stem", "num_classes", "class_names", "preprocessing", "state_dict") if k not in obj]
    if missing:
        raise CheckpointError(f"{damaged}: it lacks {', '.join(missing)}; {fix}")
    if not isinstance(obj["arch"], str) or obj["arch"] not in ARCHS:
        raise CheckpointError(f"{path}: the checkpoint records arch {obj['arch']!r}, which this edgeopt does not know "
                              f"(it knows {', '.join(ARCHS)}); {fix}")
    if obj["stem"] not in STEMS:
        raise CheckpointError(f"{path}: the checkpoint records stem {obj['stem']!r}, not one of {', '.join(STEMS)}; "
                              f"{fix}")
    if not isinstance(obj["state_dict"], Mapping) or not all(isinstance(v, torch.Tensor)
                                                            for v in obj["state_dict"].values()):
        raise CheckpointError(f"{damaged}: its state_dict is not a dict of tensors; {fix}")
    names = obj["class_names"]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{damaged}: class_names is not a list of strings; {fix}")
    if not isinstance(obj["num_classes"], int) or obj["num_classes"] != len(names):
        raise CheckpointError(f"{damaged}: num_classes {obj['num_classes']!r} does not match its {len(names)} class "
                              f"names; {fix}")
    guessed = guess_arch(obj["state_dict"])
    if guessed != obj["arch"]:
        looks = f"weights of a {guessed}" if guessed else "weights of no known ResNet"
        raise CheckpointError(f"{path}: the checkpoint records arch {obj['arch']!r} but holds {looks}; {fix}")


def _check_file(path: Path) -> None:
    """Refuse a path that is no readable checkpoint file before anything reads it."""
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, a FIFO or a socket)"
        raise CheckpointError(f"checkpoint {path} is {kind}; give the checkpoint file itself")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (train one with 'cli.py train')")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty; copy it again or re-save it")


def _load_torchscript(path: Path, digest: str, manifest: Mapping) -> LoadedModel:
    """A TorchScript file: forward only; class names and preprocessing only from its manifest."""
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as e:
        raise CheckpointError(f"{path} looks like TorchScript but does not load: {str(e).splitlines()[0]}") from e
    pre = manifest.get("preprocessing")
    return LoadedModel(module.eval(), "torchscript", path, digest, class_names=manifest.get("class_names"),
                       preprocessing=_recorded_preprocessing(pre or None, f"{path}'s manifest"))


def _load_edgeopt(obj: Mapping, path: Path, digest: str, arch: str | None) -> LoadedModel:
    """Our own format: its version and fields checked, the model rebuilt as recorded."""
    version = obj.get("version")
    if not isinstance(version, int) or not 1 <= version <= CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is an edgeopt checkpoint of format version {version!r}; this edgeopt "
                              f"reads versions 1 to {CHECKPOINT_VERSION}: update edgeopt to load it")
    _check_edgeopt_fields(obj, path)
    preprocessing = _recorded_preprocessing(obj["preprocessing"], str(path))
    if arch and arch != obj["arch"]:
        raise CheckpointError(f"{path} holds a {obj['arch']}, not --arch {arch}; drop --arch or fix it")
    model, _, _ = model_from_state_dict(obj["state_dict"], arch=obj["arch"], stem=obj["stem"], source=str(path))
    extra = {k: v for k, v in obj.items() if k not in {"format", "version", "arch", "stem", "num_classes",
                                                        "class_names", "preprocessing", "state_dict", "metrics"}}
    return LoadedModel(model.eval(), "edgeopt", path, digest, obj["arch"], obj["stem"], obj["num_classes"],
                       list(obj["class_names"]), preprocessing,
                       dict(obj.get("metrics") or {}), extra)


def _load_module(obj: nn.Module, path: Path, digest: str, arch: str | None) -> LoadedModel:
    """A pickled whole module (only reachable with trust=True): rebuilt as a ResNet when its weights are one, else
    kept as it is, forward only."""
    sd = _as_state_dict(obj.state_dict(), str(path))
    if sd is not None and guess_arch(sd) is not None:
        model, found_arch, stem = model_from_state_dict(sd, arch=arch, source=str(path))
        return LoadedModel(model.eval(), "pickled-module", path, digest, found_arch, stem, model.fc.out_features)
    logger.warning("%s is a %s, not a torchvision ResNet: usable forward-only (as a teacher)", path,
                   type(obj).__name__)
    return LoadedModel(obj.eval(), "pickled-module", path, digest)


def _load_state_dict(obj: Any, path: Path, digest: str, arch: str | None, manifest: Mapping) -> LoadedModel:
    """A foreign state_dict (see :func:`_as_state_dict`); class names and preprocessing only from its manifest."""
    sd = _as_state_dict(obj, str(path))
    if sd is None:
        raise CheckpointError(f"{path} is a PyTorch file but holds no model weights (found {type(obj).__name__}); "
                              "give an edgeopt checkpoint, a ResNet state_dict or a TorchScript file")
    model, found_arch, stem = model_from_state_dict(sd, arch=arch, source=str(path))
    pre = manifest.get("preprocessing")
    return LoadedModel(model.eval(), "state_dict", path, digest, found_arch, stem, model.fc.out_features,
                       manifest.get("class_names"), _recorded_preprocessing(pre or None, f"{path}'s manifest"))


def load_checkpoint(path: str | Path, *, arch: str | None = None, trust: bool = False) -> LoadedModel:
    """Load any checkpoint edgeopt accepts; the model comes back on the CPU in eval mode.

    Args:
        path: the file.
        arch: for a plain state_dict, the expected ResNet (guessed from the keys when None). Checked against
            what an edgeopt checkpoint records.
        trust: allow unpickling arbitrary objects (a whole pickled ``nn.Module``).

    Raises:
        CheckpointError: missing, truncated, foreign or untrusted file; an ``arch`` that does not match.
    """
    path = Path(path)
    _check_file(path)
    digest = sha256_file(path)
    manifest = read_manifest(path) or {}
    if _is_torchscript(path):
        return _load_torchscript(path, digest, manifest)
    obj = _read(path, trust)
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        return _load_edgeopt(obj, path, digest, arch)
    if isinstance(obj, nn.Module):  # only reachable with trust=True
        return _load_module(obj, path, digest, arch)
    return _load_state_dict(obj, path, digest, arch, manifest)
