"""The contrastive family on a tiny random BERT: each objective's loss equals a direct
computation, augmentations do what they say, BYOL's target moves only by EMA, BERT-flow is
invertible with the right log-determinant, and every objective trains through the loop."""

import dataclasses
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import spearmanr

from peft_jax.contrastive import augment, flow, objectives, simcse
from peft_jax.contrastive.embed import embed_outputs
from peft_jax.contrastive.losses import cosine_matrix, unsup_simcse_loss
from peft_jax.contrastive.prompt_embed import PromptEmbedder, PromptRenderer
from peft_jax.models import bert
from peft_jax.models.registry import Pretrained
from peft_jax.peft import heads
from peft_jax.peft.partition import assemble, full_finetuning_patterns, split_trainable
from peft_jax.train.step import TrainState, make_train_step

CLS, SEP, MASK = 1, 97, 98


class WordTokenizer:
    """[CLS]=1 words [SEP]=97; "[MASK]" -> 98; other words hashed into 2..96."""

    pad_id = 0
    mask_token, mask_token_id = "[MASK]", MASK

    def __init__(self, max_length=24):
        self.max_length = max_length

    def _id(self, w):
        return MASK if w == "[MASK]" else 2 + zlib.crc32(w.encode()) % 95

    def encode(self, texts):
        return [[CLS] + [self._id(w) for w in t.split()][: self.max_length - 2] + [SEP]
                for t in texts]


SENTENCES = [f"sentence {i} about topic {i % 7} with word w{i % 11} and x{i % 5}" for i in range(64)]
DOCS = [" ".join(f"d{i}t{j % 9}" for j in range(30 + i % 7)) for i in range(32)]


@pytest.fixture(scope="module")
def tiny():
    config = bert.BertConfig.tiny(hidden_dropout=0.1, attention_dropout=0.1)
    boxed = bert.BertModel(config).init(jax.random.PRNGKey(0), jnp.ones((2, 8), jnp.int32))["params"]
    base = jax.tree.map(np.asarray, nn.meta.unbox(boxed))
    return Pretrained(name="tiny", family=bert.BERT, config=config, base=base,
                      tokenizer=WordTokenizer())


def _batch(n=8, length=24):
    tok = WordTokenizer(length)
    return {k: jnp.asarray(v) for k, v in
            simcse.SentenceBatches(tok.encode(SENTENCES[:n]), n, length, 0).peek().items()}


def _vars(tiny, head=True):
    v = {"params": jax.tree.map(jnp.asarray, tiny.base), "peft": {}}
    if head:
        v["peft"]["head"] = simcse.init_head(jax.random.PRNGKey(3), tiny.config.d_model)
    return v


def _pool(tiny, params, ids, mask):
    """Mean-pooled last layer of the plain model (deterministic) ``[b, d]``."""
    return embed_outputs(tiny.build(), {"params": params}, ids, mask, "mean")


# ----------------------------------------------------------------------------- augmentations

def test_token_shuffle_permutes_inner_tokens_only():
    b = _batch()
    ids, mask = np.asarray(b["input_ids"]), np.asarray(b["attention_mask"])
    out = np.asarray(augment.token_shuffle(jax.random.PRNGKey(0), b["input_ids"], b["attention_mask"]))
    assert not np.array_equal(out, ids)
    for r in range(len(ids)):
        n = mask[r].sum()
        assert out[r, 0] == ids[r, 0] and out[r, n - 1] == ids[r, n - 1]
        assert np.array_equal(out[r, n:], ids[r, n:])
        assert sorted(out[r, 1:n - 1]) == sorted(ids[r, 1:n - 1])


def test_cutoffs_erase_exact_counts():
    mask = jnp.asarray(np.array([[1] * 12 + [0] * 4, [1] * 6 + [0] * 10]))
    x = jnp.ones((2, 16, 10))
    y = np.asarray(augment.token_cutoff(jax.random.PRNGKey(1), x, mask, 0.25))
    zero_rows = (y == 0).all(-1)
    assert zero_rows[0].sum() == 2 and zero_rows[1].sum() == 1     # floor(.25 * 10), max(1, ..)
    assert not zero_rows[:, 0].any()                               # never the first token
    f = np.asarray(augment.feature_cutoff(jax.random.PRNGKey(2), x, 0.2))
    cols = (f == 0).all(1)
    assert cols.sum(1).tolist() == [2, 2]                          # floor(.2 * 10) per row


