"""Linear and MLP probes on frozen features of every layer at once (``jax.vmap`` over layers).

A probe is a classifier on one layer's features: ``linear`` (multinomial logistic
regression) or ``mlp`` (one hidden ReLU layer). Features are standardized with the training
set's per-layer mean and standard deviation; probes are trained full-batch with Adam on the
cross-entropy plus ``l2 * ||W||^2`` (``l2`` chosen per layer on the dev set from ``l2_grid``
when a dev set is given). Accuracy per layer is the probing curve.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = Any
KINDS = ("linear", "mlp")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    kind: str = "linear"
    hidden: int = 256
    steps: int = 300
    lr: float = 1e-2
    l2_grid: tuple = (1e-4, 1e-2, 1.0)
    seed: int = 0


def _init(rng: Array, d: int, c: int, kind: str, hidden: int) -> dict:
    if kind == "linear":
        return {"w": jnp.zeros((d, c)), "b": jnp.zeros((c,))}
    k1, _ = jax.random.split(rng)
    return {"w1": jax.random.normal(k1, (d, hidden)) / np.sqrt(d), "b1": jnp.zeros((hidden,)),
            "w": jnp.zeros((hidden, c)), "b": jnp.zeros((c,))}


def probe_logits(p: dict, x: Array) -> Array:
    """``[n, d] -> [n, C]`` for one layer's probe."""
    if "w1" in p:
        x = jax.nn.relu(x @ p["w1"] + p["b1"])
    return x @ p["w"] + p["b"]


def _penalty(p: dict) -> Array:
    return sum(jnp.sum(p[k] ** 2) for k in ("w", "w1") if k in p)


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Per layer and dimension: ``(x - mean_train) / std_train`` for ``[L, n, d]`` arrays."""
    mu = train.mean(1, keepdims=True)
    sd = train.std(1, keepdims=True) + 1e-6
    return [((x - mu) / sd).astype(np.float32) for x in (train,) + others]


def fit_probes(x: np.ndarray, y: np.ndarray, num_classes: int, cfg: ProbeConfig,
               l2: float) -> dict:
    """Probes for every layer: ``x [L, n, d]`` (standardized), ``y [n]`` -> params with a
    leading ``[L]`` axis."""
    if cfg.kind not in KINDS:
        raise ValueError(f"probe kind {cfg.kind!r}: choose from {KINDS}")
    rngs = jax.random.split(jax.random.PRNGKey(cfg.seed), x.shape[0])
    return _fit(jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.float32(l2), rngs,
                num_classes=num_classes, kind=cfg.kind, hidden=cfg.hidden, steps=cfg.steps,
                lr=cfg.lr)


@functools.partial(jax.jit, static_argnames=("num_classes", "kind", "hidden", "steps", "lr"))
def _fit(x: Array, y: Array, l2: Array, rngs: Array, *, num_classes: int, kind: str,
         hidden: int, steps: int, lr: float) -> dict:
    """Full-batch Adam on every layer at once (``vmap`` over ``x [L, n, d]``)."""
    n, d = x.shape[1:]
    tx = optax.adam(lr)

    def one(xl, rng):
        p = _init(rng, d, num_classes, kind, hidden)

        def loss(q):
            logits = probe_logits(q, xl)
            ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
            return ce + l2 * _penalty(q) / n

        def body(carry, _):
            q, o = carry
            u, o = tx.update(jax.grad(loss)(q), o, q)
            return (optax.apply_updates(q, u), o), None

        (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), None, length=steps)
        return p

    return jax.vmap(one)(x, rngs)


def probe_accuracy(params: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Accuracy per layer ``[L]`` of probes ``params`` (leading ``[L]``) on ``x [L, n, d]``."""
    pred = jax.vmap(lambda p, xl: jnp.argmax(probe_logits(p, xl), -1))(params, jnp.asarray(x))
    return np.asarray(jnp.mean(pred == jnp.asarray(y)[None], axis=1))


def run_probes(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
               num_classes: int, cfg: ProbeConfig = ProbeConfig(),
               dev: Optional[tuple[np.ndarray, np.ndarray]] = None) -> dict:
    """Per-layer probe accuracy on ``test``; with ``dev``, ``l2`` is chosen per layer from
    ``cfg.l2_grid`` by dev accuracy (else the grid's middle value). Inputs are
    ``(features [L, n, d], labels [n])``. Returns ``test_accuracy [L]``, ``dev_accuracy``
    (or None), ``l2 [L]``, ``best_layer`` (by dev, else by test) and its test accuracy."""
    xs = [train[0], test[0]] + ([dev[0]] if dev is not None else [])
    std = standardize(*xs)
    xtr, xte = std[0], std[1]
    grid = list(cfg.l2_grid) if dev is not None else [cfg.l2_grid[len(cfg.l2_grid) // 2]]
    test_acc, dev_acc = [], []
    for l2 in grid:
        p = fit_probes(xtr, train[1], num_classes, cfg, l2)
        test_acc.append(probe_accuracy(p, xte, test[1]))
        if dev is not None:
            dev_acc.append(probe_accuracy(p, std[2], dev[1]))
    test_acc = np.stack(test_acc)                                  # [G, L]
    pick = np.argmax(np.stack(dev_acc), 0) if dev is not None else np.zeros(xtr.shape[0], int)
    cols = np.arange(xtr.shape[0])
    t = test_acc[pick, cols]
    d = np.stack(dev_acc)[pick, cols] if dev is not None else None
    best = int(np.argmax(d if d is not None else t))
    return {"test_accuracy": t.tolist(), "dev_accuracy": None if d is None else d.tolist(),
            "l2": [float(grid[i]) for i in pick], "best_layer": best,
            "best_test_accuracy": float(t[best])}


def majority_baseline(y_train: Sequence[int], y_test: Sequence[int]) -> float:
    """Accuracy of always predicting the most frequent training label."""
    vals, counts = np.unique(np.asarray(y_train), return_counts=True)
    return float(np.mean(np.asarray(y_test) == vals[np.argmax(counts)]))
