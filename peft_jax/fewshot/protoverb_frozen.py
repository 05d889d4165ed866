"""ProtoVerb on a frozen model: prototypes (and a projection) learned from K shots.

Instances are the model's states at the template's answer position (``representation=
'mask'``: the ``[MASK]`` token of "<sentence> It was [MASK]." for an encoder, the last prompt
token for a causal LM; :mod:`peft_jax.fewshot.answer_states`) or the mean-pooled sentence
state (``'mean'``), projected by a learned ``W [d, d']``; the prototypes ``[C, d']`` and
``W`` are trained with :func:`peft_jax.fewshot.protoverb.protoverb_loss` (full batch, Adam);
the step with the best dev accuracy is kept; prediction is the nearest prototype by cosine,
plus the manual verbalizer's scores when the model has an LM head (ProtoVerb + manual).
The encoder stays frozen (ProtoVerb's tuning-free setting).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peft_jax.fewshot import protoverb


def train_prototypes(z: np.ndarray, y: np.ndarray, z_dev: np.ndarray, y_dev: np.ndarray,
                     num_classes: int, seed: int, steps: int = 200, lr: float = 1e-2,
                     dim: int = 128, tau: float = 0.1, eval_every: int = 10,
                     verb_dev: Optional[np.ndarray] = None) -> dict:
    """Learn ``{"w": [d, dim], "protos": [C, dim]}``; returns the best-dev parameters.

    ``verb_dev [n_dev, C]``: manual verbalizer scores added at prediction (model selection
    then judges the combination)."""
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

    def acc(p):
        return float(np.mean(predict(p, z_dev, verb_dev) == y_dev))

    best, best_acc = params, acc(params)
    for i in range(1, steps + 1):
        params, opt, _ = step(params, opt)
        if i % eval_every == 0:
            a = acc(params)
            if a > best_acc:
                best, best_acc = params, a
    return {**best, "dev_accuracy": best_acc}


def predict(params: dict, z: np.ndarray, verbalizer_scores: Optional[np.ndarray] = None
            ) -> np.ndarray:
    """Nearest prototype ``[n]`` of instances ``z [n, d]`` (+ manual verbalizer scores)."""
    v = None if verbalizer_scores is None else jnp.asarray(verbalizer_scores)
    s = protoverb.prototype_scores(jnp.asarray(z, jnp.float32) @ params["w"], params["protos"], v)
    return np.asarray(jnp.argmax(s, -1))


def fixed_subset(examples: list, n: int, seed: int = 0) -> list:
    """A fixed seeded subset of ``n`` test examples (the same for every training seed)."""
    if not n or len(examples) <= n:
        return examples
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), n, replace=False))
    return [examples[i] for i in keep]


def run(task_name: str, seed: int, eval_examples: int, *, embed_fn: Optional[Callable] = None,
        pre: Any = None, representation: str = "mask", steps: int = 200,
        use_verbalizer: bool = True, max_len: int = 128, template: Optional[str] = None,
        label_words: Any = None) -> dict:
    """Train on ``train-<seed>``, select on ``dev-<seed>``, test on a fixed test subset.

    ``representation='mean'`` needs ``embed_fn(list[str]) -> [n, d]``; ``'mask'`` needs
    ``pre`` (a loaded model) and uses ``template`` / ``label_words`` (default: the task's)."""
    from peft_jax.data import get_task
    from peft_jax.data.metrics import compute_metrics
    from peft_jax.fewshot.answer_states import answer_states

    t0 = time.perf_counter()
    task = get_task(task_name)
    tr, dv = task.load(f"train-{seed}"), task.load(f"dev-{seed}")
    te = fixed_subset(task.load("test"), eval_examples)
    lab = lambda exs: np.asarray([ex["label"] for ex in exs])
    if representation == "mean":
        if embed_fn is None:
            raise ValueError("representation='mean' needs embed_fn")
        join = lambda exs: [" ".join(ex[f] for f in task.text_fields) for ex in exs]
        (z, zd, zt), (vd, vt) = (np.asarray(embed_fn(join(x))) for x in (tr, dv, te)), (None, None)
    elif representation == "mask":
        if pre is None:
            raise ValueError("representation='mask' needs pre (a loaded model)")
        (z, _), (zd, vd), (zt, vt) = (answer_states(pre, task, x, template, label_words,
                                                              max_len=max_len) for x in (tr, dv, te))
        if not use_verbalizer:
            vd = vt = None
    else:
        raise ValueError(f"representation {representation!r}: choose 'mask' or 'mean'")
    p = train_prototypes(z, lab(tr), zd, lab(dv), task.num_labels, seed, steps=steps, verb_dev=vd)
    metrics = compute_metrics(task.metrics, predict(p, zt, vt), lab(te), num_classes=task.num_labels)
    return {"metrics": metrics, "dev": {"accuracy": p["dev_accuracy"]},
            "wall_s": time.perf_counter() - t0,
            "trainable_params": int(p["w"].size + p["protos"].size),
            "protoverb": {"representation": representation, "with_verbalizer": vt is not None,
                          "prototypes_only_accuracy": float(np.mean(predict(p, zt) == lab(te))),
                          "verbalizer_only_accuracy": (None if vt is None else
                                                       float(np.mean(vt.argmax(-1) == lab(te))))}}
