"""T5 (v1.0, v1.1, LM-adapted-like, encoder-only): parity with transformers (PyTorch) on
identical random weights, greedy generation token for token, checkpoint round trips, the
encoder soft-prompt and prefix slots against HF's own mechanisms, and clear errors."""

import dataclasses
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.models import t5
from peft_jax.models.hf_io import CheckpointError
from peft_jax.models.slots import Insert, Slots, module_path

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4

CONFIGS = {
    "v1.0": t5.T5Config.tiny(),
    "v1.1": t5.T5Config.tiny(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                             scale_decoder_outputs=False),
    # LM-adapted-like: gated GELU, untied, deeper decoder, inner dim != d_model, a short
    # max_distance so the long inputs below reach the clamped log buckets.
    "lm-adapted": t5.T5Config.tiny(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                   scale_decoder_outputs=False, num_decoder_layers=3, d_kv=6,
                                   relative_attention_num_buckets=10,
                                   relative_attention_max_distance=12),
}


def random_base(cfg: t5.T5Config, seed: int = 0) -> dict:
    """Our base pytree with every leaf random: kernels ~ N(0, 1/fan_in), tables ~ N(0, 1)
    (relative bias N(0, 0.5)), norm scales ~ 1 + N(0, 0.1)."""
    model = t5.T5Model(cfg)
    ids = jnp.ones((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, None, ids))["params"]
    shapes = nn.meta.unbox(shapes)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if name.endswith("scale"):
            return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
        if "relative_attention_bias" in name:
            return (0.5 * rng.standard_normal(s.shape)).astype(np.float32)
        std = 1.0 if name.endswith("embedding") or name.startswith("lm_head") else s.shape[0] ** -0.5
        return (std * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


_CACHE: dict = {}


def pair(name: str, tmp_path_factory):
    """(config, base, HF model): our random base -> save_hf -> transformers from_pretrained."""
    if name not in _CACHE:
        cfg = CONFIGS[name]
        base = random_base(cfg, seed=len(_CACHE))
        folder = tmp_path_factory.mktemp(name.replace(".", "_"))
        t5.T5.save(str(folder), cfg, base)
        hf, info = transformers.T5ForConditionalGeneration.from_pretrained(
            str(folder), output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        _CACHE[name] = (cfg, base, hf.eval())
    return _CACHE[name]


def batch(cfg: t5.T5Config, src_len: int = 11, tgt_len: int = 9, seed: int = 0):
    """Encoder inputs with right- and left-padded rows, decoder inputs with a right-padded row."""
    rng = np.random.default_rng(seed)
    x = rng.integers(2, cfg.vocab_size, (3, src_len))
    xm = np.ones_like(x)
    xm[1, src_len - 3:] = 0
    xm[2, :4] = 0
    y = rng.integers(2, cfg.vocab_size, (3, tgt_len))
    ym = np.ones_like(y)
    ym[0, tgt_len - 3:] = 0
    return x, xm, y, ym


def T(a):
    return torch.tensor(np.asarray(a))


_JITTED: dict = {}


def apply(model, variables, *args, rngs=None, **kwargs):
    """``model.apply`` under ``jax.jit``, compiled once per (model, keyword arguments)."""
    key = (model, tuple(sorted(kwargs.items())))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda v, r, *a: model.apply(v, *a, rngs=r, **kwargs))
    return _JITTED[key](variables, rngs, *[jnp.asarray(a) for a in args])


def init_delta(model, *args):
    return jax.jit(lambda: model.init(jax.random.key(0, impl="rbg"), *args))()["peft"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_parity(name, tmp_path_factory):
    cfg, base, hf = pair(name, tmp_path_factory)
    src = 30 if name == "lm-adapted" else 11  # beyond max_distance: clamped buckets
    x, xm, y, ym = batch(cfg, src_len=src)
    with torch.no_grad():
        ref = hf(input_ids=T(x), attention_mask=T(xm), decoder_input_ids=T(y),
                 decoder_attention_mask=T(ym), output_hidden_states=True)
    out = apply(t5.T5Model(cfg), {"params": base}, x, xm, y, ym, output_hidden_states=True)
    err = np.abs(np.asarray(out["logits"]) - ref.logits.numpy()).max()
    enc_err = np.abs(np.asarray(out["encoder_hidden_states"])
                     - ref.encoder_last_hidden_state.numpy()).max()
    print(f"{name}: max |logits diff| = {err:.3g}, max |encoder states diff| = {enc_err:.3g}")
    assert err <= TOL and enc_err <= TOL
    assert out["logits"].shape == (3, y.shape[1], cfg.vocab_size)
    np.testing.assert_array_equal(out["encoder_attention_mask"], xm)
    # Per-layer decoder states. Ours: embeddings, then every layer's output; HF: the same,
    # except that the last entry is the final (normed) output.
    ours = out["all_hidden_states"][:-1] + (out["hidden_states"],)
    assert len(ours) == len(ref.decoder_hidden_states) == cfg.num_decoder_layers + 1
    for a, b in zip(ours, ref.decoder_hidden_states):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["v1.0", "v1.1"])
def test_greedy_generation_matches_hf(name, tmp_path_factory):
    cfg, base, hf = pair(name, tmp_path_factory)
    x, xm, _, _ = batch(cfg, seed=1)
    model, variables, n = t5.T5Model(cfg), {"params": base}, 10
    kw = dict(do_sample=False, num_beams=1, max_new_tokens=n,
              decoder_start_token_id=cfg.decoder_start_token_id, pad_token_id=cfg.pad_token_id)
    with torch.no_grad():
        free = hf.generate(input_ids=T(x), attention_mask=T(xm), eos_token_id=None, **kw).numpy()
    # eos := row 0's first non-pad token, so that row stops early while others run on.
    eos = int(next(t for t in free[0, 1:] if t != cfg.pad_token_id))
    stop = int(np.argmax(free[0] == eos))
    ours = np.asarray(t5.greedy_generate(model, variables, x, xm, max_new_tokens=n, eos_token_id=eos))
    with torch.no_grad():
        ref = hf.generate(input_ids=T(x), attention_mask=T(xm), eos_token_id=eos, **kw).numpy()
    print(f"{name}: HF {ref.tolist()}\n      ours {ours.tolist()}")
    np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == cfg.pad_token_id).all()
    assert stop < n and (ours[0, stop + 1:] == cfg.pad_token_id).all()  # row 0 stopped
    assert not (ours[:, 1:] == eos).any(axis=1).all()  # some row never stopped


