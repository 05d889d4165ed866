"""What trains: path rules over pytrees, trainable/frozen splits, optimizer-state bytes.

The one place that decides which leaves are trained. The trainable tree is the delta
(less any method-owned frozen leaves) plus base leaves selected by regex rules (the
methods' ``base_patterns()``: BitFit ``r".*bias"``, full fine-tuning ``r".*"``; or given
directly, e.g. LayerNorm only: :func:`layernorm_patterns`)::

    trainable, frozen = split_trainable(base, delta, methods=methods)
    variables = assemble(frozen, trainable)     # {"params": base, "peft": delta}

Gradients are taken only with respect to ``trainable``, so frozen base leaves get no
gradient buffers and no optimizer state (see :func:`optimizer_state_bytes`).

Paths are the ``'/'``-joined dict keys of a leaf, e.g.
``'encoder/layer_0/attention/query/bias'``; patterns are matched with ``re.fullmatch``
(so ``r".*bias"`` and ``r".*bias$"`` are the same rule). Flax ``nn.Partitioned`` boxes
count as leaves (their path is the path of the box).
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from peft_jax.peft import tree
from peft_jax.peft.method import materialize_all, owner

PyTree = Any

# Labels of the trainable tree made by :func:`split_trainable`.
DELTA_KEY = "peft"
BASE_KEY = "params"


def _is_leaf(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _key_str(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` in tree-flatten order; path is ``'/'``-joined keys."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    return [("/".join(_key_str(k) for k in path), leaf) for path, leaf in flat]


def map_with_paths(fn, tree: PyTree) -> PyTree:
    """``tree_map`` whose function receives ``(path, leaf)``; boxes count as leaves."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn("/".join(_key_str(k) for k in p), x), tree, is_leaf=_is_leaf)


def _compile(patterns: Iterable[str]) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"invalid path pattern {p!r}: {e}") from None
    return out


def _preview(paths: Sequence[str], n: int = 20) -> str:
    shown = ", ".join(paths[:n])
    return shown + (f", ... ({len(paths) - n} more)" if len(paths) > n else "")


# ----------------------------------------------------------------------------- labels


def label_tree(tree: PyTree, rules: Sequence[tuple[str, str]], *,
               unused: str = "error") -> PyTree:
    """Tree of the same structure as ``tree`` whose leaves are labels (for optax).

    ``rules``: ``[(regex, label), ...]``; a leaf gets the label of the first regex that
    fully matches its path. Every leaf must be covered: otherwise ``ValueError`` listing
    the uncovered paths (as big_vision does).

    Every rule must be of use: a regex matching no path at all is a typo, handled per
    ``unused`` (``"error"`` (default): ``ValueError`` naming the regex and some paths;
    ``"warn"``: a warning; ``"ignore"``). A rule whose paths were all claimed by earlier
    rules (shadowed, e.g. a catch-all ``".*"`` after rules that cover everything) only
    warns when ``unused="error"|"warn"``, since a catch-all that catches nothing is fine.
    """
    if unused not in ("error", "warn", "ignore"):
        raise ValueError(f"unused={unused!r}; allowed: ['error', 'warn', 'ignore']")
    compiled = _compile(r for r, _ in rules)
    paths = [p for p, _ in leaf_paths(tree)]
    labels: dict[str, str] = {}
    matched = [False] * len(rules)
    claimed = [False] * len(rules)
    for path in paths:
        for i, rx in enumerate(compiled):
            if rx.fullmatch(path):
                matched[i] = True
                if path not in labels:
                    labels[path] = rules[i][1]
                    claimed[i] = True
    uncovered = [p for p in paths if p not in labels]
    if uncovered:
        raise ValueError(f"{len(uncovered)} leaves are not covered by any rule "
                         f"{[r for r, _ in rules]}: {_preview(uncovered)}")
    if unused != "ignore":
        for i, (rx, label) in enumerate(rules):
            if not matched[i]:
                msg = (f"rule {rx!r} (label {label!r}) matches no leaf path; "
                       f"paths look like: {_preview(paths, 8)}")
                if unused == "error":
                    raise ValueError(msg)
                warnings.warn(msg, stacklevel=2)
            elif not claimed[i] and rx not in (".*", ".+"):
                warnings.warn(f"rule {rx!r} (label {label!r}) is shadowed: every path it "
                              "matches was claimed by an earlier rule", stacklevel=2)
    return map_with_paths(lambda p, _: labels[p], tree)


# ----------------------------------------------------------------------------- base selection


def bitfit_patterns() -> tuple[str, ...]:
    """BitFit (Ben Zaken et al. 2022): every bias of the base (dense and LayerNorm)."""
    return (r".*bias",)


def layernorm_patterns() -> tuple[str, ...]:
    """LayerNorm/RMSNorm parameters only (modules whose name ends in ``norm``)."""
    return (r".*norm[^/]*/(scale|bias)",)


