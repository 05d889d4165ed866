"""BERT and RoBERTa encoders (post-LN), with optional pooler and tied MLM head.

One module covers both families: RoBERTa differs only in its position ids (they start at
``pad_token_id + 1`` and skip pad tokens, as HF's ``create_position_ids_from_input_ids``),
its MLM head names (``lm_head.*``; the head activation is always exact GELU) and defaults.

Module tree (the base pytree mirrors it; ``hf_module_name`` maps it to HF names)::

    embeddings/{word_embeddings, position_embeddings, token_type_embeddings, layer_norm}
    encoder/layer_{i}/{attention/{query,key,value,out}, attention_norm, mlp/{up,down}, mlp_norm}
    pooler                                      (config.add_pooling_layer)
    mlm_head/{transform, layer_norm, bias}      (config.with_mlm_head; decoder tied)

PEFT slots: ``input_embeddings`` is called by :class:`BertModel` itself (so soft-prompt
parameters sit at the root of the delta) on the word embeddings, before position and
token-type embeddings are added; inserted positions get token type 0 and ordinary
consecutive positions. ``sublayer`` is called by each :class:`BertLayer` on the attention
and FFN outputs after their dropout, before residual add + LayerNorm.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from peft_jax.models import hf_io
from peft_jax.models.family import Family, register
from peft_jax.models.hf_io import CheckpointError
from peft_jax.models.layers import (Attention, Dense, Dropout, Embed, LayerNorm, Mlp,
                                    get_activation, make_attention_bias)
from peft_jax.models.slots import NO_SLOTS, Slots, apply_inserts
from peft_jax.models.stack import ModelOptions, per_layer_delta, run_layers

Array = Any
Dtype = Any

MODEL_TYPES = ("bert", "roberta")
_HF_DEFAULTS = {  # defaults of transformers' BertConfig / RobertaConfig for optional fields
    "bert": {"pad_token_id": 0, "bos_token_id": None, "eos_token_id": None},
    "roberta": {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
}


@dataclasses.dataclass(frozen=True)
class BertConfig(ModelOptions):
    """Hyper-parameters of a BERT / RoBERTa encoder (validated on construction)."""

    vocab_size: int = 30522
    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    d_ff: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    model_type: str = "bert"
    position_embedding_type: str = "absolute"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    add_pooling_layer: bool = True
    with_mlm_head: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type={self.model_type!r}; supported: {list(MODEL_TYPES)}")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"unsupported position_embedding_type={self.position_embedding_type!r}; "
                             "supported: ['absolute']")
        get_activation(self.hidden_act, "hidden_act")
        if self.d_model % self.num_heads:
            raise ValueError(f"hidden_size={self.d_model} is not divisible by "
                             f"num_attention_heads={self.num_heads}")
        if self.is_roberta and self.max_position_embeddings <= self.pad_token_id + 1:
            raise ValueError(f"max_position_embeddings={self.max_position_embeddings} leaves no "
                             f"positions after pad_token_id={self.pad_token_id} (RoBERTa)")

    @property
    def is_roberta(self) -> bool:
        return self.model_type == "roberta"

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def max_length(self) -> int:
        """Longest sequence (prompts included) that has position embeddings."""
        return (self.max_position_embeddings - self.pad_token_id - 1 if self.is_roberta
                else self.max_position_embeddings)

    @classmethod
    def tiny(cls, **overrides) -> "BertConfig":
        """A small random-init config for tests (RoBERTa: ``tiny(model_type='roberta')``)."""
        base = dict(vocab_size=99, d_model=32, num_layers=2, num_heads=4, d_ff=37,
                    max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12)
        if overrides.get("model_type") == "roberta":
            base.update(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                        layer_norm_eps=1e-5)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], source: str = "config.json", **overrides) -> "BertConfig":
        """From a Hugging Face ``config.json`` dict; unsupported values -> CheckpointError.

        ``overrides`` set fields that are not in HF configs (``add_pooling_layer``,
        ``with_mlm_head``).
        """
        model_type = cfg.get("model_type")
        if model_type not in MODEL_TYPES:
            raise CheckpointError(f"{source}: config field model_type={model_type!r} is not "
                                  f"supported; supported: {list(MODEL_TYPES)}")
        hf_io.check_keys(cfg, {"is_decoder": (False,), "add_cross_attention": (False,),
                               "position_embedding_type": ("absolute",)}, source)
        if cfg.get("hidden_act") is not None and not isinstance(cfg["hidden_act"], str):
            raise CheckpointError(f"{source}: config field hidden_act={cfg['hidden_act']!r} is not "
                                  "supported (must be an activation name)")
        defaults = _HF_DEFAULTS[model_type]

        field = hf_io.field_reader(cfg, source)

        def optional_int(name: str) -> Optional[int]:
            v = cfg.get(name, defaults[name])
            return v if isinstance(v, int) or v is None else None  # lists of eos ids: not needed

        kwargs = dict(
            vocab_size=field("vocab_size", int),
            d_model=field("hidden_size", int),
            num_layers=field("num_hidden_layers", int),
            num_heads=field("num_attention_heads", int),
            d_ff=field("intermediate_size", int),
            hidden_act=field("hidden_act", str, "gelu"),
            max_position_embeddings=field("max_position_embeddings", int, 512),
            type_vocab_size=field("type_vocab_size", int, 2),
            layer_norm_eps=field("layer_norm_eps", float, 1e-12),
            pad_token_id=field("pad_token_id", int, defaults["pad_token_id"]),
            model_type=model_type,
            position_embedding_type=field("position_embedding_type", str, "absolute"),
            hidden_dropout=field("hidden_dropout_prob", float, 0.1),
            attention_dropout=field("attention_probs_dropout_prob", float, 0.1),
            initializer_range=field("initializer_range", float, 0.02),
            bos_token_id=optional_int("bos_token_id"),
            eos_token_id=optional_int("eos_token_id"),
        )
        kwargs.update(overrides)
        return hf_io.construct(cls, kwargs, source)

    def to_hf(self) -> dict:
        """A ``config.json`` dict that transformers' AutoConfig loads as Bert/RobertaConfig."""
        arch = {"bert": "Bert", "roberta": "Roberta"}[self.model_type]
        return {
            "architectures": [f"{arch}ForMaskedLM" if self.with_mlm_head else f"{arch}Model"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.d_ff,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "position_embedding_type": self.position_embedding_type,
            "hidden_dropout_prob": self.hidden_dropout,
            "attention_probs_dropout_prob": self.attention_dropout,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": True,
            "is_decoder": False,
            "add_cross_attention": False,
        }


# ----------------------------------------------------------------------------- model


def position_ids(config: BertConfig, token_mask: Array, offset: int = 0) -> Array:
    """Position ids ``[b, l]`` from a non-pad indicator ``[b, l]`` (1 = real token or prompt).

    BERT: ``offset .. offset+l-1``. RoBERTa: ``(cumsum(token_mask) + offset) * token_mask +
    pad_token_id`` (pads get ``pad_token_id``; real tokens count from ``pad_token_id + 1``),
    as HF. ``offset``: key/value prefix length (HF shifts positions by the length of
    ``past_key_values``, which is how HF PEFT passes prefix tuning).
    """
    b, l = token_mask.shape
    if not config.is_roberta:
        return jnp.broadcast_to(jnp.arange(offset, offset + l, dtype=jnp.int32)[None], (b, l))
    m = token_mask.astype(jnp.int32)
    return (jnp.cumsum(m, axis=1) + offset) * m + config.pad_token_id


class BertEmbeddings(nn.Module):
    """Word, position and token-type tables, LayerNorm and dropout.

    Split into :meth:`words` and :meth:`combine` so that the model can run the
    ``input_embeddings`` slot in between; :meth:`attend` gives tied MLM logits.
    """

    config: BertConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        self.word_embeddings = Embed(c.vocab_size, c.d_model, axes=("vocab", "embed"),
                                     dtype=self.dtype, embedding_init=init)
        self.position_embeddings = Embed(c.max_position_embeddings, c.d_model,
                                         axes=("length", "embed"), dtype=self.dtype,
                                         embedding_init=init)
        self.token_type_embeddings = Embed(c.type_vocab_size, c.d_model, axes=(None, "embed"),
                                           dtype=self.dtype, embedding_init=init)
        self.layer_norm = LayerNorm(eps=c.layer_norm_eps, dtype=self.dtype)
        self.dropout = Dropout(c.hidden_dropout, c.dropout_impl)

    def words(self, input_ids: Array) -> Array:
        """``[b, l]`` int -> ``[b, l, d]``."""
        return self.word_embeddings(input_ids)

    def combine(self, words: Array, token_type_ids: Array, positions: Array,
                deterministic: bool = True) -> Array:
        """``words + type + position`` -> LayerNorm -> dropout; all ``[b, l, d]``."""
        x = words + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)
        return self.dropout(self.layer_norm(x), deterministic=deterministic)

    def attend(self, x: Array) -> Array:
        """``[b, l, d]`` -> ``[b, l, vocab]`` against the word embedding table."""
        return self.word_embeddings.attend(x)

    def __call__(self, input_ids: Array, token_type_ids: Array, positions: Array,
                 deterministic: bool = True) -> Array:
        return self.combine(self.words(input_ids), token_type_ids, positions, deterministic)


