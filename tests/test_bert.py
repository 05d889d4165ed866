"""BERT / RoBERTa: parity with transformers (PyTorch) on identical weights, checkpoint
round trips, real all-MiniLM-L6-v2 embeddings vs sentence-transformers, slot placement,
and clear errors on bad configs / checkpoints."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.models import bert, pooling
from peft_jax.models.hf_io import CheckpointError
from peft_jax.models.slots import Insert, Slots

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4

TORCH_CLASSES = {
    ("bert", False): "BertModel", ("bert", True): "BertForMaskedLM",
    ("roberta", False): "RobertaModel", ("roberta", True): "RobertaForMaskedLM",
}


def tiny(model_type: str, mlm: bool, **kw) -> bert.BertConfig:
    # *ForMaskedLM models have no pooler; base models do.
    kw.setdefault("add_pooling_layer", not mlm)
    return bert.BertConfig.tiny(model_type=model_type, with_mlm_head=mlm, **kw)


def torch_model(cfg: bert.BertConfig, seed: int = 0):
    """A transformers model for ``cfg`` with every parameter randomized (biases, norms too)."""
    hf = {k: v for k, v in cfg.to_hf().items() if k != "architectures"}
    hcfg = transformers.AutoConfig.for_model(**hf)
    torch.manual_seed(seed)
    model = getattr(transformers, TORCH_CLASSES[(cfg.model_type, cfg.with_mlm_head)])(hcfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight") or name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def state_dict_np(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def batch(cfg: bert.BertConfig, seed: int = 0):
    """ids/mask/types [4, 10]: full row, right-padded rows, and (RoBERTa) a left-padded row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.vocab_size, (4, 10))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    mask[3, :2] = 0  # left padding: RoBERTa positions must skip the pads, as HF computes them
    ids = np.where(mask == 1, ids, cfg.pad_token_id)
    types = np.zeros_like(ids)
    if cfg.type_vocab_size > 1:
        types[:, 5:] = 1
    return ids, mask, types


def run_torch(model, ids, mask, types, **kw):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(types), output_hidden_states=True, **kw)


def masked_max_diff(a, b, mask) -> float:
    """Max |a - b| over real tokens only (pad-token states are never used)."""
    m = np.asarray(mask, bool)[..., None]
    return float(np.abs(np.where(m, np.asarray(a) - np.asarray(b), 0.0)).max())


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("mlm", [False, True])
def test_parity_with_transformers(model_type, mlm):
    # RoBERTa with relu: its MLM head must still use exact GELU, as RobertaLMHead does.
    cfg = tiny(model_type, mlm, hidden_act="gelu_new" if model_type == "bert" else "relu")
    tm = torch_model(cfg)
    base = bert.BERT.params_from_hf(state_dict_np(tm), cfg)
    ids, mask, types = batch(cfg)
    ref = run_torch(tm, ids, mask, types)
    out = bert.BertModel(cfg).apply({"params": base}, jnp.asarray(ids), jnp.asarray(mask),
                                    jnp.asarray(types), output_hidden_states=True)
    ref_hidden = ref.hidden_states[-1].numpy()
    h_err = float(np.abs(np.asarray(out["hidden_states"]) - ref_hidden).max())
    layer_err = max(float(np.abs(np.asarray(a) - b.numpy()).max())
                    for a, b in zip(out["all_hidden_states"], ref.hidden_states))
    print(f"\n{TORCH_CLASSES[(model_type, mlm)]}: max|hidden diff| {h_err:.3g}, "
          f"all layers {layer_err:.3g}", end="")
    assert len(out["all_hidden_states"]) == cfg.num_layers + 1
    assert h_err <= TOL and layer_err <= TOL
    np.testing.assert_array_equal(np.asarray(out["attention_mask"]), mask)
    if mlm:
        l_err = float(np.abs(np.asarray(out["logits"]) - ref.logits.numpy()).max())
        print(f", max|logits diff| {l_err:.3g}", end="")
        assert out["logits"].shape == (4, 10, cfg.vocab_size)
        assert l_err <= TOL
        assert "pooled" not in out
    else:
        p_err = float(np.abs(np.asarray(out["pooled"]) - ref.pooler_output.numpy()).max())
        print(f", max|pooled diff| {p_err:.3g}", end="")
        assert p_err <= TOL
        assert "logits" not in out


