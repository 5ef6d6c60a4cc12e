"""Scores of an attacker: accuracy against chance, and the multi-attribute cMAP / F1.

cMAP and F1 follow the ensemble protocol of PRIVACY_EVAL.md: each attribute class is a
binary "can be told" task (one-vs-rest), cMAP is the mean of their average precisions
and F1 the mean of their F1 at probability threshold 0.5.
"""

from __future__ import annotations

import numpy as np


def accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = np.asarray(pred), np.asarray(truth)
    if len(truth) == 0:
        raise ValueError("no test samples")
    return float((pred == truth).mean())


def chance_level(train: np.ndarray, test: np.ndarray) -> float:
    """Accuracy of always answering the training set's most common class: what an
    attacker who learned nothing from the video gets."""
    train, test = np.asarray(train), np.asarray(test)
    values, counts = np.unique(train, return_counts=True)
    majority = values[np.argmax(counts)]
    return float((test == majority).mean())


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the precision-recall curve as the mean of precision at each positive
    (ties broken by order); NaN when there is no positive."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    if not positive.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = positive[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def f1_binary(pred: np.ndarray, positive: np.ndarray) -> float:
    pred, positive = np.asarray(pred, bool), np.asarray(positive, bool)
    tp = float((pred & positive).sum())
    denom = float(pred.sum() + positive.sum())
    return 2 * tp / denom if denom else 1.0


def one_vs_rest(probs: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(mean AP, mean F1 at 0.5) over the classes of one attribute present in `truth`.

    probs: (N, K) class probabilities; truth: (N,) class indices."""
    probs, truth = np.asarray(probs, float), np.asarray(truth)
    aps, f1s = [], []
    for k in range(probs.shape[1]):
        positive = truth == k
        if not positive.any():
            continue
        aps.append(average_precision(probs[:, k], positive))
        f1s.append(f1_binary(probs[:, k] >= 0.5, positive))
    return float(np.mean(aps)), float(np.mean(f1s))


def cmap_f1(results: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """cMAP and F1 over several attributes: {attribute: (probs (N, K), truth (N,))}."""
    aps, f1s = [], []
    for probs, truth in results.values():
        ap, f1 = one_vs_rest(probs, truth)
        aps.append(ap)
        f1s.append(f1)
    return {"cmap": float(np.mean(aps)), "f1": float(np.mean(f1s))}
