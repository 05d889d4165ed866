"""Parity of the PEFT methods with Hugging Face PEFT on identical weights.

Tiny random HF models (fp32, eval) are wrapped with HF PEFT, their PEFT weights set to
random non-zero values, and base + PEFT weights copied into peft_jax (via each family's
``params_from_hf`` and ``hf_module_name``). Outputs must agree to 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")

import peft_jax.peft as P
from peft_jax.models import bert, llama, t5
from peft_jax.models.slots import Slots
from peft_jax.peft.prefix import reparam_paths

TOL = 1e-4
IDS = np.array([[2, 5, 6, 7, 8, 9, 10], [2, 3, 4, 5, 11, 0, 0]], np.int64)
MASK = (IDS != 0).astype(np.int64)
DEC = np.array([[0, 4, 5, 6], [0, 7, 8, 9]], np.int64)


def _np(sd) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in sd.items()}


def _report(name: str, ours, theirs, mask=None) -> float:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    diff = np.abs(ours - theirs)
    if mask is not None:
        diff = diff[np.asarray(mask).astype(bool)]
    err = float(diff.max())
    print(f"\n[parity] {name}: max abs err {err:.3e} (output scale {np.abs(theirs).max():.2f})")
    assert err <= TOL, f"{name}: max abs err {err:.3e} > {TOL}"
    return err


def _assert_changes(Model, config, base, kind, key, out) -> None:
    """The method is not a no-op: the plain model's output differs (so parity is not trivial)."""
    plain = np.asarray(Model(config).apply({"params": base}, **_batch(kind))[key])
    out = np.asarray(out)[:, -plain.shape[1]:]
    assert float(np.max(np.abs(plain - out))) > 1e-3


def _randomize_peft(model, names=("lora_", "ia3_"), seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in names):
                if "ia3_" in n:
                    p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _modules_with(tree, leaf, path=()):
    out = []
    if leaf in tree:
        out.append(("/".join(path), tree))
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _modules_with(v, leaf, path + (k,))
    return out


def _copy_lora(delta, root, hf_name) -> int:
    """HF lora_A/B weights of the module ``hf_name(path)`` -> our lora_a/b (transposed)."""
    mods = _modules_with(delta, "lora_a")
    for path, mod in mods:
        m = root.get_submodule(hf_name(path))
        mod["lora_a"] = jnp.asarray(m.lora_A["default"].weight.detach().numpy().T)
        mod["lora_b"] = jnp.asarray(m.lora_B["default"].weight.detach().numpy().T)
    n_hf = sum(1 for _, m in root.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert len(mods) == n_hf, f"ours adapts {len(mods)} modules, HF PEFT {n_hf}"
    return len(mods)


def _copy_ia3(delta, root, hf_name) -> None:
    mods = _modules_with(delta, "ia3_scale")
    for path, mod in mods:
        mod["ia3_scale"] = jnp.asarray(root.get_submodule(hf_name(path)).ia3_l["default"]
                                       .detach().numpy().reshape(-1))
    n_hf = sum(1 for _, m in root.named_modules() if hasattr(m, "ia3_l") and "default" in m.ia3_l)
    assert len(mods) == n_hf, f"ours adapts {len(mods)} modules, HF PEFT {n_hf}"


# ----------------------------------------------------------------------------- families


def _bert(**kw):
    config = bert.BertConfig.tiny(**kw)
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(**config.to_hf())).eval()
    return config, hf, bert.BERT.params_from_hf(_np(hf.state_dict()), config)


def _llama():
    config = llama.LlamaConfig.tiny()
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf())).eval()
    return config, hf, llama.LLAMA.params_from_hf(_np(hf.state_dict()), config)


def _t5():
    config = t5.T5Config.tiny()
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**config.to_hf())).eval()
    return config, hf, t5.T5.params_from_hf(_np(hf.state_dict()), config)


