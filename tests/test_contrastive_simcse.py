"""Unsupervised SimCSE through make_train_step/run_loop on a tiny random BERT."""

import dataclasses
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.contrastive import simcse
from peft_jax.contrastive.embed import Embedder
from peft_jax.models import bert
from peft_jax.models.registry import Pretrained
from peft_jax.peft.partition import assemble, full_finetuning_patterns, split_trainable
from peft_jax.train.step import TrainState, make_train_step


class WordTokenizer:
    """Deterministic toy tokenizer: [CLS]=1, words hashed into ids 2..98."""

    pad_id = 0

    def __init__(self, max_length=16):
        self.max_length = max_length

    def encode(self, texts):
        return [[1] + [2 + zlib.crc32(w.encode()) % 97 for w in t.split()][: self.max_length - 1]
                for t in texts]


SENTENCES = [f"sentence {i} about topic {i % 7} with word w{i % 11} and x{i % 5}" for i in range(96)]


@pytest.fixture(scope="module")
def tiny():
    config = bert.BertConfig.tiny(hidden_dropout=0.1, attention_dropout=0.1)
    model = bert.BertModel(config)
    ids = jnp.ones((2, 8), jnp.int32)
    boxed = model.init(jax.random.PRNGKey(0), ids)["params"]
    base = jax.tree.map(np.asarray, nn.meta.unbox(boxed))
    return Pretrained(name="tiny", module=bert, config=config, base=base,
                      tokenizer=WordTokenizer(), kind="encoder")


def _batch(n=8, length=16):
    tok = WordTokenizer(length)
    return next(simcse.SentenceBatches(tok.encode(SENTENCES[:n]), n, length, 0, seed=0))


def test_dropout_makes_two_different_views(tiny):
    model = tiny.build()
    batch = _batch()
    loss_fn = jax.jit(simcse.make_loss_fn(model, "cls", use_head=False), static_argnums=3)
    variables = {"params": tiny.base}
    noisy, _ = loss_fn(variables, batch, jax.random.PRNGKey(1), False)
    clean, m = loss_fn(variables, batch, jax.random.PRNGKey(1), True)
    # identical views: the positive has cosine 1, a large margin -> smaller loss than with noise
    assert float(noisy) > float(clean) + 1e-3
    noisy2, _ = loss_fn(variables, batch, jax.random.PRNGKey(2), False)
    assert float(noisy2) != float(noisy)


