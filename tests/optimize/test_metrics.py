"""The classification metrics (optimize/metrics.py) and the figures evaluate() reports, against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optimize.loop import evaluate
from optimize.metrics import EvalMetrics, classification_metrics, confusion_matrix


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    labels, predicted = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2]
    confusion = confusion_matrix(np.array(labels), np.array(predicted), 3)
    assert confusion.tolist() == [[1, 1, 0],
                                  [0, 1, 0],
                                  [1, 0, 2]]
    assert confusion.dtype == np.int64
    # a class neither in the labels nor predicted still has its row and column
    assert confusion_matrix(np.array([0]), np.array([0]), 4).shape == (4, 4)


def test_classification_metrics_match_a_hand_computation():
    # rows: true a, b, c; columns: predicted a, b, c. c is never predicted.
    confusion = [[5, 1, 0],
                 [2, 3, 0],
                 [1, 1, 0]]
    m = classification_metrics(confusion, ["a", "b", "c"])
    a, b, c = (m["per_class"][n] for n in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (5 / 8, 5 / 6, 6)
    assert (b["precision"], b["recall"], b["support"]) == (3 / 5, 3 / 5, 5)
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 2)  # zero division -> 0
    f1_a, f1_b = 2 * (5 / 8) * (5 / 6) / (5 / 8 + 5 / 6), 0.6
    assert a["f1"] == pytest.approx(f1_a) and b["f1"] == pytest.approx(f1_b)
    assert m["macro_precision"] == pytest.approx((5 / 8 + 3 / 5 + 0) / 3)
    assert m["macro_recall"] == pytest.approx((5 / 6 + 3 / 5 + 0) / 3)
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b) / 3)
    assert m["weighted_precision"] == pytest.approx((6 * 5 / 8 + 5 * 3 / 5) / 13)
    assert m["weighted_f1"] == pytest.approx((6 * f1_a + 5 * f1_b) / 13)
    assert m["weighted_recall"] == pytest.approx(8 / 13)  # top-1

    metrics = EvalMetrics(loss=1.0, top1=8 / 13, top5=1.0, count=13, confusion=np.array(confusion))
    assert metrics.classification(["a", "b", "c"]) == m
    assert metrics.per_class_accuracy == pytest.approx([5 / 6, 3 / 5, 0.0])
    # a class in neither the labels nor the predictions is left out of the macro averages, and its accuracy is NaN
    absent = EvalMetrics(loss=1.0, top1=1.0, top5=1.0, count=5, confusion=np.array([[2, 0, 0], [0, 3, 0], [0, 0, 0]]))
    c = absent.classification()
    assert c["macro_precision"] == c["macro_recall"] == c["macro_f1"] == 1.0
    assert list(c["per_class"]) == ["0", "1", "2"]
    assert absent.per_class_accuracy[:2] == [1.0, 1.0] and math.isnan(absent.per_class_accuracy[2])


def test_evaluate_reports_top1_top5_loss_and_confusion_of_known_logits():
    """Five images of six classes whose logits are the inputs themselves (an identity model), in two batches.

    Falling logits rank class 0 first and class 5 last; rising ones the reverse. Top-5 of six classes misses
    only a label ranked last: the third and fifth images.
    """
    falling, rising = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    batches = [(torch.tensor([falling, falling, falling]), torch.tensor([0, 1, 5])),
               (torch.tensor([rising, rising]), torch.tensor([5, 0]))]
    m = evaluate(torch.nn.Identity(), batches, num_classes=6, device=torch.device("cpu"), amp=False,
                 channels_last=False)
    assert (m.count, m.top1, m.top5) == (5, 2 / 5, 3 / 5)
    # cross-entropy of each image: log(sum of e^0 .. e^5) minus the label's logit (5, 4, 0, 5, 0)
    lse = math.log(sum(math.exp(k) for k in range(6)))
    assert m.loss == pytest.approx(lse - (5 + 4 + 0 + 5 + 0) / 5, rel=1e-6)
    expected = np.zeros((6, 6), dtype=np.int64)
    for label, predicted in [(0, 0), (1, 0), (5, 0), (5, 5), (0, 5)]:
        expected[label, predicted] += 1
    assert m.confusion.tolist() == expected.tolist()
    assert m.summary() == {"top1": 2 / 5, "top5": 3 / 5, "loss": m.loss, "count": 5}
    accuracy = m.per_class_accuracy  # class 0: 1 of 2, class 1: 0 of 1, class 5: 1 of 2, classes 2-4: none seen
    assert [accuracy[i] for i in (0, 1, 5)] == [0.5, 0.0, 0.5] and all(math.isnan(accuracy[i]) for i in (2, 3, 4))
    assert m.classification()["weighted_recall"] == pytest.approx(m.top1)