def test_init_tree_matches_conversion_and_dropout_is_wired():
    cfg = tiny("bert", True, add_pooling_layer=True)
    model = bert.BertModel(cfg)
    ids, mask, types = batch(cfg)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(ids), jnp.asarray(mask))
    init_params = jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
    converted = bert.BERT.params_from_hf(bert.BERT.params_to_hf(init_params, cfg), cfg)
    assert jax.tree.structure(init_params) == jax.tree.structure(converted)
    jax.tree.map(np.testing.assert_array_equal, init_params, converted)
    # every leaf carries logical axis names
    boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: hasattr(x, "names"))
    assert all(hasattr(x, "names") and len(x.names) == x.value.ndim for x in boxed)

    det = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask))["hidden_states"]
    drop = lambda k: model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), deterministic=False,
                                 rngs={"dropout": jax.random.PRNGKey(k)})["hidden_states"]
    assert not np.allclose(drop(1), det)
    np.testing.assert_array_equal(drop(1), drop(1))


def test_base_without_mlm_head_has_no_head_params():
    cfg = tiny("bert", False)
    variables = bert.BertModel(cfg).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
    assert set(variables["params"]) == {"embeddings", "encoder", "pooler"}
    cfg = dataclasses.replace(cfg, add_pooling_layer=False)
    variables = bert.BertModel(cfg).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
    assert set(variables["params"]) == {"embeddings", "encoder"}


def test_hf_module_names_exist_in_torch_model():
    for model_type in ("bert", "roberta"):
        for mlm in (False, True):
            cfg = tiny(model_type, mlm)
            tm = torch_model(cfg)
            prefix = f"{model_type}." if mlm else ""
            torch_names = {n for n, _ in tm.named_modules()}
            variables = bert.BertModel(cfg).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
            paths = set()
            for kp, _ in jax.tree_util.tree_flatten_with_path(
                    nn.meta.unbox(variables["params"]))[0]:
                keys = [k.key for k in kp][:-1]  # drop the leaf name (kernel, bias, ...)
                if keys:
                    paths.add("/".join(keys))
            for p in paths:
                name = bert.BERT.hf_module_name(p, cfg)
                full = name if p.startswith("mlm_head") else prefix + name
                assert full in torch_names, (p, full)
    cfg = tiny("bert", False)
    assert bert.BERT.hf_module_name("encoder/layer_3/attention/query", cfg) == "encoder.layer.3.attention.self.query"
    assert bert.BERT.hf_module_name("encoder/layer_0/mlp/down", cfg) == "encoder.layer.0.output.dense"
    with pytest.raises(ValueError, match="encoder/bogus"):
        bert.BERT.hf_module_name("encoder/bogus", cfg)


# ----------------------------------------------------------------------------- slots


class _PrependPrompt:
    """Minimal soft prompt: prepends delta['prompt'] [n, d] to every sequence."""

    def __init__(self, n: int):
        self.n = n

    def input_embeddings(self, module, embeds, mask, deterministic):
        prompt = module.variable("peft", "prompt", jnp.zeros, (self.n, embeds.shape[-1])).value
        b = embeds.shape[0]
        p = jnp.broadcast_to(prompt[None].astype(embeds.dtype), (b,) + prompt.shape)
        ones = jnp.ones((b, self.n), mask.dtype)
        return (jnp.concatenate([p, embeds], 1), jnp.concatenate([ones, mask], 1),
                Insert(at=0, n=self.n))


