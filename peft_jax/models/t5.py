"""T5 encoder-decoder: v1.0 (ReLU FFN, tied + rescaled LM head) and v1.1 / LM-adapted
(gated-GELU FFN, untied ``lm_head``, no rescale), plus encoder-only (``T5EncoderModel``).

Module tree (the base pytree mirrors it; :func:`hf_module_name` maps it to HF names)::

    shared                                               (token table, used by both stacks)
    encoder/layer_{i}/{attention_norm, attention/{query,key,value,out}, mlp_norm,
                       mlp/{up | gate,up ; down}}
    encoder/layer_0/relative_attention_bias              ([buckets, heads], layer 0 only)
    encoder/final_norm
    decoder/layer_{i}/{attention_norm, attention, cross_attention_norm, cross_attention,
                       mlp_norm, mlp}
    decoder/layer_0/relative_attention_bias, decoder/final_norm
    lm_head                                              (untied checkpoints only)

As in Hugging Face, the relative position bias ``[1, heads, q, k]`` is computed once per
stack by its first layer (bidirectional buckets in the encoder, causal ones in the decoder)
and shared by every layer; cross attention has no position bias.

PEFT slots: ``input_embeddings`` on the ENCODER side only (prompt tuning as in Lester et
al.; the encoder mask is extended with the inserts), called by :meth:`T5Model.encode` so
that soft-prompt parameters sit at the root of the delta. ``sublayer`` with kinds
``"attention"``, ``"cross_attention"`` and ``"ffn"`` after each sublayer's dropout, before
the residual add. Key/value prefixes (``attention_kv``): when the methods expose a static
``kv_prefix_length`` P, the self-attention position bias is computed for ``P + L`` keys
with queries taking the last ``L`` positions, which is what HF T5 computes when the
prefixes arrive as ``past_key_values`` (HF PEFT prefix tuning). An attention layer that
receives no prefix uses the last ``L`` key columns of that bias, i.e. the ordinary bias.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.models import hf_io
from peft_jax.models.family import Family, register
from peft_jax.models.generation import greedy_loop
from peft_jax.models.hf_io import CheckpointError
from peft_jax.models.layers import (Attention, Dense, Dropout, Embed, LayerNorm, Mlp,
                                    get_activation, make_attention_bias)
from peft_jax.models.slots import NO_SLOTS, Slots
from peft_jax.models.stack import ModelOptions, per_layer_delta, run_layers

Array = Any
Dtype = Any


# ----------------------------------------------------------------------------- config


def parse_feed_forward_proj(value: str, field: str = "feed_forward_proj") -> tuple[str, bool]:
    """``'relu'`` / ``'gated-gelu'`` / ``'gated-silu'`` ... -> (dense_act_fn, is_gated_act).

    Exactly transformers' rule: the last ``-`` part is the activation, a leading
    ``gated`` makes the FFN gated, and ``gated-gelu`` means ``gelu_new`` (tanh GELU).
    """
    parts = str(value).split("-")
    if (len(parts) > 1 and parts[0] != "gated") or len(parts) > 2:
        raise ValueError(f"unsupported {field}={value!r}: must be '{{ACT_FN}}' or "
                         "'gated-{ACT_FN}', e.g. 'relu' or 'gated-gelu'")
    act = "gelu_new" if value == "gated-gelu" else parts[-1]
    get_activation(act, field)
    return act, parts[0] == "gated"


@dataclasses.dataclass(frozen=True)
class T5Config(ModelOptions):
    """Hyper-parameters of a T5 model (validated on construction).

    ``dense_act_fn`` / ``is_gated_act`` default (None) to what ``feed_forward_proj`` implies.
    ``tie_word_embeddings``: LM logits from the ``shared`` table (v1.0) instead of a separate
    ``lm_head`` (v1.1). ``scale_decoder_outputs``: multiply the decoder output by
    ``d_model ** -0.5`` before the head (v1.0). ``encoder_only``: no decoder / head
    (``T5EncoderModel`` checkpoints).
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    dense_act_fn: Optional[str] = None
    is_gated_act: Optional[bool] = None
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True
    pad_token_id: int = 0
    eos_token_id: Optional[int] = 1
    decoder_start_token_id: int = 0
    encoder_only: bool = False

    def __post_init__(self):
        super().__post_init__()
        act, gated = parse_feed_forward_proj(self.feed_forward_proj)
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.dense_act_fn is None:
            object.__setattr__(self, "dense_act_fn", act)
        if self.is_gated_act is None:
            object.__setattr__(self, "is_gated_act", gated)
        get_activation(self.dense_act_fn, "dense_act_fn")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be positive")
        if self.relative_attention_num_buckets < 4:
            raise ValueError(f"relative_attention_num_buckets={self.relative_attention_num_buckets} "
                             "must be >= 4")

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_kv

    @classmethod
    def tiny(cls, **overrides) -> "T5Config":
        """A small random-init config for tests (v1.1: ``tiny(feed_forward_proj='gated-gelu',
        tie_word_embeddings=False, scale_decoder_outputs=False)``)."""
        base = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2,
                    num_heads=4, relative_attention_num_buckets=8,
                    relative_attention_max_distance=20, dropout_rate=0.1)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], source: str = "config.json", **overrides) -> "T5Config":
        """From a Hugging Face ``config.json`` dict, parsed as transformers 5.24 does.

        ``dense_act_fn``/``is_gated_act``/``scale_decoder_outputs`` stored in the file win
        over what ``feed_forward_proj``/``tie_word_embeddings`` imply. ``tie_word_embeddings``
        here is a first guess (False for v1.1-style files); :func:`load_hf` settles it from the
        tensors (a distinct ``lm_head.weight`` unties, as transformers does).
        """
        if cfg.get("model_type", "t5") != "t5":
            raise CheckpointError(f"{source}: config field model_type={cfg.get('model_type')!r} "
                                  "is not supported; supported: ['t5']")
        hf_io.check_keys(cfg, {"is_decoder": (False,)}, source)

        field = hf_io.field_reader(cfg, source)

        ffp = field("feed_forward_proj", str, "relu")
        try:
            act, gated = parse_feed_forward_proj(ffp)
        except ValueError as e:
            raise CheckpointError(f"{source}: config field {e}") from None
        tie = cfg.get("tie_word_embeddings")
        scale = cfg.get("scale_decoder_outputs", tie is not False)
        eos = cfg.get("eos_token_id", 1)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        archs = cfg.get("architectures") or []
        kwargs = dict(
            vocab_size=field("vocab_size", int, 32128),
            d_model=field("d_model", int, 512),
            d_kv=field("d_kv", int, 64),
            d_ff=field("d_ff", int, 2048),
            num_layers=field("num_layers", int, 6),
            num_decoder_layers=field("num_decoder_layers", int, None),
            num_heads=field("num_heads", int, 8),
            relative_attention_num_buckets=field("relative_attention_num_buckets", int, 32),
            relative_attention_max_distance=field("relative_attention_max_distance", int, 128),
            dropout_rate=field("dropout_rate", float, 0.1),
            layer_norm_epsilon=field("layer_norm_epsilon", float, 1e-6),
            initializer_factor=field("initializer_factor", float, 1.0),
            feed_forward_proj=ffp,
            dense_act_fn=field("dense_act_fn", str, act),
            is_gated_act=bool(cfg.get("is_gated_act", gated)),
            tie_word_embeddings=bool(scale) if tie is None or tie is True else False,
            scale_decoder_outputs=bool(scale),
            pad_token_id=field("pad_token_id", int, 0),
            eos_token_id=eos,
            decoder_start_token_id=field("decoder_start_token_id", int, field("pad_token_id", int, 0)),
            encoder_only=list(archs) == ["T5EncoderModel"],
        )
        kwargs.update(overrides)
        return hf_io.construct(cls, kwargs, source)

    def to_hf(self) -> dict:
        """A ``config.json`` dict that transformers loads as ``T5Config`` (4.x and 5.x)."""
        return {
            "architectures": ["T5EncoderModel" if self.encoder_only else "T5ForConditionalGeneration"],
            "model_type": "t5",
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_layers": self.num_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "num_heads": self.num_heads,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "dropout_rate": self.dropout_rate,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_factor": self.initializer_factor,
            "feed_forward_proj": self.feed_forward_proj,
            "dense_act_fn": self.dense_act_fn,
            "is_gated_act": self.is_gated_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "scale_decoder_outputs": self.scale_decoder_outputs,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.decoder_start_token_id,
            "is_encoder_decoder": not self.encoder_only,
            "is_decoder": False,
            "use_cache": True,
        }


