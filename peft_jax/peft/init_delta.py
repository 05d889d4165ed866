"""Initialize a delta for a model's methods, then validate what each method matched."""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import flax.linen as nn
import jax

Array = Any


def dense_paths(base: Mapping, path: tuple = ()) -> list[str]:
    """Module paths of every dense layer (a module with a ``kernel``) in a base pytree."""
    out = []
    for k, v in base.items():
        if isinstance(v, Mapping):
            out += dense_paths(v, path + (k,))
        elif k == "kernel":
            out.append("/".join(path))
    return out


def init_delta(model: nn.Module, base: Mapping, batch: Mapping[str, Array], rng: Array) -> dict:
    """The ``peft`` collection of ``model`` (built with ``slots=Slots(methods)``).

    Runs ``model.apply({"params": base}, **batch, mutable=["peft"], rngs={"params": rng})``
    (the base is read, never re-initialized), then each method's post-init step
    (``finalize_delta``: e.g. vocabulary-based prompt init, prefix reparameterization) and
    its validation (``validate``: e.g. a LoRA target regex that matched no module is a
    ValueError naming it).
    """
    methods = tuple(getattr(model, "slots", None).methods) if getattr(model, "slots", None) else ()
    if not methods:
        raise ValueError("init_delta: the model has no PEFT methods (build it with "
                         "slots=Slots((method, ...)))")
    k_apply, k_post = jax.random.split(rng)

    accepted = inspect.signature(type(model).__call__).parameters
    batch = {k: v for k, v in batch.items() if k in accepted}  # drop labels etc.
    arrays = {k: v for k, v in batch.items() if hasattr(v, "shape")}
    static = {k: v for k, v in batch.items() if k not in arrays}

    def run(base, arrays, key):
        _, mut = model.apply({"params": base}, **arrays, **static, mutable=["peft"],
                             rngs={"params": key})
        return mut.get("peft", {})

    delta = _to_dict(jax.jit(run)(base, arrays, k_apply))
    paths = dense_paths(nn.meta.unbox(base))
    for i, m in enumerate(methods):
        if hasattr(m, "finalize_delta"):
            delta = m.finalize_delta(delta, base, jax.random.fold_in(k_post, i))
    for m in methods:
        if hasattr(m, "validate"):
            m.validate(delta, paths)
    return delta


def _to_dict(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree
