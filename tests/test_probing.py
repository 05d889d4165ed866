"""Layer-wise probing: probes recover a signal planted at one layer only, the MLP probe
decodes what a linear one cannot, per-layer features equal the model's hidden states,
surface tasks label what they say, and the whole pipeline runs on a tiny model."""

from __future__ import annotations

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.contrastive.embed import embed_outputs
from peft_jax.models import bert
from peft_jax.models.registry import Pretrained
from peft_jax.probing import cli, features, probes, surface


def _planted(n, seed, layer=2, layers=5, d=16, c=3):
    """Features ``[layers, n, d]``: class means at ``layer`` only, pure noise elsewhere."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    x = rng.normal(size=(layers, n, d)).astype(np.float32)
    means = np.random.default_rng(99).normal(size=(c, d)) * 1.5
    x[layer] += means[y]
    return x, y


def test_linear_probe_recovers_a_signal_planted_at_one_layer():
    tr, dv, te = _planted(300, 0), _planted(100, 1), _planted(300, 2)
    res = probes.run_probes(tr, te, 3, probes.ProbeConfig(kind="linear", steps=200), dev=dv)
    acc = np.asarray(res["test_accuracy"])
    assert res["best_layer"] == 2 and acc[2] > 0.9
    assert np.all(np.delete(acc, 2) < 0.45)          # chance is 1/3
    assert len(res["l2"]) == 5 and res["dev_accuracy"][2] > 0.9


def test_mlp_probe_decodes_xor_that_a_linear_probe_cannot():
    def xor(n, seed):
        rng = np.random.default_rng(seed)
        s = rng.choice([-1.0, 1.0], size=(n, 2))
        y = (s[:, 0] * s[:, 1] > 0).astype(int)
        x = np.concatenate([s + 0.1 * rng.normal(size=(n, 2)), rng.normal(size=(n, 4))], 1)
        return x[None].astype(np.float32), y

    tr, te = xor(400, 0), xor(400, 1)
    lin = probes.run_probes(tr, te, 2, probes.ProbeConfig(kind="linear", steps=300))
    mlp = probes.run_probes(tr, te, 2, probes.ProbeConfig(kind="mlp", hidden=32, steps=300, lr=3e-2))
    assert lin["test_accuracy"][0] < 0.65 and mlp["test_accuracy"][0] > 0.9


class WordTokenizer:
    pad_id = 0
    mask_token, mask_token_id = "[MASK]", 98

    def __init__(self, max_length=32):
        self.max_length = max_length

    def encode(self, texts):
        ids = lambda w: 98 if w == "[MASK]" else 2 + zlib.crc32(w.encode()) % 95
        return [[1] + [ids(w) for w in t.split()][: self.max_length - 2] + [97] for t in texts]


@pytest.fixture(scope="module")
def tiny():
    config = bert.BertConfig.tiny()
    boxed = bert.BertModel(config).init(jax.random.PRNGKey(0), jnp.ones((2, 8), jnp.int32))["params"]
    return Pretrained(name="tiny", family=bert.BERT, config=config,
                      base=jax.tree.map(np.asarray, nn.meta.unbox(boxed)), tokenizer=WordTokenizer())


TEXTS = ["a b c", "the cat sat on the mat today", "x", "one two three four five"]


def test_layer_features_are_the_models_hidden_states(tiny):
    f = features.layer_features(tiny, TEXTS, "mean", max_length=32, batch_size=4)
    assert f.shape == (tiny.config.num_layers + 1, 4, tiny.config.d_model)
    model, v = tiny.build(), {"params": tiny.base}
    ids = WordTokenizer().encode(TEXTS)
    tok = np.zeros((4, 16), np.int32)
    mask = np.zeros((4, 16), np.int32)
    for i, t in enumerate(ids):
        tok[i, :len(t)], mask[i, :len(t)] = t, 1
    out = model.apply(v, jnp.asarray(tok), jnp.asarray(mask), output_hidden_states=True)
    for layer, h in enumerate(out["all_hidden_states"]):
        for i, t in enumerate(ids):
            np.testing.assert_allclose(f[layer, i], np.asarray(h[i, :len(t)].mean(0)), atol=1e-5)
    # the last layer's mean readout is the mean-pooled sentence embedding
    last = embed_outputs(model, v, jnp.asarray(tok), jnp.asarray(mask), "mean")
    np.testing.assert_allclose(f[-1], np.asarray(last), atol=1e-5)
    a = features.layer_features(tiny, TEXTS[:1], "answer", max_length=32, batch_size=4)
    q = WordTokenizer().encode(["a b c It was [MASK] ."])[0]
    out = model.apply(v, jnp.asarray([q]), output_hidden_states=True)
    np.testing.assert_allclose(a[:, 0], np.stack([np.asarray(h[0, q.index(98)])
                                                  for h in out["all_hidden_states"]]), atol=1e-5)


def test_surface_tasks_label_length_and_word_content():
    assert [surface.length_bin(" ".join(["w"] * n)) for n in (3, 8, 9, 16, 17, 25, 26, 40)] == \
        [0, 0, 1, 2, 3, 4, 5, 5]
    rng = np.random.default_rng(0)
    vocab = ["w" + chr(97 + i // 26 % 26) + chr(97 + i % 26) + "x" for i in range(400)]
    texts = [" ".join(rng.choice(vocab, rng.integers(3, 35), p=None)) for _ in range(6000)]
    t = surface.length_task(texts, {"train": 120, "dev": 60, "test": 60})
    xs, ys = t.splits["train"]
    assert np.bincount(ys).tolist() == [20] * 6
    assert all(surface.length_bin(x) == y for x, y in zip(xs, ys))
    assert not set(t.splits["train"][0]) & set(t.splits["test"][0])
    wc = surface.word_content_task(texts, {"train": 100, "dev": 20, "test": 20}, k=5, rank_lo=10)
    for x, y in zip(*wc.splits["test"]):
        present = [i for i, w in enumerate(wc.label_names) if w in x.lower().split()]
        assert present == [y]


def test_probe_pipeline_on_a_tiny_model(tiny, tmp_path):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    texts = [" ".join(rng.choice(words, rng.integers(2, 30))) for _ in range(1500)]
    task = surface.length_task(texts, {"train": 96, "dev": 48, "test": 48})
    rows = cli.probe_model(tiny, [task], ["mean", "answer"], ["linear"], max_length=48,
                           batch_size=32, log=lambda *_: None)
    assert [(r["readout"], r["probe"]) for r in rows] == [("mean", "linear"), ("answer", "linear")]
    for r in rows:
        assert len(r["test_accuracy"]) == tiny.config.num_layers + 1
        assert all(0.0 <= a <= 1.0 for a in r["test_accuracy"])
    # sentence length is decodable from the mean of position-embedded tokens at the input
    assert max(rows[0]["test_accuracy"]) > 0.4          # chance: 1/6
    md = cli.table(rows)
    assert md.count("\n") == tiny.config.num_layers + 3 and "**" in md
    assert cli.plot(rows, str(tmp_path / "p.png"))


def test_probe_cli_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        cli.probe_main(["--readout", "mean,bogus"])
    assert "bogus" in capsys.readouterr().err
    with pytest.raises(ValueError, match="surface tasks"):
        cli.load_probe_task("surface:nope", cli.SIZES, "mr:all")
