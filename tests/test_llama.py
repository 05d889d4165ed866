"""Llama-family decoder: parity with transformers (PyTorch) on identical random weights.

Covers Llama (GQA, tied/untied head, attention/mlp biases), Qwen2 (qkv bias without o bias),
Mistral (no sliding window), the rope scaling variants, right and left padding, the PEFT
slots (soft prompt = HF ``inputs_embeds``; key/value prefix = HF ``past_key_values``),
greedy generation with the KV cache vs ``generate(do_sample=False)``, HF folder round trips
and bad-input errors.
"""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from peft_jax.models import llama  # noqa: E402
from peft_jax.models.generation import greedy_generate, greedy_loop  # noqa: E402
from peft_jax.models.hf_io import CheckpointError  # noqa: E402
from peft_jax.models.rope import RopeConfig  # noqa: E402
from peft_jax.models.slots import Insert, Slots  # noqa: E402

TOL = 1e-4


def hf_model(config: llama.LlamaConfig, seed: int = 0):
    """A transformers *ForCausalLM with random weights (std 0.2 so logits are not flat)."""
    hf_cfg = transformers.AutoConfig.for_model(**config.to_hf())
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def convert(model, config):
    return llama.LLAMA.params_from_hf({k: v.detach().numpy() for k, v in model.state_dict().items()}, config)


def hf_logits(model, ids, mask, positions=None, **kw):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=None if positions is None else torch.tensor(positions), **kw)
    return out


