"""``scan_layers``: one ``nn.scan`` over the blocks gives the same function as the Python
loop, for every family and PEFT method; the delta keeps its per-layer layout (a delta trained
scanned is saved, reloaded and applied unscanned with the same outputs); the base converts
between stacked and per-layer form without loss."""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peft_jax.models import generation, stack
from peft_jax.models.bert import BERT, BertConfig
from peft_jax.models.llama import LLAMA, LlamaConfig
from peft_jax.models.slots import Slots
from peft_jax.models.t5 import T5, T5Config
from peft_jax.peft import (IA3, Adapter, BitFit, LoRA, PrefixTuning, PromptTuning, VeRA,
                           init_delta)
from peft_jax.peft.delta_io import load_delta, save_delta
from peft_jax.peft.partition import leaf_paths
from peft_jax.runner.run import delta_tree
from peft_jax.train.builder import build_train_state
from peft_jax.train.step import make_train_step

IDS = np.array([[5, 6, 7, 8, 9], [9, 10, 11, 3, 0]], np.int32)
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], np.int32)
BATCH = {"input_ids": IDS, "attention_mask": MASK, "token_type_ids": np.zeros_like(IDS),
         "decoder_input_ids": np.array([[0, 4, 5], [0, 6, 0]], np.int32)}

FAMILIES = {
    "bert": (BERT, BertConfig.tiny(num_layers=3, hidden_dropout=0.0, attention_dropout=0.0),
             "hidden_states"),
    "llama": (LLAMA, LlamaConfig.tiny(num_layers=3), "logits"),
    "t5": (T5, T5Config.tiny(num_layers=3, num_decoder_layers=2, feed_forward_proj="gated-gelu",
                             tie_word_embeddings=False, scale_decoder_outputs=False,
                             dropout_rate=0.0), "logits"),
}
METHODS = (PromptTuning(length=2), PrefixTuning(length=3),
           LoRA(targets=r".*/(query|value|up)$", rank=2), Adapter(bottleneck=4), IA3())


def _base(fam, config):
    base = fam.build(config).init(jax.random.PRNGKey(0), **fam.init_inputs(BATCH))["params"]
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda a: np.asarray(a) + rng.normal(0, 0.05, a.shape).astype(np.float32),
                        nn.meta.unbox(base))


def _randomize(delta, seed=2):
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(delta))))
    return jax.tree.map(lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape), delta)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_base_converts_between_stacked_and_per_layer(family):
    fam, config, _ = FAMILIES[family]
    base = _base(fam, config)
    scanned = dataclasses.replace(config, scan_layers=True)
    stacked = stack.stack_layers(base)
    abstract = jax.eval_shape(lambda: nn.meta.unbox(fam.build(scanned).init(
        jax.random.PRNGKey(0), **fam.init_inputs(BATCH))["params"]))
    assert jax.tree.structure(stacked) == jax.tree.structure(abstract)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), stacked, abstract)
    jax.tree.map(np.testing.assert_array_equal, stack.unstack_layers(stacked), base)
    # the stacked leaves carry the logical "layers" axis (sharding rules), layer 0 only
    # leaves (T5's position bias) stay per layer
    boxed = jax.eval_shape(lambda: fam.build(scanned).init(
        jax.random.PRNGKey(0), **fam.init_inputs(BATCH))["params"])
    names = {tuple(x.names) for x in jax.tree.leaves(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))}
    assert any(n[0] == "layers" for n in names)


@pytest.mark.parametrize("family", [pytest.param("bert", marks=pytest.mark.slow), "llama",
                                    pytest.param("t5", marks=pytest.mark.slow)])
def test_scanned_equals_unscanned(family):
    """Every method at once (prompt, prefix, LoRA, adapters, IA3), remat on: outputs and
    delta gradients."""
    fam, config, key = FAMILIES[family]
    base = _base(fam, config)
    scanned = dataclasses.replace(config, scan_layers=True, remat="full")
    m, sm = (fam.build(c, Slots(METHODS)) for c in (config, scanned))
    sbase = stack.stack_layers(base)
    delta = init_delta(m, base, BATCH, jax.random.PRNGKey(3))
    sdelta = init_delta(sm, sbase, BATCH, jax.random.PRNGKey(3))
    # the scanned model creates its delta in the per-layer layout
    assert jax.tree.structure(sdelta) == jax.tree.structure(delta)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), sdelta, delta)
    delta = _randomize(delta)

    def out(model, params, d):
        return fam.apply(model, {"params": params, "peft": d}, BATCH)[key]

    np.testing.assert_allclose(out(sm, sbase, delta), out(m, base, delta), atol=2e-5, rtol=1e-5)
    g = jax.grad(lambda d: jnp.sum(jnp.sin(out(m, base, d))))(delta)
    sg = jax.grad(lambda d: jnp.sum(jnp.sin(out(sm, sbase, d))))(delta)
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g))  # fp32 summation-order noise
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5 * scale), sg, g)


