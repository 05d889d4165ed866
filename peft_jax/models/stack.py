"""Stacks of identical blocks: a Python loop over ``layer_{i}`` or one ``nn.scan``.

Every family config carries :class:`ModelOptions` (options that are not in Hugging Face
``config.json``): the dropout mask generator, the remat policy of the blocks and
``scan_layers``. :func:`run_layers` runs a family's blocks either way:

- unscanned: blocks ``layer_0 .. layer_{n-1}``, traced (and compiled) once per layer;
- scanned (``scan_layers=True``): one block ``layers`` under ``nn.scan``, traced once, whose
  parameters are stacked on a leading axis of size n (logical axis ``"layers"``), so compile
  time does not grow with depth.

Parameter and delta trees convert at the boundary, so that checkpoints, delta files and HF
exports are the same either way:

- the frozen base is stored stacked in memory (``decoder/layers/attention/query/kernel
  [n, d, d]``): :func:`stack_layers` / :func:`unstack_layers` convert it (the loaders build
  it stacked directly; HF export unstacks);
- the delta (``peft`` collection) is created in its per-layer form and the model takes it
  in either form: :func:`per_layer_delta` wraps a family's stack module in
  ``nn.map_variables``, which stacks ``layer_{i}`` delta leaves on the way in (a stacked
  delta passes unchanged) and unstacks new ones on the way out (init);
- training keeps the delta stacked: the train state (``train.builder``) holds the trainable
  tree, its optimizer state and the method-owned frozen leaves in stacked form, so that the
  jitted step has one leaf per stacked tensor, not one per layer (per-layer optimizer
  updates, health checks and stack / unstack would grow the step with depth). Delta files
  and exports convert back (``runner.run.delta_tree``): a delta trained scanned is
  bit-identical in layout to one trained unscanned. Checkpoints hold the train state as it
  is (stacked); their metadata records ``scan_layers``, which a resume must match.

Leaves that only some layers have (T5's relative position bias, in ``layer_0``) stay under
``layer_{i}``: :func:`stack_layers` stacks what every layer has in common. PEFT methods that
select layers by path (``layer_3/...``) cannot be scanned (the scanned block's path is
``.../layers/...`` for every layer); methods matching by module name work unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from peft_jax.models.layers import DEFAULT_DROPOUT_IMPL, check_dropout_impl

REMAT_POLICIES = ("none", "full", "dots")
STACKED = "layers"
_LAYER = re.compile(r"layer_(\d+)")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Options every family config has besides its HF fields (validated on construction).

    ``dropout_impl``: dropout masks, 'hash' | 'jax' (``layers.Dropout``); ``remat``:
    recompute blocks in the backward, 'none' | 'full' | 'dots'; ``scan_layers``: one
    ``nn.scan`` over the blocks instead of a Python loop.
    """

    dropout_impl: str = DEFAULT_DROPOUT_IMPL
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        check_dropout_impl(self.dropout_impl)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unsupported remat={self.remat!r}; supported: {list(REMAT_POLICIES)}")


def remat_block(cls: type, remat: str, static_argnums: tuple[int, ...]) -> type:
    """``cls`` (a block module) rematerialized in the backward pass: ``'none'`` (as is),
    ``'full'`` (keep only the block inputs) or ``'dots'`` (keep matmul outputs without batch
    dims, recompute element-wise ops). Parameter names and values are unchanged.
    ``static_argnums``: positions of Python-valued call arguments (``self`` is 0)."""
    if remat == "none":
        return cls
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unsupported remat={remat!r}; supported: {list(REMAT_POLICIES)}")
    policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots"
              else None)
    return nn.remat(cls, policy=policy, static_argnums=static_argnums)


