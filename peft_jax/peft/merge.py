"""Fold deltas into the base kernels (and back), for every mergeable method.

Each method owns its algebra (``PeftMethod.merge`` / ``unmerge``; kernels are
``[in, out]``: LoRA adds ``scale * lora_a @ lora_b``, (IA)^3 scales rows or columns). A
merged base is used with a model built WITHOUT the merged methods and the delta stripped
of their leaves (:func:`strip_leaves`). Boxed (``nn.Partitioned``) base leaves keep their
metadata.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from peft_jax.peft import tree
from peft_jax.peft.method import NotSupported


def _acting(delta: Mapping, methods: Sequence[Any]) -> list:
    paths = list(tree.flatten(delta))
    return [m for m in methods if any(m.owns(p) for p in paths)]


def merge(base: Mapping, delta: Mapping, methods: Sequence[Any]) -> dict:
    """``base`` with every method that has leaves in ``delta`` folded in; a method that
    cannot be folded (prompt, prefix, adapters, heads) is a :class:`NotSupported` error
    naming it."""
    for m in _acting(delta, methods):
        if not m.mergeable:
            raise NotSupported(f"{m.name} cannot be folded into the base weights; mergeable "
                               "methods fold into the kernels (e.g. lora, ia3)")
        base = m.merge(base, delta)
    return base


def unmerge(base: Mapping, delta: Mapping, methods: Sequence[Any]) -> dict:
    """Inverse of :func:`merge` (up to float rounding), in reverse order."""
    for m in reversed(_acting(delta, methods)):
        base = m.unmerge(base, delta)
    return base


def strip_leaves(delta: Mapping, methods: Sequence[Any]) -> dict:
    """``delta`` without the leaves owned by ``methods`` (and without emptied modules)."""
    return tree.unflatten({p: v for p, v in tree.flatten(delta).items()
                           if not any(m.owns(p) for m in methods)})
