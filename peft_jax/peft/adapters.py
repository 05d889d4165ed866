"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021).

The ``sublayer`` slot receives a sublayer's output ``h [b, l, d]`` right before its residual
add; an adapter returns ``h + up(act(down(h)))`` with ``down [d, r]``, ``up [r, d]``.
``placement='houlsby'`` puts one after every attention (self and cross) and every FFN
sublayer; ``'pfeiffer'`` after the FFN only. All weights start ``N(0, init_scale)`` and
biases zero, so a fresh adapter is (nearly) the identity.

Leaves at the module that calls the slot (a layer): ``adapter_<kind>/{down_kernel [d, r],
down_bias [r], up_kernel [r, d], up_bias [d]}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from peft_jax.models.layers import get_activation

Array = Any

KINDS = {"houlsby": ("attention", "cross_attention", "ffn"), "pfeiffer": ("ffn",)}


def _adapter_init(rng: Array, d: int, r: int, scale: float) -> dict:
    k1, k2 = jax.random.split(rng)
    return {"down_kernel": scale * jax.random.normal(k1, (d, r), jnp.float32),
            "down_bias": jnp.zeros((r,), jnp.float32),
            "up_kernel": scale * jax.random.normal(k2, (r, d), jnp.float32),
            "up_bias": jnp.zeros((d,), jnp.float32)}


@dataclasses.dataclass(frozen=True)
class Adapter:
    """Bottleneck adapter of width ``bottleneck`` after the sublayers of ``placement``."""

    placement: str = "houlsby"
    bottleneck: int = 64
    activation: str = "relu"
    init_scale: float = 1e-3

    def __post_init__(self):
        if self.placement not in KINDS:
            raise ValueError(f"Adapter.placement={self.placement!r}; supported: {list(KINDS)}")
        if int(self.bottleneck) < 1:
            raise ValueError(f"Adapter.bottleneck={self.bottleneck!r} must be >= 1")
        get_activation(self.activation, "Adapter.activation")

    def sublayer(self, module, kind: str, h: Array, deterministic: bool = True) -> Array:
        """``[b, l, d]`` -> ``h + up(act(down(h)))`` for the kinds of this placement."""
        if kind not in KINDS[self.placement]:
            return h
        d = h.shape[-1]
        w = module.variable("peft", f"adapter_{kind}",
                            lambda: _adapter_init(module.make_rng("params"), d, self.bottleneck,
                                                  self.init_scale)).value
        dt = h.dtype
        z = jnp.dot(h, jnp.asarray(w["down_kernel"], dt)) + jnp.asarray(w["down_bias"], dt)
        z = get_activation(self.activation)(z)
        return h + jnp.dot(z, jnp.asarray(w["up_kernel"], dt)) + jnp.asarray(w["up_bias"], dt)

    def validate(self, delta: Mapping, dense_paths: Sequence[str]) -> None:
        def found(t: Mapping) -> bool:
            return any(str(k).startswith("adapter_") or (isinstance(v, Mapping) and found(v))
                       for k, v in t.items())
        if not found(delta):
            raise ValueError(f"Adapter(placement={self.placement!r}): the model never called the "
                             f"sublayer slot with kinds {KINDS[self.placement]}")
