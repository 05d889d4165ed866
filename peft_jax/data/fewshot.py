"""Few-shot data: K-shot sampling (LM-BFF protocol), demonstrations, unlabelled pools.

All functions are deterministic given their seed and never modify their inputs.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from peft_jax.data.builtin import LMBFF_SEEDS
from peft_jax.data.readers import DataError


def _by_class(examples: Sequence[dict], num_classes: Optional[int]) -> list[np.ndarray]:
    ys = []
    for i, ex in enumerate(examples):
        y = ex.get("label")
        if not isinstance(y, (int, np.integer)) or isinstance(y, bool):
            raise DataError(f"k-shot sampling needs class labels; example {i} has label {y!r}")
        ys.append(int(y))
    ys = np.asarray(ys)
    n = num_classes or int(ys.max()) + 1
    return [np.nonzero(ys == c)[0] for c in range(n)]


def sample_kshot(examples: Sequence[dict], k: int, seed: int, num_classes: Optional[int] = None,
                 exclude: Sequence[int] = ()) -> list[dict]:
    """K examples of every class, drawn without replacement with ``seed``; the result is
    ordered by class then draw. ``exclude``: indices that may not be drawn."""
    return [examples[i] for i in kshot_indices(examples, k, seed, num_classes, exclude)]


def kshot_indices(examples: Sequence[dict], k: int, seed: int, num_classes: Optional[int] = None,
                  exclude: Sequence[int] = ()) -> np.ndarray:
    rng = np.random.default_rng(seed)
    banned = set(int(i) for i in exclude)
    out = []
    for c, idx in enumerate(_by_class(examples, num_classes)):
        idx = np.array([i for i in idx if i not in banned], np.int64)
        if len(idx) < k:
            raise DataError(f"class {c} has {len(idx)} examples, fewer than k={k}")
        out.append(rng.choice(idx, size=k, replace=False))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def lmbff_kshot(examples: Sequence[dict], k: int = 16, seed: int = 13,
                num_classes: Optional[int] = None) -> tuple[list[dict], list[dict]]:
    """LM-BFF protocol for one seed: a train set of K per class and a disjoint dev set of the
    same size, both from ``examples`` (the full training set)."""
    train = kshot_indices(examples, k, seed, num_classes)
    dev = kshot_indices(examples, k, seed + 10_000, num_classes, exclude=train)
    return [examples[i] for i in train], [examples[i] for i in dev]


def lmbff_protocol(examples: Sequence[dict], k: int = 16, seeds: Sequence[int] = LMBFF_SEEDS,
                   num_classes: Optional[int] = None) -> dict[int, tuple[list[dict], list[dict]]]:
    """``{seed: (train, dev)}`` for the LM-BFF seeds 13, 21, 42, 87, 100."""
    return {s: lmbff_kshot(examples, k, s, num_classes) for s in seeds}


def unlabelled(examples: Sequence[dict]) -> list[dict]:
    """Copies of the examples with the label removed (PET / self-training / SimCSE pools)."""
    return [{k: v for k, v in ex.items() if k != "label"} for ex in examples]


def select_demonstrations(queries: Sequence[dict], pool: Sequence[dict], seed: int,
                          mode: str = "random", num_classes: Optional[int] = None,
                          embed_fn: Optional[Callable[[list[str]], np.ndarray]] = None,
                          text_fields: Sequence[str] = ("sentence",), top_fraction: float = 0.5,
                          exclude_same_text: bool = True) -> list[list[dict]]:
    """One demonstration per class for every query (LM-BFF). ``mode='random'``: uniform within
    the class; ``'similarity'``: uniform among the ``top_fraction`` of the class most similar
    to the query by cosine of ``embed_fn`` embeddings (e.g. a SentenceTransformer's
    ``encode``). A pool example whose text equals the query's is never its demonstration.
    Result ``[query][class]``, deterministic given ``seed``."""
    if mode not in ("random", "similarity"):
        raise DataError(f"demonstration mode must be 'random' or 'similarity', got {mode!r}")
    classes = _by_class(pool, num_classes)
    for c, idx in enumerate(classes):
        if len(idx) == 0:
            raise DataError(f"demonstration pool has no example of class {c}")
    join = lambda ex: " ".join(ex[f] for f in text_fields)
    sims = None
    if mode == "similarity":
        if embed_fn is None:
            raise DataError("mode='similarity' needs embed_fn(list[str]) -> [n, d] array")
        q = np.asarray(embed_fn([join(ex) for ex in queries]), np.float64)
        p = np.asarray(embed_fn([join(ex) for ex in pool]), np.float64)
        if q.ndim != 2 or p.ndim != 2 or q.shape[0] != len(queries) or p.shape[0] != len(pool):
            raise DataError(f"embed_fn returned shapes {q.shape}, {p.shape}; expected [n, d]")
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        p /= np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
        sims = q @ p.T
    pool_text = [join(ex) for ex in pool]
    out = []
    for i, ex in enumerate(queries):
        rng = np.random.default_rng([seed, i])
        qt = join(ex)
        demos = []
        for c, idx in enumerate(classes):
            cand = np.array([j for j in idx if not (exclude_same_text and pool_text[j] == qt)], np.int64)
            if len(cand) == 0:
                raise DataError(f"query {i}: no demonstration of class {c} other than itself")
            if sims is not None:
                order = cand[np.argsort(-sims[i, cand], kind="stable")]
                cand = order[:max(1, int(np.ceil(len(order) * top_fraction)))]
            demos.append(pool[int(rng.choice(cand))])
        out.append(demos)
    return out
