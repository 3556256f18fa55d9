"""Classification metrics from a confusion matrix: what ``evaluate`` reports and ``benchmark`` scores every row with.

One home for them, apart from the training loop: the loop only fills the confusion matrix (:func:`confusion_matrix`
per batch); the ONNX Runtime, TensorRT and OpenVINO rows of a benchmark fill theirs from numpy outputs and must
read the same precision, recall and F1 off it.

Example::

    confusion = confusion_matrix(labels, logits.argmax(1), num_classes=10)
    classification_metrics(confusion, class_names)["macro_f1"]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) pairs: rows true, columns predicted, int64.

    One bincount over ``label * num_classes + prediction``, so a batch costs one pass whatever its class count.
    """
    labels = np.asarray(labels, dtype=np.int64)
    flat = labels * num_classes + np.asarray(predicted, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _precision_recall_f1(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1, support and whether the class occurs at all (zero division -> 0)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(tp), where=both > 0)
    return precision, recall, f1, support, (support > 0) | (predicted > 0)


def classification_metrics(confusion: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support from a confusion matrix (rows true, columns predicted).

    As scikit-learn's ``classification_report`` with ``zero_division=0``, without its warning: a class never
    predicted has precision 0, a class absent from the labels recall 0, and F1 is 0 where precision + recall is.
    Macro averages weigh alike every class that occurs in the labels or the predictions (a class in neither is
    left out, as scikit-learn leaves out labels it never sees); weighted averages weigh by support (weighted
    recall is top-1).

    Example::

        classification_metrics([[5, 1], [2, 3]], ["cat", "dog"])["per_class"]["cat"]
        # {"precision": 0.714..., "recall": 0.833..., "f1": 0.769..., "support": 6}
    """
    precision, recall, f1, support, seen = _precision_recall_f1(confusion)
    weights = support / max(support.sum(), 1.0)

    def macro(values: np.ndarray) -> float:
        return float(values[seen].mean()) if seen.any() else 0.0

    return {
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
                      for name, p, r, f, n in zip(class_names, precision, recall, f1, support)},
        "macro_precision": macro(precision), "macro_recall": macro(recall), "macro_f1": macro(f1),
        "weighted_precision": float((precision * weights).sum()), "weighted_recall": float((recall * weights).sum()),
        "weighted_f1": float((f1 * weights).sum()),
    }


@dataclass
class EvalMetrics:
    """Metrics of one pass over a labelled split (what :func:`optimize.loop.evaluate` returns).

    Precision, recall and F1 follow :func:`classification_metrics` (zero division gives 0); per-class accuracy
    is recall, except that a class with no samples gets NaN there.
    """

    loss: float
    top1: float
    top5: float
    count: int
    confusion: np.ndarray  # rows: true class, columns: predicted class

    @property
    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(axis=1)
        return [float(self.confusion[i, i] / t) if t else float("nan") for i, t in enumerate(totals)]

    def classification(self, class_names: list[str] | None = None) -> dict[str, Any]:
        """:func:`classification_metrics` of this pass; classes are named ``"0"``, ``"1"``... without names."""
        names = class_names if class_names is not None else [str(i) for i in range(len(self.confusion))]
        return classification_metrics(self.confusion, names)

    def summary(self) -> dict[str, float]:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "count": self.count}
