"""The custom-VJP LayerNorm core against the autodiff one: outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.models import layers


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("eps", [1e-12, 1e-5])
@pytest.mark.parametrize("fence", layers.LN_FENCES)
def test_layer_norm_vjp_matches_autodiff(use_bias, eps, fence):
    import functools
    ln = functools.partial(layers.layer_norm, fence=fence)
    kx, ks, kb, kg = jax.random.split(jax.random.PRNGKey(0), 4)
    x = 3.0 * jax.random.normal(kx, (4, 7, 48)) + 1.5
    scale = 1.0 + 0.3 * jax.random.normal(ks, (48,))
    bias = 0.2 * jax.random.normal(kb, (48,)) if use_bias else None
    dy = jax.random.normal(kg, x.shape)

    def loss(fn):
        return lambda x, s, b: jnp.sum(fn(x, s, b, eps) * dy)

    y_new = ln(x, scale, bias, eps)
    y_old = layers.layer_norm_autodiff(x, scale, bias, eps)
    np.testing.assert_array_equal(np.asarray(y_new), np.asarray(y_old))
    argn = (0, 1, 2) if use_bias else (0, 1)
    g_new = jax.jit(jax.grad(loss(ln), argn))(x, scale, bias)
    g_old = jax.jit(jax.grad(loss(layers.layer_norm_autodiff), argn))(x, scale, bias)
    for name, a, b in zip(("dx", "dscale", "dbias"), g_new, g_old):
        assert _rel(a, b) <= 1e-5, (name, _rel(a, b))


def test_layernorm_fence_only_on_cpu(monkeypatch):
    assert layers.default_ln_fence() == "dx"              # the tests run on the CPU backend
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    assert layers.default_ln_fence() == "none"


def test_layernorm_module_trains_scale_and_bias():
    """Through the flax module (bf16 compute dtype too): param grads match the autodiff core."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 32))
    for dtype in (jnp.float32, jnp.bfloat16):
        mod = layers.LayerNorm(eps=1e-12, dtype=dtype)
        params = mod.init(jax.random.PRNGKey(2), x)
        params = jax.tree_util.tree_map(
            lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(3), p.shape), params)

        def f(params, x):
            return jnp.sum(mod.apply(params, x).astype(jnp.float32) ** 3)

        g_new = jax.grad(f, (0, 1))(params, x)
        saved = layers.layer_norm
        layers.layer_norm = layers.layer_norm_autodiff
        try:
            g_old = jax.grad(f, (0, 1))(params, x)
        finally:
            layers.layer_norm = saved
        for a, b in zip(jax.tree_util.tree_leaves(g_new), jax.tree_util.tree_leaves(g_old)):
            assert a.dtype == b.dtype
            tol = 1e-5 if dtype == jnp.float32 else 1e-2
            assert _rel(a, b) <= tol
