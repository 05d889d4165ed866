"""Task heads, stored in the delta under ``head`` and applied to pooled states.

Pure functions over a small params dict (no Flax module, no slot)::

    delta["head"] = init_head("classification", d_model=384, num_labels=2, rng=key)
    logits = apply_head("classification", delta["head"], pooled, deterministic=False, rng=key)

Kinds
- ``classification``: ``[dropout -> dense(d, d) -> tanh] -> dropout -> dense(d, num_labels)``;
  the bracketed part (RoBERTa's ``RobertaClassificationHead``) only with ``hidden=True``
  (params then hold ``dense``); the output layer is ``out_proj``.
- ``regression``: like classification with ``num_labels = 1``.
- ``projection``: SimCSE's MLP ``tanh(dense(d, num_labels or d))`` (``dense`` only).

Kernels are ``[in, out]``, initialized N(0, 0.02) as in Hugging Face; biases are zero.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from peft_jax.models.layers import matmul
from peft_jax.peft.method import BuildContext, PeftMethod, internal, option, register
from peft_jax.peft.prompt import embedding_table

Array = Any
KINDS = ("classification", "regression", "projection")


def _dense(rng: Array, n_in: int, n_out: int, std: float, dtype) -> dict:
    return {"kernel": (std * jax.random.normal(rng, (n_in, n_out))).astype(dtype),
            "bias": jnp.zeros((n_out,), dtype)}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"head kind={kind!r}; allowed: {list(KINDS)}")


def init_head(kind: str, d_model: int, num_labels: Optional[int], rng: Array, *,
              hidden: bool = False, init_std: float = 0.02, dtype=jnp.float32) -> dict:
    """Parameters of a head reading ``[b, d_model]`` pooled states.

    ``num_labels``: classes (classification), ignored/1 (regression), output size
    (projection; None = d_model). ``hidden``: add RoBERTa's dense+tanh layer.
    """
    _check_kind(kind)
    k1, k2 = jax.random.split(rng)
    if kind == "projection":
        return {"dense": _dense(k1, d_model, num_labels or d_model, init_std, dtype)}
    if kind == "regression":
        if num_labels not in (None, 1):
            raise ValueError(f"regression head: num_labels={num_labels}; a regression head has 1 output")
        num_labels = 1
    if not num_labels or num_labels < 1:
        raise ValueError(f"classification head: num_labels={num_labels} must be >= 1")
    params = {"out_proj": _dense(k2, d_model, num_labels, init_std, dtype)}
    if hidden:
        params["dense"] = _dense(k1, d_model, d_model, init_std, dtype)
    return params


def _dropout(x: Array, rate: float, deterministic: bool, rng: Optional[Array]) -> Array:
    if deterministic or rate == 0.0:
        return x
    if rng is None:
        raise ValueError("apply_head: deterministic=False with dropout needs an rng")
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _apply_dense(p: dict, x: Array) -> Array:
    return matmul(x, p["kernel"].astype(x.dtype)) + p["bias"].astype(x.dtype)


def apply_head(kind: str, params: dict, pooled: Array, deterministic: bool = True,
               rng: Optional[Array] = None, dropout_rate: float = 0.1) -> Array:
    """``pooled [b, d]`` -> ``[b, num_labels]`` (regression: ``[b, 1]``; projection:
    ``[b, out]``). Dropout (classification/regression only) needs ``rng`` when not
    deterministic."""
    _check_kind(kind)
    if pooled.ndim != 2:
        raise ValueError(f"apply_head: pooled must be [batch, d_model], got shape {pooled.shape}")
    if kind == "projection":
        return jnp.tanh(_apply_dense(params["dense"], pooled))
    r1 = r2 = None
    if rng is not None:
        r1, r2 = jax.random.split(rng)
    x = pooled
    if "dense" in params:
        x = _dropout(x, dropout_rate, deterministic, r1)
        x = jnp.tanh(_apply_dense(params["dense"], x))
    x = _dropout(x, dropout_rate, deterministic, r2)
    return _apply_dense(params["out_proj"], x)


@register
@dataclasses.dataclass(frozen=True)
class Head(PeftMethod):
    """The task head of the classification / regression formats (leaves ``delta["head"]``).

    It trains in the optimizer group ``head`` (``config.optim.head_lr``). The runner adds it whenever the format needs one;
    ``config.peft.methods=head`` alone trains only the head (a linear probe of the frozen
    model). ``kind``, ``num_labels`` and ``d_model`` come from the task and the model."""

    name = "head"
    lr_group = "head"

    dropout: float = option(0.1, "dropout before the output layer (and the hidden layer)")
    hidden: bool = option(False, "RoBERTa-style dense + tanh layer before the output")
    kind: str = internal("classification", "classification | regression | projection (SimCSE)")
    num_labels: int = internal(2)
    d_model: int = internal(0, "input width (0: the base's embedding width)")

    def __post_init__(self):
        self.check_rate("dropout")
        if self.kind not in KINDS:
            self.fail("kind", f"choose one of {list(KINDS)}")

    @classmethod
    def from_config(cls, section, ctx: BuildContext = BuildContext()) -> "Head":
        return cls(**cls.kwargs_from_config(section), kind=ctx.head_kind,
                   num_labels=1 if ctx.head_kind == "regression" else ctx.num_labels,
                   d_model=ctx.d_model)

    def owns(self, path: str) -> bool:
        return path.split("/", 1)[0] == "head"

    def finalize_delta(self, delta: dict, base: Mapping, rng: Array) -> dict:
        d = self.d_model or int(embedding_table(base).shape[1])
        n = self.num_labels or None if self.kind == "projection" else self.num_labels
        return {**delta, "head": init_head(self.kind, d, n, rng, hidden=self.hidden)}

    def apply(self, params: dict, pooled: Array, deterministic: bool = True,
              rng: Optional[Array] = None) -> Array:
        """``pooled [b, d]`` -> ``[b, num_labels]`` (regression: ``[b, 1]``)."""
        return apply_head(self.kind, params, pooled, deterministic, rng, self.dropout)