class _TanhResidual:
    """Sublayer hook h -> h + 0.5 tanh(h) (attention) / h - 0.3 tanh(h) (ffn)."""

    def sublayer(self, module, kind, h, deterministic):
        return h + (0.5 if kind == "attention" else -0.3) * jnp.tanh(h)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_soft_prompt_matches_hf_inputs_embeds(model_type):
    """Prompt tokens get type 0 and consecutive positions, as HF PEFT's prompt tuning gets
    by prepending to ``inputs_embeds`` (RoBERTa: only pad positions may differ)."""
    cfg = tiny(model_type, True)
    tm = torch_model(cfg, seed=1)
    base = bert.BERT.params_from_hf(state_dict_np(tm), cfg)
    ids, mask, types = batch(cfg)
    ids, mask, types = ids[:3], mask[:3], types[:3]  # right padding only (HF embeds path)
    n = 4
    prompt = np.random.default_rng(1).normal(size=(n, cfg.d_model)).astype(np.float32)
    model = bert.BertModel(cfg, slots=Slots((_PrependPrompt(n),)))
    out = model.apply({"params": base, "peft": {"prompt": prompt}}, jnp.asarray(ids),
                      jnp.asarray(mask), jnp.asarray(types))
    words = tm.get_input_embeddings()(torch.tensor(ids))
    embeds = torch.cat([torch.tensor(prompt)[None].expand(3, n, -1), words], 1)
    full_mask = np.concatenate([np.ones((3, n), mask.dtype), mask], 1)
    full_types = np.concatenate([np.zeros((3, n), types.dtype), types], 1)
    with torch.no_grad():
        ref = tm(inputs_embeds=embeds, attention_mask=torch.tensor(full_mask),
                 token_type_ids=torch.tensor(full_types))
    np.testing.assert_array_equal(np.asarray(out["attention_mask"]), full_mask)
    assert out["logits"].shape == (3, n + 10, cfg.vocab_size)
    err = masked_max_diff(out["logits"], ref.logits.numpy(), full_mask)
    print(f"\nsoft prompt ({model_type}) max|logits diff| {err:.3g}", end="")
    assert err <= TOL
    if model_type == "bert":  # BERT positions are 0..l'-1 for pads too: everything matches
        assert float(np.abs(np.asarray(out["logits"]) - ref.logits.numpy()).max()) <= TOL


def test_sublayer_slot_placement_matches_torch_hooks():
    """The hook acts after each sublayer's dropout, before residual add + LayerNorm."""
    cfg = tiny("bert", False)
    tm = torch_model(cfg, seed=2)
    base = bert.BERT.params_from_hf(state_dict_np(tm), cfg)
    for layer in tm.encoder.layer:
        layer.attention.output.dropout.register_forward_hook(lambda m, i, o: o + 0.5 * torch.tanh(o))
        layer.output.dropout.register_forward_hook(lambda m, i, o: o - 0.3 * torch.tanh(o))
    ids, mask, types = batch(cfg)
    ref = run_torch(tm, ids, mask, types)
    out = bert.BertModel(cfg, slots=Slots((_TanhResidual(),))).apply(
        {"params": base}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    plain = bert.BertModel(cfg).apply({"params": base}, jnp.asarray(ids), jnp.asarray(mask),
                                      jnp.asarray(types))
    err = float(np.abs(np.asarray(out["hidden_states"]) - ref.last_hidden_state.numpy()).max())
    assert err <= TOL
    assert float(np.abs(np.asarray(plain["hidden_states"]) - np.asarray(out["hidden_states"])).max()) > 1e-2


def test_too_long_sequence_is_a_clear_error():
    cfg = bert.BertConfig.tiny(model_type="roberta", max_position_embeddings=10)  # 8 positions
    model = bert.BertModel(cfg)
    with pytest.raises(ValueError, match="exceeds the 8 positions"):
        model.init(jax.random.PRNGKey(0), jnp.ones((1, 9), jnp.int32))


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_save_hf_loads_in_transformers(tmp_path, model_type):
    cfg = tiny(model_type, False)
    base = jax.tree.map(np.asarray, nn.meta.unbox(
        bert.BertModel(cfg).init(jax.random.PRNGKey(3), jnp.ones((1, 4), jnp.int32))["params"]))
    # non-trivial norms and biases
    base = jax.tree.map(lambda x: x + np.random.default_rng(x.size).normal(0, 0.05, x.shape)
                        .astype(np.float32), base)
    bert.BERT.save(str(tmp_path), cfg, base)
    tm, info = transformers.AutoModel.from_pretrained(str(tmp_path), output_loading_info=True)
    tm.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask, types = batch(cfg)
    ref = run_torch(tm, ids, mask, types)
    out = bert.BertModel(cfg).apply({"params": base}, jnp.asarray(ids), jnp.asarray(mask),
                                    jnp.asarray(types))
    err = float(np.abs(np.asarray(out["hidden_states"]) - ref.last_hidden_state.numpy()).max())
    print(f"\nround trip {model_type}: max|hidden diff| {err:.3g}", end="")
    assert err <= TOL
    # and back through our own loader
    cfg2, base2 = bert.BERT.load(str(tmp_path))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, base, base2)


