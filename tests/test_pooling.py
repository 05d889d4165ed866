"""Sentence poolers against direct numpy computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.models import pooling


@pytest.fixture
def outputs():
    rng = np.random.default_rng(0)
    layers = tuple(rng.normal(size=(3, 6, 4)).astype(np.float32) for _ in range(4))
    mask = np.array([[1, 1, 1, 1, 1, 1],     # full
                     [1, 1, 1, 0, 0, 0],     # right padding
                     [0, 0, 1, 1, 1, 1]],    # left padding
                    np.int32)
    pooled = rng.normal(size=(3, 4)).astype(np.float32)
    return {"hidden_states": layers[-1], "attention_mask": mask, "all_hidden_states": layers,
            "pooled": pooled}


def np_mean(x, mask):
    return np.stack([x[i][mask[i] == 1].mean(0) for i in range(x.shape[0])])


def test_poolers_match_numpy(outputs):
    h, m, hs = outputs["hidden_states"], outputs["attention_mask"], outputs["all_hidden_states"]
    expected = {
        "cls": outputs["pooled"],
        "cls_before_pooler": h[:, 0],
        "mean": np_mean(h, m),
        "first_last_avg": np_mean((hs[1] + hs[-1]) / 2, m),
        "top2_avg": np_mean((hs[-2] + hs[-1]) / 2, m),
        "last_token": np.stack([h[0, 5], h[1, 2], h[2, 5]]),
    }
    assert set(expected) == set(pooling.POOLERS)
    for name, want in expected.items():
        got = np.asarray(pooling.pool(name, outputs))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)


def test_cls_without_pooler_is_token_zero(outputs):
    no_pooler = {k: v for k, v in outputs.items() if k != "pooled"}
    np.testing.assert_array_equal(np.asarray(pooling.pool("cls", no_pooler)),
                                  outputs["hidden_states"][:, 0])


def test_mean_ignores_padding_values(outputs):
    h = outputs["hidden_states"].copy()
    h[1, 3:] = 1e6  # pad positions carry garbage
    a = np.asarray(pooling.mean(h, outputs["attention_mask"]))
    b = np.asarray(pooling.mean(outputs["hidden_states"], outputs["attention_mask"]))
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_errors_name_the_problem(outputs):
    with pytest.raises(ValueError, match=r"unknown pooling 'avg'.*first_last_avg"):
        pooling.pool("avg", outputs)
    no_layers = {k: v for k, v in outputs.items() if k != "all_hidden_states"}
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        pooling.pool("first_last_avg", no_layers)


def test_l2_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], np.float32)
    y = np.asarray(pooling.l2_normalize(jnp.asarray(x)))
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], rtol=1e-6)
    z = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(pooling.l2_normalize(z)),
                               z / np.linalg.norm(z, axis=1, keepdims=True), rtol=1e-5)
