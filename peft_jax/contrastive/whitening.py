"""BERT-whitening (Su et al. 2021): ``x -> (x - mu) @ W`` with ``W = U diag(1/sqrt(S))[:, :k]``
from the SVD of the embeddings' covariance. On its fit set the whitened embeddings have
zero mean and identity covariance (``k`` dimensions kept, largest variance first).

Stored as ``.npz`` (arrays ``mu [d]``, ``W [d, k]``), read without pickle.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Whitening:
    """``mu [d]`` and ``W [d, k]`` (float64)."""

    mu: np.ndarray
    W: np.ndarray

    @property
    def dim_in(self) -> int:
        return int(self.W.shape[0])

    @property
    def dim_out(self) -> int:
        return int(self.W.shape[1])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return apply_whitening(self, x)


def fit_whitening(embeddings: np.ndarray, k: Optional[int] = None, rtol: float = 1e-7) -> Whitening:
    """Fit on ``embeddings [n, d]``; keep ``k`` dims (largest variance first).

    Covariance is the unbiased ``np.cov`` estimate. A direction with (near-)zero variance
    (``S < rtol * S.max()``, e.g. when ``n <= d``) cannot be whitened: ``k=None`` keeps every
    other direction (``d`` for full-rank data); an explicit ``k`` that would keep one is a
    ValueError naming ``k``.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"fit_whitening: embeddings must be [n, d], got shape {x.shape}")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"fit_whitening: need at least 2 embeddings, got {n}")
    if k is not None and not 1 <= int(k) <= d:
        raise ValueError(f"fit_whitening: k={k} must be in [1, {d}] (embedding dimension)")
    mu = x.mean(axis=0)
    cov = np.cov(x, rowvar=False)
    u, s, _ = np.linalg.svd(cov)
    k = int(np.sum(s >= rtol * s[0])) if k is None else int(k)
    if s[k - 1] < rtol * s[0]:
        rank = int(np.sum(s >= rtol * s[0]))
        raise ValueError(f"fit_whitening: k={k} keeps directions with ~zero variance (covariance "
                         f"rank ~{rank} from n={n} embeddings of dim {d}); use k <= {rank} or "
                         "fit on more sentences")
    W = u[:, :k] / np.sqrt(s[:k])[None, :]
    return Whitening(mu=mu, W=W)


def apply_whitening(w: Whitening, x: np.ndarray) -> np.ndarray:
    """``x [n, d] -> (x - mu) @ W  [n, k]`` (float32)."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != w.dim_in:
        raise ValueError(f"apply_whitening: embeddings of shape {x.shape} do not match the "
                         f"whitening's input dimension {w.dim_in}")
    return ((x.astype(np.float64) - w.mu) @ w.W).astype(np.float32)


def save_whitening(path: str, w: Whitening) -> None:
    """Write ``mu`` and ``W`` to an ``.npz`` file (no pickled objects)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, mu=w.mu, W=w.W)


def load_whitening(path: str) -> Whitening:
    """Read a file written by :func:`save_whitening`; bad contents -> ValueError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: whitening file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"mu", "W"} - set(f.files)
            if missing:
                raise ValueError(f"{path}: not a whitening file (missing arrays {sorted(missing)}; "
                                 f"has {sorted(f.files)})")
            mu, W = np.asarray(f["mu"]), np.asarray(f["W"])
    except (OSError, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith(path):
            raise
        raise ValueError(f"{path}: cannot read whitening .npz ({e})") from None
    if mu.ndim != 1 or W.ndim != 2 or W.shape[0] != mu.shape[0]:
        raise ValueError(f"{path}: inconsistent shapes mu {mu.shape}, W {W.shape} "
                         "(expected [d] and [d, k])")
    return Whitening(mu=mu.astype(np.float64), W=W.astype(np.float64))
