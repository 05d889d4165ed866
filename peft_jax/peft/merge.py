"""Fold LoRA / (IA)^3 deltas into the base kernels (and back).

Kernels are ``[in, out]``. LoRA: ``kernel' = kernel + scale * lora_a @ lora_b``.
(IA)^3: output scaling ``kernel' = kernel * s[None, :]`` (and ``bias' = bias * s``); input
scaling (feed-forward) ``kernel' = kernel * s[:, None]``. A merged base is used with a
model built WITHOUT the merged method and the delta stripped of its leaves
(:func:`strip_leaves`). Boxed (``nn.Partitioned``) base leaves keep their metadata.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp

from peft_jax.peft.ia3 import IA3
from peft_jax.peft.lora import LoRA

Array = Any


def _modules_with(delta: Mapping, leaf: str, path: tuple = ()) -> list[tuple[tuple, Mapping]]:
    """(module path, module dict) of every delta module holding ``leaf``."""
    out = []
    if leaf in delta and not isinstance(delta[leaf], Mapping):
        out.append((path, delta))
    for k, v in delta.items():
        if isinstance(v, Mapping):
            out += _modules_with(v, leaf, path + (k,))
    return out


def _copy(tree: Mapping) -> dict:
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _update(base: dict, path: tuple, name: str, fn: Callable[[Array], Array]) -> None:
    node = base
    for k in path:
        if not isinstance(node, Mapping) or k not in node:
            raise KeyError(f"merge: base params have no module {'/'.join(path)!r}")
        node = node[k]
    if name not in node:
        raise KeyError(f"merge: base params have no leaf {'/'.join(path + (name,))!r}")
    leaf = node[name]
    if isinstance(leaf, nn.meta.AxisMetadata):
        node[name] = leaf.replace_boxed(fn(leaf.unbox()))
    else:
        node[name] = fn(leaf)


def _lora(base: Mapping, delta: Mapping, method: LoRA, sign: float) -> dict:
    out = _copy(base)
    for path, mod in _modules_with(delta, "lora_a"):
        a = jnp.asarray(mod["lora_a"], jnp.float32)
        b = jnp.asarray(mod["lora_b"], jnp.float32)
        upd = sign * method.scale_for("/".join(path), a.shape[1]) * (a @ b)
        _update(out, path, "kernel", lambda k: (jnp.asarray(k, jnp.float32) + upd).astype(k.dtype))
    return out


def merge_lora(base: Mapping, delta: Mapping, method: LoRA) -> dict:
    """``kernel + scale * lora_a @ lora_b`` at every module of ``delta`` with LoRA leaves."""
    return _lora(base, delta, method, 1.0)


def unmerge_lora(base: Mapping, delta: Mapping, method: LoRA) -> dict:
    """Inverse of :func:`merge_lora` (up to float rounding)."""
    return _lora(base, delta, method, -1.0)


def merge_ia3(base: Mapping, delta: Mapping, method: IA3) -> dict:
    """Fold ``ia3_scale`` into the kernels (and, for output scaling, the biases)."""
    out = _copy(base)
    for path, mod in _modules_with(delta, "ia3_scale"):
        s = jnp.asarray(mod["ia3_scale"], jnp.float32)
        if method.is_feedforward("/".join(path)):
            _update(out, path, "kernel", lambda k: (k * s[:, None]).astype(k.dtype))
        else:
            _update(out, path, "kernel", lambda k: (k * s[None, :]).astype(k.dtype))
            node = out
            for p in path:
                node = node[p]
            if "bias" in node:
                _update(out, path, "bias", lambda bias: (bias * s).astype(bias.dtype))
    return out


def strip_leaves(delta: Mapping, names: tuple[str, ...] = ("lora_a", "lora_b")) -> dict:
    """``delta`` without the named leaves (and without modules left empty)."""
    out = {}
    for k, v in delta.items():
        if isinstance(v, Mapping):
            sub = strip_leaves(v, names)
            if sub:
                out[k] = sub
        elif k not in names:
            out[k] = v
    return out
