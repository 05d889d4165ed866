"""Layers shared by every model family (BERT/RoBERTa, T5, Llama-family).

Written once, with the PEFT slots (see ``slots.py``) built in: every dense layer goes
through ``Slots.dense``, every attention through ``Slots.attention_kv``. Family files
assemble these into blocks and call ``Slots.input_embeddings`` / ``Slots.sublayer``.

Conventions
- Kernels are ``[in, out]`` (HF ``nn.Linear.weight`` is ``[out, in]``: converters transpose).
- Every parameter carries logical axis names (``nn.with_logical_partitioning``) so that
  ``peft_jax.parallel`` can shard base weights with one rules table; activations are
  constrained by the same table (``parallel.mesh.constrain``: embeddings and every Dense
  output ``[batch, length, embed | joined_kv | mlp]``, attention heads ``[batch, length,
  heads, kv]``, LM logits ``[vocab_batch, length, vocab]``) whenever a mesh is set.
- Attention masks are additive biases ``[b, 1 | h, q, k]`` (0 = attend, large negative =
  masked), built with :func:`make_attention_bias`.
- Parameters are created in ``param_dtype`` (fp32); a loaded base may be stored in bf16 or
  with int8 dense kernels (``models/quantize.py``: ``Dense`` dequantizes inside the matmul);
  computation runs in ``dtype`` (fp32 or bf16); softmax and norms always in fp32.
- Dropout masks come from :func:`dropout_keep_mask`: ``impl='hash'`` (default) hashes the
  element's coordinates with two key words (one fused element-wise kernel, ~4x cheaper than
  threefry bits on CPU; an element's mask does not depend on the tensor's size, so padding
  a batch to a longer length leaves the real tokens' masks as they were), ``impl='jax'`` draws ``jax.random.bernoulli`` with the key's own
  PRNG (the masks of ``flax.linen.Dropout``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from peft_jax.models.quantize import dequantize_kernel
from peft_jax.models.slots import NO_SLOTS, Slots
from peft_jax.parallel.mesh import constrain

Array = Any
Dtype = Any

NEG_INF = -1e9  # finite, so fully masked rows give a uniform (not NaN) softmax

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: gelu_erf(x),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def gelu_erf(x: Array) -> Array:
    """Exact GELU ``x/2 * (1 + erf(x/sqrt(2)))`` (as torch / HF). Same function as
    ``jax.nn.gelu(approximate=False)``, which goes through ``erfc`` (an exp and two selects
    per element on CPU); ``erf`` is one rational polynomial."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


DROPOUT_IMPLS = ("hash", "jax")
DEFAULT_DROPOUT_IMPL = "hash"


def check_dropout_impl(impl: str, field: str = "dropout_impl") -> str:
    if impl not in DROPOUT_IMPLS:
        raise ValueError(f"unsupported {field}={impl!r}; supported: {list(DROPOUT_IMPLS)}")
    return impl


