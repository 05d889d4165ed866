"""ProtoVerb on a frozen sentence encoder: prototypes (and a projection) learned from K shots.

Instances are the encoder's mean-pooled states (all-MiniLM-L6-v2 has no MLM head, so the
pooled sentence state stands in for the mask-position state), projected by a learned
``W [d, d']``; the prototypes ``[C, d']`` and ``W`` are trained with
:func:`peft_jax.fewshot.protoverb.protoverb_loss` (full batch, Adam); the step with the best
dev accuracy is kept; prediction is the nearest prototype by cosine.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peft_jax.fewshot import protoverb


def train_prototypes(z: np.ndarray, y: np.ndarray, z_dev: np.ndarray, y_dev: np.ndarray,
                     num_classes: int, seed: int, steps: int = 200, lr: float = 1e-2,
                     dim: int = 128, tau: float = 0.1, eval_every: int = 10) -> dict:
    """Learn ``{"w": [d, dim], "protos": [C, dim]}``; returns the best-dev parameters."""
    k = jax.random.PRNGKey(seed)
    d = z.shape[1]
    w0 = jax.random.normal(k, (d, dim)) / np.sqrt(d)
    zj, yj = jnp.asarray(z, jnp.float32), jnp.asarray(y, jnp.int32)
    params = {"w": w0, "protos": protoverb.init_prototypes(zj @ w0, yj, num_classes)}
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(p, o):
        loss, g = jax.value_and_grad(lambda q: protoverb.protoverb_loss(
            zj @ q["w"], q["protos"], yj, tau))(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    def acc(p, zz, yy):
        return float(np.mean(np.asarray(predict(p, zz)) == yy))

    best, best_acc = params, acc(params, z_dev, y_dev)
    for i in range(1, steps + 1):
        params, opt, _ = step(params, opt)
        if i % eval_every == 0:
            a = acc(params, z_dev, y_dev)
            if a > best_acc:
                best, best_acc = params, a
    return {**best, "dev_accuracy": best_acc}


def predict(params: dict, z: np.ndarray) -> np.ndarray:
    """Nearest prototype ``[n]`` of instances ``z [n, d]``."""
    s = protoverb.prototype_scores(jnp.asarray(z, jnp.float32) @ params["w"], params["protos"])
    return np.asarray(jnp.argmax(s, -1))


def run(task_name: str, seed: int, embed_fn: Callable[[list[str]], np.ndarray],
        eval_examples: int, steps: int = 200) -> dict:
    """Train on ``train-<seed>``, select on ``dev-<seed>``, test on a seeded test subset."""
    from peft_jax.data import get_task
    from peft_jax.data.metrics import compute_metrics
    t0 = time.perf_counter()
    task = get_task(task_name)
    join = lambda exs: [" ".join(ex[f] for f in task.text_fields) for ex in exs]
    tr, dv, te = task.load(f"train-{seed}"), task.load(f"dev-{seed}"), task.load("test")
    if eval_examples and len(te) > eval_examples:
        keep = np.sort(np.random.default_rng(seed).choice(len(te), eval_examples, replace=False))
        te = [te[i] for i in keep]
    lab = lambda exs: np.asarray([ex["label"] for ex in exs])
    z, zd, zt = (np.asarray(embed_fn(join(x))) for x in (tr, dv, te))
    p = train_prototypes(z, lab(tr), zd, lab(dv), task.num_labels, seed, steps=steps)
    metrics = compute_metrics(task.metrics, predict(p, zt), lab(te), num_classes=task.num_labels)
    return {"metrics": metrics, "dev_accuracy": p["dev_accuracy"], "wall_s": time.perf_counter() - t0,
            "trainable_params": int(p["w"].size + p["protos"].size)}
