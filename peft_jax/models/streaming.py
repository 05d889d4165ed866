"""Streaming sharded load: each process reads only the checkpoint rows its devices hold.

:func:`load_sharded` builds the base directly as global ``jax.Array``s laid out by the
logical-axis rules table (``peft_jax.parallel.mesh``), without ever holding the whole
model on a host:

1. the abstract base comes from ``jax.eval_shape`` of the family model's ``init`` (shapes
   and logical axes only; int8 kernels and their scales with ``quantize='int8'``, stacked
   ``layers`` with ``scan_layers``), and its ``NamedSharding``s from the rules table;
2. the family's layout is checked against the checkpoint header (names, shapes, dtypes;
   unexpected tensors refused) before any byte is read;
3. leaf by leaf, each process asks ``sharding.addressable_devices_indices_map`` which
   slices its devices hold, reads only the rows of the HF tensor those slices need (one
   contiguous row range per tensor: ``hf_io.TensorSource.read(name, rows)``; GGUF tensors
   are dequantized and un-permuted per tensor), converts them (transpose of ``linear``
   weights, dtype cast or int8 quantization per output channel, one HF tensor per layer of
   a stacked leaf) into its devices' pieces and assembles the global array with
   ``jax.make_array_from_single_device_arrays``.

Host memory peaks at the process's own shards plus about one tensor (the rows being
converted). ``benchmarks/scale_load.py`` measures it (one process with 8 devices, two
``jax.distributed`` processes with 4 each).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding

from peft_jax.models import hf_io, quantize
from peft_jax.models.family import Family, fingerprint, sample_index
from peft_jax.models.hf_io import CheckpointError, TensorSource
from peft_jax.models.stack import STACKED
from peft_jax.parallel.mesh import DEFAULT_RULES, spec_for

_LAYER = re.compile(r"layer_(\d+)")


def abstract_base(family: Family, config: Any, quant: str = "none",
                  quant_group: int = quantize.DEFAULT_GROUP) -> dict:
    """The base as ``jax.eval_shape`` sees it, logically boxed (no array is allocated)."""
    dummy = {"input_ids": jnp.zeros((1, 1), jnp.int32), "attention_mask": jnp.ones((1, 1), jnp.int32)}
    boxed = jax.eval_shape(lambda: family.build(config).init(
        jax.random.PRNGKey(0), **family.init_inputs(dummy))["params"])
    return quantize.abstract_quantized(boxed, quant_group) if quant == "int8" else boxed


def checkpoint_dtype(family: Family, config: Any, source: TensorSource) -> np.dtype:
    """The storage dtype of a checkpoint: bfloat16 if most of its weights are, else float32
    (float16 checkpoints load as float32)."""
    rename = family.rename(config, source)
    names = [rename(hf) if rename else hf for _, hf, _, _ in family.layout(config)]
    dtypes = [source.info(n)[1] for n in names if n in source]
    bf16 = quantize.PARAM_DTYPES["bfloat16"]
    return bf16 if dtypes and sum(d == bf16 for d in dtypes) * 2 > len(dtypes) else np.dtype(np.float32)


def _plan(layout: list, leaves: dict) -> dict[tuple, list]:
    """Our leaf path -> its layout entries (one, or one per layer of a stacked leaf)."""
    plan: dict[tuple, list] = {}
    for entry in layout:
        path = tuple(entry[0])
        if path not in leaves:
            at = next((k for k, p in enumerate(path) if _LAYER.fullmatch(p)), None)
            stacked = None if at is None else path[:at] + (STACKED,) + path[at + 1:]
            if stacked not in leaves:
                raise CheckpointError(f"layout path {'/'.join(path)} has no leaf in the model")
            i = int(_LAYER.fullmatch(path[at])[1])
            plan.setdefault(stacked, {})[i] = entry
            continue
        plan[path] = entry
    return {p: ([e[i] for i in range(len(e))] if isinstance(e, dict) else [e]) for p, e in plan.items()}


@dataclasses.dataclass
class _Leaf:
    """One global array being assembled: its shape, sharding and per-device pieces."""

    shape: tuple
    sharding: NamedSharding
    dtype: np.dtype
    stacked: bool

    def __post_init__(self):
        self.index = self.sharding.addressable_devices_indices_map(self.shape)
        self.pieces: dict[tuple, np.ndarray] = {}
        for idx in self.index.values():
            key = _key(idx, self.shape)
            if key not in self.pieces:
                self.pieces[key] = np.empty([b - a for a, b in key], self.dtype)

    def rows(self, layer: Optional[int], axis: int) -> Optional[slice]:
        """The union of rows (of our ``axis``, per layer) that this process's pieces need."""
        spans = [k[axis + self.stacked] for k in self.pieces
                 if layer is None or k[0][0] <= layer < k[0][1]]
        return slice(min(a for a, _ in spans), max(b for _, b in spans)) if spans else None

    def fill(self, layer: Optional[int], arr: np.ndarray, axis: int, lo: int) -> None:
        """Copy ``arr`` (our layout, rows ``lo..`` of ``axis``) into the pieces it covers."""
        for key, piece in self.pieces.items():
            if layer is not None and not key[0][0] <= layer < key[0][1]:
                continue
            own = key[1:] if self.stacked else key
            src = tuple(slice(a - lo, b - lo) if d == axis else slice(a, b)
                        for d, (a, b) in enumerate(own))
            dst = (layer - key[0][0],) if self.stacked else ()
            piece[dst] = arr[src]

    def array(self) -> jax.Array:
        """The global array; each host piece is dropped as soon as its devices hold it, so
        a leaf is never twice in host memory (on CPU the device buffers are host memory)."""
        devices: dict[tuple, list] = {}
        for d, idx in self.index.items():
            devices.setdefault(_key(idx, self.shape), []).append(d)
        arrays = {}
        for key, ds in devices.items():
            piece = self.pieces.pop(key)
            for d in ds:
                arrays[d] = jax.block_until_ready(jax.device_put(piece, d))
            del piece
        return jax.make_array_from_single_device_arrays(
            self.shape, self.sharding, [arrays[d] for d in self.index])