def _fmix32(x: Array) -> Array:
    """MurmurHash3's 32-bit finalizer (a bijection with full avalanche) on uint32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


# odd 32-bit multipliers of an element's coordinates, one per axis counted from the last
_AXIS_MULTIPLIERS = (0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F,
                     0x165667B1, 0xD3A2646D, 0xFD7046C5, 0xB55A4F09)


def coordinate_code(shape: Sequence[int]) -> Array:
    """uint32 ``shape``: ``sum_j c_j * M_j (mod 2**32)`` of each element's coordinates
    ``c_j`` (fixed odd ``M_j`` per axis, from the last). Unlike the flat index it does not
    depend on the axes' sizes: the elements of a tensor padded along any axis keep their
    codes. Rank <= 8."""
    if len(shape) > len(_AXIS_MULTIPLIERS):
        raise ValueError(f"coordinate_code: rank {len(shape)} > {len(_AXIS_MULTIPLIERS)}")
    code = jnp.zeros(tuple(shape), jnp.uint32)
    for j, axis in enumerate(reversed(range(len(shape)))):
        code = code + (jax.lax.broadcasted_iota(jnp.uint32, tuple(shape), axis)
                       * jnp.uint32(_AXIS_MULTIPLIERS[j]))
    return code


def hash_bits(rng: Array, shape: Sequence[int]) -> Array:
    """uint32 ``shape`` of pseudo-random bits: ``fmix32(fmix32(code ^ k0) ^ k1)`` of the
    element's :func:`coordinate_code` with two key words ``k0, k1`` drawn from ``rng``.

    Counter-based like threefry (no state, any shape, reproducible per key and element
    coordinates, also when the tensor is padded) but only ~12 integer ops per element (+2
    per axis), fused into the consumer: meant for dropout masks, not for statistics that
    need a cryptographic-strength generator. Codes wrap at 2**32.
    """
    k = jax.random.bits(rng, (2,), jnp.uint32)
    return _fmix32(_fmix32(coordinate_code(shape) ^ k[0]) ^ k[1])


def dropout_keep_mask(rng: Array, rate: float, shape: Sequence[int],
                      impl: str = DEFAULT_DROPOUT_IMPL) -> Array:
    """bool ``shape``, True with probability ``1 - rate`` (``impl``: 'hash' | 'jax')."""
    if impl == "hash":
        threshold = min(int(round(float(rate) * 2.0 ** 32)), 2 ** 32 - 1)
        return hash_bits(rng, shape) >= jnp.uint32(threshold)
    check_dropout_impl(impl)
    return jax.random.bernoulli(rng, 1.0 - rate, tuple(shape))


def matmul(x: Array, w: Array) -> Array:
    """``x [..., in] @ w [in, out]`` -> ``[..., out]``, computed as one 2-D matmul
    ``[rows, in] @ [in, out]``. Same values as ``jnp.dot``; on XLA:CPU the backward of the
    3-D form transposes its operands into copies (and recomputes the elementwise ops
    feeding them) before the weight-gradient dot, the 2-D form does not
    (``benchmarks/matmul_layout.py``)."""
    return jnp.dot(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


def apply_dropout(x: Array, rate: float, rng: Array, impl: str = DEFAULT_DROPOUT_IMPL) -> Array:
    """Inverted dropout: zero each element with probability ``rate``, scale the rest by
    ``1 / (1 - rate)``. x ``[...]`` -> same shape and dtype."""
    if rate == 0.0:
        return x
    keep = dropout_keep_mask(rng, rate, x.shape, impl)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """``flax.linen.Dropout`` with a choice of mask generator (:func:`dropout_keep_mask`);
    draws from the ``dropout`` rng collection. ``impl='jax'`` gives flax's exact masks."""

    rate: float
    impl: str = DEFAULT_DROPOUT_IMPL

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        return apply_dropout(x, self.rate, self.make_rng("dropout"), self.impl)


