"""Calibration: ECE by hand, contextual calibration by the paper's formula, reliability
diagram, and few-shot rows carrying ``ece`` / ``accuracy_cc`` / ``ece_cc``."""

from __future__ import annotations

import os
import pathlib
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _train_fixtures import tiny_config, write_task  # noqa: E402

from peft_jax.fewshot import calibration as C  # noqa: E402


def test_ece_equals_a_hand_computation():
    probs = np.array([[0.95, 0.05],    # conf .95 bin 10, correct (y=0)
                      [0.85, 0.15],    # conf .85 bin 9, wrong (y=1)
                      [0.32, 0.68],    # conf .68 bin 7, correct (y=1)
                      [0.62, 0.38],    # conf .62 bin 7, wrong (y=1)
                      [0.50, 0.50]])   # conf .50 bin 5, argmax 0, correct (y=0)
    y = np.array([0, 1, 1, 1, 0])
    # bins (width .1): {.95: acc 1}, {.85: acc 0}, {.68, .62: acc .5, conf .65}, {.50: acc 1}
    want = (1 / 5) * abs(1 - .95) + (1 / 5) * abs(0 - .85) + (2 / 5) * abs(.5 - .65) \
        + (1 / 5) * abs(1 - .5)
    assert C.ece(probs, y, n_bins=10) == pytest.approx(want, abs=1e-12)
    r = C.reliability(probs, y, 10)
    assert r["count"].tolist() == [0, 0, 0, 0, 1, 0, 2, 0, 1, 1]
    # perfectly confident and right: 0; a 2-class classifier that always says 1.0 and is
    # right half the time: 0.5
    assert C.ece(np.eye(2)[[0, 1, 1]], np.array([0, 1, 1])) == 0.0
    assert C.ece(np.eye(2)[[0, 0]], np.array([0, 1])) == pytest.approx(0.5)


def test_contextual_calibration_is_the_papers_formula():
    """Zhao et al. 2021: q = softmax(W p + b), W = diag(p_cf)^-1, b = 0."""
    p = np.array([[0.8, 0.1, 0.1], [0.5, 0.4, 0.1]])
    cf = np.log(np.array([[0.6, 0.3, 0.1], [0.8, 0.1, 0.1]]))    # two content-free inputs
    p_cf = np.array([0.7, 0.2, 0.1])                             # their mean (sums to 1)
    np.testing.assert_allclose(C.content_free_prior(cf), p_cf)
    q = C.contextual_calibrate(np.log(p), p_cf)
    wp = p @ np.diag(1 / p_cf)
    want = np.exp(wp) / np.exp(wp).sum(1, keepdims=True)
    np.testing.assert_allclose(q, want, rtol=1e-12)
    # a prompt biased towards class 0 gets its argmax moved: [.5, .4, .1] -> class 1
    assert q[1].argmax() == 1 and p[1].argmax() == 0
    m = C.calibration_metrics(np.log(p), np.array([0, 1]), cf)
    assert m["accuracy_cc"] == 1.0 and set(m) == {"ece", "accuracy_cc", "ece_cc", "p_cf"}
    # scores are log-probs up to a constant per row: the same result
    np.testing.assert_allclose(C.contextual_calibrate(np.log(p) + 3.0, p_cf), q, rtol=1e-12)