def test_perturb_hook_touches_only_the_token_embeddings(tiny):
    b = _batch()
    model, v = tiny.build(), {"params": tiny.base}
    plain = embed_outputs(model, v, b["input_ids"], b["attention_mask"], "mean")
    with augment.perturb_input_embeddings(lambda x: x, tiny.config.vocab_size):
        same = embed_outputs(model, v, b["input_ids"], b["attention_mask"], "mean")
    np.testing.assert_allclose(same, plain, atol=1e-6)
    # zeroing every token embedding == a model whose word-embedding table is zero
    with augment.perturb_input_embeddings(jnp.zeros_like, tiny.config.vocab_size):
        hooked = embed_outputs(model, v, b["input_ids"], b["attention_mask"], "mean")
    p0 = jax.tree.map(np.array, tiny.base)
    p0["embeddings"]["word_embeddings"]["embedding"][:] = 0
    np.testing.assert_allclose(hooked, _pool(tiny, p0, b["input_ids"], b["attention_mask"]), atol=1e-5)


# ----------------------------------------------------------------------------- losses == direct

def test_consert_token_and_feature_cutoff_loss_equals_direct(tiny):
    """Cutoff views computed by editing the embedding table per example == the hooked loss."""
    b = _batch(4)
    obj = objectives.ConSERT(views=("token_cutoff", "feature_cutoff"), token_rate=0.3,
                             feature_rate=0.25)
    enc = objectives.Encode(tiny.build(), "mean", use_head=False, vocab_size=99)
    rng = jax.random.PRNGKey(5)
    loss, _ = obj.loss(enc, _vars(tiny, head=False), b, rng, True, 0.05)

    k1, k2, _ = jax.random.split(rng, 3)
    ka1, _ = jax.random.split(k1)
    ka2, _ = jax.random.split(k2)
    ids, mask = np.asarray(b["input_ids"]), b["attention_mask"]
    d = tiny.config.d_model
    cut_tok = np.asarray(augment.token_cutoff(ka1, jnp.ones((4, ids.shape[1], 1)), mask, 0.3))[..., 0] == 0
    cut_col = np.asarray(augment.feature_cutoff(ka2, jnp.ones((4, 1, d)), 0.25))[:, 0] == 0
    z1, z2 = [], []
    for r in range(4):
        p = jax.tree.map(np.array, tiny.base)
        table = p["embeddings"]["word_embeddings"]["embedding"]
        table[MASK] = 0.0                      # [MASK] (absent from the batch) = "erased"
        row = np.where(cut_tok[r], MASK, ids[r])
        row_mask = np.asarray(mask[r:r + 1])
        z1.append(_pool(tiny, p, jnp.asarray(row[None]), row_mask)[0])
        p2 = jax.tree.map(np.array, tiny.base)
        p2["embeddings"]["word_embeddings"]["embedding"][:, cut_col[r]] = 0.0
        z2.append(_pool(tiny, p2, jnp.asarray(ids[r:r + 1]), row_mask)[0])
    want = unsup_simcse_loss(jnp.stack(z1), jnp.stack(z2), 0.05)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)


def test_consert_shuffle_loss_equals_direct(tiny):
    b = _batch(6)
    obj = objectives.ConSERT(views=("shuffle", "none"))
    enc = objectives.Encode(tiny.build(), "mean", use_head=True, vocab_size=99)
    v = _vars(tiny)
    rng = jax.random.PRNGKey(7)
    loss, _ = obj.loss(enc, v, b, rng, True, 0.05)
    k1, _, _ = jax.random.split(rng, 3)
    shuffled = augment.token_shuffle(jax.random.split(k1)[0], b["input_ids"], b["attention_mask"])
    head = lambda z: heads.apply_head("projection", v["peft"]["head"], z)
    z1 = head(_pool(tiny, tiny.base, shuffled, b["attention_mask"]))
    z2 = head(_pool(tiny, tiny.base, b["input_ids"], b["attention_mask"]))
    np.testing.assert_allclose(float(loss), float(unsup_simcse_loss(z1, z2, 0.05)), rtol=1e-5)


