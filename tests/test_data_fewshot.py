"""K-shot sampling (LM-BFF protocol), demonstrations, unlabelled pools, multi-task mixtures."""

import collections

import numpy as np
import pytest

from peft_jax.data import (DataError, get_task, lmbff_kshot, lmbff_protocol, mix, mixture_rates, sample_kshot,
                           select_demonstrations, unlabelled)


@pytest.fixture(scope="module")
def sst2_train(shared_data):
    return get_task("sst2").load("train", str(shared_data))


def test_kshot_balanced_and_deterministic(sst2_train):
    a = sample_kshot(sst2_train, 16, seed=13)
    b = sample_kshot(sst2_train, 16, seed=13)
    c = sample_kshot(sst2_train, 16, seed=21)
    assert a == b and a != c
    assert collections.Counter(e["label"] for e in a) == {0: 16, 1: 16}
    assert len({e["idx"] for e in a}) == 32


def test_lmbff_protocol_train_dev_disjoint(shared_data):
    trec = get_task("trec").load("train", str(shared_data))
    splits = lmbff_protocol(trec, k=16)
    assert sorted(splits) == [13, 21, 42, 87, 100]
    for seed, (train, dev) in splits.items():
        assert len(train) == len(dev) == 96
        assert collections.Counter(e["label"] for e in dev) == {c: 16 for c in range(6)}
        assert not {e["idx"] for e in train} & {e["idx"] for e in dev}
    assert lmbff_kshot(trec, 16, 42) == splits[42]
    with pytest.raises(DataError, match="class 2 has 86 examples, fewer than k=100"):
        sample_kshot(trec, 100, seed=0)
    with pytest.raises(DataError, match="needs class labels"):
        sample_kshot([{"sentence": "x", "label": 1.5}], 1, 0)


def test_unlabelled_pool(sst2_train):
    pool = unlabelled(sst2_train[:10])
    assert all("label" not in e and e["sentence"] == s["sentence"] for e, s in zip(pool, sst2_train))
    assert "label" in sst2_train[0]  # inputs untouched


def _bow_embed(texts):
    """A deterministic bag-of-words embedding (hashing trick) standing in for a sentence encoder."""
    out = np.zeros((len(texts), 256))
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, hash(w) % 256] += 1.0  # PYTHONHASHSEED does not matter: same run, same hash
    return out


def test_demonstrations_random_and_similarity(shared_data):
    task = get_task("lmbff/sst2")
    pool = task.load("train-13", str(shared_data))
    queries = pool[:6]
    d1 = select_demonstrations(queries, pool, seed=0)
    assert d1 == select_demonstrations(queries, pool, seed=0)
    assert d1 != select_demonstrations(queries, pool, seed=1)
    for q, demos in zip(queries, d1):
        assert [d["label"] for d in demos] == [0, 1]
        assert all(d["sentence"] != q["sentence"] for d in demos)
    sim = select_demonstrations(queries, pool, seed=0, mode="similarity", embed_fn=_bow_embed, top_fraction=0.25)
    e = _bow_embed([x["sentence"] for x in pool])
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    for qi, (q, demos) in enumerate(zip(queries, sim)):
        for c, d in enumerate(demos):
            cand = [j for j, x in enumerate(pool) if x["label"] == c and x["sentence"] != q["sentence"]]
            s = e[cand] @ e[qi]
            cut = np.sort(s)[::-1][int(np.ceil(len(cand) * 0.25)) - 1]
            dj = next(j for j in cand if pool[j] is d)
            assert e[dj] @ e[qi] >= cut - 1e-12  # drawn from the most similar quarter
    with pytest.raises(DataError, match="needs embed_fn"):
        select_demonstrations(queries, pool, seed=0, mode="similarity")


def test_mixture_rates():
    sizes = {"a": 1000, "b": 100, "c": 10}
    r = mixture_rates(sizes)
    assert r["a"] == pytest.approx(1000 / 1110)
    r = mixture_rates(sizes, cap=100)
    assert r == pytest.approx({"a": 100 / 210, "b": 100 / 210, "c": 10 / 210})
    r = mixture_rates(sizes, "temperature", temperature=2.0)
    w = np.sqrt([1000, 100, 10])
    assert [r[k] for k in "abc"] == pytest.approx(list(w / w.sum()))
    assert mixture_rates(sizes, "equal") == pytest.approx({k: 1 / 3 for k in "abc"})
    with pytest.raises(DataError, match="mixture mode"):
        mixture_rates(sizes, "uniform")


def test_mix_is_deterministic_and_follows_rates():
    data = {"a": [{"x": i} for i in range(50)], "b": [{"x": -i} for i in range(5)]}
    rates = {"a": 0.8, "b": 0.2}
    m1, m2 = mix(data, rates, 2000, seed=4), mix(data, rates, 2000, seed=4)
    assert m1 == m2 and m1 != mix(data, rates, 2000, seed=5)
    frac = np.mean([e["task"] == "a" for e in m1])
    assert abs(frac - 0.8) < 0.04
    b = [e["x"] for e in m1 if e["task"] == "b"]
    assert sorted(b[:5]) == [-4, -3, -2, -1, 0]  # every example once before any repeats
    assert "task" not in data["a"][0]
