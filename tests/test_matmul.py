"""``layers.matmul`` (every Dense, LoRA, adapter and head matmul) computes ``jnp.dot``'s
values and gradients for any number of leading axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.models.layers import matmul


@pytest.mark.parametrize("shape", [(5, 7), (2, 5, 7), (2, 3, 5, 7), (0, 4, 7)])
def test_matmul_equals_dot(shape):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    w = jax.random.normal(jax.random.PRNGKey(1), (7, 3))
    got, want = matmul(x, w), jnp.dot(x, w)
    assert got.shape == want.shape == shape[:-1] + (3,)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    f = lambda fn: jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), argnums=(0, 1))(x, w)
    for g, h in zip(f(matmul), f(jnp.dot)):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6)