def get_activation(name: str, field: str = "activation") -> Callable[[Array], Array]:
    """Look up an activation by its Hugging Face name; unknown names are a clear error."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported {field}={name!r}; supported: {sorted(ACTIVATIONS)}") from None


def _init(init: Callable, axes: Sequence[Optional[str]]):
    return nn.with_logical_partitioning(init, tuple(axes))


def _batch_axis(feature_axis: Optional[str]) -> str:
    """Logical batch axis of an activation: LM logits are vocab-parallel (``vocab_batch``:
    their batch is not split over the devices that hold vocabulary rows)."""
    return "vocab_batch" if feature_axis == "vocab" else "batch"


class Dense(nn.Module):
    """``y = x @ kernel + bias`` with a PEFT ``dense`` slot.

    x: ``[..., in]`` -> ``[..., features]``. ``axes`` names the kernel's (in, out) axes.
    """

    features: int
    use_bias: bool = True
    axes: tuple[Optional[str], Optional[str]] = ("embed", "mlp")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)
    slots: Slots = NO_SLOTS

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        kernel = self.param("kernel", _init(self.kernel_init, self.axes),
                            (x.shape[-1], self.features), self.param_dtype)
        bias = (self.param("bias", _init(nn.initializers.zeros, self.axes[1:]),
                           (self.features,), self.param_dtype) if self.use_bias else None)
        # an int8 base (models/quantize.py): kernel int8 [in, out], kernel_scale [G, out]
        scale = (self.get_variable("params", "kernel_scale")
                 if self.has_variable("params", "kernel_scale") else None)
        grouped = scale is not None and scale.shape[-2] > 1

        def base_fn(inp: Array) -> Array:
            w = (dequantize_kernel(kernel, scale, self.dtype, jnp) if grouped
                 else jnp.asarray(kernel, self.dtype))
            y = matmul(inp.astype(self.dtype), w)
            if scale is not None and not grouped:     # one group: scale the output
                y = y * jnp.asarray(scale[0], self.dtype)
            if bias is not None:
                y = y + jnp.asarray(bias, self.dtype)
            return y

        y = base_fn(x) if not self.slots else self.slots.dense(self, x, base_fn, deterministic)
        return constrain(y, (_batch_axis(self.axes[1]), "length", self.axes[1])) if y.ndim == 3 else y


class Embed(nn.Module):
    """Token embedding table ``[vocab, d]``; ``attend`` gives tied LM logits."""

    num_embeddings: int
    features: int
    axes: tuple[Optional[str], Optional[str]] = ("vocab", "embed")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    embedding_init: Callable = nn.initializers.normal(0.02)

    def setup(self):
        self.embedding = self.param("embedding", _init(self.embedding_init, self.axes),
                                    (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids: Array) -> Array:
        """ids ``[b, l]`` int -> ``[b, l, d]``."""
        return constrain(jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0),
                         ("batch", "length", self.axes[1]))

    def attend(self, x: Array) -> Array:
        """``[b, l, d]`` -> logits ``[b, l, vocab]`` against the (tied) table."""
        y = jnp.dot(x.astype(self.dtype), jnp.asarray(self.embedding, self.dtype).T)
        return constrain(y, (_batch_axis(self.axes[0]), "length", self.axes[0]))


class LayerNorm(nn.Module):
    """LayerNorm (``rms=False``; BERT) or RMSNorm (``rms=True``; T5, Llama), fp32 inside."""

    eps: float = 1e-12
    rms: bool = False
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", _init(nn.initializers.ones, ("embed",)), (d,), self.param_dtype)
        xf = x.astype(jnp.float32)
        if self.rms:
            y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
            # T5/Llama cast back to the compute dtype before scaling.
            return jnp.asarray(scale, self.dtype) * y.astype(self.dtype)
        bias = None
        if self.use_bias:
            bias = jnp.asarray(self.param("bias", _init(nn.initializers.zeros, ("embed",)), (d,),
                                          self.param_dtype), jnp.float32)
        y = layer_norm(xf, jnp.asarray(scale, jnp.float32), bias, self.eps)
        return y.astype(self.dtype)


def layer_norm_autodiff(x: Array, scale: Array, bias: Optional[Array], eps: float) -> Array:
    """LayerNorm over the last axis (two-pass mean/var), differentiated by JAX."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps) * scale
    return y if bias is None else y + bias


def _ln_fwd_parts(x, scale, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(var + eps)
    return (x - mean) * rstd, rstd


def _fence(tree: Any, rstd: Array) -> Any:
    """``tree`` through a ``lax.cond``: a fusion boundary that XLA keeps (it drops
    ``optimization_barrier`` before fusion on CPU). The predicate is false only when the first
    row's ``rstd`` is NaN; that branch adds the NaN to ``tree``'s first leaf (any NaN input row
    makes the loss NaN either way)."""
    r0 = rstd.reshape(-1)[0]
    return jax.lax.cond(r0 >= 0, lambda t: t,
                        lambda t: jax.tree_util.tree_map(lambda a: a + r0.astype(a.dtype), t),
                        tree)


def _make_layer_norm_vjp(fence: str):
    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def ln(x, scale, bias, eps):
        xhat, _ = _ln_fwd_parts(x, scale, eps)
        y = xhat * scale
        return y if bias is None else y + bias

    def fwd(x, scale, bias, eps):
        xhat, rstd = _ln_fwd_parts(x, scale, eps)
        if fence in ("res", "both"):
            xhat, rstd = _fence((xhat, rstd), rstd)
        y = xhat * scale
        return (y if bias is None else y + bias), (xhat, rstd, scale, bias)

    def bwd(eps, res, dy):
        xhat, rstd, scale, bias = res
        g = dy * scale
        dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True)
                     - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
        if fence in ("dx", "both"):
            dx = _fence(dx, rstd)
        rows = tuple(range(dy.ndim - 1))
        dscale = jnp.sum(dy * xhat, axis=rows)
        dbias = None if bias is None else jnp.sum(dy, axis=rows)
        return dx, dscale, dbias

    ln.defvjp(fwd, bwd)
    return ln


