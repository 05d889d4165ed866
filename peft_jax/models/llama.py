"""Llama-family decoder-only LMs: Llama 1-3, SmolLM/SmolLM2, Qwen2 (qkv bias), Mistral
(without sliding window).

Module tree (the base pytree mirrors it; ``hf_module_name`` maps it to HF names)::

    embed_tokens                                   (Embed; tied LM head uses ``attend``)
    decoder/layer_{i}/{attention_norm, attention/{query,key,value,out},
                       mlp_norm, mlp/{gate,up,down}}
    decoder/final_norm
    lm_head                                        (untied head only)

Position ids (one rule, with and without a KV cache): a token's position is the number of
real tokens before it in its row, ``clip(cumsum(mask) - 1, 0)`` (pads get the position
of their neighbour; they are never attended to), plus the static key/value prefix length
of prefix-tuning methods (``kv_prefix_length``; Hugging Face PEFT passes the prefix as past
key/values, so real tokens start at ``P``). This equals Hugging Face's
``generate`` rule (left padding) and, on every real token, its ``forward`` rule
(``arange``) for unpadded and right-padded rows. Pass ``positions`` to override.

PEFT slots: :class:`LlamaModel` calls ``input_embeddings`` on the token embeddings (soft
prompts; inserted tokens are real for the mask and get consecutive positions); each
:class:`LlamaLayer` calls ``sublayer`` on the attention and MLP outputs before the
residual adds; every Dense goes through the ``dense`` slot and every attention through
``attention_kv``.

KV cache (``decode=True``): initialize by one call on a ``[b, max_len]`` dummy (see
``generation.init_cache``); then feed chunks ``[b, q]`` with their own masks ``[b, q]``.
The cache keeps the key padding mask, the write index and each row's real-token count,
so positions and the causal mask follow automatically. ``prefill=True`` (default) runs
the ``input_embeddings`` slot on the chunk; pass ``prefill=False`` for the following
one-token steps so that soft prompts are inserted once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from peft_jax.models import hf_io
from peft_jax.models.family import Family, register
from peft_jax.models.hf_io import CheckpointError
from peft_jax.models.layers import (Attention, Dense, Embed, LayerNorm, Mlp, get_activation,
                                    make_attention_bias)
from peft_jax.models.rope import RopeConfig, RopeConfigError, rotary
from peft_jax.models.slots import NO_SLOTS, Slots
from peft_jax.models.stack import ModelOptions, per_layer_delta, run_layers

Array = Any
Dtype = Any

MODEL_TYPES = ("llama", "qwen2", "mistral")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "mistral": "MistralForCausalLM"}


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ModelOptions):
    """Hyper-parameters of a Llama-family decoder (validated on construction).

    ``attention_bias``: biases on q/k/v; ``attention_out_bias``: bias on o_proj (Llama's
    ``attention_bias`` sets both; Qwen2 has q/k/v biases only).
    """

    vocab_size: int = 32000
    d_model: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    d_ff: int = 11008
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    model_type: str = "llama"
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2

    def __post_init__(self):
        super().__post_init__()
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type={self.model_type!r}; supported: {list(MODEL_TYPES)}")
        get_activation(self.hidden_act, "hidden_act")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not divisible by "
                             f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (rotary embeddings)")

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @classmethod
    def tiny(cls, **overrides) -> "LlamaConfig":
        """A small random-init config for tests (GQA: 4 query heads, 2 key/value heads)."""
        base = dict(vocab_size=101, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, d_ff=40, rms_norm_eps=1e-6, max_position_embeddings=64,
                    rope=RopeConfig(theta=10000.0), pad_token_id=0, bos_token_id=1, eos_token_id=2)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], source: str = "config.json") -> "LlamaConfig":
        """From a Hugging Face ``config.json`` dict; unsupported values -> CheckpointError."""
        model_type = cfg.get("model_type")
        if model_type not in MODEL_TYPES:
            raise CheckpointError(f"{source}: config field model_type={model_type!r} is not "
                                  f"supported; supported: {list(MODEL_TYPES)}")
        if model_type == "mistral" and cfg.get("sliding_window") is not None:
            raise CheckpointError(f"{source}: config field sliding_window={cfg['sliding_window']!r} "
                                  "is not supported (sliding-window attention); set it to null")
        if model_type == "qwen2" and cfg.get("use_sliding_window"):
            raise CheckpointError(f"{source}: config field use_sliding_window=True is not supported "
                                  "(sliding-window attention)")
        layer_types = cfg.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types) and (
                model_type != "qwen2" or cfg.get("use_sliding_window")):
            raise CheckpointError(f"{source}: config field layer_types={layer_types!r} is not "
                                  "supported (only full_attention)")
        hf_io.check_keys(cfg, {"pretraining_tp": (1,)}, source)

        field = hf_io.field_reader(cfg, source)

        def token_id(name: str) -> Optional[int]:
            v = cfg.get(name)
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            return v if isinstance(v, int) else None

        heads = field("num_attention_heads", int)
        d_model = field("hidden_size", int)
        if model_type == "qwen2":
            qkv_bias, out_bias = True, False
        else:
            qkv_bias = out_bias = bool(cfg.get("attention_bias", False))
        try:
            rope = RopeConfig.from_hf(cfg, source)
        except RopeConfigError as e:
            raise CheckpointError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None
        kwargs = dict(
            vocab_size=field("vocab_size", int),
            d_model=d_model,
            num_layers=field("num_hidden_layers", int),
            num_heads=heads,
            num_kv_heads=field("num_key_value_heads", int, heads),
            head_dim=field("head_dim", int, d_model // heads),
            d_ff=field("intermediate_size", int),
            hidden_act=field("hidden_act", str, "silu"),
            rms_norm_eps=field("rms_norm_eps", float, 1e-6),
            max_position_embeddings=field("max_position_embeddings", int, 2048),
            rope=rope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            attention_out_bias=out_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)) if model_type == "llama" else False,
            attention_dropout=field("attention_dropout", float, 0.0),
            initializer_range=field("initializer_range", float, 0.02),
            model_type=model_type,
            pad_token_id=token_id("pad_token_id"),
            bos_token_id=token_id("bos_token_id"),
            eos_token_id=token_id("eos_token_id"),
        )
        return hf_io.construct(cls, kwargs, source)

    def to_hf(self) -> dict:
        """A ``config.json`` dict that transformers loads as Llama/Qwen2/MistralConfig."""
        if self.model_type == "qwen2" and (not self.attention_bias or self.attention_out_bias):
            raise ValueError("qwen2 requires attention_bias=True and attention_out_bias=False")
        if self.model_type == "llama" and self.attention_bias != self.attention_out_bias:
            raise ValueError("llama needs attention_bias == attention_out_bias (one HF flag)")
        if self.model_type != "llama" and self.mlp_bias:
            raise ValueError(f"{self.model_type} has no mlp_bias")
        out = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.d_ff,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": self.rope.to_hf(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": self.attention_dropout,
            "initializer_range": self.initializer_range,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.model_type == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            out["sliding_window"] = None
        else:
            out["use_sliding_window"] = False
        return out


# ----------------------------------------------------------------------------- model


def default_positions(mask: Array, offset: Any = 0) -> Array:
    """Positions ``[b, l]``: real tokens before each one, ``clip(cumsum(mask) - 1, 0) + offset``."""
    m = mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0) + offset


class LlamaLayer(nn.Module):
    """Pre-RMSNorm block: ``x + attn(norm(x))`` then ``h + mlp(norm(h))``; ``[b, l, d]``."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    slots: Slots = NO_SLOTS

    @nn.compact
    def __call__(self, x: Array, bias: Optional[Array], rotary_cs: tuple[Array, Array],
                 decode: bool = False, deterministic: bool = True) -> Array:
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        h = LayerNorm(eps=c.rms_norm_eps, rms=True, dtype=self.dtype, name="attention_norm")(x)
        a = Attention(num_heads=c.num_heads, head_dim=c.head_dim, num_kv_heads=c.num_kv_heads,
                      qkv_bias=c.attention_bias, out_bias=c.attention_out_bias,
                      dropout_rate=c.attention_dropout, dropout_impl=c.dropout_impl,
                      dtype=self.dtype, kernel_init=init, slots=self.slots, name="attention")(
            h, bias=bias, rotary=rotary_cs, decode=decode, deterministic=deterministic)
        a = self.slots.sublayer(self, "attention", a, deterministic)
        x = x + a
        h = LayerNorm(eps=c.rms_norm_eps, rms=True, dtype=self.dtype, name="mlp_norm")(x)
        f = Mlp(d_ff=c.d_ff, activation=c.hidden_act, gated=True, use_bias=c.mlp_bias,
                dtype=self.dtype, kernel_init=init, slots=self.slots, name="mlp")(h, deterministic)
        f = self.slots.sublayer(self, "ffn", f, deterministic)
        return x + f