def test_consert_adversarial_view_raises_the_loss(tiny):
    b = _batch(6)
    enc = objectives.Encode(tiny.build(), "mean", use_head=False, vocab_size=99)
    v = _vars(tiny, head=False)
    rng = jax.random.PRNGKey(2)
    losses = {eps: float(objectives.ConSERT(views=("none", "adversarial"), eps=eps).loss(
        enc, v, b, rng, True, 0.05)[0]) for eps in (0.0, 0.5)}
    clean = float(objectives.ConSERT(views=("none", "none")).loss(enc, v, b, rng, True, 0.05)[0])
    assert losses[0.0] == pytest.approx(clean, rel=1e-5)
    assert losses[0.5] > losses[0.0] + 1e-3


def test_declutr_spans_and_loss(tiny):
    rng = np.random.default_rng(0)
    for _ in range(200):
        (a0, a1), (p0, p1) = augment.sample_spans(rng, 40, 4, 12)
        assert 4 <= a1 - a0 <= 12 and 4 <= p1 - p0 <= a1 - a0
        assert 0 <= p0 and p1 <= 40 and p0 <= a1 and p1 >= a0      # overlap or adjacent
    tok = WordTokenizer(24)
    obj = objectives.DeCLUTR(min_span=4, max_span=12)
    cfg = simcse.SimCSEConfig(batch_size=8, max_length=24)
    batches = obj.batches(tok, DOCS, cfg, seed=0)
    first = batches.peek()
    assert batches.get_state() == {"drawn": 0}
    b = {k: jnp.asarray(x) for k, x in next(batches).items()}
    assert np.array_equal(first["input_ids"], b["input_ids"])
    ids = np.asarray(b["input_ids"])
    assert (ids[:, 0] == CLS).all()
    enc = objectives.Encode(tiny.build(), "mean", use_head=False, vocab_size=99)
    loss, _ = obj.loss(enc, _vars(tiny, head=False), b, None, True, 0.05)
    z1 = _pool(tiny, tiny.base, b["input_ids"], b["attention_mask"])
    z2 = _pool(tiny, tiny.base, b["pos_input_ids"], b["pos_attention_mask"])
    np.testing.assert_allclose(float(loss), float(unsup_simcse_loss(z1, z2, 0.05)), rtol=1e-5)


def test_rank_vectors_are_spearman_and_rankencoder_loss_equals_direct(tiny):
    rng = np.random.default_rng(0)
    emb, corpus = rng.normal(size=(6, 5)), rng.normal(size=(20, 5))
    r = objectives.rank_vectors(emb, corpus)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit(emb) @ unit(corpus).T
    assert r[0] @ r[1] == pytest.approx(spearmanr(sims[0], sims[1]).correlation, abs=1e-5)

    b = dict(_batch(6))
    b["rank_vec"] = jnp.asarray(r)
    obj = objectives.RankEncoder(weight=0.7)
    enc = objectives.Encode(tiny.build(), "mean", use_head=False, vocab_size=99)
    loss, m = obj.loss(enc, _vars(tiny, head=False), b, None, True, 0.05)
    z = np.asarray(_pool(tiny, tiny.base, b["input_ids"], b["attention_mask"]), np.float64)
    zs = unit(z) @ unit(z).T
    off = ~np.eye(6, dtype=bool)
    rank_term = np.mean(((zs - r @ r.T) ** 2)[off])
    want = float(unsup_simcse_loss(jnp.asarray(z), jnp.asarray(z), 0.05)) + 0.7 * rank_term
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    assert float(m["rank_loss"]) == pytest.approx(rank_term, rel=1e-4)


def test_rankencoder_table_is_lazy_and_equals_the_full_table():
    """The teacher embeds only the sentences batches draw; their rank vectors equal the
    rows of the table computed over every sentence at once."""
    rng = np.random.default_rng(1)
    vecs = {f"s{i}": rng.normal(size=5) for i in range(40)}
    seen = []

    def teacher(texts):
        seen.extend(texts)
        return np.stack([vecs[t] for t in texts])

    texts = list(vecs)
    obj = objectives.RankEncoder(teacher=teacher, corpus_size=8)
    tok = WordTokenizer(24)
    cfg = simcse.SimCSEConfig(batch_size=4, max_length=24)
    batches = obj.batches(tok, texts, cfg, 3)
    assert len(seen) == 8                                    # the corpus only
    corpus_rows = np.sort(np.random.default_rng(3).choice(40, 8, replace=False))
    full = objectives.rank_vectors(np.stack([vecs[t] for t in texts]),
                                   np.stack([vecs[texts[i]] for i in corpus_rows]))
    for _ in range(3):
        rows = batches._order[batches.pos:batches.pos + 4]
        np.testing.assert_allclose(next(batches)["rank_vec"], full[rows], atol=1e-6)
    assert 8 < len(seen) <= 8 + 12                           # 3 batches of 4, no more
    np.testing.assert_allclose(batches.table[[0, 5]], full[[0, 5]], atol=1e-6)


