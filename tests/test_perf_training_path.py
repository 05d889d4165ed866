"""Behaviour of the performance features of the training path (no timing assertions):
fused hash dropout masks, the 4-D attention path, erf GELU, layer remat, buffer donation,
one compilation per batch shape with no host callbacks inside the step, the gradient only
of trainable leaves, device prefetching that keeps the data position exact, and the GPU
benchmark script's CPU smoke run."""

import os
import pathlib
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peft_jax import peft as pj
from peft_jax.models import bert, llama
from peft_jax.models.layers import (Dropout, apply_dropout, dot_product_attention,
                                    dropout_keep_mask, gelu_erf)
from peft_jax.models.slots import Slots
from peft_jax.parallel.prefetch import DevicePrefetcher
from peft_jax.peft import init_delta, partition
from peft_jax.train.loop import compile_count
from peft_jax.train.step import TrainState, jit_train_step, make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- dropout


def test_hash_dropout_rate_independence_and_determinism():
    shape = (8, 4, 128, 256)  # 1M elements
    rate = 0.1
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    m1 = np.asarray(dropout_keep_mask(k1, rate, shape, "hash"))
    m2 = np.asarray(dropout_keep_mask(k2, rate, shape, "hash"))
    assert m1.dtype == bool and m1.shape == shape
    n = m1.size
    tol = 5 * np.sqrt(rate * (1 - rate) / n)
    assert abs(m1.mean() - (1 - rate)) < tol
    # other key: an independent mask (agreement p^2 + (1-p)^2), same key: the same mask
    assert abs((m1 == m2).mean() - (rate ** 2 + (1 - rate) ** 2)) < 2 * tol
    np.testing.assert_array_equal(m1, np.asarray(dropout_keep_mask(k1, rate, shape, "hash")))
    # neighbouring elements are not correlated (lag-1 and across the last axis)
    flat = m1.reshape(-1).astype(np.float64)
    corr = np.corrcoef(flat[:-1], flat[1:])[0, 1]
    assert abs(corr) < 0.01
    # inverted dropout keeps the expectation
    x = jnp.ones(shape, jnp.float32)
    assert abs(float(apply_dropout(x, rate, k1, "hash").mean()) - 1.0) < 0.01


def test_jax_dropout_impl_gives_flax_masks_and_bad_impl_is_named():
    x = jnp.arange(1.0, 601.0).reshape(2, 300)
    rng = jax.random.PRNGKey(3)
    ours = Dropout(0.3, "jax").apply({}, x, deterministic=False, rngs={"dropout": rng})
    ref = nn.Dropout(0.3).apply({}, x, deterministic=False, rngs={"dropout": rng})
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6)
    np.testing.assert_array_equal(Dropout(0.3).apply({}, x, deterministic=True), x)
    with pytest.raises(ValueError, match="dropout_impl='threefry'"):
        bert.BertConfig.tiny(dropout_impl="threefry")
    with pytest.raises(ValueError, match="remat='some'"):
        llama.LlamaConfig.tiny(remat="some")


@pytest.mark.parametrize("impl", ["hash", "jax"])
def test_bert_dropout_is_active_and_reproducible(impl):
    cfg = bert.BertConfig.tiny(dropout_impl=impl)
    model = bert.BertModel(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 99, (2, 12)))
    v = model.init(jax.random.PRNGKey(0), ids)
    det = model.apply(v, ids)["hidden_states"]
    run = lambda k: model.apply(v, ids, deterministic=False,
                                rngs={"dropout": jax.random.PRNGKey(k)})["hidden_states"]
    assert not np.allclose(run(1), det)
    assert not np.allclose(run(1), run(2))
    np.testing.assert_array_equal(run(1), run(1))


# ----------------------------------------------------------------------------- layers


