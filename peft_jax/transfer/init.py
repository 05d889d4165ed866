"""SPoT transfer initialization: put a source task's prompt into a target delta.

The soft-prompt leaf of a delta is named ``prompt`` ([P, d]) and sits at the module that
calls ``slots.input_embeddings`` (e.g. ``delta["encoder"]["prompt"]``). The source prompt
is copied bit-exactly (same dtype required unless ``cast=True``). A length mismatch is an
error unless ``mode`` is ``"truncate"`` (keep the first P source tokens) or ``"tile"``
(repeat the source tokens cyclically to length P, cutting the last repetition).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from peft_jax.transfer.library import LibraryError, PromptLibrary

PROMPT_LEAF = "prompt"
MODES = ("exact", "truncate", "tile")

Path = tuple[str, ...]


def _walk(tree: Any, prefix: Path = ()):
    if isinstance(tree, Mapping):
        for k in tree:
            yield from _walk(tree[k], prefix + (str(k),))
    else:
        yield prefix, tree


def prompt_paths(delta: Mapping[str, Any]) -> list[Path]:
    """Paths (tuples of keys) of every ``prompt`` leaf in a delta pytree of nested mappings."""
    return [p for p, _ in _walk(delta) if p and p[-1] == PROMPT_LEAF]


def _parse_path(path: Union[str, Sequence[str]]) -> Path:
    return tuple(path.strip("/").split("/")) if isinstance(path, str) else tuple(path)


def _get(tree: Mapping[str, Any], path: Path) -> Any:
    node = tree
    for i, k in enumerate(path):
        if not isinstance(node, Mapping) or k not in node:
            raise KeyError("/".join(path[: i + 1]))
        node = node[k]
    return node


def _replace(tree: Mapping[str, Any], path: Path, value: Any) -> Any:
    """Copy of ``tree`` (same mapping types along the path) with ``tree[path] = value``."""
    k = path[0]
    new_child = value if len(path) == 1 else _replace(tree[k], path[1:], value)
    items = {kk: (new_child if kk == k else vv) for kk, vv in tree.items()}
    try:
        return type(tree)(items)
    except TypeError:
        return items


def fit_length(source: np.ndarray, length: int, mode: str = "exact") -> np.ndarray:
    """[Ps, d] -> [length, d] by ``mode`` (see module docstring); ``exact`` needs Ps == length."""
    if mode not in MODES:
        raise ValueError(f"unknown length mode {mode!r}; choose one of {MODES}")
    ps = source.shape[0]
    if ps == length:
        return source
    if mode == "exact":
        raise ValueError(f"source prompt has length {ps} but the target prompt has length {length}; "
                         "pass mode='truncate' (keep the first tokens) or mode='tile' (repeat tokens)")
    if mode == "truncate":
        if ps < length:
            raise ValueError(f"cannot truncate a length-{ps} source prompt to the longer target "
                             f"length {length}; use mode='tile'")
        return source[:length]
    reps = -(-length // ps)
    return np.concatenate([source] * reps, axis=0)[:length]


def transfer_prompt(delta: Mapping[str, Any], source: Any, *, path: Union[str, Sequence[str], None] = None,
                    mode: str = "exact", cast: bool = False) -> Any:
    """Return ``delta`` with its ``prompt`` leaf [P, d] replaced by ``source`` [Ps, d].

    ``path``: which prompt leaf ('encoder/prompt') when the delta holds several. The new
    leaf keeps the old one's type: a ``jax.Array`` keeps its sharding, numpy stays numpy.
    Raises ValueError naming the leaf on width, length (see ``mode``) or dtype mismatch.
    """
    if path is None:
        found = prompt_paths(delta)
        if not found:
            leaves = ["/".join(p) for p, _ in _walk(delta)][:10]
            raise ValueError(f"delta has no '{PROMPT_LEAF}' leaf (is a soft-prompt method active?); "
                             f"leaves: {leaves}")
        if len(found) > 1:
            raise ValueError(f"delta has several prompt leaves {['/'.join(p) for p in found]}; pass path=")
        key = found[0]
    else:
        key = _parse_path(path)
    name = "/".join(key)
    try:
        box = _get(delta, key)
    except KeyError as e:
        raise ValueError(f"delta has no leaf {name!r} (missing {e.args[0]!r}); prompt leaves: "
                         f"{['/'.join(p) for p in prompt_paths(delta)]}") from None
    boxed = hasattr(box, "unbox") and hasattr(box, "replace_boxed")  # flax nn.Partitioned etc.
    leaf = box.unbox() if boxed else box
    src = np.asarray(source)
    if src.ndim != 2 or len(leaf.shape) != 2:
        raise ValueError(f"{name}: expected [length, d_model] prompts, source {src.shape} vs target "
                         f"{tuple(leaf.shape)}")
    if src.shape[1] != leaf.shape[1]:
        raise ValueError(f"{name}: source prompt width d_model={src.shape[1]} differs from the target's "
                         f"{leaf.shape[1]} (a prompt from another base model)")
    src = fit_length(src, int(leaf.shape[0]), mode)
    if src.dtype != np.dtype(leaf.dtype):
        if not cast:
            raise ValueError(f"{name}: source prompt dtype {src.dtype} differs from the target's "
                             f"{np.dtype(leaf.dtype)}; pass cast=True to convert (not bit-exact)")
        src = src.astype(leaf.dtype)
    src = np.array(src, copy=True)
    if isinstance(leaf, np.ndarray):
        new = src
    else:
        import jax
        sharding = getattr(leaf, "sharding", None)
        new = jax.device_put(src, sharding) if sharding is not None else jax.numpy.asarray(src)
    return _replace(delta, key, box.replace_boxed(new) if boxed else new)


def load_source(spec: str, library: Optional[Union[str, PromptLibrary]] = None) -> np.ndarray:
    """A source prompt from a ``.npy`` file path or, with ``library``, an entry name."""
    if library is not None and not spec.endswith(".npy"):
        lib = library if isinstance(library, PromptLibrary) else PromptLibrary(library)
        return lib.load(spec)
    if not os.path.isfile(spec):
        raise LibraryError(f"source prompt file {spec!r} not found"
                           + ("" if library else " (to use a library entry, pass library=)"))
    return np.load(spec, allow_pickle=False)
