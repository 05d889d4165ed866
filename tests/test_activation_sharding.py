"""Activation sharding constraints from the rules table: a LoRA / prompt-tuning step on a
2x2x2 (data, fsdp, tensor) mesh equals the single-device step, for a Llama and a T5, and
the constraints are really in the compiled program (none without a mesh)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from peft_jax.models.llama import LLAMA, LlamaConfig
from peft_jax.models.slots import Slots
from peft_jax.models.t5 import T5, T5Config
from peft_jax.parallel.mesh import (batch_sharding, logical_axes_tree, make_mesh, shardings_for,
                                    under_mesh)
from peft_jax.peft import LoRA, PromptTuning, init_delta

FAMILIES = {
    "llama": (LLAMA, LlamaConfig.tiny(num_layers=2, d_ff=48)),
    "t5": (T5, T5Config.tiny(d_ff=48, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                             scale_decoder_outputs=False, dropout_rate=0.0)),
}
METHODS = {"lora": (LoRA(targets=r".*/(query|value|up)$", rank=4),), "prompt": (PromptTuning(length=4),)}


def _setup(family, methods, scan=False):
    fam, config = FAMILIES[family]
    config = dataclasses.replace(config, scan_layers=scan)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 90, (8, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::3, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": mask,
             "decoder_input_ids": rng.integers(3, 90, (8, 5)).astype(np.int32)}
    boxed = fam.build(config).init(jax.random.PRNGKey(0), **fam.init_inputs(batch))["params"]
    base = jax.tree.map(lambda a: np.asarray(a) + rng.normal(0, 0.05, a.shape).astype(np.float32),
                        nn.meta.unbox(boxed))
    model = fam.build(config, Slots(METHODS[methods]))
    delta = init_delta(model, base, batch, jax.random.PRNGKey(1))
    delta = jax.tree.map(lambda a: a + 0.05 * rng.normal(size=a.shape).astype(np.float32), delta)

    def loss(d, b, x):
        logits = fam.apply(model, {"params": b, "peft": d}, x)["logits"]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 7])

    return boxed, base, delta, batch, jax.value_and_grad(loss)


@pytest.mark.parametrize("methods", sorted(METHODS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sharded_step_equals_single_device(family, methods):
    boxed, base, delta, batch, grad_fn = _setup(family, methods)
    l1, g1 = jax.jit(grad_fn)(delta, base, batch)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    base_sh = shardings_for(base, mesh, logical_axes_tree(boxed))
    sharded = under_mesh(jax.jit(grad_fn), mesh)
    args = (jax.device_put(delta, NamedSharding(mesh, P())), jax.device_put(base, base_sh),
            {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()})
    l8, g8 = sharded(*args)
    assert abs(float(l8) - float(l1)) <= 1e-5
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g1))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(scale, 1.0)),
                 g8, g1)
    # the constraints are in the program under a mesh, and only there
    with jax.set_mesh(mesh):
        text = jax.jit(grad_fn).lower(*args).as_text()
    assert text.count("sharding_constraint") > 10
    assert jax.jit(grad_fn).lower(delta, base, batch).as_text().count("sharding_constraint") == 0
