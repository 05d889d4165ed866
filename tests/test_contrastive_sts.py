"""STS evaluation of all-MiniLM-L6-v2 run by our JAX BERT against sentence-transformers'
own embeddings scored with scipy; the ``peft-jax embed`` entry point."""

import json
import os

import numpy as np
import pytest
from scipy.stats import spearmanr

from peft_jax.contrastive import sts_eval
from peft_jax.contrastive.embed import Embedder, embed_main, load_embedder
from peft_jax.contrastive.whitening import load_whitening


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return load_embedder(minilm_path, pooling="mean", max_length=256, batch_size=64)


@pytest.fixture(scope="module")
def st_model(minilm_path):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(minilm_path, device="cpu")


def _reference_spearman(st_model, pairs):
    """sentence-transformers embeddings, cosine, scipy Spearman (x100)."""
    sents = sts_eval.task_sentences(pairs)
    emb = dict(zip(sents, st_model.encode(sents, batch_size=64, convert_to_numpy=True)))
    pred = np.concatenate([sts_eval.cosine_rows(np.stack([emb[s] for s in p.sent1]),
                                                np.stack([emb[s] for s in p.sent2])) for p in pairs])
    gold = np.concatenate([p.gold for p in pairs])
    return 100 * spearmanr(pred, gold).correlation, emb


def _check_against_reference(minilm, st_model, shared_data, task, max_pairs):
    task_pairs = sts_eval.load_sts_tasks([task], str(shared_data), max_pairs=max_pairs)
    want, ref_emb = _reference_spearman(st_model, task_pairs[task])
    got = sts_eval.evaluate_sts(minilm, [task], str(shared_data), max_pairs=max_pairs)
    assert got[task] == pytest.approx(want, abs=1e-3)
    assert 60 < got[task] < 100  # a real sentence encoder, not noise
    sents = list(ref_emb)[:50]
    ours = minilm(sents)
    ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    np.testing.assert_allclose(ours, np.stack([ref_emb[s] for s in sents]), atol=2e-5)
    return got[task]


def test_minilm_stsb_subset_matches_sentence_transformers(minilm, st_model, shared_data):
    _check_against_reference(minilm, st_model, shared_data, "STSBenchmark", max_pairs=200)


@pytest.mark.slow
def test_minilm_stsb_full_test_matches_sentence_transformers(minilm, st_model, shared_data):
    score = _check_against_reference(minilm, st_model, shared_data, "STSBenchmark", max_pairs=None)
    print(f"all-MiniLM-L6-v2 STS-B test Spearman: {score:.2f}")


def test_embed_main_writes_npy_and_whitening(minilm, tmp_path):
    sents = [f"sentence number {i} is about {w}" for i, w in
             enumerate(["cats", "dogs", "the stock market", "football", "rain"] * 4)]
    inp = os.path.join(tmp_path, "in.txt")
    with open(inp, "w") as f:
        f.write("\n".join(sents[:10]) + "\n\n" + "\n".join(sents[10:]) + "\n")
    out = os.path.join(tmp_path, "emb.npy")
    wpath = os.path.join(tmp_path, "w.npz")
    assert embed_main(["--model", "minilm", "--input", inp, "--output", out, "--max-length", "256",
                       "--fit-whitening", wpath, "--whitening-dim", "8"]) == 0
    got = np.load(out, allow_pickle=False)
    assert got.shape == (20, 8)
    np.testing.assert_allclose(np.cov(got, rowvar=False), np.eye(8), atol=1e-3)
    w = load_whitening(wpath)
    raw = minilm.raw(sents)
    np.testing.assert_allclose(got, (raw - w.mu) @ w.W, atol=1e-4)
    # raw embeddings with the default options
    out2 = os.path.join(tmp_path, "raw.npy")
    assert embed_main(["--model", "minilm", "--input", inp, "--output", out2,
                       "--max-length", "256"]) == 0
    np.testing.assert_allclose(np.load(out2), raw, atol=1e-5)


def test_embed_main_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        embed_main(["--model", "minilm", "--input", str(tmp_path / "nope.txt"),
                    "--output", str(tmp_path / "o.npy")])
