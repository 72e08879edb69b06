"""Scores of classifiers and regressors, computed in one place: accuracy, F1 (binary and macro), Matthews
correlation (CoLA's metric), Pearson and Spearman correlation (STS-B's). Inputs are plain sequences or tensors of
predictions and truths; float64 throughout, so the numbers do not depend on the batch they came from."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _array(x) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)


def confusion(pred: Sequence[int], truth: Sequence[int], n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts, rows the truth, columns the prediction."""
    p, t = _array(pred).astype(np.int64), _array(truth).astype(np.int64)
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def accuracy(pred, truth) -> float:
    p, t = _array(pred), _array(truth)
    return float((p == t).mean()) if t.size else float("nan")


def f1(pred, truth, n_classes: int, average: str = "binary") -> float:
    """F1 of class 1 ("binary", as GLUE's MRPC and QQP) or the unweighted mean over classes ("macro"). A class
    never predicted nor present scores 0, as in scikit-learn's zero_division=0."""
    c = confusion(pred, truth, n_classes).astype(np.float64)
    tp = np.diag(c)
    denom = c.sum(0) + c.sum(1)  # predicted + true counts = 2 tp + fp + fn
    scores = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    if average == "binary":
        if n_classes != 2:
            raise ValueError("binary F1 needs 2 classes")
        return float(scores[1])
    if average == "macro":
        return float(scores.mean())
    raise ValueError(f"unknown average {average!r}")


def matthews(pred, truth, n_classes: int) -> float:
    """Matthews correlation coefficient, multi-class (Gorodkin's R_K); 0 when it is undefined."""
    c = confusion(pred, truth, n_classes).astype(np.float64)
    t, p, n = c.sum(1), c.sum(0), c.sum()
    cov_tp = np.trace(c) * n - t @ p
    cov_pp, cov_tt = n * n - p @ p, n * n - t @ t
    denom = np.sqrt(cov_pp * cov_tt)
    return float(cov_tp / denom) if denom > 0 else 0.0


def pearson(pred, truth) -> float:
    x, y = _array(pred), _array(truth)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their mean rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def spearman(pred, truth) -> float:
    return pearson(_ranks(_array(pred)), _ranks(_array(truth)))


def classification_scores(logits_or_values, truth, n_classes: int) -> dict[str, float]:
    """Every score of one validation pass: for a classifier (n_classes > 0; logits (N, C)) accuracy, macro F1,
    Matthews correlation, and binary F1 with 2 classes; for a regressor (n_classes == 0; values (N,)) Pearson and
    Spearman correlation."""
    y = _array(logits_or_values)
    if n_classes == 0:
        return {"pearson": pearson(y.reshape(-1), truth), "spearman": spearman(y.reshape(-1), truth)}
    pred = y.argmax(-1)
    out = {
        "accuracy": accuracy(pred, truth),
        "f1_macro": f1(pred, truth, n_classes, "macro"),
        "mcc": matthews(pred, truth, n_classes),
    }
    if n_classes == 2:
        out["f1"] = f1(pred, truth, 2, "binary")
    return out