def _batch(kind):
    b = {"input_ids": jnp.asarray(IDS, jnp.int32), "attention_mask": jnp.asarray(MASK, jnp.int32)}
    if kind == "t5":
        b["decoder_input_ids"] = jnp.asarray(DEC, jnp.int32)
    return b


def _torch_batch(kind):
    b = {"input_ids": torch.tensor(IDS), "attention_mask": torch.tensor(MASK)}
    if kind == "t5":
        b["decoder_input_ids"] = torch.tensor(DEC)
    return b


def _names(family):
    """config -> our module path -> HF module name (one signature for every family)."""
    return lambda c: (lambda p: family.hf_module_name(p, c))


FAMILIES = {
    "bert": (_bert, bert.BertModel, _names(bert.BERT), "last_hidden_state", "hidden_states"),
    "llama": (_llama, llama.LlamaModel, _names(llama.LLAMA), "logits", "logits"),
    "t5": (_t5, t5.T5Model, _names(t5.T5), "logits", "logits"),
}


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("kind,hf_targets,ours", [
    ("bert", ["query", "value"], r".*/(query|value)$"),
    ("llama", ["q_proj", "v_proj", "down_proj"], r".*/(query|value|down)$"),
    ("t5", ["q", "v"], r".*/(query|value)$"),
])
def test_lora_parity(kind, hf_targets, ours):
    build, Model, name_fn, hf_key, our_key = FAMILIES[kind]
    config, hf, base = build()
    lcfg = hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=hf_targets, lora_dropout=0.0)
    pm = hf_peft.get_peft_model(hf, lcfg).eval()
    _randomize_peft(pm)
    lora = P.LoRA(targets=ours, rank=4, alpha=8)
    model = Model(config, slots=Slots((lora,)))
    delta = P.init_delta(model, base, _batch(kind), jax.random.PRNGKey(0))
    n = _copy_lora(delta, pm.base_model.model, name_fn(config))
    with torch.no_grad():
        theirs = getattr(pm(**_torch_batch(kind)), hf_key).numpy()
    out = model.apply({"params": base, "peft": delta}, **_batch(kind))[our_key]
    mask = MASK[..., None] if kind != "t5" else None
    _report(f"LoRA r=4 on {kind} ({n} modules)", out, theirs,
            np.broadcast_to(mask, theirs.shape) if mask is not None else None)
    _assert_changes(Model, config, base, kind, our_key, out)


def test_lora_rslora_and_patterns_parity():
    config, hf, base = _bert()
    lcfg = hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                              use_rslora=True, rank_pattern={"layer.1.attention.self.value": 2},
                              alpha_pattern={"query": 3})
    pm = hf_peft.get_peft_model(hf, lcfg).eval()
    _randomize_peft(pm)
    lora = P.LoRA(rank=4, alpha=8, use_rslora=True, rank_pattern={"layer_1/attention/value": 2},
                  alpha_pattern={"query": 3})
    model = bert.BertModel(config, slots=Slots((lora,)))
    delta = P.init_delta(model, base, _batch("bert"), jax.random.PRNGKey(0))
    _copy_lora(delta, pm.base_model.model, _names(bert.BERT)(config))
    with torch.no_grad():
        theirs = pm(**_torch_batch("bert")).last_hidden_state.numpy()
    out = model.apply({"params": base, "peft": delta}, **_batch("bert"))["hidden_states"]
    _report("LoRA rsLoRA + rank/alpha patterns on bert", out, theirs,
            np.broadcast_to(MASK[..., None], theirs.shape))