def _key(idx: tuple, shape: tuple) -> tuple:
    return tuple(s.indices(n)[:2] for s, n in zip(idx, shape))


def source_fingerprint(family: Family, config: Any, source: TensorSource,
                       samples: int = 1024) -> str:
    """The base content hash (:func:`peft_jax.models.family.fingerprint`) of the per-layer
    float32 base this checkpoint loads to, from sampled elements only: equal to
    ``base_fingerprint`` of the in-memory load, whatever the storage dtype, int8 or
    ``scan_layers`` of this run (all processes compute it alone, without collectives)."""
    rename = family.rename(config, source)
    items = []
    for path, hf, kind, shape in family.layout(config):
        name = rename(hf) if rename else hf
        ours = np.unravel_index(sample_index(int(np.prod(shape)), samples), shape)
        hf_at = ours[::-1] if kind == "linear" else ours
        if source.cheap_rows:
            uniq, inv = np.unique(hf_at[0], return_inverse=True)
            rows = source.read_rows(name, uniq)
            values = rows[(inv.reshape(-1),) + tuple(hf_at[1:])]
        else:
            values = source.read(name)[hf_at]
        items.append(("/".join(path), np.float32, tuple(shape), np.asarray(values, np.float32)))
    return fingerprint(items, samples)


def load_sharded(family: Family, config: Any, source: TensorSource, mesh: Mesh, *,
                 rules: Sequence[tuple[str, Any]] = DEFAULT_RULES, param_dtype: Any = None,
                 quant: str = "none", quant_group: int = quantize.DEFAULT_GROUP) -> dict:
    """The base of ``config`` (``scan_layers``: stacked) as global arrays sharded on ``mesh``.

    ``param_dtype``: storage dtype (None: the checkpoint's, bf16 or fp32); ``quant='int8'``:
    dense kernels int8 + scales per ``quant_group`` input rows and output channel (see
    ``models/quantize.py``; a kernel's rows are read whole along its input axis to quantize it).
    """
    if quant not in quantize.QUANTIZE:
        raise ValueError(f"quantize={quant!r}; supported: {list(quantize.QUANTIZE)}")
    layout = family.layout(config)
    rename = family.rename(config, source)
    names = hf_io.check_layout(source, layout, rename, family.expected_extras(config, rename))
    family.check_tied(config, source, rename)
    dtype = np.dtype(param_dtype) if param_dtype is not None else checkpoint_dtype(
        family, config, source)

    boxed = traverse_util.flatten_dict(abstract_base(family, config, quant, quant_group))
    leaves = {p: nn.meta.unbox(b) for p, b in boxed.items()}
    axes = {p: tuple(b.names) if isinstance(b, nn.LogicallyPartitioned) else (None,) * b.ndim
            for p, b in boxed.items()}
    plan = _plan(layout, leaves)
    missing = sorted(set(leaves) - set(plan) - {p for p in leaves if p[-1] == quantize.SCALE})
    if missing:
        raise CheckpointError(f"{source.where}: no checkpoint tensor for leaf {'/'.join(missing[0])}")

    def make(path: tuple, leaf_dtype: Any, stacked: bool) -> _Leaf:
        shape = tuple(leaves[path].shape)
        return _Leaf(shape, NamedSharding(mesh, spec_for(axes[path], shape, mesh, rules)),
                     np.dtype(leaf_dtype), stacked)

    out: dict[tuple, jax.Array] = {}
    for path, entries in plan.items():
        stacked = STACKED in path
        q = quant == "int8" and quantize.is_kernel(path)
        leaf = make(path, np.int8 if q else dtype, stacked)
        scale = make(path[:-1] + (quantize.SCALE,), np.float32, stacked) if q else None
        for i, (entry_path, _, kind, _) in enumerate(entries):
            layer = i if stacked else None
            axis = len(leaf.shape) - stacked - 1 if kind == "linear" else 0  # our axis of HF rows
            rows = leaf.rows(layer, axis)
            if rows is None:
                continue
            if q and axis == len(leaf.shape) - stacked - 2:   # HF rows = our input axis: its
                rows = slice(0, leaf.shape[-2])               # groups need all of it
            arr = source.read(names[tuple(entry_path)], rows)   # HF rows lo..hi
            arr = arr.T if kind == "linear" else arr                 # a view: our layout
            if q:
                w, s = quantize.quantize_kernel(arr, quant_group)
                leaf.fill(layer, w, axis, rows.start)
                scale.fill(layer, s, axis, rows.start)   # scale [G, out]: the same out axis
            else:
                leaf.fill(layer, arr.astype(leaf.dtype, copy=False), axis, rows.start)
            del arr
        out[path] = leaf.array()
        if scale is not None:
            out[path[:-1] + (quantize.SCALE,)] = scale.array()
    return traverse_util.unflatten_dict(out)