def test_promptbert_loss_equals_direct_and_embedder_denoises(tiny):
    tok = WordTokenizer(24)
    t1, t2 = 'this sentence : " {sentence} " means {mask} .', 'the text " {sentence} " is {mask} .'
    r1 = PromptRenderer(tok, t1, 24)
    ids, pos = r1(["a b c"])
    assert ids[0][pos[0]] == MASK and ids[0][0] == CLS
    obj = objectives.PromptBERT(templates=(t1, t2))
    cfg = simcse.SimCSEConfig(batch_size=4, max_length=24)
    b = {k: jnp.asarray(x) for k, x in obj.batches(tok, SENTENCES[:8], cfg, 0).peek().items()}
    enc = objectives.Encode(tiny.build(), "mean", use_head=False, vocab_size=99)
    v = _vars(tiny, head=False)
    loss, _ = obj.loss(enc, v, b, None, True, 0.05)

    model = tiny.build()

    def at(ids, mask, pos):
        h = model.apply({"params": tiny.base}, ids, mask)["hidden_states"]
        return h[jnp.arange(len(pos)), pos]

    h1 = at(b["input_ids"], b["attention_mask"], b["answer_pos"])
    h2 = at(b["pos_input_ids"], b["pos_attention_mask"], b["pos_answer_pos"])
    bias = at(b["tmpl_input_ids"], b["tmpl_attention_mask"], b["tmpl_answer_pos"])
    want = unsup_simcse_loss(h1 - bias[0], h2 - bias[1], 0.05)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    # the embedder (no training) gives the same denoised template-1 states
    emb = PromptEmbedder(model, {"params": tiny.base}, tok, template=t1, max_length=24)
    sents = SENTENCES[:4]
    got = emb(sents)
    ids1, p1 = r1(sents)
    ref = [np.asarray(at(jnp.asarray([i]), jnp.ones((1, len(i)), jnp.int32), jnp.asarray([p])))[0]
           for i, p in zip(ids1, p1)]
    (bi,), (bp,) = r1([""])
    b0 = np.asarray(at(jnp.asarray([bi]), jnp.ones((1, len(bi)), jnp.int32), jnp.asarray([bp])))[0]
    np.testing.assert_allclose(got, np.stack(ref) - b0, atol=1e-5)


def test_byol_loss_equals_direct_and_target_moves_by_ema(tiny):
    b = _batch(6)
    obj = objectives.BYOL(tau=0.9)
    cfg = simcse.SimCSEConfig(pooling="mean")
    head = simcse.init_head(jax.random.PRNGKey(3), tiny.config.d_model)
    trainable, frozen = split_trainable(tiny.base, {"head": head}, full_finetuning_patterns())
    trainable = obj.init_extra(trainable, jax.random.PRNGKey(4), tiny.config.d_model)
    # the target starts as a copy of every online leaf
    for a, c in zip(jax.tree.leaves(objectives._online(trainable)),
                    jax.tree.leaves(trainable["peft"]["target"])):
        np.testing.assert_array_equal(a, c)
    loss_fn = simcse.make_loss_fn(tiny.build(), "mean", cfg.temperature, True, obj)
    v = assemble(frozen, trainable)
    loss, _ = loss_fn(v, b, jax.random.PRNGKey(0), True)
    proj = lambda z, h: heads.apply_head("projection", h, z)
    z = _pool(tiny, v["params"], b["input_ids"], b["attention_mask"])
    online = proj(z, head)
    q = proj(online, v["peft"]["predictor"])
    qn = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    tn = online / jnp.linalg.norm(online, axis=-1, keepdims=True)
    # deterministic: both views are the same sentences, so the target of the other view is
    # the target of this sentence
    want = jnp.mean(2 - 2 * jnp.sum(qn * tn, -1))
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)

    tx = obj.wrap_tx(optax.sgd(0.5), trainable)
    step = jax.jit(make_train_step(loss_fn, assemble, tx))
    state = TrainState.create(trainable, tx, jax.random.PRNGKey(1))
    new, _ = step(state, frozen, b)
    old_t, new_t = trainable["peft"]["target"], new.trainable["peft"]["target"]
    new_on = objectives._online(new.trainable)
    moved = 0
    for t0, t1, o1, o0 in zip(jax.tree.leaves(old_t), jax.tree.leaves(new_t),
                              jax.tree.leaves(new_on), jax.tree.leaves(objectives._online(trainable))):
        np.testing.assert_allclose(t1, 0.9 * t0 + 0.1 * o1, atol=1e-6)
        moved += int(not np.allclose(o1, o0))
    assert moved > 0
    # no gradient reaches the target
    g = jax.grad(lambda tr: loss_fn(assemble(frozen, tr), b, jax.random.PRNGKey(0), False)[0])(trainable)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g["peft"]["target"]))