LN_FENCES = ("none", "res", "dx", "both")
_LN_VJPS = {f: _make_layer_norm_vjp(f) for f in LN_FENCES}


def default_ln_fence() -> str:
    """``"dx"`` on the CPU backend (where it pays: see :func:`layer_norm`), else ``"none"``
    (a ``lax.cond`` whose predicate reads one element would be a sync point on sharded
    activations, for a fusion problem seen only on XLA:CPU)."""
    return "dx" if jax.default_backend() == "cpu" else "none"


def layer_norm(x: Array, scale: Array, bias: Optional[Array], eps: float,
               fence: Optional[str] = None) -> Array:
    """LayerNorm over the last axis, ``x [..., d]`` fp32, with a hand-written backward:
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``, ``g = dy * scale``; ``dscale =
    sum dy * xhat``, ``dbias = sum dy`` over the rows. Same forward ops as
    :func:`layer_norm_autodiff`, so the same outputs.

    ``fence`` (default :func:`default_ln_fence`): where a ``lax.cond`` fusion fence goes
    (:func:`_fence`; ``none`` / ``res`` / ``dx`` / ``both``). Without the ``dx`` fence
    XLA:CPU duplicates element-wise producers into every consumer along the residual stream:
    the fusion that makes one layer's ``dx`` recomputes the forward ``xhat`` chains and the
    later layers' ``dx`` from the matmul outputs (fusions of 300-500 ops and ~120 operands
    per layer with a frozen base, quadratic in depth). ~1.2x per LoRA / adapter step on
    all-MiniLM-L6-v2 (``benchmarks/layernorm_vjp.py``)."""
    return _LN_VJPS[fence or default_ln_fence()](x, scale, bias, float(eps))