class BertLayer(nn.Module):
    """Post-LN block: ``LN(x + drop(attn(x)))`` then ``LN(h + drop(ffn(h)))``; ``[b, l, d]``."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    slots: Slots = NO_SLOTS

    @nn.compact
    def __call__(self, x: Array, bias: Optional[Array], deterministic: bool = True) -> Array:
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        a = Attention(num_heads=c.num_heads, head_dim=c.head_dim, qkv_bias=True, out_bias=True,
                      dropout_rate=c.attention_dropout, dropout_impl=c.dropout_impl,
                      dtype=self.dtype, kernel_init=init, slots=self.slots,
                      name="attention")(x, bias=bias, deterministic=deterministic)
        a = Dropout(c.hidden_dropout, c.dropout_impl)(a, deterministic=deterministic)
        a = self.slots.sublayer(self, "attention", a, deterministic)
        h = LayerNorm(eps=c.layer_norm_eps, dtype=self.dtype, name="attention_norm")(x + a)
        f = Mlp(d_ff=c.d_ff, activation=c.hidden_act, gated=False, use_bias=True,
                dropout_rate=0.0, dtype=self.dtype, kernel_init=init, slots=self.slots,
                name="mlp")(h, deterministic)
        f = Dropout(c.hidden_dropout, c.dropout_impl)(f, deterministic=deterministic)
        f = self.slots.sublayer(self, "ffn", f, deterministic)
        return LayerNorm(eps=c.layer_norm_eps, dtype=self.dtype, name="mlp_norm")(h + f)


class BertEncoder(nn.Module):
    """The stack of :class:`BertLayer` (``layer_0`` ... or scanned ``layers``); returns
    (the last layer's output, every layer's output when ``keep``)."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    slots: Slots = NO_SLOTS

    @nn.compact
    def __call__(self, x: Array, bias: Optional[Array], deterministic: bool = True,
                 keep: bool = True) -> tuple[Array, tuple]:
        c = self.config
        return run_layers(BertLayer, dict(config=c, dtype=self.dtype, slots=self.slots),
                          c.num_layers, x, (bias,), (deterministic,), remat=c.remat,
                          scan=c.scan_layers, keep=keep)