def _reference_attention(q, k, v, bias):
    h, h_kv = q.shape[2], k.shape[2]
    k = jnp.repeat(k, h // h_kv, axis=2)
    v = jnp.repeat(v, h // h_kv, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]) + bias
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)


@pytest.mark.parametrize("h_kv", [4, 2, 1])
def test_attention_mha_and_gqa_paths_match_reference(h_kv):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 7, h_kv, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 7, h_kv, 8)), jnp.float32)
    bias = jnp.asarray(np.where(rng.random((2, 1, 5, 7)) < 0.2, -1e9, 0.0), jnp.float32)
    out = dot_product_attention(q, k, v, bias=bias, scale=1 / np.sqrt(8))
    np.testing.assert_allclose(out, _reference_attention(q, k, v, bias), atol=1e-5)


def test_gelu_erf_matches_jax_exact_gelu():
    x = jnp.linspace(-8, 8, 2001, dtype=jnp.float32)
    # erf form: absolute error ~1e-6 where 1 + erf cancels (x << 0), as torch
    np.testing.assert_allclose(gelu_erf(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
    g1 = jax.grad(lambda t: gelu_erf(t).sum())(x)
    g2 = jax.grad(lambda t: jax.nn.gelu(t, approximate=False).sum())(x)
    np.testing.assert_allclose(g1, g2, atol=1e-6)


# ----------------------------------------------------------------------------- remat


def _loss_and_grads(family, remat, method):
    if family == "bert":
        cfg = bert.BertConfig.tiny(remat=remat)
        model = bert.BertModel(cfg, slots=Slots((method,)))
        plain = bert.BertModel(bert.BertConfig.tiny())
        out_key = "hidden_states"
    else:
        cfg = llama.LlamaConfig.tiny(remat=remat)
        model = llama.LlamaModel(cfg, slots=Slots((method,)))
        plain = llama.LlamaModel(llama.LlamaConfig.tiny())
        out_key = "logits"
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 90, (2, 9)))
    mask = jnp.ones_like(ids).at[1, 6:].set(0)
    base = nn.meta.unbox(plain.init(jax.random.PRNGKey(0), ids)["params"])
    delta = init_delta(model, base, {"input_ids": ids, "attention_mask": mask},
                       jax.random.PRNGKey(1))
    delta = jax.tree.map(lambda x: x + 0.01, delta)  # LoRA B != 0, so every path matters

    def loss(d):
        out = model.apply({"params": base, "peft": d}, ids, mask, deterministic=False,
                          rngs={"dropout": jax.random.PRNGKey(5)})[out_key]
        return jnp.mean(jnp.square(out))

    return jax.jit(jax.value_and_grad(loss))(delta)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_remat_keeps_loss_and_gradients(family):
    method = pj.LoRA(targets=r".*/attention/(query|value)", rank=2, alpha=4.0)
    ref_loss, ref_g = _loss_and_grads(family, "none", method)
    for remat in ("full", "dots"):
        loss, g = _loss_and_grads(family, remat, method)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g, ref_g)


# ----------------------------------------------------------------------------- train step


def _tiny_step(method):
    cfg = bert.BertConfig.tiny()
    model = bert.BertModel(cfg, slots=Slots((method,)))
    ids = jnp.ones((4, 8), jnp.int32)
    base = nn.meta.unbox(bert.BertModel(cfg).init(jax.random.PRNGKey(0), ids)["params"])
    delta = init_delta(model, base, {"input_ids": ids[:1], "attention_mask": ids[:1]},
                       jax.random.PRNGKey(1))
    trainable, frozen = partition.split_trainable(base, delta)
    tx = optax.adamw(1e-3)

    def loss_fn(variables, batch, rng, deterministic):
        out = model.apply(variables, batch["input_ids"], batch["attention_mask"],
                          deterministic=deterministic, rngs={"dropout": rng})
        return jnp.mean(jnp.square(out["pooled"])), {}

    step = jit_train_step(make_train_step(loss_fn, partition.assemble, tx))
    return step, TrainState.create(trainable, tx, jax.random.PRNGKey(2)), frozen


