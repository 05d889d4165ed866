"""Device meshes, the logical-axis rules table, and sharding of base, delta and batches.

One table (:data:`DEFAULT_RULES`) maps the logical axis names that every parameter carries
(see ``peft_jax.models.layers``), and that the models' activations are constrained to
(:func:`constrain`: ``batch, length, embed | heads, kv | mlp``), to mesh axes. Vocabulary
tables and LM logits are vocab-parallel: the table's rows are sharded over ``tensor`` x
``fsdp`` and logits ``[vocab_batch, length, vocab]`` keep their batch over ``data`` only,
so no device ever gathers the whole table (a 128k x 2k table is 1 GB in fp32). Base weights follow it (FSDP over ``embed``,
tensor parallel over ``mlp``/``joined_kv``/``vocab``); deltas are replicated by default
(they are small); batches are sharded over ``data`` (and ``fsdp``) on their leading axis.

A dimension that does not divide by its mesh axis size is replicated instead of failing,
so tiny test models run on any mesh.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

Array = Any

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or None = replicated). First match wins (flax convention).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab_batch", "data"),
    ("vocab", ("tensor", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("joined_kv", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("relpos_buckets", None),
    ("layers", None),
    ("prompt", None),
    ("prompt_embed", None),
    ("lora_rank", None),
    ("length", None),
)


def make_mesh(shape: Mapping[str, int] | Sequence[int] = (-1, 1, 1),
              axis_names: Sequence[str] = MESH_AXES,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A mesh with Auto axis types (jax.make_mesh defaults to Explicit now).

    ``shape``: sizes per axis (a dict by name or a sequence in ``axis_names`` order); one
    entry may be -1 (takes the remaining devices). Without -1 the mesh may use fewer
    devices than exist (the first ones).
    """
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(axis_names)
        if unknown:
            raise ValueError(f"mesh: unknown axis name(s) {sorted(unknown)}; allowed {list(axis_names)}")
        sizes = [int(shape.get(a, 1)) for a in axis_names]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != len(axis_names):
            raise ValueError(f"mesh: shape {tuple(sizes)} does not match axes {tuple(axis_names)}")
    devices = list(devices) if devices is not None else jax.devices()
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ValueError("mesh: at most one axis may be -1")
    if -1 in sizes:
        rest = int(np.prod([s for s in sizes if s != -1]))
        if n % rest:
            raise ValueError(f"mesh: {n} devices do not divide into {sizes}")
        sizes[sizes.index(-1)] = n // rest
    need = int(np.prod(sizes))
    if need > n:
        raise ValueError(f"mesh: shape {dict(zip(axis_names, sizes))} needs {need} devices, have {n}")
    devices = devices[:need]  # a smaller mesh (e.g. 1 device for a reference run) is allowed
    return jax.make_mesh(tuple(sizes), tuple(axis_names),
                         axis_types=(AxisType.Auto,) * len(axis_names), devices=devices)


def _mesh_axis_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    if isinstance(axis, (tuple, list)):
        return int(np.prod([mesh.shape[a] for a in axis]))
    return mesh.shape[axis]


def spec_for(logical_axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
    """PartitionSpec for one array from its logical axes, replicating non-divisible dims."""
    table = dict()
    for name, axis in rules:
        table.setdefault(name, axis)
    used: set = set()
    out = []
    for name, dim in zip(logical_axes, shape):
        axis = table.get(name) if name is not None else None
        if isinstance(axis, (tuple, list)):
            axis = tuple(a for a in axis if a in mesh.shape and a not in used) or None
            if axis is not None and len(axis) == 1:
                axis = axis[0]
        elif axis is not None and (axis not in mesh.shape or axis in used):
            axis = None
        if axis is not None and dim % _mesh_axis_size(mesh, axis):
            axis = None
        if axis is not None:
            used.update(axis if isinstance(axis, tuple) else (axis,))
        out.append(axis)
    return P(*out)


def logical_axes_tree(boxed_tree: Any) -> Any:
    """Tree of logical-axis tuples (None for unannotated leaves) from a boxed (abstract) tree."""
    def axes(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return tuple(x.names)
        return None
    return jax.tree.map(axes, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def shardings_for(tree: Any, mesh: Mesh, axes_tree: Any = None,
                  rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for ``tree`` (arrays or ShapeDtypeStructs).

    ``axes_tree``: matching tree of logical-axis tuples (from :func:`logical_axes_tree`);
    ``None`` (or a None leaf) means replicated.
    """
    if axes_tree is None:
        return jax.tree.map(lambda x: NamedSharding(mesh, P()), tree)

    def one(x, ax):
        if ax is None:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, spec_for(ax, x.shape, mesh, rules))

    return jax.tree.map(one, tree, axes_tree, is_leaf=lambda a: a is None)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a batch array: leading axis over ``data`` x ``fsdp``, rest replicated."""
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, Array]:
    """Host-local numpy batch -> global jax arrays sharded on the batch axis.

    Single-process: the host batch is the global batch. Multi-process: each process passes
    its own slice (``global_batch / process_count`` rows), as fed by the data pipeline.
    """
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        sh = batch_sharding(mesh, v.ndim)
        if jax.process_count() == 1:
            out[k] = jax.device_put(v, sh)
        else:
            out[k] = jax.make_array_from_process_local_data(sh, v)
    return out


def constrain(x: Array, logical_axes: Sequence[Optional[str]],
              rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Array:
    """Activation sharding constraint from logical axes (``("batch", "length", "embed")``)
    by the same rules table as the parameters, under the mesh of :func:`under_mesh` /
    ``jax.set_mesh``; the identity when no mesh is set (single-device code)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or len(logical_axes) != x.ndim:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(logical_axes, x.shape, mesh, rules))


class _UnderMesh:
    """A jitted function called (and lowered) with a mesh set; other attributes forward."""

    def __init__(self, fn: Any, mesh: Mesh):
        self._fn, self._mesh = fn, mesh

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self._mesh):
            return self._fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self._mesh):
            return self._fn.lower(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


def under_mesh(fn: Any, mesh: Optional[Mesh]) -> Any:
    """``fn`` called (and so traced) with ``mesh`` set, so that the models' activation
    constraints (:func:`constrain`) apply; ``mesh=None``: ``fn`` itself."""
    return fn if mesh is None else _UnderMesh(fn, mesh)


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, NamedSharding(mesh, P()))