def test_encoder_model_parity(tmp_path):
    """transformers T5EncoderModel (its own random init) -> save_pretrained -> load_hf."""
    cfg = CONFIGS["v1.1"]
    hcfg = transformers.T5Config(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    torch.manual_seed(0)
    hf = transformers.T5EncoderModel(hcfg).eval()
    hf.save_pretrained(str(tmp_path))
    loaded_cfg, base = t5.T5.load(str(tmp_path))
    assert loaded_cfg.encoder_only and "decoder" not in base
    x, xm, _, _ = batch(cfg, src_len=25)
    with torch.no_grad():
        ref = hf(input_ids=T(x), attention_mask=T(xm)).last_hidden_state.numpy()
    out = apply(t5.T5Model(loaded_cfg), {"params": base}, x, xm)
    err = np.abs(np.asarray(out["hidden_states"]) - ref).max()
    print(f"T5EncoderModel: max |hidden diff| = {err:.3g}")
    assert err <= TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_through_transformers(name, tmp_path_factory, tmp_path):
    """ours -> save_hf -> transformers (see pair) -> save_pretrained -> load_hf == ours."""
    cfg, base, hf = pair(name, tmp_path_factory)
    hf.save_pretrained(str(tmp_path))
    cfg2, base2 = t5.T5.load(str(tmp_path))
    assert cfg2 == cfg, (cfg2, cfg)
    jax.tree.map(np.testing.assert_array_equal, base2, base)
    back = t5.T5.params_to_hf(base2, cfg2)
    assert set(back) == set(t5.T5.params_to_hf(base, cfg))


def test_config_parsing_matches_transformers():
    cases = [
        {},  # all defaults (v1.0)
        {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},  # classic v1.1 file
        {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": True,  # saved by 5.x
         "scale_decoder_outputs": False, "dense_act_fn": "gelu_new", "is_gated_act": True},
        {"feed_forward_proj": "gated-silu", "num_decoder_layers": 3},
        {"feed_forward_proj": "gated-gelu", "dense_act_fn": "relu", "is_gated_act": False},
    ]
    for case in cases:
        ours = t5.T5Config.from_hf(case)
        ref = transformers.T5Config.from_dict(dict(case))
        for field in ("dense_act_fn", "is_gated_act", "scale_decoder_outputs", "num_decoder_layers",
                      "num_layers", "d_kv", "relative_attention_num_buckets",
                      "relative_attention_max_distance", "layer_norm_epsilon", "dropout_rate"):
            assert getattr(ours, field) == getattr(ref, field), (case, field)
        again = transformers.T5Config.from_dict(ours.to_hf())
        assert (again.dense_act_fn, again.is_gated_act, again.scale_decoder_outputs) == (
            ours.dense_act_fn, ours.is_gated_act, ours.scale_decoder_outputs)
    assert t5.T5Config.from_hf(cases[1]).tie_word_embeddings is False
    assert t5.T5Config.from_hf(cases[0]).tie_word_embeddings is True


@pytest.mark.parametrize("bad", ["foo-gelu", "gated-gelu-new", "gated-nonsense", "swishy"])
def test_unsupported_feed_forward_proj(bad):
    with pytest.raises(CheckpointError, match="feed_forward_proj"):
        t5.T5Config.from_hf({"feed_forward_proj": bad}, "cfg.json")
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5.T5Config.tiny(feed_forward_proj=bad)


def test_bad_checkpoints(tmp_path):
    cfg = CONFIGS["v1.1"]
    tensors = t5.T5.params_to_hf(random_base(cfg), cfg)
    missing, gone = dict(tensors), "decoder.block.1.layer.2.DenseReluDense.wi_0.weight"
    del missing[gone]
    with pytest.raises(CheckpointError, match=re.escape(gone)):
        t5.T5.params_from_hf(missing, cfg)
    wrong = dict(tensors)
    relb = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    wrong[relb] = np.zeros((3, 4), np.float32)
    with pytest.raises(CheckpointError, match=r"relative_attention_bias.weight.*\(3, 4\)"):
        t5.T5.params_from_hf(wrong, cfg)
    # The folder path: a config that disagrees with the tensors names the tensor.
    t5.T5.save(str(tmp_path), cfg, random_base(cfg))
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["d_ff"] = 40
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="wi_0.weight.*shape"):
        t5.T5.load(str(tmp_path))
    with pytest.raises(CheckpointError, match="missing leaf"):
        t5.T5.params_to_hf({"shared": {}}, cfg)