def test_train_step_matches_manual_loss_and_trains(tiny):
    """One step of the shared train step == value_and_grad of the SimCSE loss done by hand."""
    model = tiny.build()
    cfg = simcse.SimCSEConfig(pooling="mean")
    head = simcse.init_head(jax.random.PRNGKey(3), tiny.config.d_model)
    trainable, frozen = split_trainable(tiny.base, {"head": head}, full_finetuning_patterns())
    loss_fn = simcse.make_loss_fn(model, "mean", cfg.temperature)
    import optax
    tx = optax.sgd(0.1)
    step = jax.jit(make_train_step(loss_fn, assemble, tx))
    state = TrainState.create(trainable, tx, jax.random.PRNGKey(4))
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    new_state, metrics = step(state, frozen, batch)
    _, step_rng = jax.random.split(state.rng)
    (want, _), grads = jax.jit(jax.value_and_grad(
        lambda tr: loss_fn(assemble(frozen, tr), batch, step_rng, False), has_aux=True))(trainable)
    np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)
    k0 = trainable["params"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    g0 = grads["params"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    np.testing.assert_allclose(
        np.asarray(new_state.trainable["params"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]),
        np.asarray(k0 - 0.1 * g0), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(g0).max()) > 0


def test_train_simcse_full_finetune_lowers_loss(tiny):
    cfg = simcse.SimCSEConfig(pooling="mean", steps=30, batch_size=16, max_length=16,
                              learning_rate=1e-3, log_every=1)
    res = simcse.train_simcse(tiny, SENTENCES, cfg, full_finetune=True)
    losses = [h["loss"] for h in res.loop.history]
    assert res.loop.steps_run == 30 and res.loop.status == "finished"
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert "head" not in res.variables.get("peft", {})
    emb = res.embedder(WordTokenizer(), "mean")(SENTENCES[:5])
    assert emb.shape == (5, tiny.config.d_model) and np.all(np.isfinite(emb))
    before = Embedder(tiny.build(), {"params": tiny.base}, WordTokenizer(), "mean")(SENTENCES[:5])
    assert np.abs(emb - before).max() > 1e-3


@pytest.mark.slow
def test_train_simcse_sharded_equals_single_device(tiny):
    """Same run on an 8-device data-parallel mesh (global batch 16 = 2 rows per device):
    identical losses, because the in-batch negatives are the global batch."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    from peft_jax.parallel.mesh import make_mesh
    cfg = simcse.SimCSEConfig(pooling="mean", steps=3, batch_size=16, max_length=16,
                              learning_rate=1e-3, log_every=1)
    single = simcse.train_simcse(tiny, SENTENCES, cfg, full_finetune=True)
    sharded = simcse.train_simcse(tiny, SENTENCES, cfg, full_finetune=True, mesh=make_mesh((8, 1, 1)))
    np.testing.assert_allclose([h["loss"] for h in sharded.loop.history],
                               [h["loss"] for h in single.loop.history], rtol=1e-4)


def test_with_dropout_and_errors(tiny):
    c = simcse.with_dropout(tiny.config, 0.2)
    assert c.hidden_dropout == 0.2 and c.attention_dropout == 0.2
    with pytest.raises(ValueError, match="nothing to train"):
        simcse.train_simcse(tiny, SENTENCES, simcse.SimCSEConfig(steps=1))
    with pytest.raises(ValueError, match="at least batch_size=64"):
        simcse.train_simcse(tiny, SENTENCES[:10], simcse.SimCSEConfig(steps=1), full_finetune=True)


def test_sentence_batches_resume():
    tok = WordTokenizer()
    a = simcse.SentenceBatches(tok.encode(SENTENCES), 16, 16, 0, seed=5)
    for _ in range(7):  # crosses an epoch boundary (96 / 16 = 6 batches per epoch)
        next(a)
    state = a.get_state()
    want = next(a)
    b = simcse.SentenceBatches(tok.encode(SENTENCES), 16, 16, 0, seed=5)
    b.set_state(state)
    got = next(b)
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    assert state["epoch"] == 1


def test_lora_simcse_trains_only_the_delta(tiny):
    """LoRA-SimCSE: the base is bit-identical after training; LoRA factors and head moved."""
    from peft_jax.peft import LoRA
    cfg = simcse.SimCSEConfig(pooling="mean", steps=5, batch_size=16, max_length=16,
                              learning_rate=1e-2, log_every=1)
    res = simcse.train_simcse(tiny, SENTENCES, cfg, methods=(LoRA(rank=4, alpha=8.0),))
    for a, b in zip(jax.tree.leaves(res.variables["params"]), jax.tree.leaves(tiny.base)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lora_b = res.variables["peft"]["encoder"]["layer_0"]["attention"]["query"]["lora_b"]
    assert float(jnp.abs(lora_b).max()) > 0  # initialized at 0, trained
    assert res.head is not None and "key" not in res.variables["peft"]["encoder"]["layer_0"]["attention"]
    emb = res.embedder(WordTokenizer(), "mean")(SENTENCES[:3])
    before = Embedder(tiny.build(), {"params": tiny.base}, WordTokenizer(), "mean")(SENTENCES[:3])
    assert np.abs(emb - before).max() > 1e-4


def test_unlabelled_sentences_from_task_and_file(shared_data, tmp_path):
    from peft_jax.contrastive import sts_eval
    got = simcse.unlabelled_sentences("stsb", "train", str(shared_data))
    (pairs,) = sts_eval.load_sts_task("STSBenchmark", str(shared_data), split="train")
    want = sts_eval.task_sentences([pairs])  # both sentences of every pair, deduplicated
    assert len(got) == len(want) and set(got) == set(want)
    sst = simcse.unlabelled_sentences("sst2", "train", str(shared_data), limit=100)
    assert len(sst) == 100 and all(isinstance(s, str) and s for s in sst)
    path = tmp_path / "s.txt"
    path.write_text("one sentence\n\ntwo sentence\none sentence\n")
    assert simcse.unlabelled_sentences(str(path)) == ["one sentence", "two sentence"]