def random_batch(config, b=3, l=9, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randint(3, config.vocab_size, (b, l)).astype(np.int32)


def right_mask(b, l, lengths):
    return (np.arange(l)[None] < np.asarray(lengths)[:, None]).astype(np.int32)


def left_mask(b, l, lengths):
    return (np.arange(l)[None] >= l - np.asarray(lengths)[:, None]).astype(np.int32)


CONFIGS = {
    "llama_gqa_untied": llama.LlamaConfig.tiny(),
    "llama_tied_bias": llama.LlamaConfig.tiny(tie_word_embeddings=True, attention_bias=True,
                                              attention_out_bias=True, mlp_bias=True, num_kv_heads=4),
    "llama_mqa_headdim": llama.LlamaConfig.tiny(num_kv_heads=1, head_dim=12),
    "qwen2": llama.LlamaConfig.tiny(model_type="qwen2", attention_bias=True, rms_norm_eps=1e-5),
    "mistral": llama.LlamaConfig.tiny(model_type="mistral", num_layers=3),
    "rope_linear": llama.LlamaConfig.tiny(rope=RopeConfig("linear", 10000.0, factor=2.5)),
    "rope_dynamic": llama.LlamaConfig.tiny(max_position_embeddings=6,
                                           rope=RopeConfig("dynamic", 10000.0, factor=2.0)),
    "rope_llama3": llama.LlamaConfig.tiny(rope=RopeConfig(
        "llama3", 500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8), head_dim=16),
    "rope_yarn": llama.LlamaConfig.tiny(rope=RopeConfig(
        "yarn", 10000.0, factor=4.0, original_max_position_embeddings=16), head_dim=16),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_parity_right_padding(name):
    config = CONFIGS[name]
    hf = hf_model(config)
    ids = random_batch(config)
    mask = right_mask(3, 9, [9, 6, 2])
    out = llama.LlamaModel(config).apply({"params": convert(hf, config)}, ids, mask,
                                         output_hidden_states=True)
    ref = hf_logits(hf, ids, mask, output_hidden_states=True)
    real = mask.astype(bool)
    diff = np.abs(np.asarray(out["logits"]) - ref.logits.numpy())[real].max()
    print(f"{name}: max |logits diff| = {diff:.3g}")
    assert diff <= TOL
    assert len(out["all_hidden_states"]) == len(ref.hidden_states) == config.num_layers + 1
    # transformers 5 returns (embeddings, layers 0..n-2, final normed states).
    for ours, theirs in zip(out["all_hidden_states"][:-1] + (out["hidden_states"],), ref.hidden_states):
        assert np.abs(np.asarray(ours) - theirs.numpy())[real].max() <= TOL
    assert out["hidden_states"].shape == (3, 9, config.d_model)
    np.testing.assert_array_equal(out["attention_mask"], mask)


@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2", "rope_yarn"])
def test_forward_parity_left_padding(name):
    """Left padding: our default positions (real tokens before each one) = HF generate's."""
    config = CONFIGS[name]
    hf = hf_model(config, seed=1)
    ids = random_batch(config, seed=1)
    mask = left_mask(3, 9, [9, 5, 1])
    hf_pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    out = llama.LlamaModel(config).apply({"params": convert(hf, config)}, ids, mask)
    ref = hf_logits(hf, ids, mask, positions=hf_pos).logits.numpy()
    diff = np.abs(np.asarray(out["logits"]) - ref)[mask.astype(bool)].max()
    print(f"{name} left padding: max |logits diff| = {diff:.3g}")
    assert diff <= TOL
    # Shifting a row by padding must not change its real-token logits.
    unpadded = llama.LlamaModel(config).apply({"params": convert(hf, config)}, ids[1:2, 4:],
                                              np.ones((1, 5), np.int32))["logits"]
    assert np.abs(np.asarray(out["logits"])[1, 4:] - np.asarray(unpadded)[0]).max() <= TOL


def test_explicit_positions_match_hf():
    config = CONFIGS["rope_linear"]
    hf = hf_model(config, seed=2)
    ids = random_batch(config, b=2, l=6, seed=2)
    mask = np.ones_like(ids)
    pos = np.array([[3, 4, 5, 6, 7, 8], [10, 11, 12, 13, 14, 15]], np.int32)
    out = llama.LlamaModel(config).apply({"params": convert(hf, config)}, ids, mask, positions=pos)
    ref = hf_logits(hf, ids, mask, positions=pos).logits.numpy()
    assert np.abs(np.asarray(out["logits"]) - ref).max() <= TOL


def test_dynamic_rope_beyond_max_positions_changes_logits():
    """Sequence (9) longer than max_position_embeddings (6): the NTK base really rescales."""
    config = CONFIGS["rope_dynamic"]
    hf = hf_model(config)
    base = convert(hf, config)
    ids = random_batch(config)
    plain = dataclasses.replace(config, rope=RopeConfig("default", 10000.0))
    a = llama.LlamaModel(config).apply({"params": base}, ids)["logits"]
    b = llama.LlamaModel(plain).apply({"params": base}, ids)["logits"]
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    short = llama.LlamaModel(config).apply({"params": base}, ids[:, :6])["logits"]
    short_plain = llama.LlamaModel(plain).apply({"params": base}, ids[:, :6])["logits"]
    assert np.abs(np.asarray(short) - np.asarray(short_plain)).max() <= 1e-6


ROPE_CASES = [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 5e5, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0, "original_max_position_embeddings": 64,
     "mscale": 0.7, "mscale_all_dim": 1.0, "beta_fast": 16, "truncate": False},
]


@pytest.mark.parametrize("params", ROPE_CASES, ids=lambda p: p["rope_type"])
def test_inverse_frequencies_match_transformers(params):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from peft_jax.models.rope import inverse_frequencies

    hf_cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=32,
                                      max_position_embeddings=256, rope_parameters=dict(params))
    if params["rope_type"] == "default":
        inv, scale = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding \
            .compute_default_rope_parameters(hf_cfg)
    else:
        inv, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_cfg)
    config = llama.LlamaConfig.from_hf(hf_cfg.to_dict())
    ours, our_scale = inverse_frequencies(config.rope, 32, 256)
    np.testing.assert_allclose(ours, inv.numpy(), rtol=1e-6)
    assert our_scale == pytest.approx(scale, rel=1e-6)


# ----------------------------------------------------------------------------- generation


def hf_generate(hf, ids, mask, n, eos, pad):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                          min_new_tokens=0)
    return out.numpy()[:, ids.shape[1]:]


@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2", "rope_llama3"])
def test_greedy_generate_matches_hf(name):
    config = dataclasses.replace(CONFIGS[name], eos_token_id=None)
    hf = hf_model(config, seed=3)
    base = convert(hf, config)
    ids = random_batch(config, b=3, l=7, seed=3)
    mask = left_mask(3, 7, [7, 4, 2])
    ids = np.where(mask > 0, ids, 0)
    model = llama.LlamaModel(config)
    n = 12
    ref = hf_generate(hf, ids, mask, n, eos=None, pad=0)
    ours = np.asarray(greedy_generate(model, {"params": base}, ids, mask, n))
    np.testing.assert_array_equal(ours, ref)
    # With an EOS that one row emits mid-way: that row is padded afterwards, others go on.
    eos = int(ref[0, 4])
    ref_eos = hf_generate(hf, ids, mask, n, eos=eos, pad=0)
    ours_eos = np.asarray(greedy_generate(model, {"params": base}, ids, mask, n,
                                          eos_token_id=eos, pad_token_id=0))
    np.testing.assert_array_equal(ours_eos[:, : ref_eos.shape[1]], ref_eos)
    assert (ours_eos[:, ref_eos.shape[1]:] == 0).all()
    first = int(np.argmax(ours_eos[0] == eos))
    assert (ours_eos[0, first + 1:] == 0).all()