@pytest.mark.parametrize("name", ["v1.0", "v1.1"])
def test_hf_module_name_covers_every_weight(name, tmp_path_factory):
    cfg, base, hf = pair(name, tmp_path_factory)
    hf_names = set(hf.state_dict())
    leaves = jax.tree_util.tree_flatten_with_path(base)[0]
    for path, _ in leaves:
        module = "/".join(p.key for p in path[:-1])
        assert t5.T5.hf_module_name(module, cfg) + ".weight" in hf_names, module
    assert t5.T5.hf_module_name("encoder/layer_0/attention/query", cfg) == "encoder.block.0.layer.0.SelfAttention.q"
    assert (t5.T5.hf_module_name("decoder/layer_1/cross_attention/out", cfg)
            == "decoder.block.1.layer.1.EncDecAttention.o")
    assert t5.T5.hf_module_name("decoder/layer_1/mlp/down", cfg) == "decoder.block.1.layer.2.DenseReluDense.wo"
    hf_modules = dict(hf.named_modules())
    for module in ("encoder/layer_1", "decoder/layer_0/cross_attention", "decoder/layer_1/mlp"):
        assert t5.T5.hf_module_name(module, cfg) in hf_modules
    with pytest.raises(ValueError, match="pooler"):
        t5.T5.hf_module_name("pooler", cfg)


