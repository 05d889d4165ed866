"""ProtoVerb (Cui et al., 2022): prototypes learned from mask-position representations.

Instances ``z [n, d]`` (hidden states at the mask / answer position, optionally projected)
and prototypes ``p [C, d]`` are compared by cosine similarity divided by ``tau``. Training
uses an instance-instance contrastive loss (same-class instances are positives) and an
instance-prototype loss (an instance against every prototype); prediction is the nearest
prototype, optionally summed with a manual verbalizer's scores.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

Array = Any


def _normalize(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine(a: Array, b: Array) -> Array:
    """Cosine similarity ``[n, m]`` of ``a [n, d]`` and ``b [m, d]``."""
    return _normalize(a) @ _normalize(b).T


def instance_instance_loss(z: Array, labels: Array, tau: float = 0.1,
                           weights: Optional[Array] = None) -> Array:
    """Supervised contrastive loss over a batch ``z [n, d]``, ``labels [n]``.

    For anchor i with positives P(i) = {j != i, y_j = y_i}:
    ``-1/|P(i)| sum_{j in P(i)} log(exp(s_ij) / sum_{k != i} exp(s_ik))``, s = cos / tau,
    averaged over anchors with at least one positive (and weight > 0).
    """
    n = z.shape[0]
    w = jnp.ones((n,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    s = cosine(z, z) / tau
    eye = jnp.eye(n, dtype=bool)
    valid = (w[:, None] > 0) & (w[None, :] > 0) & ~eye
    s = jnp.where(valid, s, -jnp.inf)
    logp = s - jax.nn.logsumexp(s, axis=1, keepdims=True)
    pos = valid & (labels[:, None] == labels[None, :])
    npos = jnp.sum(pos, axis=1)
    per = -jnp.sum(jnp.where(pos, logp, 0.0), axis=1) / jnp.maximum(npos, 1)
    keep = (npos > 0) & (w > 0)
    return jnp.sum(jnp.where(keep, per, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def instance_prototype_loss(z: Array, protos: Array, labels: Array, tau: float = 0.1,
                            weights: Optional[Array] = None) -> Array:
    """``-log(exp(s(z_i, p_{y_i})) / sum_c exp(s(z_i, p_c)))`` averaged, s = cos / tau."""
    s = cosine(z, protos) / tau
    logp = jax.nn.log_softmax(s, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    if weights is None:
        return jnp.mean(nll)
    w = weights.astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def protoverb_loss(z: Array, protos: Array, labels: Array, tau: float = 0.1,
                   weights: Optional[Array] = None, lam: float = 1.0) -> Array:
    """Total ProtoVerb objective: instance-instance + ``lam`` * instance-prototype."""
    return (instance_instance_loss(z, labels, tau, weights)
            + lam * instance_prototype_loss(z, protos, labels, tau, weights))


def prototype_scores(z: Array, protos: Array, verbalizer_scores: Optional[Array] = None,
                     ) -> Array:
    """Class scores ``[n, C]``: cosine to each prototype, plus (if given) the manual
    verbalizer's scores, each normalized by log-softmax so the two are on one scale."""
    s = cosine(z, protos)
    if verbalizer_scores is None:
        return s
    return jax.nn.log_softmax(s, -1) + jax.nn.log_softmax(verbalizer_scores.astype(jnp.float32), -1)


def init_prototypes(z: Array, labels: Array, num_classes: int) -> Array:
    """Class means of normalized instances ``[C, d]`` (a starting point for learning)."""
    zn = _normalize(z)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return (onehot.T @ zn) / jnp.maximum(onehot.sum(0)[:, None], 1.0)
