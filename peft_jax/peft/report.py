"""Parameter and memory report: what trains, by method and by module.

::

    rep = param_report(base, delta, base_patterns=bitfit_patterns(), tx=tx)
    print(rep.table())

Counts work on arrays or ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape`` of a model
init), so a report for a large model needs no weights in memory.

A delta leaf's line is the name of the method that owns it (``PeftMethod.owns``; the
methods of the run, or every registered method by default); a method's frozen leaves
(``is_frozen``) count as frozen; base leaves selected by rules -> ``base (selected)``;
delta leaves no method owns -> ``other``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

from peft_jax.peft.method import REGISTRY, owner
from peft_jax.peft.partition import (leaf_bytes, leaf_size, leaf_paths, optimizer_state_bytes,
                                     select_base, split_trainable)

BASE_SELECTED = "base (selected)"


@dataclasses.dataclass(frozen=True)
class Row:
    """One report line. ``percent``: trainable / ``of`` (see the table it is in)."""

    group: str
    trainable: int
    total: int
    trainable_bytes: int
    total_bytes: int
    of: int  # denominator of percent

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.of if self.of else 0.0


def default_methods() -> list:
    """One default instance of every registered method (to name leaves of any delta)."""
    return [cls() for cls in REGISTRY.values()]


def method_of(path: str, methods: Optional[Sequence[Any]] = None) -> str:
    """Name of the method that owns delta leaf ``path`` (``"other"`` if none does)."""
    m = owner(default_methods() if methods is None else methods, path)
    return m.name if m is not None else "other"


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def format_rows(title: str, rows: Sequence[Row]) -> str:
    """Aligned text table of rows."""
    head = (title, "trainable", "total", "%", "trainable bytes", "total bytes")
    body = [(r.group, f"{r.trainable:,}", f"{r.total:,}", f"{r.percent:.4f}",
             _human(r.trainable_bytes), _human(r.total_bytes)) for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ParamReport:
    trainable: int
    total: int
    trainable_bytes: int
    total_bytes: int
    by_method: tuple[Row, ...]
    by_module: tuple[Row, ...]
    optimizer_state_bytes: Optional[int] = None

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def summary(self) -> str:
        s = (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
             f"trainable%: {self.percent:.4f} || trainable bytes: {_human(self.trainable_bytes)}")
        if self.optimizer_state_bytes is not None:
            s += f" || optimizer state: {_human(self.optimizer_state_bytes)}"
        return s

    def table(self) -> str:
        return "\n\n".join([self.summary(),
                            format_rows("method (% of all params)", self.by_method),
                            format_rows("module (% of the module)", self.by_module)])

    def __str__(self) -> str:
        return self.table()


def param_report(base: Any, delta: Any, base_patterns: Sequence[str] = (), tx: Any = None,
                 module_depth: int = 1, methods: Optional[Sequence[Any]] = None) -> ParamReport:
    """Counts of ``base`` (frozen unless selected by ``base_patterns`` or the methods'
    ``base_patterns()``) plus ``delta``.

    ``tx``: an optax transformation over the trainable tree of
    :func:`~peft_jax.peft.partition.split_trainable`; its state bytes are reported.
    ``module_depth``: how many leading path keys name a module row. ``methods``: the run's
    methods (default: every registered method, to name the leaves).
    """
    run_methods = tuple(methods or ())
    named = default_methods() if methods is None else list(methods)
    patterns = tuple(base_patterns) + tuple(p for m in run_methods for p in m.base_patterns())
    sel_paths = set()
    if patterns:
        sel, _ = select_base(base, patterns)
        sel_paths = {p for p, _ in leaf_paths(sel)}
    items = []  # (path, method or None if frozen, size, bytes)
    for p, x in leaf_paths(base):
        items.append((p, BASE_SELECTED if p in sel_paths else None, leaf_size(x), leaf_bytes(x)))
    for p, x in leaf_paths(delta):
        m = owner(named, p)
        label = None if m is not None and m.is_frozen(p) else (m.name if m else "other")
        items.append((p, label, leaf_size(x), leaf_bytes(x)))
    total = sum(i[2] for i in items)
    total_b = sum(i[3] for i in items)
    trainable = sum(i[2] for i in items if i[1])
    trainable_b = sum(i[3] for i in items if i[1])

    methods: dict[str, list[int]] = {}
    for _, m, n, b in items:
        if m:
            acc = methods.setdefault(m, [0, 0])
            acc[0] += n
            acc[1] += b
    by_method = tuple(Row(m, n, n, b, b, total) for m, (n, b) in sorted(methods.items()))

    modules: dict[str, list[int]] = {}
    for p, m, n, b in items:
        key = "/".join(p.split("/")[:module_depth])
        acc = modules.setdefault(key, [0, 0, 0, 0])
        acc[1] += n
        acc[3] += b
        if m:
            acc[0] += n
            acc[2] += b
    by_module = tuple(Row(k, t, n, tb, b, n) for k, (t, n, tb, b) in modules.items())

    opt = None
    if tx is not None:
        tr, _ = split_trainable(base, delta, base_patterns, run_methods)
        opt = optimizer_state_bytes(tx, tr)
    return ParamReport(trainable, total, trainable_b, total_b, by_method, by_module, opt)


@dataclasses.dataclass(frozen=True)
class MemoryRow:
    """Training memory of one setup (bytes): gradients = trainable params' bytes."""

    name: str
    trainable: int
    trainable_bytes: int
    optimizer_state_bytes: int
    frozen_bytes: int

    @property
    def training_bytes(self) -> int:
        """Params + gradients + optimizer state (activations excluded)."""
        return self.frozen_bytes + 2 * self.trainable_bytes + self.optimizer_state_bytes


def memory_comparison(base: Any, setups: Mapping[str, tuple[Any, Sequence[str]]],
                      make_tx) -> list[MemoryRow]:
    """For each ``name: (delta, base_patterns)``: parameter, gradient and optimizer bytes.

    ``make_tx(trainable) -> optax transformation`` (e.g. one AdamW over everything).
    Full fine-tuning is ``({}, full_finetuning_patterns())``.
    """
    rows = []
    for name, (delta, patterns) in setups.items():
        rep = param_report(base, delta, patterns)
        tr, _ = split_trainable(base, delta, patterns)
        rows.append(MemoryRow(name, rep.trainable, rep.trainable_bytes,
                              optimizer_state_bytes(make_tx(tr), tr),
                              rep.total_bytes - rep.trainable_bytes))
    return rows


def format_memory(rows: Sequence[MemoryRow]) -> str:
    head = ("setup", "trainable", "grad bytes", "optimizer state", "frozen params",
            "params+grads+opt")
    body = [(r.name, f"{r.trainable:,}", _human(r.trainable_bytes),
             _human(r.optimizer_state_bytes), _human(r.frozen_bytes), _human(r.training_bytes))
            for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body])
