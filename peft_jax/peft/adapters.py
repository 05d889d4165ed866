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

from peft_jax.models.layers import get_activation, matmul
from peft_jax.peft import tree
from peft_jax.peft.method import PeftMethod, option, register

Array = Any

KINDS = {"houlsby": ("attention", "cross_attention", "ffn"), "pfeiffer": ("ffn",)}


def _adapter_init(rng: Array, d: int, r: int, scale: float) -> dict:
    k1, k2 = jax.random.split(rng)
    return {"down_kernel": scale * jax.random.normal(k1, (d, r), jnp.float32),
            "down_bias": jnp.zeros((r,), jnp.float32),
            "up_kernel": scale * jax.random.normal(k2, (r, d), jnp.float32),
            "up_bias": jnp.zeros((d,), jnp.float32)}


@register
@dataclasses.dataclass(frozen=True)
class Adapter(PeftMethod):
    """Bottleneck adapter of width ``bottleneck`` after the sublayers of ``placement``."""

    name = "adapter"

    placement: str = option("houlsby", "houlsby (after attention and FFN) | pfeiffer (FFN only)")
    bottleneck: int = option(64, "bottleneck width")
    activation: str = option("relu", "activation between down and up projections")
    init_scale: float = option(1e-3, "std of the normal init of the projections",
                               init_only=True)

    def __post_init__(self):
        if self.placement not in KINDS:
            self.fail("placement", f"choose one of {list(KINDS)}")
        self.check_int("bottleneck", 1)
        try:
            get_activation(self.activation, "activation")
        except ValueError as e:
            self.fail("activation", str(e))

    def owns(self, path: str) -> bool:
        return any(k.startswith("adapter_") for k in path.split("/"))

    def sublayer(self, module, kind: str, h: Array, deterministic: bool = True) -> Array:
        """``[b, l, d]`` -> ``h + up(act(down(h)))`` for the kinds of this placement."""
        if kind not in KINDS[self.placement]:
            return h
        d = h.shape[-1]
        w = module.variable("peft", f"adapter_{kind}",
                            lambda: _adapter_init(module.make_rng("params"), d, self.bottleneck,
                                                  self.init_scale)).value
        dt = h.dtype
        z = matmul(h, jnp.asarray(w["down_kernel"], dt)) + jnp.asarray(w["down_bias"], dt)
        z = get_activation(self.activation)(z)
        return h + matmul(z, jnp.asarray(w["up_kernel"], dt)) + jnp.asarray(w["up_bias"], dt)

    def validate(self, delta: Mapping, dense_paths: Sequence[str]) -> None:
        if not any(self.owns(p) for p in tree.flatten(delta)):
            self.fail("placement", f"the model never called the sublayer slot with kinds "
                                   f"{KINDS[self.placement]}")
