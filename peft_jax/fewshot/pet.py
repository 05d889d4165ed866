"""PET / iPET (Schick & Schütze, 2021): pattern-verbalizer pairs -> soft labels -> distillation.

Each PVP's model gives class scores on unlabelled data; the ensemble's soft label is the
(weighted) average of the PVPs' softmax (at temperature T); a classifier is then trained with
cross-entropy against those soft labels (``peft_jax.train.losses.soft_label_loss``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

Array = Any


def softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    x = np.asarray(x, np.float64) / temperature
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def ensemble_soft_labels(scores: Sequence[np.ndarray], weights: Optional[Sequence[float]] = None,
                         temperature: float = 1.0) -> np.ndarray:
    """Soft labels ``[n, C]``: the weighted mean over PVPs of ``softmax(scores_k / T)``.

    ``scores``: one ``[n, C]`` array per PVP; ``weights`` (e.g. each PVP's train accuracy,
    as in PET) default to uniform.
    """
    if not scores:
        raise ValueError("ensemble_soft_labels: no PVP scores given")
    shapes = {np.shape(s) for s in scores}
    if len(shapes) != 1:
        raise ValueError(f"ensemble_soft_labels: PVP scores differ in shape: {sorted(shapes)}")
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(scores),) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"ensemble_soft_labels: weights {w.tolist()} must be {len(scores)} "
                         "non-negative numbers with a positive sum")
    probs = np.stack([softmax(s, temperature) for s in scores])       # [K, n, C]
    return np.tensordot(w / w.sum(), probs, axes=1)


def distillation_loss(logits: Array, soft_labels: Array, weights: Optional[Array] = None) -> Array:
    """Cross-entropy of the student's ``logits [b, C]`` against ``soft_labels [b, C]``."""
    from peft_jax.train.losses import soft_label_loss
    return soft_label_loss(logits, soft_labels, weights)


def ipet_grow(unlabelled: Sequence[dict], soft: np.ndarray, n_new: int, seed: int
              ) -> list[dict]:
    """One iPET round's extra training set: ``n_new`` unlabelled examples with the ensemble's
    argmax labels, sampled per class in proportion to equal class counts (deterministic)."""
    rng = np.random.default_rng(seed)
    pred = soft.argmax(-1)
    c = soft.shape[1]
    per = n_new // c
    out = []
    for k in range(c):
        idx = np.nonzero(pred == k)[0]
        take = rng.choice(idx, size=min(per, len(idx)), replace=False) if len(idx) else []
        out += [{**unlabelled[i], "label": int(k)} for i in take]
    return out
