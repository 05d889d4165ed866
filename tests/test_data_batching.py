"""Batches: fixed shapes per length bucket, determinism, per-host shards that agree on the
bucket of every step and together cover an epoch once, exact resume from get_state()."""

import json
import warnings

import numpy as np
import pytest

from peft_jax.data import DataError, make_batches
from peft_jax.data.tokenize import Encoded


def _encoded(n=103, seed=0, max_len=60, targets=False):
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, max_len + 1, n)
    ids = [np.arange(1, l + 1, dtype=np.int32) + 1000 * i for i, l in enumerate(lens)]
    enc = Encoded(features={"input_ids": ids, "attention_mask": [np.ones(len(x), np.int32) for x in ids]},
                  scalars={"label": (np.arange(n) % 3).astype(np.int32), "idx": np.arange(n)},
                  pad={"input_ids": 0, "attention_mask": 0})
    if targets:
        enc.targets = {"targets": [np.full(1 + i % 5, 7, np.int32) for i in range(n)]}
    return enc


def _drain(it, k):
    return [next(it) for _ in range(k)]


def test_fixed_shapes_and_contents():
    enc = _encoded()
    it = make_batches(enc, 4, buckets=(16, 32, 64), seed=1, drop_remainder=True)
    seen, moved_up = [], {16: 0, 32: 0, 64: 0}
    for b in _drain(it, it.batches_per_epoch):
        L = b["input_ids"].shape[1]
        assert L in (16, 32, 64) and b["input_ids"].shape == (4, L) and b["label"].shape == (4,)
        lens = b["attention_mask"].sum(1)
        assert (lens <= L).all()
        if L > 16:  # rows that fit a smaller bucket: only a smaller bucket's partial batch
            moved_up[L] += int((lens <= {32: 16, 64: 32}[L]).sum())
        for row, i in enumerate(b["idx"]):
            n = len(enc.features["input_ids"][i])
            assert (b["input_ids"][row, :n] == enc.features["input_ids"][i]).all()
            assert (b["input_ids"][row, n:] == 0).all() and b["label"][row] == i % 3
        seen += b["idx"].tolist()
    assert len(seen) == len(set(seen))  # no repeats within an epoch
    assert all(v < 4 for v in moved_up.values()), moved_up
    assert len(seen) == len(enc) // 4 * 4   # only the last partial batch (3 of 103) is dropped
    with pytest.raises(DataError, match="more than the largest bucket 32"):
        make_batches(enc, 4, buckets=(16, 32))


def test_eval_mode_keeps_every_example_once():
    enc = _encoded(n=37)
    it = make_batches(enc, 8, buckets=(32, 64), shuffle=False, drop_remainder=False, num_epochs=1)
    batches = list(it)
    assert len(batches) == it.batches_per_epoch
    idx = np.concatenate([b["idx"][b["example_mask"] == 1] for b in batches])
    assert sorted(idx.tolist()) == list(range(37))
    assert all((b["idx"][b["example_mask"] == 0] == -1).all() for b in batches)
    assert all(b["input_ids"].shape[0] == 8 for b in batches)


