"""PEFT methods as slot implementations: invariants on tiny models of the real families."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_jax.peft as P
from peft_jax.models.bert import BertConfig, BertModel
from peft_jax.models.llama import LlamaConfig, LlamaModel
from peft_jax.models.slots import Slots
from peft_jax.peft import prompt as prompt_init

IDS = np.array([[2, 5, 6, 7, 8, 9], [2, 3, 4, 5, 0, 0]], np.int32)
MASK = (IDS != 0).astype(np.int32)
BATCH = {"input_ids": jnp.asarray(IDS), "attention_mask": jnp.asarray(MASK)}


@pytest.fixture(scope="module")
def bert():
    config = BertConfig.tiny(num_layers=2, hidden_dropout=0.0, attention_dropout=0.0)
    base = nn.meta.unbox(BertModel(config).init(jax.random.PRNGKey(0), **BATCH)["params"])
    return config, base


@pytest.fixture(scope="module")
def llama():
    config = LlamaConfig.tiny(num_layers=1)
    base = nn.meta.unbox(LlamaModel(config).init(jax.random.PRNGKey(0), **BATCH)["params"])
    return config, base


def _randomize(delta, key, scale=0.1):
    """Every delta leaf replaced by random values (non-zero LoRA B etc.)."""
    leaves, tree = jax.tree_util.tree_flatten(delta)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------- training


def test_sgd_steps_change_only_delta(bert):
    config, base = bert
    base = jax.tree_util.tree_map(jnp.asarray, base)
    before = _leaves(base)
    model = BertModel(config, slots=Slots((P.PromptTuning(3), P.LoRA(rank=4))))
    delta = P.init_delta(model, base, BATCH, jax.random.PRNGKey(1))
    delta0 = _leaves(delta)
    target = jax.random.normal(jax.random.PRNGKey(2), (2, 32))

    def loss(delta):
        out = model.apply({"params": base, "peft": delta}, **BATCH)
        return jnp.mean((out["pooled"] - target) ** 2)

    @jax.jit
    def step(delta):
        l, g = jax.value_and_grad(loss)(delta)
        return jax.tree_util.tree_map(lambda p, gg: p - 0.5 * gg, delta, g), l

    losses = []
    for _ in range(3):
        delta, l = step(delta)
        losses.append(float(l))
    assert losses[-1] < losses[0]
    after = _leaves(base)
    assert before.keys() == after.keys()
    for k in before:  # base bit-identical
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    changed = {k for k, v in _leaves(delta).items() if not np.array_equal(v, delta0[k])}
    assert changed == set(delta0), f"delta leaves that did not train: {set(delta0) - changed}"


# ----------------------------------------------------------------------------- LoRA


def test_fresh_lora_equals_base_exactly(bert):
    config, base = bert
    ref = BertModel(config).apply({"params": base}, **BATCH)
    model = BertModel(config, slots=Slots((P.LoRA(targets=r".*/(query|value|up|down)$"),)))
    delta = P.init_delta(model, base, BATCH, jax.random.PRNGKey(1))
    assert all(np.all(np.asarray(x) == 0) for p, x in _leaves(delta).items() if "lora_b" in p)
    assert any(np.any(np.asarray(x) != 0) for p, x in _leaves(delta).items() if "lora_a" in p)
    out = model.apply({"params": base, "peft": delta}, **BATCH)
    np.testing.assert_array_equal(out["hidden_states"], ref["hidden_states"])


def test_lora_shapes_init_and_patterns(bert):
    config, base = bert
    lora = P.LoRA(rank=4, alpha=16, rank_pattern={r"layer_1/attention/value": 2},
                  alpha_pattern={r"value": 4.0}, use_rslora=True)
    delta = P.init_delta(BertModel(config, slots=Slots((lora,))), base, BATCH, jax.random.PRNGKey(3))
    q = delta["encoder"]["layer_0"]["attention"]["query"]
    assert q["lora_a"].shape == (32, 4) and q["lora_b"].shape == (4, 32)
    assert float(jnp.max(jnp.abs(q["lora_a"]))) <= 1 / np.sqrt(32)  # kaiming-uniform a=sqrt(5)
    assert delta["encoder"]["layer_1"]["attention"]["value"]["lora_a"].shape == (32, 2)
    assert "key" not in delta["encoder"]["layer_0"]["attention"]
    assert lora.scale_for("encoder/layer_0/attention/query") == pytest.approx(16 / 2.0)
    assert lora.scale_for("encoder/layer_1/attention/value") == pytest.approx(4.0 / np.sqrt(2))


def test_merged_lora_equals_unmerged(bert):
    config, base = bert
    lora = P.LoRA(rank=4, alpha=8, targets=r".*/(query|key|value|out|up|down)$")
    model = BertModel(config, slots=Slots((lora,)))
    delta = _randomize(P.init_delta(model, base, BATCH, jax.random.PRNGKey(1)),
                       jax.random.PRNGKey(5))
    unmerged = model.apply({"params": base, "peft": delta}, **BATCH)["hidden_states"]
    merged_base = lora.merge(base, delta)
    merged = BertModel(config).apply({"params": merged_base}, **BATCH)["hidden_states"]
    plain = BertModel(config).apply({"params": base}, **BATCH)["hidden_states"]
    err = float(jnp.max(jnp.abs(merged - unmerged)))
    print(f"\nmerged vs unmerged LoRA max abs err {err:.2e}")
    assert err <= 1e-5
    assert float(jnp.max(jnp.abs(plain - unmerged))) > 1e-3  # the LoRA does something
    restored = P.unmerge(merged_base, delta, [lora])
    for k, v in _leaves(base).items():
        np.testing.assert_allclose(_leaves(restored)[k], v, atol=1e-6, err_msg=k)
    assert P.strip_leaves(delta, [lora]) == {}
    assert P.merge(base, delta, [lora]).keys() == base.keys()
    boxed = BertModel(config).init(jax.random.PRNGKey(0), **BATCH)["params"]  # nn.Partitioned leaves
    merged_boxed = lora.merge(boxed, delta)["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    assert isinstance(merged_boxed, nn.Partitioned) and merged_boxed.names == ("embed", "joined_kv")


def test_ia3_identity_at_init_and_merge(bert):
    config, base = bert
    ia3 = P.IA3()
    model = BertModel(config, slots=Slots((ia3,)))
    delta = P.init_delta(model, base, BATCH, jax.random.PRNGKey(1))
    layer = delta["encoder"]["layer_0"]
    assert layer["attention"]["key"]["ia3_scale"].shape == (32,)
    assert layer["mlp"]["down"]["ia3_scale"].shape == (config.d_ff,)  # input scaling
    assert "query" not in layer["attention"]
    plain = BertModel(config).apply({"params": base}, **BATCH)["hidden_states"]
    np.testing.assert_array_equal(model.apply({"params": base, "peft": delta}, **BATCH)["hidden_states"],
                                  plain)
    delta = _randomize(delta, jax.random.PRNGKey(4), 0.3)
    out = model.apply({"params": base, "peft": delta}, **BATCH)["hidden_states"]
    merged = BertModel(config).apply({"params": ia3.merge(base, delta)}, **BATCH)["hidden_states"]
    err = float(jnp.max(jnp.abs(out - merged)))
    print(f"\nmerged vs unmerged IA3 max abs err {err:.2e}")
    assert err <= 1e-5 and float(jnp.max(jnp.abs(out - plain))) > 1e-3


def test_unmatched_regex_is_a_clear_error(bert):
    config, base = bert
    with pytest.raises(ValueError, match=r"lora.targets='\.\*/no_such_proj\$': matched no dense"):
        P.init_delta(BertModel(config, slots=Slots((P.LoRA(targets=r".*/no_such_proj$"),))),
                     base, BATCH, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="ia3.targets='.*q_proj.*': matched no dense"):
        P.init_delta(BertModel(config, slots=Slots((P.IA3(targets=r".*/q_proj$"),))),
                     base, BATCH, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="prefix.targets"):
        P.init_delta(BertModel(config, slots=Slots((P.PrefixTuning(2, targets="nothing"),))),
                     base, BATCH, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="invalid regex"):
        P.LoRA(targets="(")


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("placement,at", [("prefix", 0), ("after_bos", 1), ("suffix", 6)])
def test_prompt_placement(llama, placement, at):
    config, base = llama
    method = P.PromptTuning(3, placement=placement, init_scale=0.5)
    model = LlamaModel(config, slots=Slots((method,)))
    delta = P.init_delta(model, base, BATCH, jax.random.PRNGKey(1))
    prompt = delta["prompt"]
    assert prompt.shape == (3, config.d_model)
    assert float(jnp.max(jnp.abs(prompt))) <= 0.5 and float(jnp.std(prompt)) > 0.1
    out = model.apply({"params": base, "peft": delta}, **BATCH, output_hidden_states=True)
    emb = out["all_hidden_states"][0]
    assert emb.shape == (2, 9, config.d_model)
    np.testing.assert_array_equal(emb[0, at:at + 3], prompt)
    table = base["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(np.delete(np.asarray(emb[0]), range(at, at + 3), axis=0),
                                  np.asarray(table)[IDS[0]])
    np.testing.assert_array_equal(out["attention_mask"][1],
                                  np.insert(MASK[1], at, [1, 1, 1]))


def test_sampled_vocab_rows_come_from_top_k():
    table = jax.random.normal(jax.random.PRNGKey(0), (6000, 8))
    rows = np.asarray(prompt_init.sampled_vocab(table, 50, jax.random.PRNGKey(1)))
    ids = [int(np.argmin(np.abs(np.asarray(table) - r).sum(1))) for r in rows]
    for r, i in zip(rows, ids):
        np.testing.assert_array_equal(r, np.asarray(table)[i])
    assert max(ids) < 5000 and len(set(ids)) == 50  # top-5000, without replacement
    ranking = list(range(5999, -1, -1))  # most frequent = highest ids
    rows = np.asarray(prompt_init.sampled_vocab(table, 20, jax.random.PRNGKey(1), top_k=100,
                                                ranking=ranking))
    ids = [int(np.argmin(np.abs(np.asarray(table) - r).sum(1))) for r in rows]
    assert min(ids) >= 5900 and len(set(ids)) == 20
    with pytest.warns(UserWarning, match="not frequency-ordered"):
        prompt_init.sampled_vocab(table, 2, jax.random.PRNGKey(1), tokenizer_kind="wordpiece")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prompt_init.sampled_vocab(table, 2, jax.random.PRNGKey(1), tokenizer_kind="sentencepiece")
    with pytest.raises(ValueError, match="cannot sample 30 distinct"):
        prompt_init.sampled_vocab(table, 30, jax.random.PRNGKey(1), top_k=10)


def test_class_label_and_text_init(bert):
    config, base = bert
    table = np.asarray(base["embeddings"]["word_embeddings"]["embedding"])
    labels = [[10, 11], [12], [13, 14, 15]]
    method = P.PromptTuning(5, init="class_labels", label_token_ids=labels)
    model = BertModel(config, slots=Slots((method,)))
    prompt = np.asarray(P.init_delta(model, base, BATCH, jax.random.PRNGKey(1))["prompt"])
    for i, ids in enumerate(labels):
        np.testing.assert_allclose(prompt[i], table[ids].mean(0), rtol=1e-6, atol=1e-7)
    for r in prompt[3:]:  # the rest: vocabulary rows
        assert np.any(np.all(table == r, axis=1))
    text = P.PromptTuning(5, init="text", text_token_ids=[7, 8])
    prompt = P.init_delta(BertModel(config, slots=Slots((text,))), base, BATCH,
                          jax.random.PRNGKey(1))["prompt"]
    np.testing.assert_array_equal(prompt, table[[7, 8, 7, 8, 7]])
    np.testing.assert_array_equal(prompt_init.text(table, [1, 2, 3, 4, 5, 6], 4), table[[1, 2, 3, 4]])


def test_file_init_and_shape_errors(bert, tmp_path):
    config, base = bert
    good = np.random.default_rng(0).normal(size=(4, 32)).astype(np.float32)
    np.save(tmp_path / "p4.npy", good)
    method = P.PromptTuning(4, init="file", file=str(tmp_path / "p4.npy"))
    delta = P.init_delta(BertModel(config, slots=Slots((method,))), base, BATCH, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(delta["prompt"], good)
    path = str(tmp_path / "p4.npy")
    with pytest.raises(ValueError, match=r"p4\.npy.*\(4, 32\).*\(6, 32\)"):
        prompt_init.from_file(path, 6, d=32)
    with pytest.raises(ValueError, match=r"p4\.npy.*\(4, 32\).*\(4, 16\)"):
        prompt_init.from_file(path, 4, d=16)
    np.testing.assert_array_equal(prompt_init.from_file(path, 6, "tile", d=32),
                                  np.concatenate([good, good[:2]]))
    np.testing.assert_array_equal(prompt_init.from_file(path, 3, "truncate"), good[:3])
    with pytest.raises(ValueError, match="too few rows"):
        prompt_init.from_file(path, 6, resize="truncate")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy"):
        prompt_init.from_file(str(tmp_path / "obj.npy"), 4)
    with pytest.raises(ValueError, match="set_prompt: prompt 'prompt' has shape"):
        P.set_prompt(delta, np.zeros((5, 32)))
    np.testing.assert_array_equal(P.set_prompt(delta, good * 2)["prompt"], good * 2)
    bad = good.copy()
    bad[1, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match=r"nan\.npy.*holds 1 NaN/Inf value"):
        prompt_init.from_file(str(tmp_path / "nan.npy"), 4)


# ----------------------------------------------------------------------------- others


def test_composition_prompt_lora_adapter(bert):
    config, base = bert
    methods = (P.PromptTuning(2), P.LoRA(rank=2), P.Adapter(bottleneck=4))
    model = BertModel(config, slots=Slots(methods))
    delta = P.init_delta(model, base, BATCH, jax.random.PRNGKey(1))
    assert set(delta) == {"prompt", "encoder"}
    layer = delta["encoder"]["layer_0"]
    assert set(layer) == {"attention", "adapter_attention", "adapter_ffn"}
    assert layer["adapter_ffn"]["down_kernel"].shape == (32, 4)
    delta = _randomize(delta, jax.random.PRNGKey(2))
    full = model.apply({"params": base, "peft": delta}, **BATCH)["hidden_states"]
    assert full.shape == (2, 8, 32)
    only_prompt = BertModel(config, slots=Slots(methods[:1])).apply(
        {"params": base, "peft": {"prompt": delta["prompt"]}}, **BATCH)["hidden_states"]
    assert float(jnp.max(jnp.abs(full - only_prompt))) > 1e-3
    assert np.all(np.isfinite(full))


def test_adapter_near_identity(bert):
    config, base = bert
    for placement, kinds in (("houlsby", {"adapter_attention", "adapter_ffn"}),
                             ("pfeiffer", {"adapter_ffn"})):
        model = BertModel(config, slots=Slots((P.Adapter(placement, bottleneck=8),)))
        delta = P.init_delta(model, base, BATCH, jax.random.PRNGKey(1))
        assert set(delta["encoder"]["layer_1"]) == kinds
        out = model.apply({"params": base, "peft": delta}, **BATCH)["hidden_states"]
        plain = BertModel(config).apply({"params": base}, **BATCH)["hidden_states"]
        assert float(jnp.max(jnp.abs(out - plain))) < 1e-3


def test_prefix_reparam_materialize(llama):
    config, base = llama
    direct = LlamaModel(config, slots=Slots((P.PrefixTuning(3),)))
    d_direct = P.init_delta(direct, base, BATCH, jax.random.PRNGKey(1))
    attn = d_direct["decoder"]["layer_0"]["attention"]
    assert attn["prefix_key"].shape == (3, config.num_kv_heads, config.head_dim)
    reparam = LlamaModel(config, slots=Slots((P.PrefixTuning(3, projection_hidden=12),)))
    delta = P.init_delta(reparam, base, BATCH, jax.random.PRNGKey(1))
    assert set(delta) == {"prefix_reparam"}
    r = delta["prefix_reparam"]
    kv = config.num_kv_heads * config.head_dim
    assert r["embedding"].shape == (3, kv) and r["hidden"]["kernel"].shape == (kv, 12)
    with pytest.raises(ValueError, match="materialize"):
        reparam.apply({"params": base, "peft": delta}, **BATCH)
    mat = P.materialize(delta)
    h = np.tanh(np.asarray(r["embedding"]) @ np.asarray(r["hidden"]["kernel"]) + np.asarray(r["hidden"]["bias"]))
    o = r["out"]["decoder"]["layer_0"]["attention"]
    want_v = np.einsum("ph,hnd->pnd", h, np.asarray(o["kernel"])[:, 1]) + np.asarray(o["bias"])[1]
    np.testing.assert_allclose(mat["decoder"]["layer_0"]["attention"]["prefix_value"], want_v,
                               rtol=1e-5, atol=1e-6)
    # the materialized delta runs exactly like a direct prefix delta with those values
    a = jax.jit(lambda m: reparam.apply({"params": base, "peft": m}, **BATCH)["logits"])(mat)
    b = jax.jit(lambda m: direct.apply({"params": base, "peft": m}, **BATCH)["logits"])(mat)
    np.testing.assert_array_equal(a, b)
    grads = jax.jit(jax.grad(lambda d: jnp.sum(reparam.apply(
        {"params": base, "peft": P.materialize(d)}, **BATCH)["logits"] ** 2)))(delta)
    assert float(jnp.abs(grads["prefix_reparam"]["hidden"]["kernel"]).sum()) > 0


def test_mixed_task_batch_equals_separate_runs(bert):
    config, base = bert
    model = BertModel(config, slots=Slots((P.PromptTuning(2), P.LoRA(rank=2), P.PrefixTuning(2))))
    d0 = P.init_delta(model, base, {**BATCH, "labels": jnp.zeros((2,))}, jax.random.PRNGKey(1))
    tasks = [_randomize(d0, jax.random.PRNGKey(10 + t)) for t in range(3)]
    stacked = P.stack_deltas(tasks)
    assert stacked["prompt"].shape == (3, 2, 32)
    ids = jnp.asarray(np.concatenate([IDS, IDS[::-1]]))
    mask = (ids != 0).astype(jnp.int32)
    task_ids = jnp.array([2, 0, 1, 2])
    mixed = jax.jit(lambda s, t, b: P.apply_mixed(model, base, s, t, b))(
        stacked, task_ids, {"input_ids": ids, "attention_mask": mask})
    for i, t in enumerate(np.asarray(task_ids)):
        single = model.apply({"params": base, "peft": tasks[t]}, input_ids=ids[i:i + 1],
                             attention_mask=mask[i:i + 1])
        np.testing.assert_allclose(mixed["hidden_states"][i], single["hidden_states"][0],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(mixed["attention_mask"][i], single["attention_mask"][0])
    with pytest.raises(ValueError, match="another tree structure"):
        P.stack_deltas([d0, {"prompt": d0["prompt"]}])


def test_lora_dropout_and_hashable_configs(bert):
    config, base = bert
    lora = P.LoRA(rank=2, dropout=0.5, rank_pattern={"query": 1})
    hash(Slots((lora, P.PromptTuning(2, init="text", text_token_ids=[1, 2]), P.IA3(),
                P.PrefixTuning(2), P.Adapter())))  # usable as static jit arguments
    model = BertModel(config, slots=Slots((lora,)))
    delta = _randomize(P.init_delta(model, base, BATCH, jax.random.PRNGKey(1)), jax.random.PRNGKey(2))
    run = lambda det, key: model.apply({"params": base, "peft": delta}, **BATCH, deterministic=det,
                                       rngs={"dropout": key})["hidden_states"]
    np.testing.assert_array_equal(run(True, jax.random.PRNGKey(0)), run(True, jax.random.PRNGKey(1)))
    assert float(jnp.max(jnp.abs(run(False, jax.random.PRNGKey(0)) - run(False, jax.random.PRNGKey(1))))) > 1e-4
    from peft_jax.peft.delta_io import method_config
    for m in (lora, P.PromptTuning(4, init="class_labels", label_token_ids=[[1, 2], [3]])):
        assert type(m)(**method_config(m)["fields"]) == m  # JSON metadata round trip