# ----------------------------------------------------------------------------- model


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """T5's bucketing of ``key_pos - query_pos`` (int array, any shape) into ``[0, num_buckets)``.

    Half the buckets are exact small distances, the rest logarithmic up to ``max_distance``;
    ``bidirectional`` splits them between keys before and after the query, otherwise only
    keys at or before the query are distinguished.
    """
    rel = relative_position.astype(jnp.int32)
    buckets = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(rel)
    else:
        n = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    nf = jnp.maximum(n, 1).astype(jnp.float32)  # log(0) is never selected; keep it finite
    large = max_exact + (jnp.log(nf / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, n, large)


class RelativePositionBias(nn.Module):
    """Learned ``[buckets, heads]`` table -> additive bias ``[1, heads, q, k]``."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    dtype: Dtype = jnp.float32
    embedding_init: Callable = nn.initializers.normal(1.0)

    @nn.compact
    def __call__(self, q_len: int, k_len: int, query_offset: Any = 0) -> Array:
        """Query ``i`` sits at position ``query_offset + i``, key ``j`` at ``j``."""
        table = self.param("embedding", nn.with_logical_partitioning(
            self.embedding_init, ("relpos_buckets", "heads")),
            (self.num_buckets, self.num_heads), jnp.float32)
        qpos = jnp.arange(q_len, dtype=jnp.int32)[:, None] + query_offset
        kpos = jnp.arange(k_len, dtype=jnp.int32)[None, :]
        buckets = relative_position_bucket(kpos - qpos, self.bidirectional, self.num_buckets,
                                           self.max_distance)
        values = jnp.take(jnp.asarray(table, self.dtype), buckets, axis=0)  # [q, k, h]
        return jnp.transpose(values, (2, 0, 1))[None]


def _position_bias(c: T5Config, is_decoder: bool, dtype: Dtype, slots: Slots, q_len: int,
                   key_len: int, query_offset: Any) -> Array:
    """The stack's relative position bias ``[1, heads, q_len, P + key_len]`` from the
    ``relative_attention_bias`` table of the calling module (a stack's ``layer_0``)."""
    prefix = slots.kv_prefix_length
    return RelativePositionBias(
        c.relative_attention_num_buckets, c.relative_attention_max_distance, c.num_heads,
        bidirectional=not is_decoder, dtype=dtype,
        embedding_init=nn.initializers.normal(c.initializer_factor * c.d_model ** -0.5),
        name="relative_attention_bias")(q_len, key_len + prefix, query_offset + prefix)


class T5Layer(nn.Module):
    """Pre-RMSNorm block: self attention, (decoder) cross attention, FFN; ``[b, l, d]``.

    Carries ``(x, position_bias)``: a layer that receives no bias (the first of an
    unscanned stack) computes the stack's bias from its ``relative_attention_bias`` table
    and passes it on.
    """

    config: T5Config
    is_decoder: bool
    dtype: Dtype = jnp.float32
    slots: Slots = NO_SLOTS

    @nn.compact
    def __call__(self, carry: tuple[Array, Optional[Array]], bias: Optional[Array],
                 query_offset: Any, encoder_states: Optional[Array], encoder_bias: Optional[Array],
                 key_len: int, decode: bool = False, deterministic: bool = True
                 ) -> tuple[Array, Array]:
        c = self.config
        x, position_bias = carry
        f = c.initializer_factor
        norm = lambda name: LayerNorm(eps=c.layer_norm_epsilon, rms=True, use_bias=False,
                                      dtype=self.dtype, name=name)
        drop = Dropout(c.dropout_rate, c.dropout_impl)

        def attention(name):
            return Attention(num_heads=c.num_heads, head_dim=c.d_kv, qkv_bias=False, out_bias=False,
                             scale=1.0, dropout_rate=c.dropout_rate, dropout_impl=c.dropout_impl,
                             dtype=self.dtype, kernel_init=nn.initializers.normal(f * c.d_model ** -0.5),
                             slots=self.slots, name=name)

        if position_bias is None:
            position_bias = _position_bias(c, self.is_decoder, self.dtype, self.slots, x.shape[1],
                                           key_len, query_offset)

        a = attention("attention")(norm("attention_norm")(x), bias=bias, position_bias=position_bias,
                                   decode=decode, deterministic=deterministic)
        a = drop(a, deterministic=deterministic)
        x = x + self.slots.sublayer(self, "attention", a, deterministic)

        if self.is_decoder:
            a = attention("cross_attention")(norm("cross_attention_norm")(x), kv_input=encoder_states,
                                             bias=encoder_bias, deterministic=deterministic)
            a = drop(a, deterministic=deterministic)
            x = x + self.slots.sublayer(self, "cross_attention", a, deterministic)

        h = Mlp(d_ff=c.d_ff, activation=c.dense_act_fn, gated=c.is_gated_act, use_bias=False,
                dropout_rate=c.dropout_rate, dropout_impl=c.dropout_impl, dtype=self.dtype,
                kernel_init=nn.initializers.normal(f * c.d_model ** -0.5), slots=self.slots,
                name="mlp")(norm("mlp_norm")(x), deterministic)
        h = drop(h, deterministic=deterministic)
        x = x + self.slots.sublayer(self, "ffn", h, deterministic)
        return x, position_bias


class T5PositionBias(nn.Module):
    """``layer_0`` of a scanned stack: only the position-bias table (the scanned blocks
    all receive the bias), so the parameter keeps its unscanned path."""

    config: T5Config
    is_decoder: bool
    dtype: Dtype = jnp.float32
    slots: Slots = NO_SLOTS

    @nn.compact
    def __call__(self, q_len: int, key_len: int, query_offset: Any) -> Array:
        return _position_bias(self.config, self.is_decoder, self.dtype, self.slots, q_len,
                              key_len, query_offset)


class T5Stack(nn.Module):
    """Encoder or decoder stack: dropout, ``layer_{i}`` (or scanned ``layers``),
    ``final_norm``, dropout.

    Returns (final states ``[b, l, d]``, every layer's output when ``keep``).
    """

    config: T5Config
    is_decoder: bool
    dtype: Dtype = jnp.float32
    slots: Slots = NO_SLOTS

    @nn.compact
    def __call__(self, x: Array, mask: Array, encoder_states: Optional[Array] = None,
                 encoder_mask: Optional[Array] = None, decode: bool = False,
                 deterministic: bool = True, keep: bool = True) -> tuple[Array, tuple]:
        """x ``[b, l, d]``; mask ``[b, l]`` (1 = real); encoder_* for the decoder."""
        c = self.config
        q_len = x.shape[1]
        offset: Any = 0
        key_mask = mask
        if self.is_decoder:
            if decode:
                key_mask, offset = self._decode_bookkeeping(mask)
            bias = make_attention_bias(key_mask, q_len, causal=True, query_offset=offset)
            encoder_bias = make_attention_bias(encoder_mask, q_len)
        else:
            bias, encoder_bias = make_attention_bias(mask, q_len), None
        x = Dropout(c.dropout_rate, c.dropout_impl)(x, deterministic=deterministic)
        position_bias = None
        if c.scan_layers:
            position_bias = T5PositionBias(c, self.is_decoder, self.dtype, self.slots,
                                           name="layer_0")(q_len, key_mask.shape[1], offset)
        kwargs = dict(config=c, is_decoder=self.is_decoder, dtype=self.dtype, slots=self.slots)
        (x, _), outs = run_layers(
            T5Layer, kwargs, c.num_decoder_layers if self.is_decoder else c.num_layers,
            (x, position_bias), (bias, offset, encoder_states, encoder_bias),
            (key_mask.shape[1], decode, deterministic), remat="none" if decode else c.remat,
            scan=c.scan_layers, keep=keep)
        h = LayerNorm(eps=c.layer_norm_epsilon, rms=True, use_bias=False, dtype=self.dtype,
                      name="final_norm")(x)
        h = Dropout(c.dropout_rate, c.dropout_impl)(h, deterministic=deterministic)
        return h, tuple(o[0] for o in outs)

    def _decode_bookkeeping(self, mask: Array) -> tuple[Array, Any]:
        """KV-cache mode: (key mask ``[b, max_len]`` so far, index of this chunk's first query).

        The first call (cache initialization, on a ``[b, max_len]`` dummy) only sizes the
        cache and behaves like a plain causal forward.
        """
        initialized = self.has_variable("cache", "key_mask")
        key_mask = self.variable("cache", "key_mask", jnp.zeros, mask.shape, jnp.int32)
        index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
        m = mask.astype(jnp.int32)
        if not initialized:
            return m, 0
        i = index.value
        key_mask.value = jax.lax.dynamic_update_slice(key_mask.value, m, (0, i))
        index.value = i + m.shape[1]
        return key_mask.value, i


class T5Model(nn.Module):
    """T5 as a pure function of ``{"params": base, "peft": delta}``.

    ``__call__`` (teacher forcing) = :meth:`encode` + :meth:`decode`; an ``encoder_only``
    config makes ``__call__`` = :meth:`encode`.
    """

    config: T5Config
    slots: Slots = NO_SLOTS
    dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        self.shared = Embed(c.vocab_size, c.d_model, axes=("vocab", "embed"), dtype=self.dtype,
                            embedding_init=nn.initializers.normal(c.initializer_factor))
        stack = per_layer_delta(T5Stack) if c.scan_layers else T5Stack
        self.encoder = stack(c, False, self.dtype, self.slots)
        if not c.encoder_only:
            self.decoder = stack(c, True, self.dtype, self.slots)
            if not c.tie_word_embeddings:
                self.lm_head = Dense(c.vocab_size, use_bias=False, axes=("embed", "vocab"),
                                     dtype=self.dtype,
                                     kernel_init=nn.initializers.normal(c.initializer_factor),
                                     slots=self.slots)

    @nn.compact
    def encode(self, input_ids: Array, attention_mask: Optional[Array] = None,
               deterministic: bool = True, output_hidden_states: bool = False) -> dict[str, Any]:
        """input_ids, attention_mask (1 = real): ``[b, l]``.

        Returns ``hidden_states [b, l', d]`` and ``attention_mask [b, l']`` (l' includes
        soft-prompt inserts), plus ``all_hidden_states`` when asked.
        """
        attention_mask = (jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None
                          else jnp.asarray(attention_mask, jnp.int32))
        x = self.shared(input_ids)
        x, mask, _ = self.slots.input_embeddings(self, x, attention_mask, deterministic)
        h, layers = self.encoder(x, mask, deterministic=deterministic, keep=output_hidden_states)
        out: dict[str, Any] = {"hidden_states": h, "attention_mask": mask}
        if output_hidden_states:
            out["all_hidden_states"] = (x,) + layers
        return out

    def decode(self, decoder_input_ids: Array, encoder_hidden_states: Array,
               encoder_mask: Optional[Array] = None, decoder_attention_mask: Optional[Array] = None,
               decode: bool = False, deterministic: bool = True,
               output_hidden_states: bool = False) -> dict[str, Any]:
        """decoder_input_ids ``[b, t]``; encoder_hidden_states ``[b, l, d]``, encoder_mask ``[b, l]``.

        ``decode=True``: KV-cache step (``mutable=["cache"]``; initialize the cache by one call
        on a ``[b, max_len]`` dummy). Returns ``hidden_states [b, t, d]``, ``attention_mask
        [b, t]`` and ``logits [b, t, vocab]``.
        """
        c = self.config
        if c.encoder_only:
            raise ValueError("this T5 config is encoder_only (T5EncoderModel): it has no decoder")
        decoder_attention_mask = (jnp.ones(decoder_input_ids.shape, jnp.int32)
                                  if decoder_attention_mask is None
                                  else jnp.asarray(decoder_attention_mask, jnp.int32))
        encoder_mask = (jnp.ones(encoder_hidden_states.shape[:2], jnp.int32) if encoder_mask is None
                        else jnp.asarray(encoder_mask, jnp.int32))
        x = self.shared(decoder_input_ids)
        h, layers = self.decoder(x, decoder_attention_mask, encoder_hidden_states, encoder_mask,
                                 decode=decode, deterministic=deterministic,
                                 keep=output_hidden_states)
        out: dict[str, Any] = {"hidden_states": h, "attention_mask": decoder_attention_mask,
                               "logits": self.lm_logits(h, deterministic)}
        if output_hidden_states:
            out["all_hidden_states"] = (x,) + layers
        return out

    def lm_logits(self, h: Array, deterministic: bool = True) -> Array:
        """Decoder output ``[b, t, d]`` -> ``[b, t, vocab]`` (v1.0: ``d_model**-0.5`` rescale
        and the tied table; v1.1: ``lm_head``)."""
        c = self.config
        if c.scale_decoder_outputs:
            h = h * (c.d_model ** -0.5)
        if c.tie_word_embeddings:
            return self.shared.attend(h)
        return self.lm_head(h, deterministic)

    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
                 decoder_input_ids: Optional[Array] = None,
                 decoder_attention_mask: Optional[Array] = None, deterministic: bool = True,
                 output_hidden_states: bool = False) -> dict[str, Any]:
        """Teacher forcing: ``[b, l]`` inputs, ``[b, t]`` decoder inputs -> ``logits [b, t, vocab]``.

        Also returns the decoder ``hidden_states [b, t, d]`` and ``attention_mask [b, t]``,
        ``encoder_hidden_states [b, l', d]`` and ``encoder_attention_mask [b, l']``.
        """
        enc = self.encode(input_ids, attention_mask, deterministic, output_hidden_states)
        if self.config.encoder_only:
            return enc
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids is required (use shift_right(labels, ...))")
        out = self.decode(decoder_input_ids, enc["hidden_states"], enc["attention_mask"],
                          decoder_attention_mask, deterministic=deterministic,
                          output_hidden_states=output_hidden_states)
        out["encoder_hidden_states"] = enc["hidden_states"]
        out["encoder_attention_mask"] = enc["attention_mask"]
        if output_hidden_states:
            out["encoder_all_hidden_states"] = enc["all_hidden_states"]
        return out


def shift_right(labels: Array, decoder_start_token_id: int, pad_id: int) -> Array:
    """Decoder inputs from labels ``[b, t]``: start token, then ``labels[:, :-1]``; -100 -> pad."""
    labels = jnp.asarray(labels)
    start = jnp.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[:, :-1]], axis=1)
    return jnp.where(shifted == -100, pad_id, shifted)