def test_generate_rejects_right_padding():
    config = CONFIGS["llama_gqa_untied"]
    model = llama.LlamaModel(config)
    base = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3), jnp.int32))["params"]
    with pytest.raises(ValueError, match="left-pad"):
        greedy_generate(model, {"params": base}, np.ones((2, 4), np.int32),
                        right_mask(2, 4, [4, 2]), 3)


def test_greedy_loop_is_generic():
    """A toy step function (next = token + 1) through the same loop; stops and pads at EOS."""
    def step(cache, token, i):
        return jax.nn.one_hot(token + 1, 10), cache + 1

    first = jax.nn.one_hot(jnp.array([2, 5]), 10)
    toks = greedy_loop(step, jnp.array(0), first, 6, eos_token_id=6, pad_token_id=0)
    np.testing.assert_array_equal(toks, [[2, 3, 4, 5, 6, 0], [5, 6, 0, 0, 0, 0]])


# ----------------------------------------------------------------------------- slots


class SoftPrompt:
    """Minimal input_embeddings method: prepends fixed vectors ``[n, d]`` (mask 1)."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors

    def input_embeddings(self, module, embeds, mask, deterministic):
        b = embeds.shape[0]
        p = jnp.broadcast_to(jnp.asarray(self.vectors, embeds.dtype), (b,) + self.vectors.shape)
        n = self.vectors.shape[0]
        return (jnp.concatenate([p, embeds], 1),
                jnp.concatenate([jnp.ones((b, n), mask.dtype), mask], 1), Insert(0, n))


class KvPrefix:
    """Minimal attention_kv method: per-layer fixed keys/values ``[P, h_kv, dh]``."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values
        self.kv_prefix_length = keys[0].shape[0]

    def attention_kv(self, module, k, v, deterministic):
        layer = int(module.path[-2].split("_")[1])
        b = k.shape[0]
        pk = jnp.broadcast_to(jnp.asarray(self.keys[layer]), (b,) + self.keys[layer].shape)
        pv = jnp.broadcast_to(jnp.asarray(self.values[layer]), (b,) + self.values[layer].shape)
        return jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1), self.kv_prefix_length


def test_soft_prompt_slot_matches_hf_inputs_embeds_and_generate():
    config = CONFIGS["llama_gqa_untied"]
    hf = hf_model(config, seed=4)
    base = convert(hf, config)
    prompt = np.random.RandomState(4).normal(0, 0.2, (3, config.d_model)).astype(np.float32)
    model = llama.LlamaModel(config, slots=Slots((SoftPrompt(prompt),)))
    ids = random_batch(config, b=2, l=6, seed=4)
    mask = left_mask(2, 6, [6, 3])
    ids = np.where(mask > 0, ids, 0)
    out = model.apply({"params": base}, ids, mask)
    assert out["logits"].shape == (2, 9, config.vocab_size)
    full_mask = np.concatenate([np.ones((2, 3), np.int32), mask], 1)
    np.testing.assert_array_equal(out["attention_mask"], full_mask)
    embeds = hf.model.embed_tokens(torch.tensor(ids)).detach()
    inputs_embeds = torch.cat([torch.tensor(prompt)[None].expand(2, -1, -1), embeds], 1)
    pos = np.maximum(np.cumsum(full_mask, 1) - 1, 0)
    with torch.no_grad():
        ref = hf(inputs_embeds=inputs_embeds, attention_mask=torch.tensor(full_mask),
                 position_ids=torch.tensor(pos)).logits.numpy()
    diff = np.abs(np.asarray(out["logits"]) - ref)[full_mask.astype(bool)].max()
    print(f"soft prompt: max |logits diff| = {diff:.3g}")
    assert diff <= TOL
    with torch.no_grad():
        ref_gen = hf.generate(inputs_embeds=inputs_embeds, attention_mask=torch.tensor(full_mask),
                              max_new_tokens=8, do_sample=False, pad_token_id=0,
                              eos_token_id=None).numpy()
    ours = np.asarray(greedy_generate(model, {"params": base}, ids, mask, 8))
    np.testing.assert_array_equal(ours, ref_gen[:, -8:])


