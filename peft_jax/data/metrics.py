"""Task metrics as the papers report them; pure numpy functions of predictions and labels.

``preds``/``labels``: [n] class indices (or [n] floats for pearson/spearman). Values are
returned as Python floats in [0, 1] (correlations in [-1, 1]); the papers print x100.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def _pair(preds, labels) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds), np.asarray(labels)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"preds {p.shape} and labels {y.shape} must be equal 1-d shapes [n]")
    if p.size == 0:
        raise ValueError("metrics of zero examples are undefined")
    return p, y


def accuracy(preds, labels) -> float:
    p, y = _pair(preds, labels)
    return float(np.mean(p == y))


def f1(preds, labels, positive: int = 1) -> float:
    """Binary F1 of the ``positive`` class (MRPC, QQP; 0 when there are no true positives)."""
    p, y = _pair(preds, labels)
    tp = np.sum((p == positive) & (y == positive))
    fp = np.sum((p == positive) & (y != positive))
    fn = np.sum((p != positive) & (y == positive))
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def macro_f1(preds, labels, num_classes: Optional[int] = None) -> float:
    """Unweighted mean of per-class F1 over the classes 0..num_classes-1 (CB)."""
    p, y = _pair(preds, labels)
    n = num_classes or int(max(p.max(), y.max())) + 1
    return float(np.mean([f1(p, y, positive=c) for c in range(n)]))


def mcc(preds, labels) -> float:
    """Matthews correlation (CoLA); multi-class form, 0 when undefined."""
    p, y = _pair(preds, labels)
    classes = np.union1d(p, y)
    c = np.zeros((len(classes), len(classes)))
    np.add.at(c, (np.searchsorted(classes, y), np.searchsorted(classes, p)), 1)
    t, pk, n, correct = c.sum(1), c.sum(0), c.sum(), np.trace(c)
    den = np.sqrt((n * n - pk @ pk) * (n * n - t @ t))
    return float((correct * n - t @ pk) / den) if den else 0.0


def pearson(x, y) -> float:
    a, b = _pair(x, y)
    a, b = a.astype(np.float64) - a.mean(), b.astype(np.float64) - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den else 0.0


def spearman(x, y) -> float:
    """Pearson correlation of the ranks (ties get their average rank)."""
    from scipy.stats import rankdata
    a, b = _pair(x, y)
    return pearson(rankdata(a), rankdata(b))


def multirc_f1a(preds, labels) -> float:
    """MultiRC F1a: binary F1 over all answer options."""
    return f1(preds, labels, positive=1)


def multirc_em(preds, labels, groups) -> float:
    """MultiRC EM: fraction of questions (``groups``) whose answer options are all right."""
    p, y = _pair(preds, labels)
    g = np.asarray(groups)
    if g.shape != p.shape:
        raise ValueError(f"groups {g.shape} must match preds {p.shape}")
    _, inv = np.unique(g, return_inverse=True)
    wrong = np.zeros(inv.max() + 1, bool)
    np.logical_or.at(wrong, inv, p != y)
    return float(np.mean(~wrong))


def exact_match(preds: Sequence[Optional[str]], targets: Sequence[str]) -> float:
    """Fraction of generated texts equal to their target text (None: no answer)."""
    if len(preds) != len(targets) or not preds:
        raise ValueError(f"exact_match: {len(preds)} predictions for {len(targets)} targets")
    return float(np.mean([p is not None and p == t for p, t in zip(preds, targets)]))


METRICS = {"accuracy": accuracy, "f1": f1, "macro_f1": macro_f1, "mcc": mcc, "pearson": pearson,
           "spearman": spearman, "f1a": multirc_f1a}


def compute_metrics(names: Sequence[str], preds, labels, groups=None,
                    num_classes: Optional[int] = None) -> dict[str, float]:
    """``{name: value}`` for a task's metric names (``em`` needs ``groups``)."""
    out = {}
    for name in names:
        if name == "em":
            if groups is None:
                raise ValueError("metric 'em' needs groups (the question id of every answer option)")
            out[name] = multirc_em(preds, labels, groups)
        elif name == "macro_f1":
            out[name] = macro_f1(preds, labels, num_classes)
        elif name in METRICS:
            out[name] = METRICS[name](preds, labels)
        else:
            raise ValueError(f"unknown metric {name!r} (known: {sorted(METRICS) + ['em']})")
    return out