def rotate_half(x: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """RoPE in the Hugging Face (rotate-half) layout.

    x ``[b, l, h, dh]``; cos, sin ``[b, l, dh]`` -> ``[b, l, h, dh]``.
    """
    cos = cos[:, :, None, :].astype(jnp.float32)
    sin = sin[:, :, None, :].astype(jnp.float32)
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def make_attention_bias(key_mask: Optional[Array], q_len: int, causal: bool = False,
                        query_offset: Optional[Array] = None, dtype: Dtype = jnp.float32
                        ) -> Optional[Array]:
    """Additive attention bias ``[b, 1, q, k]`` from a key padding mask ``[b, k]`` (1 = real).

    ``causal``: query i (at absolute position ``query_offset + i``) sees keys ``<=`` it.
    ``query_offset``: ``[b]`` or scalar; default ``k - q`` (queries are the last ``q``
    positions, as with a KV cache).
    """
    if key_mask is None and not causal:
        return None
    bias = None
    if key_mask is not None:
        bias = jnp.where(key_mask[:, None, None, :] > 0, 0.0, NEG_INF).astype(dtype)
    if causal:
        k_len = key_mask.shape[-1] if key_mask is not None else q_len
        off = (k_len - q_len) if query_offset is None else query_offset
        off = jnp.reshape(jnp.asarray(off), (-1, 1, 1, 1))
        qpos = jnp.arange(q_len)[None, None, :, None] + off
        kpos = jnp.arange(k_len)[None, None, None, :]
        c = jnp.where(kpos <= qpos, 0.0, NEG_INF).astype(dtype)
        bias = c if bias is None else jnp.minimum(bias, c)
    return bias


class Attention(nn.Module):
    """Multi-head / grouped-query attention with PEFT slots and an optional KV cache.

    Parameters: ``query``, ``key``, ``value`` ``[d_model, heads * head_dim]`` and
    ``out`` ``[heads * head_dim, d_model]`` (all :class:`Dense`, so LoRA/IA3 can target
    them by path). ``num_kv_heads < num_heads`` gives GQA.

    ``decode=True`` keeps ``cached_key/cached_value [b, max_len, h_kv, dh]`` and
    ``cache_index`` in the ``cache`` collection (initialize by running the model once on
    a ``[b, max_len]`` dummy with ``decode=True``); the caller's ``bias`` then covers all
    ``max_len`` keys.
    """

    num_heads: int
    head_dim: int
    num_kv_heads: Optional[int] = None
    qkv_bias: bool = True
    out_bias: bool = True
    scale: Optional[float] = None  # None: 1/sqrt(head_dim); T5 uses 1.0
    dropout_rate: float = 0.0
    dropout_impl: str = DEFAULT_DROPOUT_IMPL
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)
    slots: Slots = NO_SLOTS

    def _dense(self, features, name, use_bias, axes):
        return Dense(features, use_bias=use_bias, axes=axes, dtype=self.dtype,
                     param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                     slots=self.slots, name=name)

    @nn.compact
    def __call__(self, x: Array, kv_input: Optional[Array] = None, bias: Optional[Array] = None,
                 position_bias: Optional[Array] = None, rotary: Optional[tuple[Array, Array]] = None,
                 decode: bool = False, deterministic: bool = True) -> Array:
        """x ``[b, q, d]``; kv_input ``[b, k, d]`` (cross attention) or None (self).

        bias: additive ``[b, 1|h, q, k]``; position_bias: additive ``[1|b, h, q, k]`` (T5);
        rotary: ``(cos, sin)`` ``[b, q, dh]`` applied to queries and keys (self attention).
        Returns ``[b, q, d_model]``.
        """
        b, q_len, d_model = x.shape
        h, dh = self.num_heads, self.head_dim
        h_kv = self.num_kv_heads or h
        kv_in = x if kv_input is None else kv_input
        qs = self._dense(h * dh, "query", self.qkv_bias, ("embed", "joined_kv"))(x, deterministic)
        ks = self._dense(h_kv * dh, "key", self.qkv_bias, ("embed", "joined_kv"))(kv_in, deterministic)
        vs = self._dense(h_kv * dh, "value", self.qkv_bias, ("embed", "joined_kv"))(kv_in, deterministic)
        heads = ("batch", "length", "heads", "kv")
        qs = constrain(qs.reshape(b, q_len, h, dh), heads)
        ks = constrain(ks.reshape(b, ks.shape[1], h_kv, dh), heads)
        vs = constrain(vs.reshape(b, vs.shape[1], h_kv, dh), heads)
        if rotary is not None:
            cos, sin = rotary
            qs = apply_rotary(qs, cos, sin)
            ks = apply_rotary(ks, cos, sin)

        if decode:
            ks, vs = self._update_cache(ks, vs)

        n_prefix = 0
        if self.slots:
            ks, vs, n_prefix = self.slots.attention_kv(self, ks, vs, deterministic)
        if position_bias is not None and position_bias.shape[-1] > ks.shape[1]:
            # Bias computed for more keys than this layer has (T5: for a static prefix
            # length this layer did not receive): the keys present are the last ones.
            position_bias = position_bias[..., position_bias.shape[-1] - ks.shape[1]:]
        if n_prefix:
            pad = [(0, 0)] * 3 + [(n_prefix, 0)]
            if bias is not None:
                bias = jnp.pad(bias, pad)
            if position_bias is not None and position_bias.shape[-1] != ks.shape[1]:
                position_bias = jnp.pad(position_bias, pad)

        out = dot_product_attention(qs, ks, vs, bias=bias, position_bias=position_bias,
                                    scale=self.scale if self.scale is not None else 1.0 / math.sqrt(dh),
                                    dropout_rate=self.dropout_rate, deterministic=deterministic,
                                    dropout_rng=(None if deterministic or self.dropout_rate == 0.0
                                                 else self.make_rng("dropout")),
                                    dtype=self.dtype, dropout_impl=self.dropout_impl)
        out = out.reshape(b, q_len, h * dh)
        return self._dense(d_model, "out", self.out_bias, ("joined_kv", "embed"))(out, deterministic)

    def _update_cache(self, k: Array, v: Array) -> tuple[Array, Array]:
        initialized = self.has_variable("cache", "cached_key")
        ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        idx = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:
            return k, v
        i = idx.value
        ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, i, 0, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, i, 0, 0))
        idx.value = i + k.shape[1]
        return ck.value, cv.value