def test_shift_right_matches_transformers(tmp_path_factory):
    cfg, _, hf = pair("v1.0", tmp_path_factory)
    labels = np.array([[5, 6, 7, -100], [8, -100, -100, -100]])
    hf.config.decoder_start_token_id = cfg.decoder_start_token_id
    ref = hf._shift_right(T(labels)).numpy()
    np.testing.assert_array_equal(t5.shift_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id), ref)


# ----------------------------------------------------------------------------- slots


@dataclasses.dataclass(frozen=True)
class SoftPrompt:
    """Prepends ``n`` learned vectors to the encoder input (test stand-in for prompt tuning)."""

    n: int = 3

    def input_embeddings(self, module, embeds, mask, deterministic=True):
        p = module.variable("peft", "prompt", lambda: jax.random.normal(
            jax.random.key(7), (self.n, embeds.shape[-1]))).value
        b = embeds.shape[0]
        embeds = jnp.concatenate([jnp.broadcast_to(p, (b,) + p.shape), embeds], axis=1)
        ins = Insert(0, self.n)
        return embeds, ins.apply(mask, 1), ins


@dataclasses.dataclass(frozen=True)
class DecoderPrefix:
    """Key/value prefixes on decoder self attention only, with a static length."""

    kv_prefix_length: int = 2

    def attention_kv(self, module, k, v, deterministic=True):
        m = re.fullmatch(r"decoder/layer_(\d+)/attention", module_path(module))
        if not m:
            return k, v, 0
        shape = (self.kv_prefix_length,) + k.shape[2:]
        key = jax.random.key(100 + int(m[1]))
        pk = module.variable("peft", "prefix_key", lambda: jax.random.normal(key, shape)).value
        pv = module.variable("peft", "prefix_value",
                             lambda: jax.random.normal(jax.random.fold_in(key, 1), shape)).value
        b = k.shape[0]
        return (jnp.concatenate([jnp.broadcast_to(pk, (b,) + shape), k], axis=1),
                jnp.concatenate([jnp.broadcast_to(pv, (b,) + shape), v], axis=1),
                self.kv_prefix_length)


def test_soft_prompt_on_encoder_matches_hf_inputs_embeds(tmp_path_factory):
    cfg, base, hf = pair("v1.1", tmp_path_factory)
    x, xm, y, ym = batch(cfg)
    model = t5.T5Model(cfg, slots=Slots((SoftPrompt(3),)))
    delta = init_delta(model, x, xm, y, ym)
    assert set(delta) == {"prompt"}  # at the root of the delta
    out = apply(model, {"params": base, "peft": delta}, x, xm, y, ym)
    assert out["encoder_attention_mask"].shape == (3, x.shape[1] + 3)
    prompt = np.asarray(delta["prompt"])
    long_mask = T(np.concatenate([np.ones((3, 3), int), xm], 1))
    with torch.no_grad():
        emb = hf.shared(T(x))
        emb = torch.cat([T(np.broadcast_to(prompt, (3,) + prompt.shape)), emb], dim=1)
        ref = hf(inputs_embeds=emb, attention_mask=long_mask, decoder_input_ids=T(y),
                 decoder_attention_mask=T(ym)).logits.numpy()
    err = np.abs(np.asarray(out["logits"]) - ref).max()
    print(f"soft prompt: max |logits diff| = {err:.3g}")
    assert err <= TOL
    gen = t5.greedy_generate(model, {"params": base, "peft": delta}, x, xm, max_new_tokens=4,
                             eos_token_id=None)
    with torch.no_grad():
        ref_gen = hf.generate(inputs_embeds=emb, attention_mask=long_mask, do_sample=False,
                              num_beams=1, max_new_tokens=4, decoder_start_token_id=0,
                              eos_token_id=None, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(gen), ref_gen)


