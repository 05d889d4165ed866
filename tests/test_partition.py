"""What trains: labels, base selection, per-group optimizers, optimizer-state bytes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peft_jax.models.bert import BertConfig, BertModel
from peft_jax.peft import partition as P
from peft_jax.peft import tree
from peft_jax.peft.optim import GroupConfig, make_optimizer, make_schedule, make_group_optimizer


@pytest.fixture(scope="module")
def tiny():
    """Tiny BERT base (unboxed) and a LoRA-shaped delta (contract leaf names, r=4)."""
    config = BertConfig.tiny()
    model = BertModel(config)
    ids = jnp.array([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0]], jnp.int32)
    base = nn.meta.unbox(model.init(jax.random.key(0), ids)["params"])
    d, r = config.d_model, 4
    rng = np.random.default_rng(0)
    delta = {"encoder": {f"layer_{i}": {"attention": {
        n: {"lora_a": jnp.asarray(rng.normal(size=(d, r)), jnp.float32),
            "lora_b": jnp.zeros((r, d), jnp.float32)} for n in ("query", "value")}}
        for i in range(config.num_layers)},
        "head": {"kernel": jnp.asarray(rng.normal(size=(d, 3)), jnp.float32),
                 "bias": jnp.zeros((3,), jnp.float32)}}
    return model, base, delta, ids


def test_leaf_paths_are_slash_joined(tiny):
    _, base, _, _ = tiny
    paths = [p for p, _ in P.leaf_paths(base)]
    assert "encoder/layer_0/attention/query/kernel" in paths
    assert len(paths) == len(jax.tree.leaves(base))


def test_label_tree_first_match_wins_and_covers_everything(tiny):
    _, base, delta, _ = tiny
    labels = P.label_tree({"peft": delta}, [(r"peft/head/.*", "head"), (r".*lora_.*", "lora"),
                                             (r".*", "other")])
    assert labels["peft"]["head"]["kernel"] == "head"
    assert labels["peft"]["encoder"]["layer_1"]["attention"]["value"]["lora_b"] == "lora"
    assert jax.tree.structure(labels) == jax.tree.structure({"peft": delta})
    assert sorted(set(jax.tree.leaves(labels))) == ["head", "lora"]


def test_label_tree_uncovered_leaves_are_listed(tiny):
    _, base, _, _ = tiny
    with pytest.raises(ValueError) as e:
        P.label_tree(base, [(r".*kernel", "k"), (r".*bias", "b")])
    msg = str(e.value)
    # scale (LayerNorm) and embedding tables are not covered, and are named
    assert "embeddings/layer_norm/scale" in msg and "embeddings/word_embeddings/embedding" in msg
    assert "encoder/layer_0/attention/query/kernel" not in msg


def test_label_tree_rule_matching_nothing(tiny):
    _, base, _, _ = tiny
    rules = [(r".*qeury.*", "typo"), (r".*", "all")]
    with pytest.raises(ValueError, match=r"qeury.*matches no leaf"):
        P.label_tree(base, rules)
    with pytest.warns(UserWarning, match="qeury"):
        labels = P.label_tree(base, rules, unused="warn")
    assert set(jax.tree.leaves(labels)) == {"all"}
    with pytest.warns(UserWarning, match="shadowed"):
        P.label_tree(base, [(r".*", "all"), (r".*bias", "b")])


def test_select_base_bitfit_and_combine(tiny):
    _, base, _, _ = tiny
    sel, rest = P.select_base(base, P.bitfit_patterns())
    sel_paths = [p for p, _ in P.leaf_paths(sel)]
    all_bias = [p for p, _ in P.leaf_paths(base) if p.endswith("/bias")]
    assert sorted(sel_paths) == sorted(all_bias) and len(all_bias) == 1 + 8 * 2 + 1
    assert not any(p.endswith("bias") for p, _ in P.leaf_paths(rest))
    back = tree.merge(rest, sel)
    assert jax.tree.structure(back) == jax.tree.structure(base)
    for (pa, a), (pb, b) in zip(P.leaf_paths(back), P.leaf_paths(base)):
        assert pa == pb and a is b
    ln, _ = P.select_base(base, P.layernorm_patterns())
    assert all(p.split("/")[-2].endswith("norm") for p, _ in P.leaf_paths(ln))
    assert P.tree_size(ln) == 2 * 32 * 5  # embeddings + 2 per layer, scale and bias
    with pytest.raises(ValueError, match=r"'\.\*baias' matches no base leaf"):
        P.select_base(base, [r".*baias"])


def test_gradients_only_for_trainable_and_frozen_base_unchanged(tiny):
    """BitFit step: grads exist only for delta + biases; frozen leaves bit-identical."""
    model, base, delta, ids = tiny
    trainable, frozen = P.split_trainable(base, delta, P.bitfit_patterns())

    def loss(tr):
        v = P.assemble(frozen, tr)
        out = model.apply({"params": v["params"]}, ids)
        h = out["pooled"]
        logits = h @ v["peft"]["head"]["kernel"] + v["peft"]["head"]["bias"]
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

    grads = jax.grad(loss)(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    g_bias = grads["params"]["encoder"]["layer_0"]["mlp"]["up"]["bias"]
    assert float(jnp.abs(g_bias).sum()) > 0
    labels = P.label_tree(trainable, [(r"peft/head/.*", "head"), (r"params/.*", "bias"),
                                      (r".*", "lora")])
    tx = make_optimizer({"head": GroupConfig("sgd", 0.1), "bias": GroupConfig("sgd", 0.1),
                         "lora": GroupConfig("sgd", 0.1)}, labels)
    upd, _ = tx.update(grads, tx.init(trainable), trainable)
    new = optax.apply_updates(trainable, upd)
    new_base = P.assemble(frozen, new)["params"]
    for (p, a), (_, b) in zip(P.leaf_paths(new_base), P.leaf_paths(base)):
        if p.endswith("/bias") and p != "pooler/bias":
            continue
        if p.endswith("/bias"):
            assert not np.array_equal(a, b), p
        else:
            assert a is b, p  # frozen leaves are the very same arrays


def test_groups_get_their_own_learning_rates_sgd(tiny):
    _, _, delta, _ = tiny
    tree = {"peft": delta}
    labels = P.label_tree(tree, [(r"peft/head/.*", "head"), (r".*", "lora")])
    tx = make_optimizer({"lora": GroupConfig("sgd", 1e-3), "head": GroupConfig("sgd", 0.5)},
                        labels)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 2.0), tree)
    state = tx.init(tree)
    for step in range(2):
        upd, state = tx.update(grads, state, tree)
        assert np.allclose(upd["peft"]["head"]["kernel"], -1.0)
        assert np.allclose(upd["peft"]["encoder"]["layer_0"]["attention"]["query"]["lora_a"], -2e-3)


def test_global_clipping_acts_on_all_groups_together():
    tree = {"a": jnp.zeros((3,)), "b": jnp.zeros((4,))}
    labels = {"a": "x", "b": "y"}
    tx = make_optimizer({"x": GroupConfig("sgd", 1.0), "y": GroupConfig("sgd", 2.0)}, labels,
                        clip_norm=1.0)
    grads = {"a": jnp.full((3,), 3.0), "b": jnp.full((4,), 4.0)}
    norm = float(np.sqrt(9 * 3 + 16 * 4))
    upd, _ = tx.update(grads, tx.init(tree), tree)
    np.testing.assert_allclose(upd["a"], -3.0 / norm, rtol=1e-6)
    np.testing.assert_allclose(upd["b"], -2.0 * 4.0 / norm, rtol=1e-6)


def test_schedules():
    s = make_schedule(GroupConfig(learning_rate=1.0, schedule="linear", warmup_steps=10,
                                  total_steps=110))
    np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)], [0, 0.5, 1, 0.5, 0], atol=1e-6)
    c = make_schedule(GroupConfig(learning_rate=2.0, schedule="cosine", warmup_steps=0,
                                  total_steps=100, end_lr_factor=0.1))
    np.testing.assert_allclose([c(0), c(50), c(100)], [2.0, 1.1, 0.2], atol=1e-5)
    k = make_schedule(GroupConfig(learning_rate=0.3, warmup_steps=4))
    np.testing.assert_allclose([k(2), k(4), k(1000)], [0.15, 0.3, 0.3], atol=1e-6)
    with pytest.raises(ValueError, match="needs total_steps"):
        make_schedule(GroupConfig(schedule="cosine"))


def test_unknown_names_list_allowed_values():
    with pytest.raises(ValueError, match=r"optimizer='adam'.*'adamw', 'adafactor', 'sgd'"):
        make_group_optimizer(GroupConfig("adam"))
    with pytest.raises(ValueError, match=r"group 'head': schedule='rsqrt'.*'constant'"):
        make_group_optimizer(GroupConfig(schedule="rsqrt"), "head")
    with pytest.raises(ValueError, match=r"labels \['b'\] have no optimizer group"):
        make_optimizer({"a": GroupConfig()}, {"x": "a", "y": "b"})
    with pytest.raises(ValueError, match=r"groups \['c'\] label no parameter"):
        make_optimizer({"a": GroupConfig(), "c": GroupConfig()}, {"x": "a"})


def test_lester_adafactor_settings():
    """lr 0.3 constant, weight decay 1e-5 (optax: not scaled by lr), no parameter scaling."""
    tx = make_group_optimizer(GroupConfig.lester())
    p = {"prompt": jnp.full((20, 8), 2.0)}
    upd0, _ = tx.update({"prompt": jnp.zeros((20, 8))}, tx.init(p), p)
    np.testing.assert_allclose(upd0["prompt"], -1e-5 * 2.0, rtol=1e-5)
    upd1, _ = tx.update({"prompt": jnp.ones((20, 8))}, tx.init(p), p)
    # with parameter scaling the step would be multiplied by RMS(p) = 2
    np.testing.assert_allclose(upd1["prompt"], -0.3 - 2e-5, rtol=1e-5)


def test_no_optimizer_state_for_frozen_leaves(tiny):
    """AdamW keeps 2 moments per trainable scalar and none for frozen ones."""
    _, base, delta, _ = tiny
    adam = lambda labels: make_optimizer(
        {"t": GroupConfig("adamw", 1e-3)}, labels)
    # LoRA (+ head): only the delta is trainable
    lora_tr, _ = P.split_trainable(base, delta)
    lora_labels = P.label_tree(lora_tr, [(r".*", "t")])
    lora_bytes = P.optimizer_state_bytes(adam(lora_labels), lora_tr)
    # full fine-tuning: every base leaf too
    full_tr, frozen = P.split_trainable(base, delta, P.full_finetuning_patterns())
    assert frozen == {"params": {}, "peft": {}}
    full_bytes = P.optimizer_state_bytes(adam(P.label_tree(full_tr, [(r".*", "t")])), full_tr)
    count_bytes = 8  # int32 step counts of scale_by_adam and of the lr schedule
    assert lora_bytes == 2 * P.tree_bytes(delta) + count_bytes
    assert full_bytes == 2 * (P.tree_bytes(delta) + P.tree_bytes(base)) + count_bytes
    assert P.tree_bytes(delta) == 4 * (2 * 2 * (32 * 4 + 4 * 32) + 32 * 3 + 3)
    # a "frozen" group inside the trainable tree costs no state either
    labels = P.label_tree(full_tr, [(r"params/.*", "f"), (r".*", "t")])
    tx = make_optimizer({"f": GroupConfig("frozen"), "t": GroupConfig("adamw")}, labels)
    assert P.optimizer_state_bytes(tx, full_tr) == lora_bytes
    print(f"\nAdamW state bytes, tiny BERT: LoRA r=4 + head {lora_bytes}, "
          f"full fine-tuning {full_bytes}")


# ----------------------------------------------------------------------------- report


from peft_jax.peft.report import format_memory, memory_comparison, method_of, param_report


def _full_delta(delta, d=32, r=4, p=5, kv_heads=4, dh=8):
    """The LoRA delta plus one leaf of every other method family (contract names)."""
    z = lambda *s: jnp.zeros(s, jnp.float32)
    out = jax.tree.map(lambda x: x, delta)
    out["prompt"] = z(p, d)
    out["encoder"]["layer_0"]["attention"]["key"] = {"ia3_scale": z(d)}
    out["encoder"]["layer_0"]["adapter_ffn"] = {"down_kernel": z(d, r), "down_bias": z(r),
                                                "up_kernel": z(r, d), "up_bias": z(d)}
    out["encoder"]["layer_1"]["attention"]["prefix_key"] = z(p, kv_heads, dh)
    out["encoder"]["layer_1"]["attention"]["prefix_value"] = z(p, kv_heads, dh)
    out["prefix_reparam"] = {"embedding": z(p, d)}
    return out


def test_method_of():
    assert method_of("encoder/layer_0/attention/query/lora_b") == "lora"
    assert method_of("head/out_proj/kernel") == "head"
    assert method_of("prefix_reparam/mlp_0/kernel") == "prefix"
    assert method_of("encoder/layer_0/adapter_attention/up_bias") == "adapter"
    assert method_of("decoder/layer_0/mlp/down/ia3_scale") == "ia3"
    assert method_of("encoder/prompt") == "prompt"
    assert method_of("whatever") == "other"


def test_report_numbers_equal_direct_counts(tiny):
    _, base, delta, _ = tiny
    delta = _full_delta(delta)
    tr, _ = P.split_trainable(base, delta, P.bitfit_patterns())
    tx = make_optimizer({"t": GroupConfig("adamw")}, P.label_tree(tr, [(r".*", "t")]))
    rep = param_report(base, delta, P.bitfit_patterns(), tx=tx)

    base_leaves = dict(P.leaf_paths(base))
    delta_leaves = dict(P.leaf_paths(delta))
    n = lambda xs: sum(int(np.size(x)) for x in xs)
    biases = [x for p, x in base_leaves.items() if p.endswith("/bias")]
    assert rep.total == n(base_leaves.values()) + n(delta_leaves.values())
    assert rep.trainable == n(delta_leaves.values()) + n(biases)
    assert rep.trainable_bytes == 4 * rep.trainable and rep.total_bytes == 4 * rep.total
    assert rep.optimizer_state_bytes == 2 * rep.trainable_bytes + 8
    by_method = {r.group: r.trainable for r in rep.by_method}
    assert by_method == {
        "lora": n(x for p, x in delta_leaves.items() if "/lora_" in p),
        "head": 32 * 3 + 3, "prompt": 5 * 32, "ia3": 32, "adapter": 32 * 4 * 2 + 4 + 32,
        "prefix": 2 * 5 * 4 * 8 + 5 * 32, "base (selected)": n(biases)}
    assert sum(r.trainable for r in rep.by_method) == rep.trainable
    by_module = {r.group: r for r in rep.by_module}
    enc = by_module["encoder"]
    assert enc.total == (n(x for p, x in base_leaves.items() if p.startswith("encoder/"))
                         + n(x for p, x in delta_leaves.items() if p.startswith("encoder/")))
    assert enc.trainable == (n(x for p, x in base_leaves.items()
                               if p.startswith("encoder/") and p.endswith("/bias"))
                             + n(x for p, x in delta_leaves.items() if p.startswith("encoder/")))
    assert by_module["pooler"].trainable == 32 and by_module["pooler"].total == 32 * 32 + 32
    assert abs(by_module["pooler"].percent - 100 * 32 / (32 * 33)) < 1e-9
    text = rep.table()
    assert "trainable params: " + f"{rep.trainable:,}" in text
    table_lines = text.split("\n\n")[1].splitlines()
    assert len({len(line) for line in table_lines}) == 1  # aligned columns
    assert len(table_lines) == 2 + len(rep.by_method)


def _abstract_lora(base, r=8, pattern=r".*/(query|value)/kernel"):
    import re
    delta: dict = {}
    for p, x in P.leaf_paths(base):
        if re.fullmatch(pattern, p):
            node = delta
            for k in p.split("/")[:-1]:
                node = node.setdefault(k, {})
            node["lora_a"] = jax.ShapeDtypeStruct((x.shape[0], r), x.dtype)
            node["lora_b"] = jax.ShapeDtypeStruct((r, x.shape[1]), x.dtype)
    return delta


def _adam_tx(trainable):
    return make_optimizer({"t": GroupConfig("adamw")}, P.label_tree(trainable, [(r".*", "t")]))


def _memory_check(name, base, torch_count, sel_name="BitFit", sel=P.bitfit_patterns()):
    """LoRA r=8 on q/v vs BitFit (or norms only) vs full fine-tuning, from shapes only."""
    lora = _abstract_lora(base)
    rows = memory_comparison(base, {"LoRA r=8 (q,v)": (lora, ()),
                                    sel_name: ({}, sel),
                                    "full fine-tuning": ({}, P.full_finetuning_patterns())},
                             _adam_tx)
    total = P.tree_size(base)
    assert total == torch_count  # our base has exactly the reference's parameters
    lora_row, bitfit_row, full_row = rows
    assert lora_row.optimizer_state_bytes == 2 * P.tree_bytes(lora) + 8
    assert full_row.optimizer_state_bytes == 2 * 4 * total + 8
    assert full_row.frozen_bytes == 0 and lora_row.frozen_bytes == 4 * total
    assert bitfit_row.trainable == P.tree_size(P.select_base(base, sel)[0])
    print(f"\n{name}: {total:,} params\n{format_memory(rows)}")
    return rows


def test_memory_minilm(minilm_path):
    """PEFT vs full fine-tuning memory on all-MiniLM-L6-v2 (shapes only)."""
    import json
    import os
    import torch
    import transformers

    from peft_jax.models.bert import BertConfig, BertModel
    cfg = json.load(open(os.path.join(minilm_path, "config.json")))
    config = BertConfig.from_hf(cfg, "config.json")
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    base = nn.meta.unbox(jax.eval_shape(lambda i: BertModel(config).init(jax.random.key(0), i),
                                        ids)["params"])
    with torch.device("meta"):
        ref = transformers.BertModel(transformers.BertConfig(**cfg), add_pooling_layer=True)
    _memory_check("all-MiniLM-L6-v2", base, ref.num_parameters())


@pytest.mark.slow
def test_memory_smollm2(smollm2_gguf):
    import torch
    import transformers

    from peft_jax.models.gguf import _open, config_from_gguf
    from peft_jax.models.llama import LlamaModel
    config = config_from_gguf(_open(smollm2_gguf), smollm2_gguf)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    base = nn.meta.unbox(jax.eval_shape(lambda i: LlamaModel(config).init(jax.random.key(0), i),
                                        ids)["params"])
    with torch.device("meta"):
        ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf()))
    _memory_check("SmolLM2-135M", base, ref.num_parameters(), "norms only",
                  P.layernorm_patterns())


# ----------------------------------------------------------------------------- heads


from peft_jax.peft.heads import apply_head, init_head


def test_classification_head_matches_roberta_head():
    import torch
    from transformers import RobertaConfig
    from transformers.models.roberta.modeling_roberta import RobertaClassificationHead

    d, k = 16, 3
    params = init_head("classification", d, k, jax.random.key(1), hidden=True)
    ref = RobertaClassificationHead(RobertaConfig(hidden_size=d, num_labels=k)).eval()
    with torch.no_grad():
        for name in ("dense", "out_proj"):
            getattr(ref, name).weight.copy_(torch.tensor(np.asarray(params[name]["kernel"]).T))
            getattr(ref, name).bias.copy_(torch.tensor(np.asarray(params[name]["bias"]) + 0.1))
    params = {n: {"kernel": v["kernel"], "bias": v["bias"] + 0.1} for n, v in params.items()}
    pooled = np.random.default_rng(0).normal(size=(4, d)).astype(np.float32)
    got = apply_head("classification", params, jnp.asarray(pooled))
    with torch.no_grad():
        want = ref(torch.tensor(pooled)[:, None, :]).numpy()  # the head reads token 0
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    assert got.shape == (4, k)


def test_head_kinds_shapes_and_dropout():
    d = 8
    x = jnp.ones((3, d))
    reg = init_head("regression", d, None, jax.random.key(0))
    assert apply_head("regression", reg, x).shape == (3, 1) and set(reg) == {"out_proj"}
    proj = init_head("projection", d, None, jax.random.key(0))
    y = apply_head("projection", proj, x)
    assert y.shape == (3, d) and float(jnp.max(jnp.abs(y))) < 1.0
    np.testing.assert_allclose(y, jnp.tanh(x @ proj["dense"]["kernel"]), atol=1e-6)
    cls = init_head("classification", d, 2, jax.random.key(0))
    a = apply_head("classification", cls, x, deterministic=False, rng=jax.random.key(3),
                   dropout_rate=0.5)
    b = apply_head("classification", cls, x, deterministic=True)
    assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="needs an rng"):
        apply_head("classification", cls, x, deterministic=False)
    with pytest.raises(ValueError, match=r"kind='mlp'; allowed: \['classification'"):
        init_head("mlp", d, 2, jax.random.key(0))
    with pytest.raises(ValueError, match="regression head: num_labels=3"):
        init_head("regression", d, 3, jax.random.key(0))
