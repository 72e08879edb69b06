"""Classification and regression scores on predictions small enough to check by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.metrics.classification import (
    accuracy,
    classification_scores,
    confusion,
    f1,
    matthews,
    pearson,
    spearman,
)

# truth 1 1 1 0 0 0, prediction 1 1 0 0 0 1: tp 2, fn 1, tn 2, fp 1
TRUTH = [1, 1, 1, 0, 0, 0]
PRED = [1, 1, 0, 0, 0, 1]


def test_confusion_and_accuracy():
    assert confusion(PRED, TRUTH, 2).tolist() == [[2, 1], [1, 2]]
    assert accuracy(PRED, TRUTH) == pytest.approx(4 / 6)


def test_f1_binary_and_macro():
    assert f1(PRED, TRUTH, 2) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 2tp / (2tp + fp + fn) = 2/3
    # three classes: class 2 never predicted nor present scores 0 and pulls the macro mean down
    assert f1([0, 1, 1], [0, 1, 0], 3, "macro") == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_matthews():
    # binary MCC = (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (4 - 1) / sqrt(3 * 3 * 3 * 3) = 1/3
    assert matthews(PRED, TRUTH, 2) == pytest.approx(1 / 3)
    assert matthews(TRUTH, TRUTH, 2) == pytest.approx(1.0)
    assert matthews([1 - t for t in TRUTH], TRUTH, 2) == pytest.approx(-1.0)
    assert matthews([0] * 6, TRUTH, 2) == 0.0  # a constant prediction: undefined, reported as 0 (as GLUE does)


def test_pearson_and_spearman():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.5]
    mx, my = sum(x) / 4, sum(y) / 4
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    want = cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert pearson(x, y) == pytest.approx(want)
    assert spearman(x, y) == pytest.approx(1.0)  # monotone: ranks agree
    # ties take their mean rank: ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(pearson([1, 2.5, 2.5, 4], [1, 2, 3, 4]))


def test_scores_from_logits_and_values():
    logits = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.7, 0.3], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    s = classification_scores(logits, TRUTH, 2)
    assert (
        s["accuracy"] == pytest.approx(4 / 6) and s["f1"] == pytest.approx(2 / 3) and s["mcc"] == pytest.approx(1 / 3)
    )
    r = classification_scores(torch.tensor([1.0, 2.0, 3.0]), [1.0, 2.0, 3.5], 0)
    assert set(r) == {"pearson", "spearman"} and r["spearman"] == pytest.approx(1.0)