# ----------------------------------------------------------------------------- generation


def init_decoder_cache(model: T5Model, variables: Mapping[str, Any], encoder_states: Array,
                       encoder_mask: Array, max_len: int) -> Any:
    """Zero decoder KV cache for ``max_len`` decoder tokens (shapes traced, no compute)."""
    dummy = jnp.zeros((encoder_states.shape[0], max_len), jnp.int32)

    def run():
        _, mut = model.apply(dict(variables), dummy, encoder_states, encoder_mask, decode=True,
                             method="decode", mutable=["cache"])
        return mut["cache"]

    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run))


def greedy_generate(model: T5Model, variables: Mapping[str, Any], input_ids: Array,
                    attention_mask: Optional[Array] = None, max_new_tokens: int = 20,
                    decoder_start_token_id: Optional[int] = None,
                    eos_token_id: Optional[int] = -1, pad_token_id: Optional[int] = None) -> Array:
    """Greedy seq2seq decoding with a decoder self-attention KV cache (cross-attention keys
    and values are recomputed from the encoder states at each step), using
    :func:`peft_jax.models.generation.greedy_loop`.

    input_ids, attention_mask ``[b, l]`` (any padding) -> ``[b, 1 + max_new_tokens]``: the
    decoder start token, then the generated tokens; rows that emitted ``eos`` continue with
    ``pad``. This is transformers' ``generate(do_sample=False, num_beams=1)`` output padded
    to full length. ``eos_token_id=-1`` means the config's; ``None`` disables stopping.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    c = model.config
    start = c.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
    eos = c.eos_token_id if eos_token_id == -1 else eos_token_id
    pad = c.pad_token_id if pad_token_id is None else pad_token_id
    variables = {k: v for k, v in dict(variables).items() if k != "cache"}
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = (jnp.ones_like(input_ids) if attention_mask is None
            else jnp.asarray(attention_mask, jnp.int32))
    return _generate(model, int(max_new_tokens), int(start), eos, int(pad), variables,
                     input_ids, mask)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _generate(model, max_new_tokens, start, eos, pad, variables, input_ids, mask):
    enc = model.apply(variables, input_ids, mask, method="encode")
    states, enc_mask = enc["hidden_states"], enc["attention_mask"]
    b = input_ids.shape[0]
    cache = init_decoder_cache(model, variables, states, enc_mask, max_new_tokens)

    def step(cache, token, _):
        out, mut = model.apply({**variables, "cache": cache}, token[:, None], states, enc_mask,
                               decode=True, method="decode", mutable=["cache"])
        return out["logits"][:, -1], mut["cache"]

    first = jnp.full((b,), start, jnp.int32)
    first_logits, cache = step(cache, first, 0)
    tokens = greedy_loop(step, cache, first_logits, max_new_tokens, eos, pad)
    return jnp.concatenate([first[:, None], tokens], axis=1)


# ----------------------------------------------------------------------------- family

_ATTN = {"query": "q", "key": "k", "value": "v", "out": "o"}
_STACK = r"(encoder|decoder)"


def _ff(m) -> int:
    """Index of the FFN sub-layer in an HF T5 block (after self and, in the decoder, cross attention)."""
    return 2 if m[1] == "decoder" else 1


def _wi(m, config: Optional[T5Config]) -> str:
    gated = bool(config is not None and config.is_gated_act) or m[3] == "gate"
    wi = {"up": "wi_1" if gated else "wi", "gate": "wi_0", "down": "wo"}[m[3]]
    return f"{m[1]}.block.{m[2]}.layer.{_ff(m)}.DenseReluDense.{wi}"


class T5Family(Family):
    """T5 (``T5ForConditionalGeneration`` / ``T5EncoderModel``). Loading settles the head from
    the tensors as transformers does: an ``lm_head.weight`` that differs from
    ``shared.weight`` unties; a folder without decoder tensors is ``encoder_only``; old
    exports may spell ``shared.weight`` as ``encoder.embed_tokens.weight``."""

    name = "t5"
    model_types = ("t5",)
    kind = "encoder_decoder"
    model_class = T5Model
    config_class = T5Config
    ignored = (r"(encoder|decoder)\.embed_tokens\.weight",)
    module_map = (
        (_STACK + r"/layer_(\d+)/attention/(query|key|value|out)",
         lambda m, c: f"{m[1]}.block.{m[2]}.layer.0.SelfAttention.{_ATTN[m[3]]}"),
        (_STACK + r"/layer_(\d+)/attention", r"\1.block.\2.layer.0.SelfAttention"),
        (_STACK + r"/layer_0/relative_attention_bias", r"\1.block.0.layer.0.SelfAttention.relative_attention_bias"),
        (_STACK + r"/layer_(\d+)/attention_norm", r"\1.block.\2.layer.0.layer_norm"),
        (r"(decoder)/layer_(\d+)/cross_attention/(query|key|value|out)",
         lambda m, c: f"{m[1]}.block.{m[2]}.layer.1.EncDecAttention.{_ATTN[m[3]]}"),
        (r"(decoder)/layer_(\d+)/cross_attention", r"\1.block.\2.layer.1.EncDecAttention"),
        (r"(decoder)/layer_(\d+)/cross_attention_norm", r"\1.block.\2.layer.1.layer_norm"),
        (_STACK + r"/layer_(\d+)/mlp/(up|gate|down)", _wi),
        (_STACK + r"/layer_(\d+)/mlp", lambda m, c: f"{m[1]}.block.{m[2]}.layer.{_ff(m)}.DenseReluDense"),
        (_STACK + r"/layer_(\d+)/mlp_norm", lambda m, c: f"{m[1]}.block.{m[2]}.layer.{_ff(m)}.layer_norm"),
        (_STACK + r"/layer_(\d+)", r"\1.block.\2"),
        (_STACK + r"/final_norm", r"\1.final_layer_norm"),
        (r"(encoder|decoder|shared|lm_head)", r"\1"),
    )

    def layout(self, config: T5Config) -> list:
        c = config
        d, inner = c.d_model, c.num_heads * c.d_kv
        out: list = [(("shared", "embedding"), "shared.weight", "table", (c.vocab_size, d))]

        def attention(p, hf, ours_name, theirs_name):
            for ours, theirs in _ATTN.items():
                shape = (inner, d) if ours == "out" else (d, inner)
                out.append((p + (ours_name, ours, "kernel"), f"{hf}.{theirs_name}.{theirs}.weight",
                            "linear", shape))

        def stack(name: str, n_layers: int, is_decoder: bool):
            for i in range(n_layers):
                p, hf = (name, f"layer_{i}"), f"{name}.block.{i}.layer"
                attention(p, f"{hf}.0", "attention", "SelfAttention")
                if i == 0:
                    out.append((p + ("relative_attention_bias", "embedding"),
                                f"{hf}.0.SelfAttention.relative_attention_bias.weight", "table",
                                (c.relative_attention_num_buckets, c.num_heads)))
                out.append((p + ("attention_norm", "scale"), f"{hf}.0.layer_norm.weight", "vector", (d,)))
                if is_decoder:
                    attention(p, f"{hf}.1", "cross_attention", "EncDecAttention")
                    out.append((p + ("cross_attention_norm", "scale"), f"{hf}.1.layer_norm.weight",
                                "vector", (d,)))
                ff = 2 if is_decoder else 1
                mlp = (("gate", "wi_0"), ("up", "wi_1")) if c.is_gated_act else (("up", "wi"),)
                for ours, theirs in mlp:
                    out.append((p + ("mlp", ours, "kernel"), f"{hf}.{ff}.DenseReluDense.{theirs}.weight",
                                "linear", (d, c.d_ff)))
                out.append((p + ("mlp", "down", "kernel"), f"{hf}.{ff}.DenseReluDense.wo.weight",
                            "linear", (c.d_ff, d)))
                out.append((p + ("mlp_norm", "scale"), f"{hf}.{ff}.layer_norm.weight", "vector", (d,)))
            out.append(((name, "final_norm", "scale"), f"{name}.final_layer_norm.weight", "vector", (d,)))

        stack("encoder", c.num_layers, False)
        if not c.encoder_only:
            stack("decoder", c.num_decoder_layers, True)
            if not c.tie_word_embeddings:
                out.append((("lm_head", "kernel"), "lm_head.weight", "linear", (d, c.vocab_size)))
        return out

    def settle(self, config: T5Config, source, forced) -> T5Config:
        names = source.names()
        if "encoder_only" not in forced and not any(k.startswith("decoder.") for k in names):
            config = dataclasses.replace(config, encoder_only=True)
        if "tie_word_embeddings" not in forced and not config.encoder_only:
            untied = "lm_head.weight" in source and not (
                "shared.weight" in source
                and source.info("lm_head.weight")[0] == source.info("shared.weight")[0]
                and np.array_equal(source.read("lm_head.weight"), source.read("shared.weight")))
            config = dataclasses.replace(config, tie_word_embeddings=not untied)
        return config

    def rename(self, config, source):
        if "shared.weight" in source or "encoder.embed_tokens.weight" not in source:
            return None
        return lambda hf: "encoder.embed_tokens.weight" if hf == "shared.weight" else hf

    def tied(self, config: T5Config) -> list:
        if config.encoder_only or not config.tie_word_embeddings:
            return []
        return [("lm_head.weight", "shared.weight")]

    def inputs(self, batch, config) -> dict:
        """Teacher forcing with the batch's ``decoder_input_ids``, else one decoder step from
        the start token (encoder states for heads, first-token logits for verbalizers)."""
        dec = batch.get("decoder_input_ids")
        if dec is None:
            start = config.decoder_start_token_id if config is not None else 0
            dec = jnp.full((batch["input_ids"].shape[0], 1), start, jnp.int32)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "decoder_input_ids": dec}


T5 = register(T5Family())
