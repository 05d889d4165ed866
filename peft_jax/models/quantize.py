"""Frozen-base storage: dtype casts and weight-only int8 (the JAX counterpart of QLoRA's idea).

int8 keeps every dense kernel as ``kernel`` int8 ``[..., in, out]`` plus ``kernel_scale``
``[..., in / group, out]`` (float32): per group of ``group`` consecutive input rows and per
output channel, ``scale = max|w| / 127`` over the group and ``kernel = round(w / scale)``.
``group`` (``config.model.quantize_group``, default 64) is the largest divisor of the input
size that is <= the requested size; 0, or no divisor >= half of it, means one group (per
output channel: ``kernel_scale [..., 1, out]``). Groups matter: on SmolLM2-135M, per-channel
scales give a next-token KL of 0.0094 to fp32, groups of 64 0.0031
(``benchmarks/quant_quality.py``), since a few outlier weights set a whole row's step.
:class:`peft_jax.models.layers.Dense` dequantizes inside the step: one group computes
``(x @ kernel) * scale`` (the float kernel never exists), several groups expand one layer's
kernel to the compute dtype just before its matmul (transient, one kernel at a time). Embedding tables,
norms and biases keep the storage dtype. PEFT methods act on the Dense output as before
(LoRA, IA3, adapters, prompts, prefixes all work on an int8 base); ``full`` fine-tuning of an
int8 base is refused by the config check. :func:`dequantize` gives back float kernels
(merged export, HF export).

Storage sizes for ``d`` x ``d`` kernels: fp32 4 bytes per weight, bf16 2, int8 1 (+ 4 bytes
per group and output channel: 1.0625 bytes per weight with groups of 64).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

PARAM_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
QUANTIZE = ("none", "int8")
SCALE = "kernel_scale"
DEFAULT_GROUP = 64


def group_size(n_in: int, group: int = DEFAULT_GROUP) -> int:
    """Rows per quantization group for an input size ``n_in``: the largest divisor of ``n_in``
    that is <= ``group``; ``n_in`` (one group per output channel) when ``group`` is 0 or that
    divisor is below ``group / 2``."""
    if group <= 0 or group >= n_in:
        return n_in
    g = next(d for d in range(group, 0, -1) if n_in % d == 0)
    return g if 2 * g >= group else n_in


def quantize_kernel(w: Any, group: int = DEFAULT_GROUP) -> tuple[np.ndarray, np.ndarray]:
    """``w [..., in, out]`` -> (int8 ``[..., in, out]``, float32 scale ``[..., in / g, out]``)
    with ``g = group_size(in, group)``."""
    w = np.asarray(w, np.float32)
    n_in, n_out = w.shape[-2:]
    g = group_size(n_in, group)
    wg = w.reshape(w.shape[:-2] + (n_in // g, g, n_out))
    scale = np.max(np.abs(wg), axis=-2) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(wg / scale[..., None, :]), -127, 127).astype(np.int8)
    return q.reshape(w.shape), scale


def dequantize_kernel(q: Any, scale: Any, dtype: Any = np.float32, xp: Any = np) -> Any:
    """int8 ``q [..., in, out]`` and ``scale [..., G, out]`` -> ``[..., in, out]`` in ``dtype``
    (``xp``: numpy, or jax.numpy inside a step)."""
    *lead, n_in, n_out = q.shape
    G = scale.shape[-2]
    w = xp.reshape(xp.asarray(q, dtype), (*lead, G, n_in // G, n_out))
    return xp.reshape(w * xp.asarray(scale, dtype)[..., :, None, :], (*lead, n_in, n_out))


def is_kernel(path: tuple) -> bool:
    """Dense kernels are the leaves named ``kernel`` (every family's Dense layers)."""
    return path[-1] == "kernel"


def cast(base: Mapping, dtype: Any) -> dict:
    """Every floating leaf of ``base`` in ``dtype`` (int8 kernels and their scales as they are)."""
    dtype = np.dtype(dtype)

    def one(path, a):
        if np.dtype(a.dtype) == np.int8 or path[-1] == SCALE:
            return a
        return a.astype(dtype) if isinstance(a, np.ndarray) else jnp.asarray(a, dtype)

    flat = traverse_util.flatten_dict(nn.meta.unbox(base))
    return traverse_util.unflatten_dict({p: one(p, a) for p, a in flat.items()})


def quantize(base: Mapping, group: int = DEFAULT_GROUP) -> dict:
    """Every dense kernel of ``base`` (numpy) as int8 + ``kernel_scale``; the rest unchanged."""
    out = {}
    for path, a in traverse_util.flatten_dict(nn.meta.unbox(base)).items():
        if is_kernel(path):
            out[path], out[path[:-1] + (SCALE,)] = quantize_kernel(np.asarray(a), group)
        else:
            out[path] = a
    return traverse_util.unflatten_dict(out)


def dequantize(base: Mapping, dtype: Any = np.float32) -> dict:
    """int8 kernels back to ``dtype`` (``kernel * kernel_scale``); other leaves unchanged."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(base))
    out = {}
    for path, a in flat.items():
        if path[-1] == SCALE:
            continue
        scale = flat.get(path[:-1] + (SCALE,))
        if is_kernel(path) and scale is not None:
            a = dequantize_kernel(np.asarray(jax.device_get(a)), np.asarray(jax.device_get(scale)),
                                  np.float32).astype(dtype)
        out[path] = a
    return traverse_util.unflatten_dict(out)


def weight_count(base: Mapping) -> int:
    """Number of model weights in ``base`` (int8 scales are storage, not weights: the count
    is the same for fp32, bf16 and int8 storage)."""
    return sum(int(np.prod(np.shape(a))) for p, a in
               traverse_util.flatten_dict(nn.meta.unbox(base)).items() if p[-1] != SCALE)


def is_quantized(base: Mapping) -> bool:
    return any(p[-1] == SCALE for p in traverse_util.flatten_dict(nn.meta.unbox(base)))


def abstract_quantized(boxed: Mapping, group: int = DEFAULT_GROUP) -> dict:
    """An abstract base (``jax.eval_shape`` of ``init``, logically boxed) as it will be stored
    int8: kernels int8, plus ``kernel_scale [..., G, out]`` boxed with the kernel's leading and
    out axes (the group axis unsharded)."""
    out = {}
    flat = traverse_util.flatten_dict(boxed)  # boxes are leaves (not dicts)
    for path, leaf in flat.items():
        if not is_kernel(path):
            out[path] = leaf
            continue
        x = nn.meta.unbox(leaf)
        names = tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else (None,) * x.ndim
        out[path] = nn.LogicallyPartitioned(jax.ShapeDtypeStruct(x.shape, jnp.int8), names)
        n_groups = x.shape[-2] // group_size(x.shape[-2], group)
        out[path[:-1] + (SCALE,)] = nn.LogicallyPartitioned(
            jax.ShapeDtypeStruct(x.shape[:-2] + (n_groups,) + x.shape[-1:], jnp.float32),
            names[:-2] + (None,) + names[-1:])
    return traverse_util.unflatten_dict(out)
