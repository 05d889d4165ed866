"""Jitted programs shared by the runs of one process (e.g. the seeds of ``peft-jax fewshot``).

Every run builds its train step, predict function and delta init as closures over its
model, format spec, methods and optimizer; a new closure is a new ``jax.jit`` object, so
each run traces, lowers and compiles again even when only values (data, data order, rng
keys, initial delta) differ. A :class:`ProgramCache` that the caller creates once and
passes to each run returns the first run's jitted function to every later run with an
equal key, and jit's own cache then serves the same shapes without compiling::

    programs = ProgramCache()
    for cfg in seed_configs:
        run_experiment(cfg, pretrained, programs=programs)   # seed 2..: no compilation

A key must hold everything the jitted closure captures (the callers' keys:
:func:`peft_jax.runner.session.program_key`, ``peft_jax.peft.init_delta``): the program
then depends on nothing else, and the arguments' shapes, dtypes and shardings are jit's
own cache key. ``None`` in place of a cache (:func:`program`) builds a fresh function
every time (no reuse). There is no module-level cache: a cache lives as long as its owner.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Optional

import jax
import numpy as np


class ProgramCache:
    """Jitted functions by key (:meth:`get`); ``built`` / ``reused`` / ``unhashable`` count
    lookups."""

    def __init__(self):
        self._programs: dict[Hashable, Callable] = {}
        self.built = 0
        self.reused = 0
        self.unhashable = 0

    def get(self, key: Hashable, build: Callable[[], Callable]) -> Callable:
        """The function stored under ``key``; ``build()``'s (stored) on the first lookup. A
        key that cannot be hashed (a captured object without value equality) builds a
        fresh, unstored function (counted in ``unhashable``)."""
        try:
            hash(key)
        except TypeError:
            self.unhashable += 1
            return build()
        fn = self._programs.get(key)
        if fn is None:
            fn = self._programs[key] = build()
            self.built += 1
        else:
            self.reused += 1
        return fn

    def __len__(self) -> int:
        return len(self._programs)


def program(cache: Optional[ProgramCache], key: Hashable, build: Callable[[], Callable]) -> Callable:
    """``cache.get(key, build)``, or ``build()`` without a cache."""
    return build() if cache is None else cache.get(key, build)


def tree_signature(tree: Any) -> tuple:
    """A hashable description of a pytree's structure: its treedef and every leaf's shape
    and dtype (arrays and ``jax.ShapeDtypeStruct``) or the leaf itself (e.g. shardings)."""
    def leaf(x: Any) -> Hashable:
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return tuple(np.shape(x)), str(x.dtype)
        return x
    return jax.tree.structure(tree), tuple(leaf(x) for x in jax.tree.leaves(tree))
