"""Nested-dict pytrees addressed by '/'-joined paths (``flax.traverse_util`` underneath).

Deltas and bases are nested dicts; a leaf's path is its keys joined by ``'/'``
(``encoder/layer_0/attention/query/lora_a``), a module's path is the path of the dict that
holds its leaves (``encoder/layer_0/attention/query``).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
from flax import traverse_util

SEP = "/"


def flatten(tree: Mapping) -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (empty sub-dicts are dropped)."""
    return traverse_util.flatten_dict(dict(tree), sep=SEP) if tree else {}


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Inverse of :func:`flatten`."""
    return traverse_util.unflatten_dict(dict(flat), sep=SEP) if flat else {}


def copy(tree: Mapping) -> dict:
    """A copy of the dict structure (leaves shared)."""
    return {k: copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def parent(path: str) -> str:
    return path.rsplit(SEP, 1)[0] if SEP in path else ""


def leaf_name(path: str) -> str:
    return path.rsplit(SEP, 1)[-1]


def leaves_named(tree: Mapping, name: str) -> dict[str, Any]:
    """``{path: leaf}`` of every leaf called ``name``."""
    return {p: v for p, v in flatten(tree).items() if leaf_name(p) == name}


def modules_with(tree: Mapping, leaf: str) -> list[tuple[str, dict]]:
    """``[(module path, module dict)]`` of every module holding a leaf called ``leaf``, in
    natural order (``layer_2`` before ``layer_10``)."""
    out = []
    for p in natural_sorted(leaves_named(tree, leaf)):
        mod = parent(p)
        out.append((mod, get(tree, mod) if mod else tree))
    return out


def get(tree: Mapping, path: str) -> Any:
    """The node at ``path``; ``KeyError`` naming the path when it is absent."""
    node: Any = tree
    for k in path.split(SEP) if path else ():
        if not isinstance(node, Mapping) or k not in node:
            raise KeyError(path)
        node = node[k]
    return node


def update_leaf(tree: dict, path: str, fn: Callable[[Any], Any]) -> None:
    """Replace the leaf at ``path`` (in place) by ``fn(leaf)``; boxed leaves keep their
    metadata; a missing leaf is a ``KeyError`` naming it."""
    mod, name = parent(path), leaf_name(path)
    node = get(tree, mod) if mod else tree
    if name not in node:
        raise KeyError(f"no leaf {path!r}")
    leaf = node[name]
    if isinstance(leaf, nn.meta.AxisMetadata):
        node[name] = leaf.replace_boxed(fn(leaf.unbox()))
    else:
        node[name] = fn(leaf)


def merge(a: Mapping, b: Mapping) -> dict:
    """Deep union of two nested dicts with disjoint leaves."""
    out = dict(a)
    for k, v in b.items():
        if k in out:
            if not (isinstance(out[k], Mapping) and isinstance(v, Mapping)):
                raise ValueError(f"merge: key {k!r} is a leaf in both trees")
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def natural_key(path: str) -> tuple:
    """Sort key that orders 'layer_2' before 'layer_10'."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path))


def natural_sorted(paths: Iterable[str]) -> list[str]:
    return sorted(paths, key=natural_key)