def test_save_hf_with_mlm_head_loads_as_masked_lm(tmp_path):
    cfg = tiny("roberta", True)
    tm0 = torch_model(cfg, seed=4)
    base = bert.BERT.params_from_hf(state_dict_np(tm0), cfg)
    bert.BERT.save(str(tmp_path), cfg, base)
    tm, info = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert type(tm).__name__ == "RobertaForMaskedLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask, types = batch(cfg)
    ref = run_torch(tm.eval(), ids, mask, types)
    out = bert.BertModel(cfg).apply({"params": base}, jnp.asarray(ids), jnp.asarray(mask),
                                    jnp.asarray(types))
    assert float(np.abs(np.asarray(out["logits"]) - ref.logits.numpy()).max()) <= TOL
    cfg2, _ = bert.BERT.load(str(tmp_path))  # head auto-detected, no pooler
    assert cfg2.with_mlm_head and not cfg2.add_pooling_layer


def test_config_round_trip_through_transformers():
    for cfg in (bert.BertConfig.tiny(), bert.BertConfig.tiny(model_type="roberta")):
        hcfg = transformers.AutoConfig.for_model(**cfg.to_hf())
        assert bert.BertConfig.from_hf(hcfg.to_dict(), "x") == cfg


# ----------------------------------------------------------------------------- real weights


def test_minilm_matches_sentence_transformers(minilm_path, shared_data):
    st = pytest.importorskip("sentence_transformers")
    lines = (shared_data / "sst2" / "sentiment-dev").read_text().splitlines()
    sentences = [ln.rsplit("\t", 1)[0].strip() for ln in lines[:32]]
    assert len(sentences) == 32 and all(sentences)

    cfg, base = bert.BERT.load(minilm_path)
    assert cfg.model_type == "bert" and cfg.num_layers == 6 and cfg.d_model == 384
    assert cfg.add_pooling_layer and not cfg.with_mlm_head  # keys have no 'bert.' prefix
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    enc = tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="np")
    model = bert.BertModel(cfg)
    out = jax.jit(model.apply)({"params": base}, jnp.asarray(enc["input_ids"]),
                               jnp.asarray(enc["attention_mask"]),
                               jnp.asarray(enc["token_type_ids"]))
    ours = np.asarray(pooling.l2_normalize(pooling.pool("mean", out)))

    ref = st.SentenceTransformer(minilm_path, device="cpu").encode(
        sentences, batch_size=8, convert_to_numpy=True)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    cos = np.sum(ours * ref, axis=1)
    print(f"\nall-MiniLM-L6-v2 on 32 SST-2 dev sentences: min cosine {cos.min():.8f}, "
          f"max|diff| {np.abs(ours - ref).max():.3g}", end="")
    assert cos.min() >= 0.99999


# ----------------------------------------------------------------------------- bad input


def _hf_cfg(**kw):
    d = bert.BertConfig.tiny().to_hf()
    d.update(kw)
    return d