def dot_product_attention(q: Array, k: Array, v: Array, bias: Optional[Array] = None,
                          position_bias: Optional[Array] = None, scale: float = 1.0,
                          dropout_rate: float = 0.0, deterministic: bool = True,
                          dropout_rng: Optional[Array] = None, dtype: Dtype = jnp.float32,
                          dropout_impl: str = DEFAULT_DROPOUT_IMPL) -> Array:
    """Softmax attention with GQA.

    q ``[b, q, h, dh]``; k, v ``[b, k, h_kv, dh]`` (``h % h_kv == 0``);
    bias ``[b, 1|h, q, k]``; position_bias ``[1|b, h, q, k]`` -> ``[b, q, h, dh]``.
    Multi-head attention (``h_kv == h``) uses plain 4-D contractions; GQA groups the
    ``h // h_kv`` query heads of each key/value head (no repeated keys/values).
    """
    b, q_len, h, dh = q.shape
    k_len, h_kv = k.shape[1], k.shape[2]
    g = h // h_kv
    if g == 1:
        logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dtype), k.astype(dtype))
    else:
        qg = q.reshape(b, q_len, h_kv, g, dh)
        logits = jnp.einsum("bqkgd,bskd->bkgqs", qg.astype(dtype), k.astype(dtype))
        logits = logits.reshape(b, h, q_len, k_len)
    logits = logits.astype(jnp.float32) * scale
    if position_bias is not None:
        logits = logits + position_bias.astype(jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    if not deterministic and dropout_rate > 0.0:
        probs = apply_dropout(probs, dropout_rate, dropout_rng, dropout_impl)
    probs = probs.astype(dtype)
    if g == 1:
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(dtype))
    probs = probs.reshape(b, h_kv, g, q_len, k_len)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(dtype))
    return out.reshape(b, q_len, h, dh)


class Mlp(nn.Module):
    """Feed-forward block: ``down(act(up(x)))`` or gated ``down(act(gate(x)) * up(x))``.

    x ``[b, l, d]`` -> ``[b, l, d]``; Dense names ``up``, ``gate``, ``down``.
    """

    d_ff: int
    activation: str = "gelu"
    gated: bool = False
    use_bias: bool = True
    dropout_rate: float = 0.0  # applied to the activation (T5); BERT applies it after `down`
    dropout_impl: str = DEFAULT_DROPOUT_IMPL
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)
    slots: Slots = NO_SLOTS

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        act = get_activation(self.activation)
        d = x.shape[-1]
        mk = lambda f, n, axes: Dense(f, use_bias=self.use_bias, axes=axes, dtype=self.dtype,
                                      param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                                      slots=self.slots, name=n)
        if self.gated:
            hdn = act(mk(self.d_ff, "gate", ("embed", "mlp"))(x, deterministic)) \
                * mk(self.d_ff, "up", ("embed", "mlp"))(x, deterministic)
        else:
            hdn = act(mk(self.d_ff, "up", ("embed", "mlp"))(x, deterministic))
        hdn = Dropout(self.dropout_rate, self.dropout_impl)(hdn, deterministic=deterministic)
        return mk(d, "down", ("mlp", "embed"))(hdn, deterministic)