def test_lora_parity_minilm_real_weights(minilm_path):
    config, base = bert.BERT.load(minilm_path)
    hf = transformers.AutoModel.from_pretrained(minilm_path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    enc = tok(["A man is playing a guitar.", "Parameter-efficient tuning of language models."],
              padding=True, return_tensors="np")
    pm = hf_peft.get_peft_model(hf, hf_peft.LoraConfig(r=8, lora_alpha=16,
                                                       target_modules=["query", "value"])).eval()
    _randomize_peft(pm)
    lora = P.LoRA(rank=8, alpha=16)
    model = bert.BertModel(config, slots=Slots((lora,)))
    batch = {"input_ids": jnp.asarray(enc["input_ids"]),
             "attention_mask": jnp.asarray(enc["attention_mask"]),
             "token_type_ids": jnp.asarray(enc["token_type_ids"])}
    delta = P.init_delta(model, base, batch, jax.random.PRNGKey(0))
    _copy_lora(delta, pm.base_model.model, _names(bert.BERT)(config))
    with torch.no_grad():
        theirs = pm(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
    out = model.apply({"params": base, "peft": delta}, **batch)["hidden_states"]
    _report("LoRA r=8 on all-MiniLM-L6-v2 (real weights)", out, theirs,
            np.broadcast_to(enc["attention_mask"][..., None], theirs.shape))
    merged = bert.BertModel(config).apply({"params": lora.merge(base, delta)}, **batch)
    pm.merge_adapter()
    with torch.no_grad():
        theirs_merged = pm(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
    _report("merged LoRA on all-MiniLM-L6-v2 (ours merged vs HF merged)", merged["hidden_states"],
            theirs_merged, np.broadcast_to(enc["attention_mask"][..., None], theirs.shape))


# ----------------------------------------------------------------------------- prompt tuning


@pytest.mark.parametrize("kind,task", [("bert", "FEATURE_EXTRACTION"), ("llama", "CAUSAL_LM"),
                                       ("t5", "SEQ_2_SEQ_LM")])
def test_prompt_tuning_parity(kind, task):
    build, Model, _, hf_key, our_key = FAMILIES[kind]
    config, hf, base = build()
    n_virtual = 3
    pm = hf_peft.get_peft_model(hf, hf_peft.PromptTuningConfig(task_type=task,
                                                               num_virtual_tokens=n_virtual)).eval()
    model = Model(config, slots=Slots((P.PromptTuning(n_virtual),)))
    delta = P.init_delta(model, base, _batch(kind), jax.random.PRNGKey(0))
    hf_prompt = pm.prompt_encoder["default"].embedding.weight.detach().numpy()
    assert np.abs(hf_prompt).max() > 0.1
    delta = P.set_prompt(delta, hf_prompt[:n_virtual])  # seq2seq: the encoder's rows
    with torch.no_grad():
        theirs = getattr(pm(**_torch_batch(kind)), hf_key).numpy()
    out = model.apply({"params": base, "peft": delta}, **_batch(kind))
    mask = None
    if kind != "t5":
        full = np.asarray(out["attention_mask"])
        assert full.shape == (2, n_virtual + IDS.shape[1]) and full[:, :n_virtual].all()
        mask = np.broadcast_to(full[..., None], theirs.shape)
    _report(f"prompt tuning P={n_virtual} on {kind} ({task})", out[our_key], theirs, mask)
    _assert_changes(Model, config, base, kind, our_key, out[our_key])


# ----------------------------------------------------------------------------- prefix tuning


def _llama_prefix_delta(pm, config, delta, projection: bool):
    enc = pm.prompt_encoder["default"]
    h_kv, dh, n_layers = config.num_kv_heads, config.head_dim, config.num_layers
    if not projection:
        w = enc.embedding.weight.detach().numpy().reshape(-1, n_layers, 2, h_kv, dh)
        for i in range(n_layers):
            attn = delta["decoder"][f"layer_{i}"]["attention"]
            attn["prefix_key"], attn["prefix_value"] = jnp.asarray(w[:, i, 0]), jnp.asarray(w[:, i, 1])
        return delta
    r = delta["prefix_reparam"]
    lin0, lin2 = enc.transform[0], enc.transform[2]
    r["embedding"] = jnp.asarray(enc.embedding.weight.detach().numpy())
    r["hidden"] = {"kernel": jnp.asarray(lin0.weight.detach().numpy().T),
                   "bias": jnp.asarray(lin0.bias.detach().numpy())}
    w2 = lin2.weight.detach().numpy().reshape(n_layers, 2, h_kv, dh, -1)
    b2 = lin2.bias.detach().numpy().reshape(n_layers, 2, h_kv, dh)
    paths = reparam_paths(delta)
    assert paths == [f"decoder/layer_{i}/attention" for i in range(n_layers)]
    for i in range(n_layers):
        node = r["out"]["decoder"][f"layer_{i}"]["attention"]
        node["kernel"] = jnp.asarray(np.moveaxis(w2[i], -1, 0))
        node["bias"] = jnp.asarray(b2[i])
    return delta


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_parity_llama(projection):
    config, hf, base = _llama()
    n_virtual, hidden = 3, 16
    pcfg = hf_peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual,
                                      prefix_projection=projection, encoder_hidden_size=hidden)
    pm = hf_peft.get_peft_model(hf, pcfg).eval()
    method = P.PrefixTuning(n_virtual, projection_hidden=hidden if projection else None)
    model = llama.LlamaModel(config, slots=Slots((method,)))
    delta = P.init_delta(model, base, _batch("llama"), jax.random.PRNGKey(0))
    delta = _llama_prefix_delta(pm, config, delta, projection)
    with torch.no_grad():
        theirs = pm(**_torch_batch("llama")).logits.numpy()
    out = model.apply({"params": base, "peft": P.materialize(delta)}, **_batch("llama"))["logits"]
    _report(f"prefix tuning P={n_virtual} on llama (GQA, projection={projection})", out, theirs,
            np.broadcast_to(MASK[..., None], theirs.shape))
    _assert_changes(llama.LlamaModel, config, base, "llama", "logits", out)


@pytest.mark.parametrize("model_type,task", [("bert", "FEATURE_EXTRACTION"),
                                             ("roberta", "FEATURE_EXTRACTION")])
def test_prefix_tuning_parity_bert(model_type, task):
    """HF BERT/RoBERTa receive the prefix as past_key_values and shift position ids by its
    length; ours offsets positions by ``slots.kv_prefix_length``."""
    config = bert.BertConfig.tiny(model_type=model_type)
    torch.manual_seed(0)
    cls = transformers.RobertaModel if model_type == "roberta" else transformers.BertModel
    hf_cfg = (transformers.RobertaConfig if model_type == "roberta" else transformers.BertConfig)
    hf = cls(hf_cfg(**config.to_hf())).eval()
    base = bert.BERT.params_from_hf(_np(hf.state_dict()), config)
    n_virtual, n_layers = 3, config.num_layers
    pm = hf_peft.get_peft_model(hf, hf_peft.PrefixTuningConfig(
        task_type=task, num_virtual_tokens=n_virtual)).eval()
    method = P.PrefixTuning(n_virtual)
    model = bert.BertModel(config, slots=Slots((method,)))
    ids = IDS if model_type == "bert" else np.where(MASK == 1, IDS, config.pad_token_id)
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(MASK, jnp.int32)}
    delta = P.init_delta(model, base, batch, jax.random.PRNGKey(0))
    mods = _modules_with(delta, "prefix_key")
    assert [p for p, _ in mods] == [f"encoder/layer_{i}/attention" for i in range(n_layers)]
    g = torch.Generator().manual_seed(1)
    emb = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        emb.copy_(torch.randn(emb.shape, generator=g))
    w = emb.detach().numpy().reshape(n_virtual, n_layers, 2, config.num_heads, -1)
    for i, (_, attn) in enumerate(mods):
        attn["prefix_key"], attn["prefix_value"] = jnp.asarray(w[:, i, 0]), jnp.asarray(w[:, i, 1])
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(MASK)
                    ).last_hidden_state.numpy()
    out = model.apply({"params": base, "peft": delta}, **batch)["hidden_states"]
    _report(f"prefix tuning P={n_virtual} on {model_type} ({task})", out, theirs,
            np.broadcast_to(MASK[..., None], theirs.shape))
    plain = np.asarray(bert.BertModel(config).apply({"params": base}, **batch)["hidden_states"])
    assert float(np.max(np.abs(plain - np.asarray(out)))) > 1e-3


