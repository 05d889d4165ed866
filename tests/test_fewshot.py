"""Few-shot pieces: multi-token verbalizer scoring, ProtoVerb / PET losses, pseudo-labels,
demonstrations within the length limit. Toy tensors or a tiny random Llama."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.fewshot import pet, protoverb, scoring, self_training
from peft_jax.train.forward import label_word_scores


# ----------------------------------------------------------------------------- verbalizer


@pytest.fixture(scope="module")
def tiny_llama():
    from peft_jax.models.llama import LlamaConfig, LlamaModel
    model = LlamaModel(LlamaConfig.tiny())
    ids = jnp.ones((1, 8), jnp.int32)
    base = model.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids))["params"]

    def logits_fn(i, m):
        return model.apply({"params": base}, i, m)["logits"]
    return logits_fn


def _direct_word_logprob(logits_fn, prompt: list[int], word: list[int]) -> float:
    seq = jnp.asarray([prompt + word[:-1]], jnp.int32)
    lp = jax.nn.log_softmax(logits_fn(seq, jnp.ones_like(seq))[0].astype(jnp.float32), -1)
    p = len(prompt) - 1
    return float(sum(lp[p + i, t] for i, t in enumerate(word)))


@pytest.mark.slow  # > 40 s on 2 busy cores; runs in CI (PEFT_JAX_SLOW=1)
def test_multi_token_scores_match_direct_teacher_forcing(tiny_llama):
    # two prompts of different lengths, right-padded to 7 (with junk after the prompt)
    prompts = [[5, 9, 13, 2], [7, 3, 11, 17, 19, 23]]
    ids = np.full((2, 7), 4, np.int32)
    mask = np.zeros((2, 7), np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
        mask[i, :len(p)] = 1
    pos = jnp.asarray([len(p) - 1 for p in prompts])
    # class 0: words [30, 31, 32] and [40]; class 1: word [50, 51] (second slot absent)
    lw = np.full((2, 2, 3), -1, np.int32)
    lw[0, 0] = [30, 31, 32]
    lw[0, 1, :1] = [40]
    lw[1, 0, :2] = [50, 51]
    got = scoring.multi_token_scores(tiny_llama, jnp.asarray(ids), jnp.asarray(mask), pos,
                                     jnp.asarray(lw))
    for i, p in enumerate(prompts):
        w00 = _direct_word_logprob(tiny_llama, p, [30, 31, 32])
        w01 = _direct_word_logprob(tiny_llama, p, [40])
        c0 = np.logaddexp(w00, w01) - np.log(2)
        c1 = _direct_word_logprob(tiny_llama, p, [50, 51])
        np.testing.assert_allclose(np.asarray(got[i]), [c0, c1], rtol=1e-4, atol=1e-4)


def test_single_token_words_reduce_to_label_word_scores(tiny_llama):
    ids = jnp.asarray([[5, 9, 13, 2, 0], [7, 3, 11, 17, 19]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], jnp.int32)
    pos = jnp.asarray([3, 4])
    lw = jnp.asarray([[[30], [31]], [[50], [-1]]], jnp.int32)
    got = scoring.multi_token_scores(tiny_llama, ids, mask, pos, lw)
    ref = label_word_scores(tiny_llama(ids, mask), pos[:, None], lw, causal=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- ProtoVerb


def _np_cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def test_protoverb_losses_match_direct_loops():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 5)).astype(np.float32)
    protos = rng.normal(size=(3, 5)).astype(np.float32)
    y = np.array([0, 0, 1, 1, 2, 1])
    tau = 0.5
    s = _np_cos(z, z) / tau
    per = []
    for i in range(6):
        others = [k for k in range(6) if k != i]
        den = np.log(np.sum(np.exp(s[i, others])))
        pos = [j for j in others if y[j] == y[i]]
        if pos:
            per.append(-np.mean([s[i, j] - den for j in pos]))
    ii = np.mean(per)                  # anchor 4 (class 2, alone) has no positive
    sp = _np_cos(z, protos) / tau
    ip = np.mean([-(sp[i, y[i]] - np.log(np.exp(sp[i]).sum())) for i in range(6)])
    np.testing.assert_allclose(protoverb.instance_instance_loss(jnp.asarray(z), jnp.asarray(y), tau),
                               ii, rtol=1e-5)
    np.testing.assert_allclose(protoverb.instance_prototype_loss(
        jnp.asarray(z), jnp.asarray(protos), jnp.asarray(y), tau), ip, rtol=1e-5)
    np.testing.assert_allclose(protoverb.protoverb_loss(
        jnp.asarray(z), jnp.asarray(protos), jnp.asarray(y), tau, lam=0.5), ii + 0.5 * ip, rtol=1e-5)


def test_protoverb_padding_rows_are_ignored():
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    y = jnp.asarray([0, 1, 0, 1, 0])
    w = jnp.asarray([1, 1, 1, 1, 0])
    np.testing.assert_allclose(protoverb.instance_instance_loss(z, y, 0.2, w),
                               protoverb.instance_instance_loss(z[:4], y[:4], 0.2), rtol=1e-6)


def test_prototype_prediction_and_verbalizer_combination():
    protos = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    z = jnp.asarray([[2.0, 0.1], [0.2, 3.0]])
    assert np.asarray(protoverb.prototype_scores(z, protos).argmax(-1)).tolist() == [0, 1]
    verb = jnp.asarray([[0.0, 5.0], [0.0, 5.0]])     # a verbalizer that strongly says class 1
    comb = protoverb.prototype_scores(z, protos, verb)
    ref = jax.nn.log_softmax(protoverb.cosine(z, protos), -1) + jax.nn.log_softmax(verb, -1)
    np.testing.assert_allclose(comb, ref, rtol=1e-6)
    assert np.asarray(comb.argmax(-1)).tolist() == [1, 1]
    init = protoverb.init_prototypes(z, jnp.asarray([0, 1]), 2)
    np.testing.assert_allclose(protoverb.cosine(init, z).diagonal(), [1.0, 1.0], rtol=1e-6)


# ----------------------------------------------------------------------------- PET


def test_pet_ensemble_averages_softmaxes():
    a = np.array([[2.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.0, 0.0], [3.0, 0.0]])
    sa = np.exp(a) / np.exp(a).sum(1, keepdims=True)
    sb = np.exp(b) / np.exp(b).sum(1, keepdims=True)
    np.testing.assert_allclose(pet.ensemble_soft_labels([a, b]), (sa + sb) / 2, rtol=1e-12)
    np.testing.assert_allclose(pet.ensemble_soft_labels([a, b], weights=[3, 1]),
                               0.75 * sa + 0.25 * sb, rtol=1e-12)
    t2 = pet.ensemble_soft_labels([a], temperature=2.0)
    np.testing.assert_allclose(t2, np.exp(a / 2) / np.exp(a / 2).sum(1, keepdims=True), rtol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        pet.ensemble_soft_labels([a, np.zeros((2, 3))])


def test_pet_distillation_loss_is_soft_cross_entropy():
    logits = np.array([[1.0, -1.0, 0.5], [0.0, 2.0, 0.0]], np.float32)
    soft = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ref = np.mean(-(soft * logp).sum(1))
    np.testing.assert_allclose(pet.distillation_loss(jnp.asarray(logits), jnp.asarray(soft)),
                               ref, rtol=1e-6)
    w = jnp.asarray([1.0, 0.0])
    np.testing.assert_allclose(pet.distillation_loss(jnp.asarray(logits), jnp.asarray(soft), w),
                               -(soft[0] * logp[0]).sum(), rtol=1e-6)


def test_ipet_grow_uses_ensemble_labels_balanced():
    unl = [{"sentence": f"s{i}"} for i in range(6)]
    soft = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.1, 0.9], [0.4, 0.6], [0.6, 0.4]])
    out = pet.ipet_grow(unl, soft, 4, seed=0)
    assert sorted(e["label"] for e in out) == [0, 0, 1, 1]
    for e in out:
        i = int(e["sentence"][1:])
        assert e["label"] == soft[i].argmax()


# ----------------------------------------------------------------------------- self-training


def test_pseudo_label_selection_honours_threshold():
    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.1, 0.9], [0.3, 0.7], [0.85, 0.15], [0.02, 0.98]])
    idx, lab, conf = self_training.select_pseudo_labels(probs, 0.8)
    assert idx.tolist() == [0, 2, 4, 5]
    assert lab.tolist() == [0, 1, 0, 1]
    assert np.all(conf >= 0.8)
    idx, lab, _ = self_training.select_pseudo_labels(probs, 0.8, max_per_class=1)
    assert idx.tolist() == [0, 5]                      # the most confident of each class
    assert self_training.select_pseudo_labels(probs, 0.99)[0].tolist() == []
    with pytest.raises(ValueError, match="threshold"):
        self_training.select_pseudo_labels(probs, 1.5)
    ex = self_training.pseudo_labelled([{"t": i} for i in range(6)], probs, 0.9)
    assert ex == [{"t": 0, "label": 0}, {"t": 2, "label": 1}, {"t": 5, "label": 1}]


# ----------------------------------------------------------------------------- demonstrations


def test_demonstrations_fit_the_length_limit(minilm_path):
    from transformers import AutoTokenizer
    from peft_jax.data import encode_prompt, get_task, select_demonstrations
    tok = AutoTokenizer.from_pretrained(minilm_path)
    task = get_task("sst2")
    long = " ".join(["wonderful"] * 80)
    queries = [{"sentence": long, "label": 1}, {"sentence": "bad", "label": 0}]
    pool = [{"sentence": long + " a", "label": 0}, {"sentence": long + " b", "label": 1}]
    demos = select_demonstrations(queries, pool, seed=0, num_classes=2)
    enc = encode_prompt(queries, "{sentence} It was {mask}.", ["terrible", "great"], tok,
                        kind="encoder", max_len=48, task=task, demonstrations=demos)
    ids = np.asarray(enc.features["input_ids"])
    am = np.asarray(enc.features["attention_mask"])
    assert am.sum(1).max() <= 48
    mp = np.asarray(enc.scalars["mask_pos"])[:, 0]
    assert np.all(ids[np.arange(2), mp] == tok.mask_token_id)
    # both demonstrations' label words appear (truncation cut the texts, not the prompts)
    for w in ("terrible", "great"):
        wid = tok.convert_tokens_to_ids(w)
        assert np.all((ids == wid).sum(1) >= 1), w


# ----------------------------------------------------------------------------- label search


def test_label_search_finds_the_discriminative_tokens():
    from peft_jax.fewshot.label_search import candidate_tokens, search_label_words

    rng = np.random.default_rng(0)
    n, v = 40, 50
    y = np.arange(n) % 2
    lp = rng.normal(size=(n, v)) * 0.1
    lp[:, 3] += 5.0               # a frequent token, high for everyone: must not win
    lp[y == 0, 7] += 2.0          # class 0's word
    lp[y == 1, 11] += 2.0         # class 1's word
    cand = candidate_tokens(lp, y, 2, k=3)
    assert cand[0, 0] == 7 and cand[1, 0] == 11 and 3 not in cand[:, 0]
    res = search_label_words(lp, y, lp, y, 2, k=3)
    assert res["words"] == [7, 11] and res["train_accuracy"] == 1.0 and res["dev_accuracy"] == 1.0
    # excluded ids never appear
    assert 7 not in candidate_tokens(lp, y, 2, k=5, exclude=[7])