def test_kv_prefix_slot_matches_hf_past_key_values():
    """Prefix tuning: HF PEFT passes the prefix as past key/values, so positions start at P."""
    config = CONFIGS["llama_gqa_untied"]
    hf = hf_model(config, seed=5)
    base = convert(hf, config)
    rng = np.random.RandomState(5)
    P, b, l = 4, 2, 5
    shape = (P, config.num_kv_heads, config.head_dim)
    keys = [rng.normal(0, 1, shape).astype(np.float32) for _ in range(config.num_layers)]
    values = [rng.normal(0, 1, shape).astype(np.float32) for _ in range(config.num_layers)]
    model = llama.LlamaModel(config, slots=Slots((KvPrefix(keys, values),)))
    ids = random_batch(config, b=b, l=l, seed=5)
    mask = right_mask(b, l, [5, 3])
    out = model.apply({"params": base}, ids, mask)
    cache = transformers.DynamicCache(config=hf.config)
    for i in range(config.num_layers):
        to_t = lambda a: torch.tensor(a).permute(1, 0, 2)[None].expand(b, -1, -1, -1).contiguous()
        cache.update(to_t(keys[i]), to_t(values[i]), i)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids),
                 attention_mask=torch.tensor(np.concatenate([np.ones((b, P), np.int32), mask], 1)),
                 cache=cache).logits.numpy()
    diff = np.abs(np.asarray(out["logits"]) - ref)[mask.astype(bool)].max()
    print(f"kv prefix: max |logits diff| = {diff:.3g}")
    assert diff <= TOL
    # The cached decode path agrees with repeated full forwards (greedy, no cache).
    gen = np.asarray(greedy_generate(model, {"params": base}, ids[:1], np.ones((1, l), np.int32), 5))
    seq = ids[:1]
    for t in range(5):
        nxt = int(np.argmax(np.asarray(model.apply({"params": base}, seq)["logits"])[0, -1]))
        assert gen[0, t] == nxt
        seq = np.concatenate([seq, [[nxt]]], 1)


def test_sublayer_slot_is_called_per_block():
    calls = []

    class Recorder:
        def sublayer(self, module, kind, h, deterministic):
            calls.append(("/".join(module.path), kind))
            return h

    config = CONFIGS["llama_gqa_untied"]
    model = llama.LlamaModel(config, slots=Slots((Recorder(),)))
    model.init(jax.random.PRNGKey(0), jnp.ones((1, 3), jnp.int32))
    assert sorted(set(calls)) == sorted(
        (f"decoder/layer_{i}", k) for i in range(config.num_layers) for k in ("attention", "ffn"))


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("name", ["llama_tied_bias", "qwen2", "mistral", "rope_yarn"])
def test_save_hf_round_trip(tmp_path, name):
    config = CONFIGS[name]
    model = llama.LlamaModel(config)
    base = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(
        model.init(jax.random.PRNGKey(7), jnp.ones((1, 4), jnp.int32))["params"]))
    llama.LLAMA.save(str(tmp_path), config, base)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    assert type(hf).__name__ == llama._ARCHITECTURES[config.model_type]
    ids = random_batch(config, seed=7)
    mask = right_mask(3, 9, [9, 4, 7])
    ours = np.asarray(model.apply({"params": base}, ids, mask)["logits"])
    ref = hf_logits(hf, ids, mask).logits.numpy()
    diff = np.abs(ours - ref)[mask.astype(bool)].max()
    print(f"{name} round trip: max |logits diff| = {diff:.3g}")
    assert diff <= TOL
    config2, base2 = llama.LLAMA.load(str(tmp_path))
    assert config2 == config
    for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(base2)):
        np.testing.assert_array_equal(a, b)


