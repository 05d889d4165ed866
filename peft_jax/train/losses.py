"""Losses per task type, as pure functions of logits and batch arrays.

All return a scalar mean over the real (weight > 0) examples or tokens, computed in fp32.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

Array = Any


def _weighted_mean(x: Array, w: Optional[Array]) -> Array:
    if w is None:
        return jnp.mean(x)
    w = w.astype(jnp.float32)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def classification_loss(logits: Array, labels: Array, weights: Optional[Array] = None) -> Array:
    """Softmax cross-entropy. logits ``[b, c]``, labels ``[b]`` int, weights ``[b]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return _weighted_mean(nll, weights)


def soft_label_loss(logits: Array, targets: Array, weights: Optional[Array] = None) -> Array:
    """Cross-entropy against soft targets ``[b, c]`` (PET distillation, pseudo-labels)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return _weighted_mean(-jnp.sum(targets * logp, axis=-1), weights)


def regression_loss(pred: Array, targets: Array, weights: Optional[Array] = None) -> Array:
    """Mean squared error. pred ``[b]`` or ``[b, 1]``, targets ``[b]``."""
    pred = pred.reshape(pred.shape[0]).astype(jnp.float32)
    return _weighted_mean(jnp.square(pred - targets.astype(jnp.float32)), weights)


def token_cross_entropy(logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
    """Token-level cross-entropy. logits ``[b, l, v]``, targets/mask ``[b, l]``.

    Returns (mean loss over masked tokens, number of tokens). ``logsumexp - target logit``:
    no ``[b, l, v]`` log-softmax is materialized (its backward is one softmax).
    """
    lf = logits.astype(jnp.float32)
    tgt = jnp.take_along_axis(lf, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = jax.nn.logsumexp(lf, axis=-1) - tgt
    m = mask.astype(jnp.float32)
    n = jnp.sum(m)
    return jnp.sum(nll * m) / jnp.maximum(n, 1.0), n


def causal_lm_loss(logits: Array, input_ids: Array, loss_mask: Array) -> Array:
    """Next-token loss: position t predicts token t+1 where ``loss_mask[t+1]`` is 1.

    logits ``[b, l, v]``, input_ids/loss_mask ``[b, l]``. The targets are shifted, not the
    logits (no copy of the ``[b, l, v]`` tensor); the last position has no target.
    """
    tgt = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    m = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    loss, _ = token_cross_entropy(logits, tgt, m)
    return loss


def gather_positions(x: Array, positions: Array) -> Array:
    """x ``[b, l, ...]``, positions ``[b]`` int -> ``[b, ...]``."""
    return jnp.take_along_axis(x, positions.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]
