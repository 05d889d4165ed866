"""SimCSE losses (vs a direct numpy computation, and under an 8-device data-parallel mesh),
BERT-whitening, STS scoring helpers and semantic search."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.contrastive import losses, sts_eval, whitening
from peft_jax.contrastive.embed import semantic_search
from peft_jax.parallel.mesh import batch_sharding, make_mesh


def _np_cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def _np_ce(logits, labels):
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -np.mean(logp[np.arange(len(labels)), labels])


def _emb(seed, b=16, d=12):
    return np.random.default_rng(seed).normal(size=(b, d)).astype(np.float32)


def test_unsup_loss_matches_numpy():
    z1, z2 = _emb(0), _emb(1)
    want = _np_ce(_np_cos(z1.astype(np.float64), z2) / 0.05, np.arange(16))
    got = losses.unsup_simcse_loss(jnp.asarray(z1), jnp.asarray(z2))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # other temperature: a different value, still matching
    want_t = _np_ce(_np_cos(z1.astype(np.float64), z2) / 0.5, np.arange(16))
    np.testing.assert_allclose(float(losses.unsup_simcse_loss(z1, z2, temperature=0.5)), want_t,
                               rtol=1e-5)
    assert abs(want - want_t) > 1e-3


def test_sup_loss_matches_numpy_with_hard_negative_weight():
    z1, z2, z3 = _emb(0), _emb(1), _emb(2)
    b = 16
    sims = np.concatenate([_np_cos(z1.astype(np.float64), z2), _np_cos(z1.astype(np.float64), z3)], 1)
    for w in (0.0, 1.0):
        logits = sims / 0.05 + w * np.concatenate([np.zeros((b, b)), np.eye(b)], 1)
        want = _np_ce(logits, np.arange(b))
        got = losses.sup_simcse_loss(z1, z2, z3, hard_negative_weight=w)
        np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_perfect_views_give_low_loss_and_accuracy_one():
    z = _emb(3, b=8, d=64)
    assert float(losses.unsup_simcse_loss(z, z)) < 1e-2
    assert float(losses.contrastive_accuracy(z, z)) == 1.0
    assert float(losses.unsup_simcse_loss(z, _emb(4, b=8, d=64))) > 1.0


def test_padding_rows_are_neither_anchors_nor_candidates():
    z1, z2 = _emb(0, b=10), _emb(1, b=10)
    valid = np.array([1] * 7 + [0] * 3, np.float32)
    got = losses.unsup_simcse_loss(z1, z2, valid=valid)
    want = losses.unsup_simcse_loss(z1[:7], z2[:7])
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    got_sup = losses.sup_simcse_loss(z1, z2, _emb(2, b=10), valid=valid)
    want_sup = losses.sup_simcse_loss(z1[:7], z2[:7], _emb(2, b=10)[:7])
    np.testing.assert_allclose(float(got_sup), float(want_sup), rtol=1e-6)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="z2"):
        losses.unsup_simcse_loss(_emb(0, b=4), _emb(1, b=5))


@pytest.fixture(scope="module")
def mesh8():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return make_mesh((8, 1, 1))


def test_sharded_loss_and_grads_equal_single_device(mesh8):
    """Global batch 32 over 8 devices (4 rows each): every device's anchors see all 32
    candidates, so loss and gradients equal the single-device computation."""
    z1, z2 = _emb(0, b=32), _emb(1, b=32)
    single = jax.value_and_grad(losses.unsup_simcse_loss, argnums=(0, 1))(z1, z2)
    sh = batch_sharding(mesh8, 2)
    z1s, z2s = jax.device_put(z1, sh), jax.device_put(z2, sh)
    assert len(z1s.sharding.device_set) == 8
    jitted = jax.jit(jax.value_and_grad(losses.unsup_simcse_loss, argnums=(0, 1)))
    sharded = jitted(z1s, z2s)
    explicit = jax.jit(jax.value_and_grad(
        lambda a, b: losses.gathered_unsup_simcse_loss(a, b, mesh8), argnums=(0, 1)))(z1s, z2s)
    for got in (sharded, explicit):
        np.testing.assert_allclose(float(got[0]), float(single[0]), rtol=1e-5)
        for g, w in zip(got[1], single[1]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
    # local-only negatives (each device's 4 rows alone) would give a different loss
    local = np.mean([float(losses.unsup_simcse_loss(z1[i:i + 4], z2[i:i + 4])) for i in range(0, 32, 4)])
    assert abs(local - float(single[0])) > 0.1


def test_gathered_loss_rejects_indivisible_batch(mesh8):
    with pytest.raises(ValueError, match="does not divide"):
        losses.gathered_unsup_simcse_loss(_emb(0, b=12), _emb(1, b=12), mesh8)


def test_whitening_zero_mean_identity_cov_and_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16)) + 3.0  # correlated, offset
    w = whitening.fit_whitening(x)
    y = whitening.apply_whitening(w, x)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(16), atol=1e-4)
    w8 = whitening.fit_whitening(x, k=8)
    y8 = w8(x)
    assert y8.shape == (500, 8)
    np.testing.assert_allclose(np.cov(y8, rowvar=False), np.eye(8), atol=1e-4)
    # the kept dims are the largest-variance directions: they match the first 8 of the full fit
    np.testing.assert_allclose(np.abs(y8), np.abs(y[:, :8]), atol=1e-4)
    path = os.path.join(tmp_path, "w.npz")
    whitening.save_whitening(path, w8)
    w2 = whitening.load_whitening(path)
    np.testing.assert_array_equal(w2.W, w8.W)
    np.testing.assert_array_equal(w2.mu, w8.mu)


def test_whitening_errors(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 16))
    with pytest.raises(ValueError, match="k=16"):
        whitening.fit_whitening(x, k=16)  # rank 4 covariance
    w4 = whitening.fit_whitening(x)  # default: every direction with variance
    assert w4.dim_out == 4
    np.testing.assert_allclose(np.cov(w4(x), rowvar=False), np.eye(4), atol=1e-6)
    with pytest.raises(ValueError, match="k=17"):
        whitening.fit_whitening(np.random.default_rng(0).normal(size=(50, 16)), k=17)
    bad = os.path.join(tmp_path, "bad.npz")
    np.savez(bad, mean=np.zeros(3))
    with pytest.raises(ValueError, match="missing arrays"):
        whitening.load_whitening(bad)
    w = whitening.fit_whitening(np.random.default_rng(0).normal(size=(50, 16)))
    with pytest.raises(ValueError, match="input dimension 16"):
        whitening.apply_whitening(w, np.zeros((2, 8)))


def test_anisotropy_alignment_uniformity():
    rng = np.random.default_rng(0)
    iso = rng.normal(size=(2000, 32))
    assert abs(sts_eval.anisotropy(iso)) < 0.02
    cone = iso + 10.0  # all vectors share a large common direction
    assert sts_eval.anisotropy(cone) > 0.9
    assert sts_eval.alignment(iso, iso) == pytest.approx(0.0, abs=1e-12)
    u = iso / np.linalg.norm(iso, axis=1, keepdims=True)
    want = np.log(np.mean([np.exp(-2 * np.sum((u[i] - u[j]) ** 2))
                           for i in range(50) for j in range(i + 1, 50)]))
    assert sts_eval.uniformity(iso[:50]) == pytest.approx(want, rel=1e-9)
    assert sts_eval.uniformity(cone[:200]) > sts_eval.uniformity(iso[:200])


def test_semantic_search_top_k():
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(100, 8))
    scores, idx = semantic_search(corpus[[5, 42]] * 3.0, corpus, k=3)
    assert idx[:, 0].tolist() == [5, 42]
    assert np.all(np.diff(scores, axis=1) <= 0)
    full = (corpus / np.linalg.norm(corpus, axis=1, keepdims=True))
    want = np.argsort(-(full[[5, 42]] @ full.T), axis=1)[:, :3]
    np.testing.assert_array_equal(idx, want)


def test_sts_readers_counts(shared_data):
    """Pair counts of SentEval's STS data (README of ../shared/data)."""
    counts = {t: sum(len(p) for p in sts_eval.load_sts_task(t, str(shared_data)))
              for t in sts_eval.STS_TASKS}
    assert counts == {"STS12": 3108, "STS13": 1500, "STS14": 3750, "STS15": 3000, "STS16": 1186,
                      "STSBenchmark": 1379, "SICKRelatedness": 4927}


