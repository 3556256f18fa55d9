"""Stage ``evaluate``: top-1, top-5, loss, per-class accuracy, precision, recall and F1, and the confusion matrix.

The model's recorded preprocessing is used as is; a plain state_dict or TorchScript file, which records none,
gets the data's default preset (``image_size`` overrides its size).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .artifacts import atomic_path, check_not_input, prepare_output
from .checkpoint import LoadedModel, load_checkpoint
from .configs import EvalConfig
from .data import DataSplits, default_preprocessing, load_data
from .device import torch_device
from .loop import evaluate, make_loader
from .metrics import EvalMetrics, classification_metrics

logger = logging.getLogger(__name__)


@dataclass
class EvalReport:
    metrics: EvalMetrics
    class_names: list[str]
    model: dict[str, Any]
    plot: Path | None = None
    feature_maps: Path | None = None

    @property
    def classification(self) -> dict[str, Any]:
        return self.metrics.classification(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            **self.metrics.summary(),
            "per_class_accuracy": dict(zip(self.class_names, self.metrics.per_class_accuracy)),
            **self.classification,
            "class_names": self.class_names,
            "confusion_matrix": self.metrics.confusion.tolist(),
            "plot": str(self.plot) if self.plot else None,
            "feature_maps": str(self.feature_maps) if self.feature_maps else None,
        }


def check_model_fits_data(loaded: LoadedModel, splits: DataSplits) -> None:
    """Refuse a model whose classes differ from the data's, naming both (:meth:`DataSplits.check_model`)."""
    splits.check_model(loaded.path, loaded.class_names, loaded.num_classes)


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: str | Path, title: str) -> Path:
    """Save a row-normalized confusion matrix as a PNG, captioned with the macro precision, recall and F1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    norm = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n), dpi=100)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    m = classification_metrics(confusion, class_names)
    fig.text(0.5, 0.005, f"macro precision {m['macro_precision']:.2%}  recall {m['macro_recall']:.2%}  "
             f"F1 {m['macro_f1']:.2%}", ha="center", va="bottom", fontsize=8)
    for i in range(n):
        for j in range(n):
            if confusion[i, j]:
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def feature_maps_path(plot: str | Path) -> Path:
    """``runs/t.confusion.png`` -> ``runs/t.confusion.conv1.png``."""
    plot = Path(plot)
    return plot.with_name(f"{plot.stem}.conv1.png")


def _traced_conv(conv: torch.jit.ScriptModule) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A traced submodule cannot be called on its own: redo its convolution from the constants in its graph."""
    node = next((n for n in conv.graph.nodes() if n.kind() in ("aten::_convolution", "aten::conv2d")), None)
    if node is None:
        return None

    def value(v: torch._C.Value) -> Any:
        n = v.node()
        if n.kind() == "prim::ListConstruct":
            return [value(i) for i in n.inputs()]
        if n.kind() == "prim::GetAttr":
            return getattr(conv, n.s("name"))
        return v.toIValue()

    args = [value(v) for v in node.inputs()]
    if node.kind() == "aten::_convolution":
        if args[6]:  # transposed
            return None
        args = args[:6] + [args[8]]
    weight, bias, stride, padding, dilation, groups = args[1:7]
    return lambda x: torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)


@torch.no_grad()
def plot_first_conv(model: torch.nn.Module, image: torch.Tensor, path: str | Path, title: str) -> Path | None:
    """Save the first conv layer's output channels (``conv1``, before BatchNorm and ReLU) for one image as a grid.

    ``image`` is one preprocessed ``3 x H x W`` tensor. Scripted and traced TorchScript models work too (a traced
    ``conv1`` is redone from its graph). Returns None, and logs why, for a model whose ``conv1`` cannot be run
    alone (none, or a frozen TorchScript file that inlined it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conv1 = getattr(model, "conv1", None)
    if conv1 is None:
        logger.warning("no feature-map plot: the model has no conv1 layer")
        return None
    model.eval()
    device = next(iter(model.parameters()), image).device
    x = image[None].to(device)
    try:
        out = conv1(x)
    except RuntimeError as e:  # "Trace submodules cannot be called."
        traced = _traced_conv(conv1) if isinstance(conv1, torch.jit.ScriptModule) else None
        if traced is None:
            logger.warning("no feature-map plot: conv1 cannot be run on its own (%s)", str(e).splitlines()[0])
            return None
        out = traced(x)
    maps = out.float()[0].cpu().numpy()
    cols = 8
    rows = -(-len(maps) // cols)
    fig, axes = plt.subplots(rows + 1, cols, figsize=(cols * 1.1, (rows + 1) * 1.1), dpi=100)
    for ax in axes.flat:
        ax.axis("off")
    shown = image.float().cpu().numpy().transpose(1, 2, 0)
    axes[0, 0].imshow((shown - shown.min()) / max(float(shown.max() - shown.min()), 1e-8))
    axes[0, 0].set_title("input", fontsize=7)
    for i, fmap in enumerate(maps):
        ax = axes[1 + i // cols, i % cols]
        ax.imshow(fmap, cmap="viridis")
        ax.set_title(str(i), fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def run(cfg: EvalConfig) -> EvalReport:
    """Evaluate ``cfg.model`` on the val split of ``cfg.data``."""
    if cfg.plot:  # both PNGs, before anything is read or written: neither may land on the model or its manifest
        for flag, out in (("--plot", cfg.plot), ("--plot (its conv1 feature maps)", feature_maps_path(cfg.plot))):
            check_not_input(out, {"--model": cfg.model}, flag=flag)
        prepare_output(cfg.plot)
    loaded = load_checkpoint(cfg.model, arch=cfg.arch, trust=cfg.trust_checkpoint)
    preprocessing = loaded.preprocessing or default_preprocessing(cfg.data, cfg.image_size)
    if loaded.preprocessing and cfg.image_size and cfg.image_size != loaded.preprocessing.image_size:
        logger.warning("--image-size %d ignored: %s records its own preprocessing (%d px)", cfg.image_size,
                       cfg.model, loaded.preprocessing.image_size)
    splits = load_data(cfg.data, preprocessing, val_limit=cfg.val_limit, augment=False, val_only=True)
    check_model_fits_data(loaded, splits)
    device = torch_device(cfg.device)
    loader = make_loader(splits.val, batch_size=cfg.batch_size, shuffle=False, device=device)
    metrics = evaluate(loaded.model.to(device), loader, num_classes=splits.num_classes, device=device,
                       progress=cfg.progress)
    plot = maps = None
    if cfg.plot:
        plot = plot_confusion(metrics.confusion, splits.class_names, cfg.plot,
                              f"{Path(cfg.model).name} on {splits.name}: top-1 {metrics.top1:.2%}")
        index = next((i for i in range(len(splits.val)) if splits.val[i] is not None), None)
        if index is not None:
            image, label = splits.val[index]
            maps = plot_first_conv(loaded.model, image, feature_maps_path(cfg.plot),
                                   f"{Path(cfg.model).name}: conv1 feature maps of val image "
                                   f"{splits.val.ids[index]} ({splits.class_names[label]})")
    return EvalReport(metrics, splits.class_names, loaded.describe(), plot, maps)