class MlmHead(nn.Module):
    """``dense -> act -> LayerNorm``; logits = tied decoder + ``bias``. ``[b, l, d] -> [b, l, V]``."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    slots: Slots = NO_SLOTS

    @nn.compact
    def __call__(self, h: Array, attend, deterministic: bool = True) -> Array:
        c = self.config
        x = Dense(c.d_model, axes=("embed", "mlp"), dtype=self.dtype,
                  kernel_init=nn.initializers.normal(c.initializer_range), slots=self.slots,
                  name="transform")(h, deterministic)
        # RobertaLMHead always uses exact GELU; BERT's transform uses hidden_act.
        x = get_activation("gelu" if c.is_roberta else c.hidden_act, "hidden_act")(x)
        x = LayerNorm(eps=c.layer_norm_eps, dtype=self.dtype, name="layer_norm")(x)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                          (c.vocab_size,), jnp.float32)
        return attend(x) + jnp.asarray(bias, self.dtype)


class BertModel(nn.Module):
    """BERT / RoBERTa encoder as a pure function of ``{"params": base, "peft": delta}``."""

    config: BertConfig
    slots: Slots = NO_SLOTS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
                 token_type_ids: Optional[Array] = None, deterministic: bool = True,
                 output_hidden_states: bool = False) -> dict[str, Any]:
        """input_ids, attention_mask (1 = real), token_type_ids: ``[b, l]``.

        Returns ``hidden_states [b, l', d]``, ``attention_mask [b, l']`` (l' includes
        slot inserts), ``pooled [b, d]`` (with a pooler), ``logits [b, l', vocab]`` (with
        the MLM head) and ``all_hidden_states`` (embedding output, then every layer) when
        ``output_hidden_states``.
        """
        c = self.config
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        emb = BertEmbeddings(c, self.dtype, name="embeddings")
        words = emb.words(input_ids)
        words, mask, inserts = self.slots.input_embeddings(self, words, attention_mask, deterministic)
        token_type_ids = apply_inserts(inserts, token_type_ids, 0)
        token_mask = apply_inserts(inserts, (input_ids != c.pad_token_id).astype(jnp.int32), 1)
        length = words.shape[1]
        if length + self.slots.kv_prefix_length > c.max_length:
            raise ValueError(f"sequence length {length} (prompts included) exceeds the "
                             f"{c.max_length} positions of this model (max_position_embeddings="
                             f"{c.max_position_embeddings})")
        x = emb.combine(words, token_type_ids, position_ids(c, token_mask, self.slots.kv_prefix_length),
                      deterministic)

        bias = make_attention_bias(mask, length, dtype=jnp.float32)
        encoder = per_layer_delta(BertEncoder) if c.scan_layers else BertEncoder
        h, layers = encoder(c, self.dtype, self.slots, name="encoder")(x, bias, deterministic,
                                                                       output_hidden_states)
        out: dict[str, Any] = {"hidden_states": h, "attention_mask": mask}
        if output_hidden_states:
            out["all_hidden_states"] = (x,) + layers
        if c.add_pooling_layer:
            pooled = Dense(c.d_model, axes=("embed", "mlp"), dtype=self.dtype,
                           kernel_init=nn.initializers.normal(c.initializer_range),
                           slots=self.slots, name="pooler")(h[:, 0], deterministic)
            out["pooled"] = jnp.tanh(pooled)
        if c.with_mlm_head:
            out["logits"] = MlmHead(c, self.dtype, self.slots, name="mlm_head")(
                h, emb.attend, deterministic)
        return out


# ----------------------------------------------------------------------------- family


def _head_names(config: BertConfig) -> dict[str, str]:
    if config.is_roberta:
        return {"module": "lm_head", "transform": "lm_head.dense",
                "layer_norm": "lm_head.layer_norm", "bias": "lm_head.bias",
                "decoder": "lm_head.decoder"}
    return {"module": "cls.predictions", "transform": "cls.predictions.transform.dense",
            "layer_norm": "cls.predictions.transform.LayerNorm",
            "bias": "cls.predictions.bias", "decoder": "cls.predictions.decoder"}


def _aliases(name: str) -> list[str]:
    """Other spellings of an HF tensor name in older checkpoints (TF-era gamma/beta, tied bias)."""
    alts = [name]
    if name.endswith("LayerNorm.weight") or name.endswith("layer_norm.weight"):
        alts.append(name[: -len("weight")] + "gamma")
    if name.endswith("LayerNorm.bias") or name.endswith("layer_norm.bias"):
        alts.append(name[: -len("bias")] + "beta")
    if name in ("cls.predictions.bias", "lm_head.bias"):
        alts.append(name[: -len("bias")] + "decoder.bias")
    return alts


def _file_prefix(source, config: BertConfig) -> str:
    """'' (BertModel files, e.g. all-MiniLM-L6-v2), 'bert.' or 'roberta.' (task-model files)."""
    key = "embeddings.word_embeddings.weight"
    return next((p for p in ("", f"{config.model_type}.", "bert.", "roberta.")
                 if p + key in source), "")


def _prefix(config: BertConfig) -> str:
    """Canonical prefix of base tensors: none for ``Bert/RobertaModel``, ``bert.`` /
    ``roberta.`` for ``*ForMaskedLM`` (``with_mlm_head``)."""
    return f"{config.model_type}." if config.with_mlm_head else ""


class BertFamily(Family):
    """BERT / RoBERTa (``Bert/RobertaModel``; ``*ForMaskedLM`` with ``with_mlm_head``).

    Loading accepts names with or without a ``bert.``/``roberta.`` prefix, TF-era
    ``LayerNorm.gamma/beta`` spellings and MLM heads ``cls.predictions.*`` / ``lm_head.*``;
    the pooler and the MLM head are used when the checkpoint has them (or as forced by
    ``add_pooling_layer`` / ``with_mlm_head``). The MLM decoder is tied to the word
    embeddings (a stored decoder that differs is an error).
    """

    name = "bert"
    model_types = MODEL_TYPES
    kind = "encoder"
    model_class = BertModel
    config_class = BertConfig
    ignored = (r"(bert\.|roberta\.)?embeddings\.position_ids", r"(bert\.|roberta\.)?pooler\..*",
               r"cls\..*", r"lm_head\..*", r"classifier\..*", r"qa_outputs\..*")
    module_map = (
        (r"embeddings/(word_embeddings|position_embeddings|token_type_embeddings)", r"embeddings.\1"),
        (r"embeddings/layer_norm", "embeddings.LayerNorm"),
        (r"encoder/layer_(\d+)/attention/(query|key|value)", r"encoder.layer.\1.attention.self.\2"),
        (r"encoder/layer_(\d+)/attention/out", r"encoder.layer.\1.attention.output.dense"),
        (r"encoder/layer_(\d+)/attention_norm", r"encoder.layer.\1.attention.output.LayerNorm"),
        (r"encoder/layer_(\d+)/mlp/up", r"encoder.layer.\1.intermediate.dense"),
        (r"encoder/layer_(\d+)/mlp/down", r"encoder.layer.\1.output.dense"),
        (r"encoder/layer_(\d+)/mlp_norm", r"encoder.layer.\1.output.LayerNorm"),
        (r"encoder/layer_(\d+)", r"encoder.layer.\1"),
        (r"pooler", "pooler.dense"),
        (r"mlm_head/(transform|layer_norm)", lambda m, c: _head_names(c)[m[1]]),
        (r"mlm_head", lambda m, c: _head_names(c)["module"]),
    )

    def layout(self, config: BertConfig) -> list:
        c = config
        d, f, v = c.d_model, c.d_ff, c.vocab_size
        pre = _prefix(c)
        out: list = []

        def linear(path, hf, n_in, n_out):
            out.append((path + ("kernel",), hf + ".weight", "linear", (n_in, n_out)))
            out.append((path + ("bias",), hf + ".bias", "vector", (n_out,)))

        def norm(path, hf):
            out.append((path + ("scale",), hf + ".weight", "vector", (d,)))
            out.append((path + ("bias",), hf + ".bias", "vector", (d,)))

        e = ("embeddings",)
        for name, rows in (("word_embeddings", v), ("position_embeddings", c.max_position_embeddings),
                           ("token_type_embeddings", c.type_vocab_size)):
            out.append((e + (name, "embedding"), f"{pre}embeddings.{name}.weight", "table", (rows, d)))
        norm(e + ("layer_norm",), f"{pre}embeddings.LayerNorm")
        for i in range(c.num_layers):
            p, hf = ("encoder", f"layer_{i}"), f"{pre}encoder.layer.{i}"
            for name in ("query", "key", "value"):
                linear(p + ("attention", name), f"{hf}.attention.self.{name}", d, d)
            linear(p + ("attention", "out"), f"{hf}.attention.output.dense", d, d)
            norm(p + ("attention_norm",), f"{hf}.attention.output.LayerNorm")
            linear(p + ("mlp", "up"), f"{hf}.intermediate.dense", d, f)
            linear(p + ("mlp", "down"), f"{hf}.output.dense", f, d)
            norm(p + ("mlp_norm",), f"{hf}.output.LayerNorm")
        if c.add_pooling_layer:
            linear(("pooler",), f"{pre}pooler.dense", d, d)
        if c.with_mlm_head:
            h = _head_names(c)
            linear(("mlm_head", "transform"), h["transform"], d, d)
            norm(("mlm_head", "layer_norm"), h["layer_norm"])
            out.append((("mlm_head", "bias"), h["bias"], "vector", (v,)))
        return out

    def settle(self, config: BertConfig, source, forced) -> BertConfig:
        prefix = _file_prefix(source, config)
        over = {}
        if "add_pooling_layer" not in forced:
            over["add_pooling_layer"] = f"{prefix}pooler.dense.weight" in source
        if "with_mlm_head" not in forced:
            over["with_mlm_head"] = any(a in source for a in _aliases(_head_names(config)["bias"]))
        return dataclasses.replace(config, **over)

    def rename(self, config: BertConfig, source):
        canon, found, head = _prefix(config), _file_prefix(source, config), _head_names(config)["module"]

        def fn(hf: str) -> str:
            name = hf if hf.startswith(head + ".") else found + hf[len(canon):]
            return next((a for a in _aliases(name) if a in source), name)

        return fn

    def tied(self, config: BertConfig) -> list:
        if not config.with_mlm_head:
            return []
        return [(_head_names(config)["decoder"] + ".weight",
                 f"{_prefix(config)}embeddings.word_embeddings.weight")]

    def inputs(self, batch, config) -> dict:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "token_type_ids": batch.get("token_type_ids")}


BERT = register(BertFamily())