def test_delta_trained_scanned_loads_unscanned(tmp_path):
    fam, config, _ = FAMILIES["llama"]
    base = _base(fam, config)
    scanned = dataclasses.replace(config, scan_layers=True)
    methods = (LoRA(targets=r".*/(query|value|down)$", rank=2), PromptTuning(length=2))
    sm, m = fam.build(scanned, Slots(methods)), fam.build(config, Slots(methods))
    sbase = stack.stack_layers(base)
    delta = init_delta(sm, sbase, BATCH, jax.random.PRNGKey(0))
    tx = optax.adam(1e-2)
    opt = tx.init(delta)

    def loss(d):
        logits = fam.apply(sm, {"params": sbase, "peft": d}, BATCH)["logits"]
        return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1, 7])

    @jax.jit
    def step(d, o):
        l, g = jax.value_and_grad(loss)(d)
        u, o = tx.update(g, o, d)
        return optax.apply_updates(d, u), o, l

    losses = []
    for _ in range(5):
        delta, opt, l = step(delta, opt)
        losses.append(float(l))
    assert losses[-1] < losses[0]
    save_delta(str(tmp_path), jax.device_get(delta), base_id="tiny", base_hash="h", methods=methods)
    loaded, _ = load_delta(str(tmp_path), base_id="tiny", base_hash="h", methods=methods)
    a = fam.apply(sm, {"params": sbase, "peft": delta}, BATCH)["logits"]
    b = fam.apply(m, {"params": base, "peft": loaded}, BATCH)["logits"]
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-5)


def test_scanned_kv_cache_generation_matches():
    fam, config, _ = FAMILIES["llama"]
    base = _base(fam, config)
    scanned = dataclasses.replace(config, scan_layers=True)
    ids = jnp.asarray([[5, 6, 7, 8, 9], [0, 9, 10, 11, 3]], jnp.int32)  # left-padded prompts
    mask = (ids > 0).astype(jnp.int32)
    a = generation.greedy_generate(fam.build(config), {"params": base}, ids, mask, max_new_tokens=4)
    b = generation.greedy_generate(fam.build(scanned), {"params": stack.stack_layers(base)}, ids,
                                   mask, max_new_tokens=4)
    np.testing.assert_array_equal(a, b)


STATE_CASES = {
    # prefix MLP (materialized inside the loss), VeRA (method-owned frozen projections)
    "llama": (LoRA(targets=r".*/(query|value)$", rank=2), PromptTuning(length=2),
              PrefixTuning(length=2, projection_hidden=4), VeRA(targets=r".*/(up|down)$", rank=4),
              IA3()),
    # trained base leaves (BitFit biases of the stacked base)
    "bert": (LoRA(targets=r".*/(query|value)$", rank=2), Adapter(bottleneck=4), BitFit()),
}


@pytest.mark.parametrize("family", ["llama", pytest.param("bert", marks=pytest.mark.slow)])
def test_scanned_train_state_is_stacked_and_trains_like_the_loop(family):
    """With scan_layers the train state holds one stacked leaf per tensor (delta, optimizer
    state, frozen method state): nothing per layer enters the jitted step. Three steps
    give the same per-layer delta (``delta_tree``) as the unscanned run."""
    fam, config, key = FAMILIES[family]
    methods = STATE_CASES[family]
    base = _base(fam, config)
    scanned = dataclasses.replace(config, scan_layers=True)

    def train(cfg, params, transform=None):
        model = fam.build(cfg, Slots(methods))

        def loss_fn(variables, batch, rng, deterministic):
            return jnp.mean(jnp.sin(fam.apply(model, variables, batch)[key])), {}

        # SGD with momentum: linear in the gradients, so fp32 summation-order noise stays small
        ts = build_train_state(model, params, methods, fam.init_inputs(BATCH),
                               jax.random.PRNGKey(4), lambda tr: optax.sgd(0.5, momentum=0.9),
                               transform=transform)
        step = jax.jit(make_train_step(loss_fn, ts.variables, ts.tx))
        state, losses = ts.state, []
        start = jax.device_get(state.trainable)
        for _ in range(3):
            state, metrics = step(state, ts.frozen, BATCH)
            assert float(metrics["applied"]) == 1.0
            losses.append(float(metrics["loss"]))
        return ts, state, losses, start

    ts0, state0, losses0, start = train(config, base)
    # the same start (the scanned init draws other random values); the transform (e.g.
    # train.init_from) sees the per-layer form
    def transform(tr):
        assert jax.tree.structure(tr) == jax.tree.structure(start)
        return start

    ts, state, losses, _ = train(scanned, stack.stack_layers(base), transform)
    paths = [p for p, _ in leaf_paths((state.trainable, state.opt_state, ts.frozen["peft"]))]
    assert not [p for p in paths if re.search(r"layer_\d", p)]
    assert sum("/layers/" in p for p in paths) > len(methods)
    np.testing.assert_allclose(losses, losses0, rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0]
    got, want = delta_tree(state.trainable, ts.frozen), delta_tree(state0.trainable, ts0.frozen)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