class LlamaDecoder(nn.Module):
    """The stack of :class:`LlamaLayer` (``layer_0`` ...) and ``final_norm``.

    Returns (final normed states, tuple of every layer's output).
    """

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    slots: Slots = NO_SLOTS

    @nn.compact
    def __call__(self, x: Array, bias: Optional[Array], rotary_cs: tuple[Array, Array],
                 decode: bool = False, deterministic: bool = True,
                 keep: bool = True) -> tuple[Array, tuple]:
        c = self.config
        x, outs = run_layers(LlamaLayer, dict(config=c, dtype=self.dtype, slots=self.slots),
                             c.num_layers, x, (bias, rotary_cs), (decode, deterministic),
                             remat="none" if decode else c.remat, scan=c.scan_layers, keep=keep)
        h = LayerNorm(eps=c.rms_norm_eps, rms=True, dtype=self.dtype, name="final_norm")(x)
        return h, outs


class LlamaModel(nn.Module):
    """Llama-family causal LM as a pure function of ``{"params": base, "peft": delta}``."""

    config: LlamaConfig
    slots: Slots = NO_SLOTS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
                 positions: Optional[Array] = None, deterministic: bool = True,
                 output_hidden_states: bool = False, decode: bool = False,
                 prefill: bool = True, logits_at: Optional[Array] = None) -> dict[str, Any]:
        """input_ids, attention_mask (1 = real; left or right padding): ``[b, l]``.

        ``logits_at [b, T]``: compute the LM head only at these positions of the output
        (``logits [b, T, vocab]``; verbalizer scoring needs one position, not all ``l``).

        ``positions [b, l]``: override the default position rule (not with soft-prompt
        inserts). Returns ``hidden_states [b, l', d]`` (after the final norm),
        ``attention_mask [b, l']`` (l' includes slot inserts), ``logits [b, l', vocab]``,
        and ``all_hidden_states`` (embedding output, then every layer) when asked.
        """
        c = self.config
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        embed = Embed(c.vocab_size, c.d_model, axes=("vocab", "embed"), dtype=self.dtype,
                      embedding_init=nn.initializers.normal(c.initializer_range), name="embed_tokens")
        x = embed(input_ids)
        inserts: tuple = ()
        if prefill or not decode:
            x, mask, inserts = self.slots.input_embeddings(self, x, attention_mask, deterministic)
        else:
            mask = attention_mask
        if inserts and positions is not None:
            raise ValueError("positions cannot be combined with input_embeddings inserts "
                             "(soft prompts); leave positions=None")
        b, length = mask.shape
        prefix = self.slots.kv_prefix_length

        if decode:
            bias, pos = self._decode_bookkeeping(mask, prefix)
            positions = pos if positions is None else positions
        else:
            if positions is None:
                positions = default_positions(mask, prefix)
            bias = make_attention_bias(mask, length, causal=True)
        cos_sin = rotary(c.rope, positions, c.head_dim, c.max_position_embeddings)

        decoder = per_layer_delta(LlamaDecoder) if c.scan_layers else LlamaDecoder
        h, layers = decoder(c, self.dtype, self.slots, name="decoder")(
            x, bias, cos_sin, decode, deterministic, output_hidden_states)
        hl = h if logits_at is None else jnp.take_along_axis(h, logits_at[:, :, None], axis=1)
        if c.tie_word_embeddings:
            logits = embed.attend(hl)
        else:
            logits = Dense(c.vocab_size, use_bias=False, axes=("embed", "vocab"), dtype=self.dtype,
                           kernel_init=nn.initializers.normal(c.initializer_range),
                           slots=self.slots, name="lm_head")(hl, deterministic)
        out: dict[str, Any] = {"hidden_states": h, "attention_mask": mask, "logits": logits}
        if output_hidden_states:
            out["all_hidden_states"] = (x,) + layers
        return out

    def _decode_bookkeeping(self, mask: Array, prefix: int) -> tuple[Array, Array]:
        """KV-cache mode: (bias ``[b, 1, q, max_len]``, positions ``[b, q]``) for this chunk.

        The first call (cache initialization, on a ``[b, max_len]`` dummy) only sizes the
        cache and behaves like a plain causal forward.
        """
        b, q = mask.shape
        initialized = self.has_variable("cache", "key_mask")
        key_mask = self.variable("cache", "key_mask", jnp.zeros, (b, q), jnp.int32)
        index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
        seen = self.variable("cache", "num_tokens", jnp.zeros, (b,), jnp.int32)
        m = mask.astype(jnp.int32)
        if not initialized:
            return make_attention_bias(m, q, causal=True), default_positions(m, prefix)
        i = index.value
        key_mask.value = jax.lax.dynamic_update_slice(key_mask.value, m, (0, i))
        positions = default_positions(m, prefix) + seen.value[:, None]
        seen.value = seen.value + jnp.sum(m, axis=1)
        index.value = i + q
        bias = make_attention_bias(key_mask.value, q, causal=True, query_offset=i)
        return bias, positions


