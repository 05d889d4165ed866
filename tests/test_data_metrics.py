"""Metrics against scikit-learn / scipy and against hand-computed values."""

import numpy as np
import pytest

from peft_jax.data import compute_metrics
from peft_jax.data import metrics as M


@pytest.fixture
def cls_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    p = np.where(rng.random(500) < 0.6, y, rng.integers(0, 3, 500))
    return p, y


def test_against_sklearn(cls_data):
    skm = pytest.importorskip("sklearn.metrics")
    p, y = cls_data
    assert M.accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p))
    assert M.macro_f1(p, y, 3) == pytest.approx(skm.f1_score(y, p, average="macro"))
    assert M.mcc(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
    pb, yb = (p == 1).astype(int), (y == 1).astype(int)
    assert M.f1(pb, yb) == pytest.approx(skm.f1_score(yb, pb))
    assert M.mcc(pb, yb) == pytest.approx(skm.matthews_corrcoef(yb, pb))


def test_hand_computed():
    p, y = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    # tp=2 fp=1 fn=1 tn=1
    assert M.f1(p, y) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert M.mcc(p, y) == pytest.approx((2 * 1 - 1 * 1) / np.sqrt(3 * 3 * 2 * 2))
    assert M.mcc([1, 1, 1], [0, 1, 1]) == 0.0  # undefined -> 0, as sklearn
    assert M.f1([0, 0], [0, 0]) == 0.0
    # MultiRC: questions q1 (all right), q2 (one wrong)
    groups = ["q1", "q1", "q2", "q2", "q2"]
    assert M.multirc_em(p, [1, 1, 0, 0, 0], groups) == pytest.approx(0.5)


def test_correlations_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x = rng.normal(size=300)
    y = x + rng.normal(size=300)
    y[:40] = np.round(y[:40])  # ties
    assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    assert M.spearman(x, x ** 3) == pytest.approx(1.0)


def test_compute_metrics_by_name(cls_data):
    p, y = cls_data
    out = compute_metrics(["accuracy", "macro_f1", "mcc"], p, y, num_classes=3)
    assert set(out) == {"accuracy", "macro_f1", "mcc"} and all(isinstance(v, float) for v in out.values())
    with pytest.raises(ValueError, match="needs groups"):
        compute_metrics(["em"], p, y)
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(["bleu"], p, y)
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        M.accuracy([1, 2], [1])