def test_prefix_position_bias_matches_hf_past_key_values(tmp_path_factory):
    """A static-length decoder prefix equals HF T5 given the prefix as past_key_values
    (position bias over P + L keys, queries at the last L positions)."""
    cfg, base, hf = pair("v1.0", tmp_path_factory)
    x, xm, y, _ = batch(cfg)
    P = 2
    model = t5.T5Model(cfg, slots=Slots((DecoderPrefix(P),)))
    delta = init_delta(model, x, xm, y)
    assert set(delta) == {"decoder"} and "encoder" not in delta
    out = apply(model, {"params": base, "peft": delta}, x, xm, y)
    self_cache = transformers.DynamicCache(config=hf.config)
    for i in range(cfg.num_decoder_layers):
        d = delta["decoder"][f"layer_{i}"]["attention"]
        k = np.broadcast_to(np.asarray(d["prefix_key"]), (3, P, cfg.num_heads, cfg.d_kv))
        v = np.broadcast_to(np.asarray(d["prefix_value"]), (3, P, cfg.num_heads, cfg.d_kv))
        self_cache.update(T(k.transpose(0, 2, 1, 3).copy()), T(v.transpose(0, 2, 1, 3).copy()), i)
    cache = transformers.EncoderDecoderCache(self_cache, transformers.DynamicCache(config=hf.config))
    with torch.no_grad():
        ref = hf(input_ids=T(x), attention_mask=T(xm), decoder_input_ids=T(y),
                 cache=cache, use_cache=True).logits.numpy()
    err = np.abs(np.asarray(out["logits"]) - ref).max()
    print(f"decoder prefix (P={P}): max |logits diff| = {err:.3g}")
    assert err <= TOL
    with torch.no_grad():
        plain = hf(input_ids=T(x), attention_mask=T(xm), decoder_input_ids=T(y)).logits.numpy()
    assert np.abs(plain - ref).max() > 1e-2  # the prefix does change the output
    # KV-cache decoding with the prefix agrees with teacher forcing on its own output.
    variables = {"params": base, "peft": delta}
    gen = np.asarray(t5.greedy_generate(model, variables, x, xm, max_new_tokens=y.shape[1],
                                        eos_token_id=None))
    tf = apply(model, variables, x, xm, gen[:, :-1])["logits"]
    np.testing.assert_array_equal(np.argmax(np.asarray(tf), -1), gen[:, 1:])


def test_dropout_is_active_only_when_not_deterministic():
    cfg = dataclasses.replace(CONFIGS["v1.0"], num_layers=1, num_decoder_layers=1)
    base = random_base(cfg)
    x, xm, y, ym = batch(cfg)
    model = t5.T5Model(cfg)
    det = apply(model, {"params": base}, x, xm, y, ym)["logits"]
    # rbg keys: far quicker to compile on CPU than threefry, same dropout semantics.
    a = apply(model, {"params": base}, x, xm, y, ym, deterministic=False,
              rngs={"dropout": jax.random.key(1, impl="rbg")})["logits"]
    b = apply(model, {"params": base}, x, xm, y, ym, deterministic=False,
              rngs={"dropout": jax.random.key(2, impl="rbg")})["logits"]
    assert np.abs(np.asarray(a) - np.asarray(det)).max() > 1e-3
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