def run_layers(block: type, kwargs: Mapping[str, Any], n: int, x: Any, args: tuple = (),
               static: tuple = (), *, remat: str = "none", scan: bool = False,
               keep: bool = True) -> tuple[Any, tuple]:
    """Run ``n`` blocks ``block(**kwargs)``, each called as ``blk(x, *args, *static) -> x``.

    ``args``: arrays (or None) shared by every layer; ``static``: Python values (flags).
    Returns (the last output ``[b, l, d]``, every layer's output when ``keep``, else ()).
    Must be called from inside a compact method (the blocks are its children).
    """
    static_argnums = tuple(range(2 + len(args), 2 + len(args) + len(static)))
    cls = remat_block(block, remat, static_argnums)
    if not scan:
        outs = []
        for i in range(n):
            x = cls(**kwargs, name=f"layer_{i}")(x, *args, *static)
            outs.append(x)
        return x, tuple(outs) if keep else ()

    def body(mdl, carry, *a):
        y = mdl(carry, *a, *static)
        return y, (y if keep else None)

    scanned = nn.scan(body, variable_axes={"params": 0, "peft": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * len(args), length=n,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    x, ys = scanned(cls(**kwargs, name=STACKED), x, *args)
    return x, tuple(ys[i] for i in range(n)) if keep else ()


# ----------------------------------------------------------------------------- trees


def _stack(leaves: list) -> Any:
    if all(isinstance(a, np.ndarray) for a in leaves):
        return np.stack(leaves)
    return jnp.stack([jnp.asarray(a) for a in leaves])


def stack_layers(tree: Any) -> Any:
    """Per-layer form -> stacked form: wherever a dict has children ``layer_{i}``
    (i = 0..n-1), the leaves they all have move to ``layers`` stacked on a new leading axis;
    leaves only some layers have stay where they are. Other children recurse. A tree
    already stacked is returned as is (the same structure and leaves)."""
    if not isinstance(tree, Mapping):
        return tree
    if STACKED in tree:   # already stacked: ``layer_{i}`` hold what only some layers have
        return {k: stack_layers(v) if k == STACKED else v for k, v in tree.items()}
    layers = {int(m[1]): k for k in tree if (m := _LAYER.fullmatch(k))}
    out = {k: stack_layers(v) for k, v in tree.items() if k not in layers.values()}
    if not layers:
        return out
    n = len(layers)
    if sorted(layers) != list(range(n)):
        raise ValueError(f"stack_layers: layers {sorted(layers)} are not 0..{n - 1}")
    flats = [traverse_util.flatten_dict(nn.meta.unbox(tree[layers[i]])) for i in range(n)]
    common = [p for p in flats[0] if all(p in f for f in flats[1:])]
    out[STACKED] = traverse_util.unflatten_dict({p: _stack([f[p] for f in flats]) for p in common})
    for i, f in enumerate(flats):
        rest = {p: v for p, v in f.items() if p not in set(common)}
        if rest:
            out[layers[i]] = traverse_util.unflatten_dict(rest)
    if not out[STACKED]:
        del out[STACKED]
    return out


def unstack_layers(tree: Any) -> Any:
    """Stacked form -> per-layer form (inverse of :func:`stack_layers`)."""
    if not isinstance(tree, Mapping):
        return tree
    out = {k: unstack_layers(v) for k, v in tree.items() if k != STACKED}
    if STACKED not in tree:
        return out
    flat = traverse_util.flatten_dict(nn.meta.unbox(tree[STACKED]))
    n = int(next(iter(flat.values())).shape[0]) if flat else 0
    for i in range(n):
        name = f"layer_{i}"
        layer = traverse_util.flatten_dict(out.get(name, {}))
        layer.update({p: v[i] for p, v in flat.items()})
        out[name] = traverse_util.unflatten_dict(layer)
    return out


def leaf_shape(tree: Mapping, path: str) -> tuple[int, ...]:
    """Shape of the leaf at the per-layer ``path`` (``'decoder/layer_3/mlp/up/kernel'``) of
    ``tree`` in either form (stacked: the ``layers`` leaf's shape without its layer axis).
    ``KeyError`` naming ``path`` when neither form has it."""
    for keys, lead in ((path.split("/"), 0), (_LAYER.sub(STACKED, path, count=1).split("/"), 1)):
        node: Any = tree
        for k in keys:
            node = node.get(k) if isinstance(node, Mapping) else None
        if node is not None:
            return tuple(np.shape(nn.meta.unbox(node)))[lead:]
    raise KeyError(path)


def is_scanned(model: Any) -> bool:
    """Whether ``model`` (a family module) runs its blocks under ``nn.scan``."""
    return bool(getattr(getattr(model, "config", None), "scan_layers", False))


def per_layer_delta(stack_cls: type) -> type:
    """``stack_cls`` (a module that runs :func:`run_layers` scanned) seen from outside with
    its ``peft`` collection in per-layer form (``layer_{i}/...``) or already stacked; see the
    module docstring."""
    def each(fn: Callable) -> Callable:
        return lambda cols: {k: fn(v) for k, v in cols.items()}

    return nn.map_variables(stack_cls, "peft", trans_in_fn=each(stack_layers),
                            trans_out_fn=each(unstack_layers), init=True, mutable=True)
