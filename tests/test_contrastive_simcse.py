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
    return Pretrained(name="tiny", family=bert.BERT, config=config, base=base,
                      tokenizer=WordTokenizer())


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


# ----------------------------------------------------------------------------- supervised

from peft_jax.contrastive import nli  # noqa: E402
from peft_jax.contrastive.losses import sup_simcse_loss  # noqa: E402

SICK_LABELS = ("entailment", "neutral", "contradiction")
SICK_LIKE = [  # premise p1: ent + con; p2: ent + neutral; p3: ent only; p4: con only
    {"sentence1": "p1", "sentence2": "p1 ent a", "label": 0},
    {"sentence1": "p1", "sentence2": "p1 neu", "label": 1},
    {"sentence1": "p1", "sentence2": "p1 con", "label": 2},
    {"sentence1": "p1", "sentence2": "p1 ent b", "label": 0},
    {"sentence1": "p2", "sentence2": "p2 ent", "label": 0},
    {"sentence1": "p2", "sentence2": "p2 neu", "label": 1},
    {"sentence1": "p3", "sentence2": "p3 ent", "label": 0},
    {"sentence1": "p4", "sentence2": "p4 con", "label": 2},
    {"sentence1": "p1", "sentence2": "p1 con 2", "label": 2},
]


def test_nli_triplets_exact():
    assert nli.nli_triplets(SICK_LIKE, SICK_LABELS, "drop") == [
        ("p1", "p1 ent a", "p1 con"), ("p1", "p1 ent b", "p1 con")]
    assert nli.nli_triplets(SICK_LIKE, SICK_LABELS, "neutral") == [
        ("p1", "p1 ent a", "p1 con"), ("p1", "p1 ent b", "p1 con"), ("p2", "p2 ent", "p2 neu")]
    rnd = nli.nli_triplets(SICK_LIKE, SICK_LABELS, "random", seed=3)
    assert rnd[:3] == nli.nli_triplets(SICK_LIKE, SICK_LABELS, "neutral")
    assert len(rnd) == 4 and rnd[3][:2] == ("p3", "p3 ent")
    others = {"p1 ent a", "p1 neu", "p1 con", "p1 ent b", "p1 con 2", "p2 ent", "p2 neu", "p4 con"}
    assert rnd[3][2] in others
    assert nli.nli_triplets(SICK_LIKE, SICK_LABELS, "random", seed=3) == rnd  # seeded
    with pytest.raises(ValueError, match="missing_negative"):
        nli.nli_triplets(SICK_LIKE, SICK_LABELS, "nope")
    with pytest.raises(ValueError, match="contradiction"):
        nli.nli_triplets(SICK_LIKE, ("entailment", "not_entailment"))
    with pytest.raises(ValueError, match="'label'"):
        nli.nli_triplets([{"sentence1": "a", "sentence2": "b"}], SICK_LABELS)


