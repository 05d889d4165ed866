"""SimCSE InfoNCE losses as pure functions of sentence embeddings.

- :func:`unsup_simcse_loss`: two dropout views ``z1, z2 [b, d]`` of the same sentences;
  row ``i`` of ``z1`` must pick ``z2[i]`` among all of ``z2`` (in-batch negatives).
- :func:`sup_simcse_loss`: anchors ``z1`` (premises), positives ``z2`` (entailment) and
  hard negatives ``z3`` (contradiction) appended to the candidate set: logits
  ``[b, 2b] = cos([z1] x [z2; z3]) / temperature`` (SimCSE's supervised loss, with its
  optional ``hard_negative_weight`` added to the logit of each anchor's own hard negative).

Similarity is cosine divided by ``temperature`` (SimCSE default 0.05); computation in fp32.

Data parallelism: the candidate set is the *global* batch. Under ``jax.jit`` with the
embeddings sharded over a mesh's batch axis, calling these functions on the global arrays
already gives this (XLA inserts the all-gather), so the sharded loss equals the single-device
loss on the same global batch. :func:`gathered_unsup_simcse_loss` is the explicit
``shard_map`` + ``all_gather`` form (each device scores its own anchors against all devices'
candidates), equal to both.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

Array = Any
NEG = -1e9  # logit of an excluded candidate (finite: a fully masked row gives no NaN)


def cosine_matrix(a: Array, b: Array, eps: float = 1e-8) -> Array:
    """Cosine similarities ``[n, d], [m, d] -> [n, m]`` in fp32 (as torch.nn.CosineSimilarity:
    each norm clamped at ``eps``)."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
    return a @ b.T


def _infonce(logits: Array, labels: Array, anchor_valid: Optional[Array]) -> Array:
    """Mean over valid anchors of ``-log softmax(logits)[i, labels[i]]``; logits ``[b, c]``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    if anchor_valid is None:
        return jnp.mean(nll)
    w = anchor_valid.astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def _check(name: str, x: Array, ref: Array) -> None:
    if x.ndim != 2 or x.shape != ref.shape:
        raise ValueError(f"{name}: expected embeddings of shape {tuple(ref.shape)} ([b, d], as z1), "
                         f"got {tuple(x.shape)}")


def unsup_simcse_loss(z1: Array, z2: Array, temperature: float = 0.05,
                      valid: Optional[Array] = None) -> Array:
    """Unsupervised SimCSE loss. ``z1, z2 [b, d]``: two views of the same ``b`` sentences.

    ``valid [b]`` (1 = real row, 0 = padding): padding rows are neither anchors nor
    candidates. Returns a scalar (mean over valid anchors).
    """
    _check("z2", z2, z1)
    logits = cosine_matrix(z1, z2) / temperature  # [b, b]
    if valid is not None:
        logits = jnp.where(valid[None, :] > 0, logits, NEG)
    labels = jnp.arange(z1.shape[0])
    return _infonce(logits, labels, valid)


def sup_simcse_loss(z1: Array, z2: Array, z3: Array, temperature: float = 0.05,
                    hard_negative_weight: float = 0.0, valid: Optional[Array] = None) -> Array:
    """Supervised SimCSE loss: anchors ``z1``, positives ``z2``, hard negatives ``z3`` (all
    ``[b, d]``). Candidates are ``[z2; z3]`` (``2b``); anchor ``i``'s target is column ``i``.

    ``hard_negative_weight`` is added to logit ``[i, b + i]`` (SimCSE's ``--hard_negative_weight``,
    applied after the temperature scaling, as there).
    """
    _check("z2", z2, z1)
    _check("z3", z3, z1)
    b = z1.shape[0]
    logits = jnp.concatenate([cosine_matrix(z1, z2), cosine_matrix(z1, z3)], axis=1) / temperature
    if hard_negative_weight:
        logits = logits + hard_negative_weight * jnp.concatenate(
            [jnp.zeros((b, b), jnp.float32), jnp.eye(b, dtype=jnp.float32)], axis=1)
    if valid is not None:
        cand = jnp.concatenate([valid, valid])
        logits = jnp.where(cand[None, :] > 0, logits, NEG)
    return _infonce(logits, jnp.arange(b), valid)


def contrastive_accuracy(z1: Array, z2: Array) -> Array:
    """Fraction of anchors whose most similar candidate in ``z2`` is their own view."""
    sims = cosine_matrix(z1, z2)
    return jnp.mean((jnp.argmax(sims, axis=-1) == jnp.arange(z1.shape[0])).astype(jnp.float32))


def _batch_axes(mesh: Mesh, axes: Optional[Sequence[str]]) -> tuple[str, ...]:
    if axes is None:
        axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"batch axes {missing} are not axes of the mesh {dict(mesh.shape)}")
    return tuple(axes)


def gathered_unsup_simcse_loss(z1: Array, z2: Array, mesh: Mesh, temperature: float = 0.05,
                               batch_axes: Optional[Sequence[str]] = None) -> Array:
    """:func:`unsup_simcse_loss` written explicitly for data parallelism.

    ``z1, z2 [B, d]`` are global arrays whose rows are split over ``batch_axes`` (default:
    the mesh's ``data`` and ``fsdp`` axes). Each device all-gathers ``z2`` (the candidates of
    every device), scores its local anchors against the ``B`` global candidates (its target
    is at ``device_index * b_local + i``), and the per-device losses are averaged with a
    ``psum``. Differentiable; equals the single-device loss on the global batch.
    """
    _check("z2", z2, z1)
    axes = _batch_axes(mesh, batch_axes)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    if z1.shape[0] % n:
        raise ValueError(f"global batch {z1.shape[0]} does not divide over {n} devices ({axes})")
    spec = P(axes, None)

    def local(a, b):
        b_all = jax.lax.all_gather(b, axes, axis=0, tiled=True)  # [B, d]
        logits = cosine_matrix(a, b_all) / temperature          # [b_local, B]
        offset = jax.lax.axis_index(axes) * a.shape[0]
        labels = offset + jnp.arange(a.shape[0])
        return jax.lax.pmean(_infonce(logits, labels, None), axes)

    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=P())(z1, z2)