def _batch(length, seed=0):
    ids = np.random.default_rng(seed).integers(3, 99, (4, length)).astype(np.int32)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(jnp.asarray(ids))}


def test_step_donates_state_compiles_once_per_shape_and_has_no_host_callbacks():
    step, state, frozen = _tiny_step(pj.LoRA(targets=r".*/attention/(query|value)", rank=2))
    frozen_leaf = jax.tree.leaves(frozen)[0]
    old_leaf = jax.tree.leaves(state.trainable)[0]
    state, _ = step(state, frozen, _batch(8))
    assert old_leaf.is_deleted()            # the state's buffers were donated
    assert not frozen_leaf.is_deleted()     # the frozen base is never donated
    for seed in range(3):                   # same bucket shape: no recompilation
        state, _ = step(state, frozen, _batch(8, seed))
    assert compile_count(step) == 1
    state, _ = step(state, frozen, _batch(16))  # a second bucket: one more compilation
    state, _ = step(state, frozen, _batch(16, 1))
    assert compile_count(step) == 2
    jaxpr = str(jax.make_jaxpr(step)(state, frozen, _batch(8)))
    for prim in ("callback", "io_callback", "debug_callback", "infeed", "outfeed"):
        assert prim not in jaxpr, prim


def test_step_differentiates_only_trainable_leaves():
    step, state, frozen = _tiny_step(pj.PromptTuning(length=3))
    before = jax.tree.map(np.asarray, frozen)
    new_state, metrics = step(state, frozen, _batch(8))
    assert jax.tree.structure(new_state.trainable) == jax.tree.structure(state.trainable)
    # the word embedding table (frozen, 99 x 32) never enters the trainable/grad trees
    assert "params" not in new_state.trainable or not new_state.trainable["params"]
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, frozen))
    assert float(metrics["finite"]) == 1.0


# ----------------------------------------------------------------------------- prefetch


class _Batches:
    """Iterator with a checkpointable position, like the data pipeline."""

    def __init__(self, n):
        self.i, self.n = 0, n

    def __iter__(self):
        return self

    def __next__(self):
        if self.i >= self.n:
            raise StopIteration
        self.i += 1
        return {"x": np.full((2, 3), self.i, np.float32)}

    def get_state(self):
        return {"i": self.i}


def test_prefetcher_yields_device_batches_in_order_with_exact_position():
    src = _Batches(6)
    pf = DevicePrefetcher(src, jax.device_put, depth=2)
    first = next(pf)
    assert isinstance(first["x"], jax.Array) and float(first["x"][0, 0]) == 1.0
    deadline = time.time() + 5
    while src.i < 3 and time.time() < deadline:   # the thread reads ahead...
        time.sleep(0.01)
    assert src.i >= 3
    assert pf.get_state() == {"i": 1}             # ...but the position is the consumed one
    rest = [float(b["x"][0, 0]) for b in pf]
    assert rest == [2.0, 3.0, 4.0, 5.0, 6.0] and pf.get_state() == {"i": 6}
    pf.close()


def test_prefetcher_reraises_errors_from_the_thread():
    def bad_shard(b):
        raise RuntimeError("shard failed")

    pf = DevicePrefetcher(_Batches(3), bad_shard)
    with pytest.raises(RuntimeError, match="shard failed"):
        next(pf)
    pf.close()


# ----------------------------------------------------------------------------- GPU script


@pytest.mark.slow
def test_gpu_llama1b_script_runs_tiny_on_cpu():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_llama1b.py"), "--tiny",
           "--peak-tflops", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    res = json.loads(proc.stdout.strip().splitlines()[-1][len("RESULT "):])["results"]
    assert [r["method"] for r in res] == ["lora", "prompt"]
    for r in res:
        assert r["recompiles_after_first"] == 0 and np.isfinite(r["loss"]) and r["mfu"] > 0