def test_hf_module_names_exist_in_transformers():
    config = CONFIGS["llama_gqa_untied"]
    hf = hf_model(config)
    names = dict(hf.named_modules())
    base = convert(hf, config)
    paths = {"/".join(str(k.key) for k in path[:-1])
             for path, _ in jax.tree_util.tree_flatten_with_path(base)[0]}
    paths |= {"decoder/layer_0", "decoder/layer_1/attention", "decoder/layer_1/mlp"}
    for p in sorted(paths):
        assert llama.LLAMA.hf_module_name(p, config) in names, p
    assert llama.LLAMA.hf_module_name("decoder/layer_1/attention/value", config) == "model.layers.1.self_attn.v_proj"
    with pytest.raises(ValueError, match="no Hugging Face module"):
        llama.LLAMA.hf_module_name("encoder/layer_0", config)


def test_from_hf_reads_transformers_configs():
    """Configs as transformers itself writes them (legacy rope_scaling too)."""
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2,
                                   intermediate_size=100, rope_theta=5e5,
                                   rope_scaling={"type": "linear", "factor": 2.0}).to_dict()
    c = llama.LlamaConfig.from_hf(cfg)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (8, 2, 8)
    assert c.rope == RopeConfig("linear", 5e5, factor=2.0)
    legacy = {"model_type": "llama", "vocab_size": 10, "hidden_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 8, "rope_theta": 1234.0,
              "rope_scaling": {"rope_type": "dynamic", "factor": 3.0}}
    assert llama.LlamaConfig.from_hf(legacy).rope == RopeConfig("dynamic", 1234.0, factor=3.0)
    q = llama.LlamaConfig.from_hf(transformers.Qwen2Config(
        vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=8).to_dict())
    assert (q.attention_bias, q.attention_out_bias, q.num_kv_heads) == (True, False, 1)


# ----------------------------------------------------------------------------- bad input


def _cfg(**kw):
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 8}
    base.update(kw)
    return base


def test_unknown_rope_type_is_an_error():
    with pytest.raises(CheckpointError, match=r"rope_type='su-perfect'"):
        llama.LlamaConfig.from_hf(_cfg(rope_parameters={"rope_type": "su-perfect", "rope_theta": 1e4}),
                                  "x/config.json")
    with pytest.raises(CheckpointError, match="rope_parameters.low_freq_factor"):
        llama.LlamaConfig.from_hf(_cfg(rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    with pytest.raises(CheckpointError, match="partial_rotary_factor"):
        llama.LlamaConfig.from_hf(_cfg(partial_rotary_factor=0.5))


def test_sliding_window_is_an_error():
    with pytest.raises(CheckpointError, match="sliding_window=4096"):
        llama.LlamaConfig.from_hf(_cfg(model_type="mistral", sliding_window=4096))
    with pytest.raises(CheckpointError, match="use_sliding_window"):
        llama.LlamaConfig.from_hf(_cfg(model_type="qwen2", use_sliding_window=True))
    with pytest.raises(CheckpointError, match="model_type='gemma'"):
        llama.LlamaConfig.from_hf(_cfg(model_type="gemma"))
    with pytest.raises(CheckpointError, match="num_key_value_heads"):
        llama.LlamaConfig.from_hf(_cfg(num_key_value_heads=3))


def test_shape_mismatch_and_missing_tensor_name_the_tensor(tmp_path):
    config = CONFIGS["llama_gqa_untied"]
    hf = hf_model(config)
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    bad = dict(tensors)
    bad["model.layers.1.self_attn.k_proj.weight"] = np.zeros((config.num_heads * config.head_dim,
                                                              config.d_model), np.float32)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*shape"):
        llama.LLAMA.params_from_hf(bad, config)
    missing = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    with pytest.raises(CheckpointError, match="missing tensor 'model.norm.weight'"):
        llama.LLAMA.params_from_hf(missing, config)
    tied = dataclasses.replace(config, tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        llama.LLAMA.params_from_hf(tensors, tied)
    (tmp_path / "config.json").write_text(json.dumps(_cfg(rope_parameters={"rope_type": "ntk?"})))
    with pytest.raises(CheckpointError, match="config.json.*rope_type='ntk\\?'"):
        llama.LLAMA.load(str(tmp_path))


def test_positions_with_soft_prompt_is_an_error():
    config = CONFIGS["llama_gqa_untied"]
    model = llama.LlamaModel(config, slots=Slots((SoftPrompt(np.zeros((2, config.d_model),
                                                                       np.float32)),)))
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3), jnp.int32))["params"]
    with pytest.raises(ValueError, match="positions cannot be combined"):
        model.apply({"params": params}, jnp.ones((1, 3), jnp.int32),
                    positions=jnp.zeros((1, 3), jnp.int32))