def test_prefix_tuning_parity_t5():
    """HF PEFT gives T5 prefixes to the decoder self-attention only (the encoder gets no
    past_key_values and the cross-attention cache is reset); the per-layer tensors come
    from the flat prefix duplicated for the two 'transformer submodules'."""
    config, hf, base = _t5()
    n_virtual, n_layers = 3, config.num_layers
    pm = hf_peft.get_peft_model(hf, hf_peft.PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=n_virtual)).eval()
    method = P.PrefixTuning(n_virtual, targets=r"decoder/layer_\d+/attention")
    model = t5.T5Model(config, slots=Slots((method,)))
    delta = P.init_delta(model, base, _batch("t5"), jax.random.PRNGKey(0))
    assert "encoder" not in delta and "cross_attention" not in delta["decoder"]["layer_0"]
    w = pm.prompt_encoder["default"].embedding.weight.detach().numpy()
    w = w.reshape(n_virtual, 2 * n_layers, config.num_heads, config.d_kv)
    entries = np.concatenate([w, w], axis=1)  # HF: torch.cat([pkv, pkv], dim=2)
    for i in range(config.num_decoder_layers):
        attn = delta["decoder"][f"layer_{i}"]["attention"]
        attn["prefix_key"] = jnp.asarray(entries[:, 4 * i])
        attn["prefix_value"] = jnp.asarray(entries[:, 4 * i + 1])
    with torch.no_grad():
        theirs = pm(**_torch_batch("t5")).logits.numpy()
    out = model.apply({"params": base, "peft": delta}, **_batch("t5"))["logits"]
    _report(f"prefix tuning P={n_virtual} on t5 (decoder self-attention)", out, theirs)
    _assert_changes(t5.T5Model, config, base, "t5", "logits", out)