def full_finetuning_patterns() -> tuple[str, ...]:
    """Every base leaf."""
    return (r".*",)


def select_base(base: PyTree, patterns: Sequence[str]) -> tuple[dict, dict]:
    """Split a nested-dict ``base`` into ``(trainable_subset, frozen_rest)``.

    Both are nested dicts holding only their leaves (a subtree with no selected leaf is
    absent from the subset). A pattern that selects nothing is a ``ValueError`` (a typo
    would otherwise silently train nothing). ``tree.merge(frozen_rest, trainable_subset)``
    gives ``base`` back.
    """
    compiled = _compile(patterns)
    used = [False] * len(compiled)
    sel: dict = {}
    rest: dict = {}
    paths = leaf_paths(base)
    for p, leaf in paths:
        hit = False
        for i, rx in enumerate(compiled):
            if rx.fullmatch(p):
                used[i] = hit = True
        (sel if hit else rest)[p] = leaf
    for i, ok in enumerate(used):
        if not ok:
            raise ValueError(f"base selection pattern {patterns[i]!r} matches no base leaf; "
                             f"base paths look like: {_preview([p for p, _ in paths], 8)}")
    return tree.unflatten(sel), tree.unflatten(rest)


def split_trainable(base: PyTree, delta: PyTree, base_patterns: Sequence[str] = (),
                    methods: Sequence[Any] = ()) -> tuple[dict, dict]:
    """``(trainable, frozen)`` of a base and a delta.

    ``trainable = {"peft": trainable delta, "params": base leaves selected by
    base_patterns and the methods' base_patterns()}``; ``frozen = {"params": rest of the
    base, "peft": method-owned frozen delta leaves}`` (``is_frozen``, e.g. VeRA's shared
    projections). Use :func:`assemble` to rebuild model variables.
    """
    patterns = tuple(base_patterns) + tuple(p for m in methods for p in m.base_patterns())
    sel, rest = select_base(base, patterns) if patterns else ({}, base)
    train, frozen = {}, {}
    for p, leaf in tree.flatten(delta).items():
        m = owner(methods, p)
        (frozen if m is not None and m.is_frozen(p) else train)[p] = leaf
    return ({DELTA_KEY: tree.unflatten(train), BASE_KEY: sel},
            {BASE_KEY: rest, DELTA_KEY: tree.unflatten(frozen)})


def assemble(frozen: PyTree, trainable: Mapping) -> dict:
    """Flax variables ``{"params": base, "peft": delta}`` from :func:`split_trainable` parts."""
    base, delta = frozen.get(BASE_KEY, {}), trainable.get(DELTA_KEY, {})
    if trainable.get(BASE_KEY):
        base = tree.merge(base, trainable[BASE_KEY])
    if frozen.get(DELTA_KEY):
        delta = tree.merge(delta, frozen[DELTA_KEY])
    return {"params": base, "peft": delta}


def variables_fn(methods: Sequence[Any]):
    """``(frozen, trainable) -> variables`` for the train/eval steps: :func:`assemble`, then
    every method's ``materialize`` (prefix MLP, shared projections), inside the step."""

    def fn(frozen: PyTree, trainable: Mapping) -> dict:
        v = assemble(frozen, trainable)
        return {"params": v["params"], "peft": materialize_all(methods, v["peft"])}

    return fn


# ----------------------------------------------------------------------------- sizes


def leaf_bytes(x: Any) -> int:
    """Bytes of an array or ``ShapeDtypeStruct`` (0 for non-arrays)."""
    x = nn.meta.unbox(x)
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return 0


def leaf_size(x: Any) -> int:
    """Scalars in an array or ``ShapeDtypeStruct``."""
    x = nn.meta.unbox(x)
    return int(np.prod(x.shape, dtype=np.int64)) if hasattr(x, "shape") else 0


def tree_size(tree: PyTree) -> int:
    """Number of scalars in a tree (arrays or ``ShapeDtypeStruct``)."""
    return sum(leaf_size(x) for _, x in leaf_paths(tree))


def tree_bytes(tree: PyTree) -> int:
    """Bytes of a tree's arrays (or ``ShapeDtypeStruct`` leaves)."""
    return sum(leaf_bytes(x) for _, x in leaf_paths(tree))


def optimizer_state_bytes(tx: Any, params: PyTree) -> int:
    """Bytes of ``tx.init(params)``, computed abstractly with ``jax.eval_shape`` (no memory
    is allocated). Leaves excluded by ``multi_transform``/``masked`` cost 0 bytes."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype),
                            nn.meta.unbox(params))
    state = jax.eval_shape(tx.init, abstract)
    return sum(leaf_bytes(x) for x in jax.tree.leaves(state))