# ----------------------------------------------------------------------------- flow

def test_flow_is_invertible_with_the_jacobian_logdet():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(128, 6)) @ rng.normal(size=(6, 6)) + 3.0).astype(np.float32)
    post = flow.fit_flow(x, steps=60, depth=3, hidden=16, batch_size=64, lr=3e-3)
    z = post(x)
    np.testing.assert_allclose(post.inverse(z), x, atol=1e-4)
    f = lambda row: post.flow.apply(post.variables, row[None])[0][0]
    for i in range(3):
        _, want = jnp.linalg.slogdet(jax.jacobian(f)(jnp.asarray(x[i])))
        got = post.flow.apply(post.variables, jnp.asarray(x[i:i + 1]))[1][0]
        assert float(got) == pytest.approx(float(want), abs=1e-4)
    # fitting lowers the NLL; the latent is roughly standardized
    untrained = flow.fit_flow(x, steps=0, depth=3, hidden=16, batch_size=64)
    assert post.nll(x) < untrained.nll(x)
    assert np.abs(z.mean(0)).max() < 0.5 and np.abs(z.std(0) - 1).max() < 0.5


def test_flow_save_load_roundtrip(tmp_path):
    x = np.random.default_rng(1).normal(size=(40, 4)).astype(np.float32)
    post = flow.fit_flow(x, steps=5, depth=2, hidden=8, batch_size=20)
    path = str(tmp_path / "flow.npz")
    flow.save_flow(path, post)
    np.testing.assert_allclose(flow.load_flow(path)(x), post(x), atol=1e-6)
    with pytest.raises(FileNotFoundError):
        flow.load_flow(str(tmp_path / "none.npz"))


# ----------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n != "byol" else n
                                  for n in ["consert", "declutr", "byol", "promptbert", "rankencoder"]])
def test_every_objective_trains_through_the_shared_loop(tiny, name):
    from peft_jax.contrastive.embed import Embedder
    from peft_jax.peft import LoRA
    tok = WordTokenizer(24)
    pre = dataclasses.replace(tiny, tokenizer=tok)
    obj = {"consert": objectives.ConSERT(),
           "declutr": objectives.DeCLUTR(min_span=4, max_span=12),
           "byol": objectives.BYOL(),
           "promptbert": objectives.PromptBERT(
               templates=('" {sentence} " means {mask} .', 'text " {sentence} " is {mask} .')),
           "rankencoder": objectives.RankEncoder(
               teacher=Embedder(tiny.build(), {"params": tiny.base}, tok, "mean"),
               corpus_size=16)}[name]
    texts = DOCS if name == "declutr" else SENTENCES
    cfg = simcse.SimCSEConfig(pooling="mean", steps=4, batch_size=8, max_length=24,
                              learning_rate=1e-2, log_every=1)
    res = simcse.train_contrastive(pre, texts, obj, cfg, methods=(LoRA(rank=4, alpha=8.0),))
    losses = [h["loss"] for h in res.loop.history if "loss" in h]
    assert res.loop.status == "finished" and int(res.loop.state.step) == 4
    assert losses and all(np.isfinite(losses))
    assert set(res.variables.get("peft", {})) == {"encoder"} or "head" not in res.variables["peft"]
    emb = res.embedder(tok)(SENTENCES[:5])
    assert emb.shape == (5, tiny.config.d_model) and np.all(np.isfinite(emb))
    for a, c in zip(jax.tree.leaves(res.variables["params"]), jax.tree.leaves(tiny.base)):
        np.testing.assert_array_equal(np.asarray(a), c)
