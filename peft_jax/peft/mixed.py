"""Mixed-task batches: every example uses its own task's delta over one shared base.

``stack_deltas`` stacks T same-structure deltas into one with a leading ``[T]`` axis;
``apply_mixed`` gathers each example's delta (``stacked[task_ids]`` -> ``[b, ...]``) and
``jax.vmap``s the model over the batch with the base unbatched, so each example may use a
different task's prompt / LoRA / prefix / adapters in one forward pass.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = Any


def stack_deltas(deltas: Sequence[Mapping]) -> Any:
    """``[delta_task0, delta_task1, ...]`` (same tree and shapes) -> one delta ``[T, ...]``."""
    if not deltas:
        raise ValueError("stack_deltas: no deltas given")
    ref = jax.tree_util.tree_structure(deltas[0])
    for i, d in enumerate(deltas[1:], 1):
        if jax.tree_util.tree_structure(d) != ref:
            raise ValueError(f"stack_deltas: delta {i} has another tree structure than delta 0 "
                             f"({jax.tree_util.tree_structure(d)} vs {ref})")
    shapes0 = [jnp.shape(x) for x in jax.tree_util.tree_leaves(deltas[0])]
    for i, d in enumerate(deltas[1:], 1):
        shapes = [jnp.shape(x) for x in jax.tree_util.tree_leaves(d)]
        if shapes != shapes0:
            raise ValueError(f"stack_deltas: delta {i} has other leaf shapes than delta 0")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *deltas)


def apply_mixed(model: nn.Module, base: Mapping, stacked: Mapping, task_ids: Array,
                batch: Mapping[str, Array], **kwargs) -> Any:
    """Run ``model`` on ``batch`` (arrays ``[b, ...]``) with example ``i`` using delta
    ``stacked[task_ids[i]]``; ``kwargs`` are passed to the model unbatched (e.g.
    ``deterministic``). Returns the model output with batch axis ``b`` restored.
    """
    task_ids = jnp.asarray(task_ids, jnp.int32)
    per_example = jax.tree_util.tree_map(lambda x: jnp.take(x, task_ids, axis=0), stacked)

    def one(delta, example):
        ex = jax.tree_util.tree_map(lambda a: a[None], example)
        out = model.apply({"params": base, "peft": delta}, **ex, **kwargs)
        return jax.tree_util.tree_map(lambda a: a[0], out)

    return jax.vmap(one)(per_example, dict(batch))