def test_evaluate_sts_all_setting(shared_data):
    """The 'all' setting: one Spearman over the concatenated pairs of all subsets."""
    tasks = ("STS13",)
    subsets = sts_eval.load_sts_task("STS13", str(shared_data))
    rng = np.random.default_rng(0)
    table = {s: rng.normal(size=8) for s in sts_eval.task_sentences(subsets)}
    res = sts_eval.evaluate_sts(lambda ss: np.stack([table[s] for s in ss]), tasks,
                                str(shared_data), per_subset=True)
    pred, gold = sts_eval.score_pairs(table, subsets)
    from scipy.stats import spearmanr
    assert res["STS13"] == pytest.approx(100 * spearmanr(pred, gold).correlation)
    assert set(res) == {"STS13", "STS13/FNWN", "STS13/headlines", "STS13/OnWN", "avg"}
    for p in subsets:  # per-subset entries are the Spearman of that subset alone
        ps, gs = sts_eval.score_pairs(table, [p])
        assert res[p.name] == pytest.approx(100 * spearmanr(ps, gs).correlation)
    assert res["STS13"] != pytest.approx(np.mean([res[p.name] for p in subsets]), abs=1e-3)


def test_subsample_pairs_is_fixed_and_bounded(shared_data):
    full = sts_eval.load_sts_task("STS12", str(shared_data))
    a = sts_eval.subsample_pairs(full, 300, seed=1)
    b = sts_eval.subsample_pairs(full, 300, seed=1)
    assert sum(len(p) for p in a) == 300
    assert [p.sent1 for p in a] == [p.sent1 for p in b]
    assert sts_eval.subsample_pairs(full, None) == full