# ----------------------------------------------------------------------------- IA3


def test_ia3_parity_llama():
    config, hf, base = _llama()
    pm = hf_peft.get_peft_model(hf, hf_peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])).eval()
    _randomize_peft(pm)
    model = llama.LlamaModel(config, slots=Slots((P.IA3(),)))
    delta = P.init_delta(model, base, _batch("llama"), jax.random.PRNGKey(0))
    _copy_ia3(delta, pm.base_model.model, _names(llama.LLAMA)(config))
    with torch.no_grad():
        theirs = pm(**_torch_batch("llama")).logits.numpy()
    out = model.apply({"params": base, "peft": delta}, **_batch("llama"))["logits"]
    _report("IA3 on llama (k, v, down)", out, theirs, np.broadcast_to(MASK[..., None], theirs.shape))
    _assert_changes(llama.LlamaModel, config, base, "llama", "logits", out)


def test_ia3_parity_bert():
    config, hf, base = _bert()
    pm = hf_peft.get_peft_model(hf, hf_peft.IA3Config(
        target_modules=r".*layer\.\d+\.(attention\.self\.(key|value)|output\.dense)",
        feedforward_modules=r".*layer\.\d+\.output\.dense")).eval()
    _randomize_peft(pm)
    model = bert.BertModel(config, slots=Slots((P.IA3(),)))
    delta = P.init_delta(model, base, _batch("bert"), jax.random.PRNGKey(0))
    _copy_ia3(delta, pm.base_model.model, _names(bert.BERT)(config))
    with torch.no_grad():
        theirs = pm(**_torch_batch("bert")).last_hidden_state.numpy()
    out = model.apply({"params": base, "peft": delta}, **_batch("bert"))["hidden_states"]
    _report("IA3 on bert (key, value, FFN output.dense)", out, theirs,
            np.broadcast_to(MASK[..., None], theirs.shape))
    _assert_changes(bert.BertModel, config, base, "bert", "hidden_states", out)