def test_deterministic_given_seed_and_different_across_seeds():
    enc = _encoded()
    a = _drain(make_batches(enc, 4, seed=5), 30)
    b = _drain(make_batches(enc, 4, seed=5), 30)
    c = _drain(make_batches(enc, 4, seed=6), 30)
    assert all(np.array_equal(x["idx"], y["idx"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["idx"], y["idx"]) for x, y in zip(a, c))


def test_shards_agree_on_buckets_and_cover_the_epoch():
    enc = _encoded(n=200)
    its = [make_batches(enc, 4, buckets=(16, 32, 64), seed=3, shard_index=h, shard_count=3) for h in range(3)]
    nb = its[0].batches_per_epoch
    assert all(it.batches_per_epoch == nb for it in its)
    per_host = [_drain(it, nb) for it in its]
    idx = []
    for step in range(nb):
        shapes = {per_host[h][step]["input_ids"].shape for h in range(3)}
        assert len(shapes) == 1  # same bucket on every host at every step
        for h in range(3):
            idx += per_host[h][step]["idx"].tolist()
    assert len(idx) == len(set(idx))
    single = make_batches(enc, 12, buckets=(16, 32, 64), seed=3)
    assert single.batches_per_epoch == nb  # the global batch of 3 x 4 rows is the 1-host batch of 12
    ref = [i for b in _drain(single, nb) for i in b["idx"].tolist()]
    assert sorted(ref) == sorted(idx)
    with pytest.raises(DataError, match="shard_index 3"):
        make_batches(enc, 4, shard_index=3, shard_count=3)


@pytest.mark.parametrize("consumed", [0, 5, 24, 61])
def test_state_restore_continues_exactly(consumed):
    enc = _encoded(targets=True)
    it = make_batches(enc, 4, buckets=(32, 64), seed=9)
    assert it.batches_per_epoch < 30  # consumed=61 crosses epoch boundaries
    _drain(it, consumed)
    state = json.loads(json.dumps(it.get_state()))  # survives the JSON checkpoint metadata
    expected = _drain(it, 12)
    fresh = make_batches(enc, 4, buckets=(32, 64), seed=9)
    fresh.set_state(state)
    got = _drain(fresh, 12)
    for x, y in zip(expected, got):
        assert x.keys() == y.keys()
        for k in x:
            assert np.array_equal(x[k], y[k]), k
    assert expected[0]["targets"].shape[1] == 8  # max target 5 rounded up to 8


def test_state_of_another_configuration_is_rejected():
    enc = _encoded()
    state = make_batches(enc, 4, seed=1).get_state()
    with pytest.raises(DataError, match="another dataset/seed/batching"):
        make_batches(enc, 4, seed=2).set_state(state)


def test_too_few_examples_for_a_batch():
    with pytest.raises(DataError, match=r"make no full batch of .*lower config.train.batch_size"):
        make_batches(_encoded(n=5), 8)


def test_a_partial_bucket_moves_up_so_every_example_is_trained_on():
    # 35 short examples and 5 long ones, batch 8: the short bucket's 3 left over join the 5
    # long ones in the 64 bucket, so one epoch covers all 40 (it used to drop the 5 long ones)
    short = [np.arange(1, 11, dtype=np.int32) + 1000 * i for i in range(35)]
    long_ = [np.arange(1, 51, dtype=np.int32) + 1000 * (35 + i) for i in range(5)]
    ids = short + long_
    enc = Encoded(features={"input_ids": ids, "attention_mask": [np.ones(len(x), np.int32) for x in ids]},
                  scalars={"label": np.zeros(40, np.int32), "idx": np.arange(40)},
                  pad={"input_ids": 0, "attention_mask": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        it = make_batches(enc, 8, buckets=(32, 64), seed=0)
    assert it.batches_per_epoch == 5
    for epoch in range(3):
        batches = _drain(it, 5)
        assert sorted(int(i) for b in batches for i in b["idx"]) == list(range(40)), epoch
        for b in batches:   # a batch is padded to its bucket: carried short rows fit in 64
            assert b["input_ids"].shape[1] in (32, 64)
            assert (b["attention_mask"].sum(1) <= b["input_ids"].shape[1]).all()
    # 42 examples: 2 are left out each epoch, a different random pair each time when shuffled
    enc42 = _encoded(n=42)
    it = make_batches(enc42, 8, seed=0)
    left_out = [set(range(42)) - {int(i) for b in _drain(it, it.batches_per_epoch) for i in b["idx"]}
                for _ in range(4)]
    assert all(len(s) == 2 for s in left_out) and len({frozenset(s) for s in left_out}) > 1
    # unshuffled, the same ones are left out every epoch: the warning names them
    with pytest.warns(UserWarning, match=r"2 of 42 training examples are never trained on \(examples \d+, \d+"):
        make_batches(enc42, 8, seed=0, shuffle=False)