# ----------------------------------------------------------------------------- family

_PROJ = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "o_proj"}


class LlamaFamily(Family):
    """Llama / Qwen2 / Mistral (``*ForCausalLM``; bare ``*Model`` names without ``model.``
    are accepted). With a tied head, a stored ``lm_head.weight`` must equal the embeddings."""

    name = "llama"
    model_types = MODEL_TYPES
    kind = "decoder"
    model_class = LlamaModel
    config_class = LlamaConfig
    ignored = (r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
    module_map = (
        (r"embed_tokens", "model.embed_tokens"),
        (r"decoder/layer_(\d+)/attention/(query|key|value|out)",
         lambda m, c: f"model.layers.{m[1]}.self_attn.{_PROJ[m[2]]}"),
        (r"decoder/layer_(\d+)/attention", r"model.layers.\1.self_attn"),
        (r"decoder/layer_(\d+)/attention_norm", r"model.layers.\1.input_layernorm"),
        (r"decoder/layer_(\d+)/mlp/(gate|up|down)", r"model.layers.\1.mlp.\2_proj"),
        (r"decoder/layer_(\d+)/mlp", r"model.layers.\1.mlp"),
        (r"decoder/layer_(\d+)/mlp_norm", r"model.layers.\1.post_attention_layernorm"),
        (r"decoder/layer_(\d+)", r"model.layers.\1"),
        (r"decoder/final_norm", "model.norm"),
        (r"lm_head", "lm_head"),
    )

    def layout(self, config: LlamaConfig) -> list:
        c = config
        d, f, v = c.d_model, c.d_ff, c.vocab_size
        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        out: list = [(("embed_tokens", "embedding"), "model.embed_tokens.weight", "table", (v, d))]

        def linear(path, hf, n_in, n_out, bias):
            out.append((path + ("kernel",), hf + ".weight", "linear", (n_in, n_out)))
            if bias:
                out.append((path + ("bias",), hf + ".bias", "vector", (n_out,)))

        for i in range(c.num_layers):
            p, hf = ("decoder", f"layer_{i}"), f"model.layers.{i}"
            out.append((p + ("attention_norm", "scale"), f"{hf}.input_layernorm.weight", "vector", (d,)))
            for ours, n_out in (("query", q_out), ("key", kv_out), ("value", kv_out)):
                linear(p + ("attention", ours), f"{hf}.self_attn.{_PROJ[ours]}", d, n_out,
                       c.attention_bias)
            linear(p + ("attention", "out"), f"{hf}.self_attn.o_proj", q_out, d, c.attention_out_bias)
            out.append((p + ("mlp_norm", "scale"), f"{hf}.post_attention_layernorm.weight", "vector", (d,)))
            for name in ("gate", "up"):
                linear(p + ("mlp", name), f"{hf}.mlp.{name}_proj", d, f, c.mlp_bias)
            linear(p + ("mlp", "down"), f"{hf}.mlp.down_proj", f, d, c.mlp_bias)
        out.append((("decoder", "final_norm", "scale"), "model.norm.weight", "vector", (d,)))
        if not c.tie_word_embeddings:
            linear(("lm_head",), "lm_head", d, v, False)
        return out

    def rename(self, config, source):
        if "model.embed_tokens.weight" in source or "embed_tokens.weight" not in source:
            return None
        return lambda hf: hf[len("model."):] if hf.startswith("model.") else hf

    def tied(self, config: LlamaConfig) -> list:
        return [("lm_head.weight", "model.embed_tokens.weight")] if config.tie_word_embeddings else []

    def inputs(self, batch, config) -> dict:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


LLAMA = register(LlamaFamily())
