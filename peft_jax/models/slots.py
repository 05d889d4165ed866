"""Slots: the places in a model where a task delta may act.

Model files call these hooks and never know which PEFT method is active; PEFT methods
(``peft_jax.peft``) implement them. A model is built with ``slots=Slots(methods)``; with no
methods every hook is the identity and the model is the plain pretrained network.

Every hook receives the calling Flax module, so a method creates its parameters with
``module.variable("peft", name, init_fn)``: the delta therefore mirrors the model's module
tree (``delta["encoder"]["layer_0"]["attention"]["query"]["lora_a"]``) and lives in its own
collection, separate from the base ``params``.

Hooks (all optional on a method; composition is in the order of ``Slots.methods``):

- ``input_embeddings(module, embeds [b, l, d], mask [b, l], deterministic)
  -> (embeds [b, l', d], mask [b, l'], Insert | None)``: soft prompts.
- ``dense(module, x [..., in], base_fn, deterministic) -> y [..., out]``: wraps a dense
  layer's own computation ``base_fn(x)``; LoRA, IA3.
- ``attention_kv(module, k [b, s, h_kv, dh], v, deterministic) -> (k', v', n_prefix)``:
  key/value prefixes (prefix tuning); ``n_prefix`` entries are prepended.
- ``sublayer(module, kind, h [b, l, d], deterministic) -> h``: after a sublayer's output
  projection, before its residual add; ``kind`` is ``"attention"``, ``"cross_attention"``
  or ``"ffn"``; adapters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax.numpy as jnp

Array = Any


@dataclasses.dataclass(frozen=True)
class Insert:
    """Tokens inserted into the sequence axis by the ``input_embeddings`` slot.

    ``at``: index where ``n`` positions are inserted (``-1`` means appended at the end).
    Models use :meth:`apply` to extend any per-token array (token types, position ids,
    labels) consistently with the embeddings.
    """

    at: int
    n: int

    def apply(self, x: Array, fill: Any) -> Array:
        """Insert ``n`` copies of ``fill`` along axis 1 of ``x`` ([b, l, ...] -> [b, l+n, ...])."""
        b = x.shape[0]
        pad = jnp.full((b, self.n) + x.shape[2:], fill, dtype=x.dtype)
        if self.at == -1:
            return jnp.concatenate([x, pad], axis=1)
        return jnp.concatenate([x[:, : self.at], pad, x[:, self.at :]], axis=1)

    def remove(self, x: Array) -> Array:
        """Drop the inserted positions again ([b, l+n, ...] -> [b, l, ...])."""
        if self.at == -1:
            return x[:, : x.shape[1] - self.n]
        return jnp.concatenate([x[:, : self.at], x[:, self.at + self.n :]], axis=1)


def module_path(module) -> str:
    """'/'-joined path of a Flax module inside its model, e.g. 'encoder/layer_0/attention/query'."""
    return "/".join(str(p) for p in module.path)


SLOT_HOOKS = ("input_embeddings", "dense", "attention_kv", "sublayer")


@dataclasses.dataclass(frozen=True)
class Slots:
    """The ordered, hashable set of PEFT methods acting on a model.

    ``dropout_impl``: the mask generator methods use for their own dropout (LoRA dropout;
    ``config.model.dropout_impl``, see ``peft_jax.models.layers.dropout_keep_mask``).
    """

    methods: tuple = ()
    dropout_impl: str = "hash"

    def __bool__(self) -> bool:
        return bool(self.methods)

    @property
    def kv_prefix_length(self) -> int:
        """Static number of key/value prefix entries the methods prepend (prefix tuning).

        Families use it to place real tokens after the prefix, as Hugging Face does when a
        prefix arrives as ``past_key_values`` (positions / relative bias offset by it).
        """
        return int(sum(getattr(m, "kv_prefix_length", 0) for m in self.methods))

    def _with(self, hook: str):
        return [m for m in self.methods if hasattr(m, hook)]

    def input_embeddings(self, module, embeds: Array, mask: Array, deterministic: bool = True
                         ) -> tuple[Array, Array, tuple[Insert, ...]]:
        """[b, l, d], [b, l] -> [b, l', d], [b, l'], inserts (applied in order)."""
        inserts = []
        for m in self._with("input_embeddings"):
            embeds, mask, ins = m.input_embeddings(module, embeds, mask, deterministic)
            if ins is not None:
                inserts.append(ins)
        return embeds, mask, tuple(inserts)

    def dense(self, module, x: Array, base_fn: Callable[[Array], Array],
              deterministic: bool = True) -> Array:
        fn = base_fn
        for m in self._with("dense"):
            fn = _bind_dense(m, module, fn, deterministic)
        return fn(x)

    def attention_kv(self, module, k: Array, v: Array, deterministic: bool = True
                     ) -> tuple[Array, Array, int]:
        total = 0
        for m in self._with("attention_kv"):
            k, v, n = m.attention_kv(module, k, v, deterministic)
            total += n
        return k, v, total

    def sublayer(self, module, kind: str, h: Array, deterministic: bool = True) -> Array:
        for m in self._with("sublayer"):
            h = m.sublayer(module, kind, h, deterministic)
        return h


def _bind_dense(method, module, inner, deterministic):
    return lambda x: method.dense(module, x, inner, deterministic)


def apply_inserts(inserts: Sequence[Insert], x: Optional[Array], fill: Any) -> Optional[Array]:
    """Extend a per-token array [b, l, ...] with every insert, in order."""
    if x is None:
        return None
    for ins in inserts:
        x = ins.apply(x, fill)
    return x


def remove_inserts(inserts: Sequence[Insert], x: Array) -> Array:
    """Inverse of :func:`apply_inserts` on [b, l', ...] outputs."""
    for ins in reversed(inserts):
        x = ins.remove(x)
    return x


NO_SLOTS = Slots()