def test_bad_config_fields_are_named():
    with pytest.raises(CheckpointError, match="hidden_act='swiglu_xyz'"):
        bert.BertConfig.from_hf(_hf_cfg(hidden_act="swiglu_xyz"), "cfg.json")
    with pytest.raises(CheckpointError, match="position_embedding_type='relative_key'"):
        bert.BertConfig.from_hf(_hf_cfg(position_embedding_type="relative_key"), "cfg.json")
    with pytest.raises(CheckpointError, match="model_type='albert'"):
        bert.BertConfig.from_hf(_hf_cfg(model_type="albert"), "cfg.json")
    with pytest.raises(CheckpointError, match="is_decoder"):
        bert.BertConfig.from_hf(_hf_cfg(is_decoder=True), "cfg.json")
    bad = _hf_cfg()
    del bad["hidden_size"]
    with pytest.raises(CheckpointError, match="cfg.json: missing config field 'hidden_size'"):
        bert.BertConfig.from_hf(bad, "cfg.json")
    with pytest.raises(ValueError, match="hidden_act"):
        bert.BertConfig.tiny(hidden_act="nope")
    with pytest.raises(ValueError, match="position_embedding_type"):
        bert.BertConfig.tiny(position_embedding_type="relative_key_query")


def test_missing_and_misshapen_tensors_are_named():
    cfg = tiny("bert", True)
    sd = state_dict_np(torch_model(cfg))
    missing = {k: v for k, v in sd.items() if k != "bert.encoder.layer.1.attention.self.value.weight"}
    with pytest.raises(CheckpointError, match=r"missing tensor 'bert\.encoder\.layer\.1\.attention\.self\.value\.weight'"):
        bert.BERT.params_from_hf(missing, cfg)
    bad = dict(sd)
    bad["cls.predictions.transform.dense.bias"] = np.zeros(cfg.d_model + 1, np.float32)
    with pytest.raises(CheckpointError, match=r"'cls\.predictions\.transform\.dense\.bias' has shape \(33,\)"):
        bert.BERT.params_from_hf(bad, cfg)
    untied = dict(sd)
    untied["cls.predictions.decoder.weight"] = sd["cls.predictions.decoder.weight"] + 1.0
    with pytest.raises(CheckpointError, match="untied"):
        bert.BERT.params_from_hf(untied, cfg)


def test_old_layernorm_names_are_accepted():
    cfg = tiny("bert", False)
    sd = state_dict_np(torch_model(cfg))
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in sd.items()}
    assert any(k.endswith("gamma") for k in renamed)
    jax.tree.map(np.testing.assert_array_equal, bert.BERT.params_from_hf(sd, cfg),
                 bert.BERT.params_from_hf(renamed, cfg))


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(bert.BertConfig.tiny().to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*[Cc]onvert"):
        bert.BERT.load(str(tmp_path))


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    cfg = tiny("bert", False)
    bert.BERT.save(str(tmp_path), cfg, bert.BERT.params_from_hf(state_dict_np(torch_model(cfg)), cfg))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupted"):
        bert.BERT.load(str(tmp_path))


def test_with_mlm_head_required_but_absent(tmp_path):
    cfg = tiny("bert", False)
    bert.BERT.save(str(tmp_path), cfg, bert.BERT.params_from_hf(state_dict_np(torch_model(cfg)), cfg))
    with pytest.raises(CheckpointError, match="missing tensor 'cls.predictions.transform.dense.weight'"):
        bert.BERT.load(str(tmp_path), with_mlm_head=True)


def test_bf16_compute_stays_close_to_fp32():
    cfg = tiny("roberta", True)
    base = bert.BERT.params_from_hf(state_dict_np(torch_model(cfg)), cfg)
    ids, mask, types = batch(cfg)
    f32 = bert.BertModel(cfg).apply({"params": base}, jnp.asarray(ids), jnp.asarray(mask))
    b16 = bert.BertModel(cfg, dtype=jnp.bfloat16).apply({"params": base}, jnp.asarray(ids),
                                                         jnp.asarray(mask))
    assert b16["hidden_states"].dtype == jnp.bfloat16
    a = np.asarray(f32["hidden_states"])
    b = np.asarray(b16["hidden_states"], np.float32)
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cos.min() > 0.99, cos.min()
    assert np.isfinite(np.asarray(b16["logits"], np.float32)).all()
