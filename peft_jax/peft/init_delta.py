"""Initialize a delta for a model's methods, then validate what each method matched."""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax

from peft_jax.models.slots import SLOT_HOOKS
from peft_jax.peft import tree
from peft_jax.programs import ProgramCache, program

Array = Any


def dense_paths(base: Mapping) -> list[str]:
    """Module paths of every dense layer (a module with a ``kernel``) in a base pytree."""
    return [p for p, _ in tree.modules_with(nn.meta.unbox(base), "kernel")]


def init_delta(model: nn.Module, base: Mapping, batch: Mapping[str, Array], rng: Array,
               methods: Optional[Sequence[Any]] = None,
               programs: Optional[ProgramCache] = None) -> dict:
    """The ``peft`` collection of ``model`` (built with ``slots=Slots(methods)``).

    Runs ``model.apply({"params": base}, **batch, mutable=["peft"], rngs={"params": rng})``
    when a method acts through a slot (the base is read, never re-initialized), then each
    method's post-init step (``finalize_delta``: e.g. vocabulary-based prompt init, prefix
    reparameterization, a task head) and its validation (``validate``: e.g. a LoRA target
    regex that matched no module is an error naming it). ``batch``: any inputs of the right
    rank (values and length do not change the delta's shapes). ``methods``: default the
    model's ``slots.methods``. ``programs``: the jitted slot init is shared with earlier
    inits of an equal model and equal non-array inputs (its key; the base, array inputs and
    rng are arguments).
    """
    slots = getattr(model, "slots", None)
    methods = tuple(slots.methods if slots else ()) if methods is None else tuple(methods)
    if not methods:
        raise ValueError("init_delta: the model has no PEFT methods (build it with "
                         "slots=Slots((method, ...)))")
    k_apply, k_post = jax.random.split(rng)
    delta: dict = {}
    if any(hasattr(m, hook) for m in methods for hook in SLOT_HOOKS):
        accepted = inspect.signature(type(model).__call__).parameters
        batch = {k: v for k, v in batch.items() if k in accepted}  # drop labels etc.
        arrays = {k: v for k, v in batch.items() if hasattr(v, "shape")}
        static = {k: v for k, v in batch.items() if k not in arrays}

        def run(base, arrays, key):
            _, mut = model.apply({"params": base}, **arrays, **static, mutable=["peft"],
                                 rngs={"params": key})
            return mut.get("peft", {})

        init = program(programs, ("init_delta", model, tuple(sorted(static.items()))),
                       lambda: jax.jit(run))
        delta = tree.copy(init(base, arrays, k_apply))
    for i, m in enumerate(methods):
        delta = m.finalize_delta(delta, base, jax.random.fold_in(k_post, i))
    paths = dense_paths(base)
    for m in methods:
        m.validate(delta, paths)
    return delta
