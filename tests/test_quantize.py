"""int8 weight-only storage (``models/quantize.py``): group sizes, the round trip error bound,
and a model on an int8 base computing what the same model computes on the dequantized float
kernels (grouped and per-channel scales, unscanned and scanned)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.models import quantize, stack
from peft_jax.models.llama import LLAMA, LlamaConfig


@pytest.mark.parametrize("n_in,group,want", [(576, 64, 64), (1536, 64, 64), (100, 64, 50),
                                             (97, 64, 97), (96, 0, 96), (32, 64, 32), (60, 64, 60)])
def test_group_size(n_in, group, want):
    assert quantize.group_size(n_in, group) == want


@pytest.mark.parametrize("group", [0, 8, 64])
def test_round_trip_error_is_half_a_step_per_group(group):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (2, 64, 24)).astype(np.float32)
    w[0, 5, 3] = 1.0                                    # an outlier weight
    q, s = quantize.quantize_kernel(w, group)
    g = quantize.group_size(64, group)
    assert q.dtype == np.int8 and q.shape == w.shape and s.shape == (2, 64 // g, 24)
    back = quantize.dequantize_kernel(q, s)
    step = np.repeat(s, g, axis=-2)                     # each weight's own group scale
    assert np.all(np.abs(back - w) <= step / 2 + 1e-7)
    np.testing.assert_allclose(np.abs(w).reshape(2, 64 // g, g, 24).max(2) / 127, s, rtol=1e-6)


def test_groups_confine_an_outlier():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.02, (64, 16)).astype(np.float32)
    w[3, :] = 1.0                                       # one outlier input row
    err = {g: np.abs(quantize.dequantize_kernel(*quantize.quantize_kernel(w, g)) - w)[8:].mean()
           for g in (0, 8)}
    assert err[8] < err[0] / 10                         # rows outside the outlier's group


def _tiny():
    config = LlamaConfig.tiny(tie_word_embeddings=False)     # kernels' inputs: 32 and 40 rows
    model = LLAMA.build(config)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 101, (2, 9)), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    base = nn.meta.unbox(model.init(jax.random.PRNGKey(0), **LLAMA.init_inputs(batch))["params"])
    return config, model, batch, jax.tree.map(np.asarray, base)


@pytest.mark.parametrize("group", [0, 8])
@pytest.mark.parametrize("scan", [False, True])
def test_int8_forward_equals_the_dequantized_float_forward(group, scan):
    config, model, batch, base = _tiny()
    q = quantize.quantize(base, group)
    deq = quantize.dequantize(q)
    if scan:
        config = dataclasses.replace(config, scan_layers=True)
        model, q, deq = LLAMA.build(config), stack.stack_layers(q), stack.stack_layers(deq)
        base = stack.stack_layers(base)
    scales = [a for p, a in jax.tree_util.tree_flatten_with_path(q)[0] if "kernel_scale" in str(p)]
    assert scales and all((s.shape[-2] > 1) == bool(group) for s in scales)
    run = lambda b: np.asarray(LLAMA.apply(model, {"params": b}, batch)["logits"])
    got, want = run(q), run(deq)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert np.abs(run(base) - want).max() > 1e-4       # int8 is not the float base itself


def test_weight_count_ignores_scales():
    _, _, _, base = _tiny()
    n = sum(a.size for a in jax.tree.leaves(base))
    q = quantize.quantize(base, 8)
    assert sum(a.size for a in jax.tree.leaves(q)) > n
    assert quantize.weight_count(q) == quantize.weight_count(base) == n
