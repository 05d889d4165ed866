"""Sentence pooling over token states: pure functions of model outputs.

Every pooler takes ``hidden_states [b, l, d]`` (last layer), ``mask [b, l]`` (1 = real
token, as the model's output ``"attention_mask"``, prompts included) and optionally
``all_hidden_states`` (embedding output, then each layer) and ``pooled [b, d]``, and
returns ``[b, d]``. Names follow SimCSE's evaluation poolers:

- ``cls``: the model's pooler output (dense + tanh on token 0) when it has one, else token 0.
- ``cls_before_pooler``: token 0 of the last layer.
- ``mean`` (SimCSE ``avg``): mask-weighted mean of the last layer.
- ``first_last_avg`` (SimCSE ``avg_first_last``): mask-weighted mean of
  ``(all_hidden_states[1] + all_hidden_states[-1]) / 2``, i.e. first transformer layer and last.
- ``top2_avg`` (SimCSE ``avg_top2``): the same with the last two layers.
- ``last_token``: the last real token of each row (decoders; any padding side).

A trainable SimCSE MLP on top of ``cls`` is a task head (part of the delta), not a pooler.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax.numpy as jnp

Array = Any


def _masked_mean(x: Array, mask: Array) -> Array:
    """``[b, l, d]``, ``[b, l]`` (None = all real) -> ``[b, d]`` (rows without real tokens give 0)."""
    if mask is None:
        mask = jnp.ones(x.shape[:2], jnp.float32)
    m = mask.astype(jnp.float32)[..., None]
    total = jnp.sum(x.astype(jnp.float32) * m, axis=1)
    return total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def _layers(all_hidden_states: Optional[Sequence[Array]], need: int, name: str) -> Sequence[Array]:
    if all_hidden_states is None or len(all_hidden_states) < need:
        got = "none" if all_hidden_states is None else len(all_hidden_states)
        raise ValueError(f"pooling {name!r} needs all_hidden_states with >= {need} entries "
                         f"(call the model with output_hidden_states=True); got {got}")
    return all_hidden_states


def cls_before_pooler(hidden_states: Array, mask: Optional[Array] = None,
                      all_hidden_states: Optional[Sequence[Array]] = None,
                      pooled: Optional[Array] = None) -> Array:
    """Token 0 of the last layer: ``[b, l, d] -> [b, d]``."""
    return hidden_states[:, 0]


def cls(hidden_states: Array, mask: Optional[Array] = None,
        all_hidden_states: Optional[Sequence[Array]] = None,
        pooled: Optional[Array] = None) -> Array:
    """The model's pooler output ``pooled [b, d]`` if given, else token 0."""
    return pooled if pooled is not None else hidden_states[:, 0]


def mean(hidden_states: Array, mask: Array, all_hidden_states: Optional[Sequence[Array]] = None,
         pooled: Optional[Array] = None) -> Array:
    """Mask-weighted mean of the last layer: ``[b, l, d], [b, l] -> [b, d]``."""
    return _masked_mean(hidden_states, mask)


def first_last_avg(hidden_states: Array, mask: Array,
                   all_hidden_states: Optional[Sequence[Array]] = None,
                   pooled: Optional[Array] = None) -> Array:
    """Masked mean of ``(first layer + last layer) / 2`` (SimCSE ``avg_first_last``)."""
    hs = _layers(all_hidden_states, 2, "first_last_avg")
    return _masked_mean((hs[1].astype(jnp.float32) + hs[-1].astype(jnp.float32)) / 2.0, mask)


def top2_avg(hidden_states: Array, mask: Array,
             all_hidden_states: Optional[Sequence[Array]] = None,
             pooled: Optional[Array] = None) -> Array:
    """Masked mean of the last two layers' average (SimCSE ``avg_top2``)."""
    hs = _layers(all_hidden_states, 3, "top2_avg")
    return _masked_mean((hs[-2].astype(jnp.float32) + hs[-1].astype(jnp.float32)) / 2.0, mask)


def last_token(hidden_states: Array, mask: Array,
               all_hidden_states: Optional[Sequence[Array]] = None,
               pooled: Optional[Array] = None) -> Array:
    """State at the last position whose mask is 1 (right or left padding): ``[b, d]``."""
    l = hidden_states.shape[1]
    if mask is None:
        return hidden_states[:, -1]
    idx = jnp.max(jnp.where(mask > 0, jnp.arange(l)[None, :], 0), axis=1)
    return jnp.take_along_axis(hidden_states, idx[:, None, None], axis=1)[:, 0]


POOLERS: dict[str, Callable[..., Array]] = {
    "cls": cls,
    "cls_before_pooler": cls_before_pooler,
    "mean": mean,
    "first_last_avg": first_last_avg,
    "top2_avg": top2_avg,
    "last_token": last_token,
}


def pool(name: str, outputs: Mapping[str, Any]) -> Array:
    """Apply pooler ``name`` to a model output dict (``hidden_states``, ``attention_mask``,
    optional ``all_hidden_states`` and ``pooled``) -> ``[b, d]``."""
    try:
        fn = POOLERS[name]
    except KeyError:
        raise ValueError(f"unknown pooling {name!r}; supported: {sorted(POOLERS)}") from None
    return fn(outputs["hidden_states"], outputs.get("attention_mask"),
              outputs.get("all_hidden_states"), outputs.get("pooled"))


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """``x / max(||x||, eps)`` along ``axis`` (as torch.nn.functional.normalize)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True))
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)
