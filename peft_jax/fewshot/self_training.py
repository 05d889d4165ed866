"""Self-training (STraTA-style): teacher pseudo-labels above a confidence threshold.

The teacher's probabilities on unlabelled data give pseudo-labels; only those whose top
probability reaches ``threshold`` are kept (optionally at most ``max_per_class`` of the most
confident per class, for balance); the student trains on labelled + pseudo-labelled data and
becomes the next round's teacher.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def select_pseudo_labels(probs: np.ndarray, threshold: float,
                         max_per_class: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``probs [n, C]`` -> (indices, labels, confidences) of the kept examples.

    Kept: ``max(probs[i]) >= threshold``; with ``max_per_class`` the most confident of each
    predicted class (ties: lower index first). Indices are sorted ascending.
    """
    p = np.asarray(probs, np.float64)
    if p.ndim != 2:
        raise ValueError(f"select_pseudo_labels: probs must be [n, C], got shape {p.shape}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"select_pseudo_labels: threshold {threshold} is not in [0, 1]")
    conf, lab = p.max(-1), p.argmax(-1)
    keep = np.nonzero(conf >= threshold)[0]
    if max_per_class is not None:
        chosen = []
        for c in range(p.shape[1]):
            idx = keep[lab[keep] == c]
            order = np.lexsort((idx, -conf[idx]))
            chosen.append(idx[order[:max_per_class]])
        keep = np.sort(np.concatenate(chosen)) if chosen else keep
    return keep, lab[keep], conf[keep]


def pseudo_labelled(unlabelled: Sequence[dict], probs: np.ndarray, threshold: float,
                    max_per_class: Optional[int] = None) -> list[dict]:
    """The kept unlabelled examples with their pseudo-label in ``label``."""
    idx, lab, _ = select_pseudo_labels(probs, threshold, max_per_class)
    return [{**unlabelled[i], "label": int(y)} for i, y in zip(idx, lab)]