def test_read_triplets_tsv(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("sent0\tsent1\thard_neg\na  man\tA person\tNobody\n\nx\ty\tz\n")
    assert nli.read_triplets_tsv(str(path)) == [("a man", "A person", "Nobody"), ("x", "y", "z")]
    assert nli.load_triplets(str(path)) == nli.read_triplets_tsv(str(path))
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n")
    with pytest.raises(ValueError, match=r"bad.tsv:1: expected 3 tab-separated columns"):
        nli.read_triplets_tsv(str(bad))


def test_sick_triplets_use_same_premise_contradictions(shared_data):
    from peft_jax.data import get_task
    task = get_task("sick-e")
    exs = task.load("train", str(shared_data))
    label = {(" ".join(e["sentence1"].split()), " ".join(e["sentence2"].split())): e["label"]
             for e in exs}
    trip = nli.load_triplets("sick-e", "train", str(shared_data), "drop")
    assert len(trip) > 100
    for a, p, n in trip:
        assert label[(a, p)] == 0 and label[(a, n)] == 2


TRIPLETS = [(f"premise {i} topic {i % 7}", f"entailed {i} topic {i % 7} w{i % 3}",
             f"contradicted {i} not {i % 5}") for i in range(48)]


def _triplet_batch(n=8, length=16):
    tok = WordTokenizer(length)
    cols = [tok.encode([t[j] for t in TRIPLETS[:n]]) for j in range(3)]
    return next(simcse.TripletBatches(*cols, n, length, 0, seed=0))


def test_triplet_batches_and_resume():
    tok = WordTokenizer()
    cols = [tok.encode([t[j] for t in TRIPLETS]) for j in range(3)]
    a = simcse.TripletBatches(*cols, 16, 16, 0, seed=5)
    for _ in range(4):  # crosses an epoch boundary (48 / 16 = 3 batches per epoch)
        next(a)
    state = a.get_state()
    want = next(a)
    b = simcse.TripletBatches(*cols, 16, 16, 0, seed=5)
    b.set_state(state)
    got = next(b)
    assert set(want) == {"input_ids", "attention_mask", "pos_input_ids", "pos_attention_mask",
                         "neg_input_ids", "neg_attention_mask"}
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    # rows stay aligned: row r's positive/negative are those of the same triplet
    row0 = [i for i, ids in enumerate(cols[0]) if list(want["input_ids"][0][:len(ids)]) == ids
            and want["attention_mask"][0].sum() == len(ids)]
    assert len(row0) == 1
    n = len(cols[1][row0[0]])
    assert list(want["pos_input_ids"][0][:n]) == cols[1][row0[0]]
    with pytest.raises(ValueError, match="differ in length"):
        simcse.TripletBatches(cols[0], cols[1][:-1], cols[2], 16, 16, 0)


def test_supervised_train_step_matches_manual_loss(tiny):
    """One shared train step on the supervised loss == hand-written value_and_grad of
    sup_simcse_loss over the three dropout views + SGD."""
    import optax
    model = tiny.build()
    head = simcse.init_head(jax.random.PRNGKey(3), tiny.config.d_model)
    trainable, frozen = split_trainable(tiny.base, {"head": head}, full_finetuning_patterns())
    loss_fn = simcse.make_sup_loss_fn(model, "cls_before_pooler", 0.05, hard_negative_weight=0.5)
    tx = optax.sgd(0.1)
    step = jax.jit(make_train_step(loss_fn, assemble, tx))
    state = TrainState.create(trainable, tx, jax.random.PRNGKey(4))
    batch = {k: jnp.asarray(v) for k, v in _triplet_batch().items()}
    new_state, metrics = step(state, frozen, batch)
    _, step_rng = jax.random.split(state.rng)
    b = batch["input_ids"].shape[0]

    def manual(tr):
        v = assemble(frozen, tr)
        ids = jnp.concatenate([batch["input_ids"], batch["pos_input_ids"], batch["neg_input_ids"]])
        mask = jnp.concatenate([batch["attention_mask"], batch["pos_attention_mask"],
                                batch["neg_attention_mask"]])
        h = model.apply({"params": v["params"]}, ids, attention_mask=mask, deterministic=False,
                        rngs={"dropout": step_rng})["hidden_states"][:, 0]
        dense = v["peft"]["head"]["dense"]
        z = jnp.tanh(h @ dense["kernel"] + dense["bias"])
        return sup_simcse_loss(z[:b], z[b:2 * b], z[2 * b:], 0.05, 0.5)

    want, grads = jax.jit(jax.value_and_grad(manual))(trainable)
    np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)
    path = ("encoder", "layer_0", "attention", "query", "kernel")
    k0, g0, k1 = trainable["params"], grads["params"], new_state.trainable["params"]
    for p in path:
        k0, g0, k1 = k0[p], g0[p], k1[p]
    np.testing.assert_allclose(np.asarray(k1), np.asarray(k0 - 0.1 * g0), rtol=1e-5, atol=1e-6)
    hb = new_state.trainable["peft"]["head"]["dense"]["kernel"]
    np.testing.assert_allclose(np.asarray(hb), np.asarray(
        head["dense"]["kernel"] - 0.1 * grads["peft"]["head"]["dense"]["kernel"]),
                               rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(g0).max()) > 0


def test_lora_supervised_simcse_trains_only_the_delta(tiny):
    from peft_jax.peft import LoRA
    cfg = simcse.SimCSEConfig(pooling="mean", steps=4, batch_size=16, max_length=16,
                              learning_rate=1e-2, log_every=1)
    res = simcse.train_simcse_supervised(tiny, TRIPLETS, cfg, methods=(LoRA(rank=4, alpha=8.0),))
    assert res.loop.steps_run == 4 and res.loop.status == "finished"
    assert all(np.isfinite(h["loss"]) for h in res.loop.history)
    for a, b in zip(jax.tree.leaves(res.variables["params"]), jax.tree.leaves(tiny.base)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lora_b = res.variables["peft"]["encoder"]["layer_0"]["attention"]["query"]["lora_b"]
    assert float(jnp.abs(lora_b).max()) > 0
    assert "head" not in res.variables["peft"] and res.head is not None
    with pytest.raises(ValueError, match="expected \\(anchor, positive, hard negative\\)"):
        simcse.train_simcse_supervised(tiny, [("a", "b")], cfg, full_finetune=True)
    with pytest.raises(ValueError, match="at least batch_size=16 triplets"):
        simcse.train_simcse_supervised(tiny, TRIPLETS[:5], cfg, full_finetune=True)
