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

    Returns (mean loss over masked tokens, number of tokens).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    n = jnp.sum(m)
    return jnp.sum(nll * m) / jnp.maximum(n, 1.0), n


def causal_lm_loss(logits: Array, input_ids: Array, loss_mask: Array) -> Array:
    """Next-token loss: position t predicts token t+1 where ``loss_mask[t+1]`` is 1.

    logits ``[b, l, v]``, input_ids/loss_mask ``[b, l]``.
    """
    loss, _ = token_cross_entropy(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:])
    return loss


def gather_positions(x: Array, positions: Array) -> Array:
    """x ``[b, l, ...]``, positions ``[b]`` int -> ``[b, ...]``."""
    return jnp.take_along_axis(x, positions.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]