def test_reliability_diagram_is_written(tmp_path):
    rng = np.random.default_rng(0)
    p = C.label_probs(rng.normal(size=(50, 2)))
    y = rng.integers(0, 2, 50)
    path = C.plot_reliability([("raw", p, y)], str(tmp_path / "r.png"))
    assert os.path.getsize(path) > 1000
    # bins of two halves pooled == bins of the whole; ECE from bins == ECE
    pooled = C.pool_bins([C.reliability(p[:20], y[:20]), C.reliability(p[20:], y[20:])])
    whole = C.reliability(p, y)
    np.testing.assert_allclose(pooled["count"], whole["count"])
    assert C.bins_ece(pooled) == pytest.approx(C.ece(p, y))


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory, minilm_path):
    """A random 2-layer BERT with an MLM head and the MiniLM tokenizer, plus a toy task."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from peft_jax.models import bert

    root = tmp_path_factory.mktemp("cal")
    cfg = bert.BertConfig.tiny(vocab_size=30522, max_position_embeddings=128, hidden_dropout=0.0,
                               attention_dropout=0.0, with_mlm_head=True)
    base = nn.meta.unbox(bert.BertModel(cfg).init(jax.random.PRNGKey(0),
                                                  jnp.ones((1, 8), jnp.int32))["params"])
    folder = str(root / "model")
    bert.BERT.save(folder, cfg, jax.device_get(base))
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(folder)
    return folder, write_task(str(root / "data"))


def test_zero_shot_and_trained_rows_carry_calibration(tiny_mlm, tmp_path):
    from peft_jax.fewshot.methods import train, untrained

    model, task = tiny_mlm
    over = {"task.format": "verbalizer", "task.template": "{text} It was {mask} .",
            "task.label_words": "bad,good", "task.test_split": "dev",
            "task.max_test_examples": 16, "train.best_metric": "accuracy", "train.eval_every": 2}
    cfg = tiny_config(model, task, str(tmp_path / "z"), methods="lora", **over)
    zs = untrained(cfg, None)
    assert {"accuracy", "ece", "accuracy_cc", "ece_cc"} <= set(zs["test"])
    assert 0.0 <= zs["test"]["ece"] <= 1.0 and 0.0 <= zs["test"]["accuracy_cc"] <= 1.0
    assert sum(zs["reliability"]["raw"]["count"]) == 16 and set(zs["reliability"]) == {"raw", "calibrated"}
    res = train(tiny_config(model, task, str(tmp_path / "p"), methods="lora",
                            **{**over, "train.steps": 2, "train.eval_every": 1}), None)
    assert {"accuracy", "ece", "accuracy_cc", "ece_cc"} <= set(res.row["test"])
    assert 0.0 <= res.row["test"]["ece"] <= 1.0 and res.row["reliability"]["raw"]["count"]


def test_test_calibration_reuses_the_runs_test_scores(tiny_mlm, tmp_path):
    """The runner's test pass hands its scores to the calibration (one pass over the test
    subset, not two): they equal a fresh prediction of the selected tree, and the
    calibration from them equals the calibration that predicts again."""
    from peft_jax.fewshot.methods import test_calibration, train
    from peft_jax.runner.data import load_examples

    model, task = tiny_mlm
    over = {"task.format": "verbalizer", "task.template": "{text} It was {mask} .",
            "task.label_words": "bad,good", "task.test_split": "dev",
            "task.max_test_examples": 12, "train.best_metric": "accuracy",
            "train.steps": 2, "train.eval_every": 1}
    res = train(tiny_config(model, task, str(tmp_path / "p"), methods="lora", **over), None)
    s, cfg = res.session, res.session.exp.cfg
    test = load_examples(s.exp, cfg.task.test_split, cfg.task.max_test_examples)
    assert res.test_scores is not None and res.test_scores.shape == (12, 2)
    np.testing.assert_allclose(res.test_scores, s.predict_scores(res.selected, test), rtol=0, atol=1e-6)
    again = test_calibration(s, res.selected, test)
    reused = test_calibration(s, res.selected, test, res.test_scores)
    assert again.pop("reliability") == reused.pop("reliability")
    assert again == pytest.approx(reused, abs=1e-6)
    assert res.row["test"]["accuracy"] == pytest.approx(
        float(np.mean(res.test_scores.argmax(-1) == [ex["label"] for ex in test])))
    with pytest.raises(ValueError, match="scores for"):
        test_calibration(s, res.selected, test, res.test_scores[:5])
