"""Frozen-base storage: dtype casts and weight-only int8 (the JAX counterpart of QLoRA's idea).

int8 keeps every dense kernel as ``kernel`` int8 ``[..., in, out]`` plus ``kernel_scale``
``[..., out]`` (float32): per output channel, ``scale = max|w| / 127`` over the input axis
and ``kernel = round(w / scale)``. :class:`peft_jax.models.layers.Dense` sees the scale and
computes ``(x @ kernel) * scale`` in the compute dtype, i.e. the dequantization happens
inside the matmul and the full-precision kernel never exists in memory. Embedding tables,
norms and biases keep the storage dtype. PEFT methods act on the Dense output as before
(LoRA, IA3, adapters, prompts, prefixes all work on an int8 base); ``full`` fine-tuning of an
int8 base is refused by the config check. :func:`dequantize` gives back float kernels
(merged export, HF export).

Storage sizes for ``d`` x ``d`` kernels: fp32 4 bytes per weight, bf16 2, int8 1 (+ 4 bytes
per output channel).
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


def quantize_kernel(w: Any) -> tuple[np.ndarray, np.ndarray]:
    """``w [..., in, out]`` -> (int8 ``[..., in, out]``, float32 scale ``[..., out]``)."""
    w = np.asarray(w, np.float32)
    scale = np.max(np.abs(w), axis=-2) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[..., None, :]), -127, 127).astype(np.int8)
    return q, scale


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


def quantize(base: Mapping) -> dict:
    """Every dense kernel of ``base`` (numpy) as int8 + ``kernel_scale``; the rest unchanged."""
    out = {}
    for path, a in traverse_util.flatten_dict(nn.meta.unbox(base)).items():
        if is_kernel(path):
            out[path], out[path[:-1] + (SCALE,)] = quantize_kernel(np.asarray(a))
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
            a = np.asarray(jax.device_get(a), np.float32) * np.asarray(
                jax.device_get(scale), np.float32)[..., None, :]
            a = a.astype(dtype)
        out[path] = a
    return traverse_util.unflatten_dict(out)


def is_quantized(base: Mapping) -> bool:
    return any(p[-1] == SCALE for p in traverse_util.flatten_dict(nn.meta.unbox(base)))


def abstract_quantized(boxed: Mapping) -> dict:
    """An abstract base (``jax.eval_shape`` of ``init``, logically boxed) as it will be stored
    int8: kernels int8, plus ``kernel_scale [..., out]`` boxed with the kernel's out axes."""
    out = {}
    flat = traverse_util.flatten_dict(boxed)  # boxes are leaves (not dicts)
    for path, leaf in flat.items():
        if not is_kernel(path):
            out[path] = leaf
            continue
        x = nn.meta.unbox(leaf)
        names = tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else (None,) * x.ndim
        out[path] = nn.LogicallyPartitioned(jax.ShapeDtypeStruct(x.shape, jnp.int8), names)
        out[path[:-1] + (SCALE,)] = nn.LogicallyPartitioned(
            jax.ShapeDtypeStruct(x.shape[:-2] + x.shape[-1:], jnp.float32), names[:-2] + names[-1:])
    return traverse_util.unflatten_dict(out)
