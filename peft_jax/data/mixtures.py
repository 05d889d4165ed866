"""Multi-task mixtures (T5 conventions): mixing rates and a deterministic mixed example list.

Rates: ``proportional`` (examples-proportional, sizes capped at ``cap``), ``temperature``
(rate ~ min(size, cap) ** (1 / T)), ``equal``.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from peft_jax.data.readers import DataError


def mixture_rates(sizes: Mapping[str, int], mode: str = "proportional", cap: Optional[int] = None,
                  temperature: float = 1.0) -> dict[str, float]:
    """Normalised sampling rate of every task."""
    if not sizes:
        raise DataError("mixture of no tasks")
    for k, n in sizes.items():
        if n <= 0:
            raise DataError(f"mixture: task {k!r} has {n} examples")
    s = {k: float(min(n, cap) if cap else n) for k, n in sizes.items()}
    if mode == "proportional":
        w = s
    elif mode == "temperature":
        if temperature <= 0:
            raise DataError(f"temperature must be > 0, got {temperature}")
        w = {k: v ** (1.0 / temperature) for k, v in s.items()}
    elif mode == "equal":
        w = {k: 1.0 for k in s}
    else:
        raise DataError(f"mixture mode must be proportional, temperature or equal, got {mode!r}")
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}


def mix(examples: Mapping[str, Sequence[dict]], rates: Mapping[str, float], num_examples: int,
        seed: int = 0) -> list[dict]:
    """``num_examples`` examples drawn task by task with probability ``rates``; within a task
    examples come in a seeded permutation, reshuffled when exhausted. Each returned example is
    a copy with its ``"task"`` name added."""
    names = sorted(examples)
    if set(names) != set(rates):
        raise DataError(f"mixture: rates for {sorted(rates)} but examples for {names}")
    rng = np.random.default_rng(seed)
    p = np.array([rates[n] for n in names], np.float64)
    choice = rng.choice(len(names), size=num_examples, p=p / p.sum())
    out, cursors, perms, epochs = [], {}, {}, {}
    for c in choice:
        name = names[c]
        data = examples[name]
        if not data:
            raise DataError(f"mixture: task {name!r} has no examples")
        if cursors.get(name, len(data)) >= len(data):
            epochs[name] = epochs.get(name, -1) + 1
            perms[name] = np.random.default_rng([seed, c, epochs[name]]).permutation(len(data))
            cursors[name] = 0
        ex = dict(data[perms[name][cursors[name]]])
        cursors[name] += 1
        ex["task"] = name
        out.append(ex)
    return out
