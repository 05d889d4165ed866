"""The text-to-text format on T5 (v1.0, v1.1) and a decoder-only Llama, against transformers.

Tiny random models saved as HF folders with tokenizers trained here on SST-2 sentences
(``_seq2seq_fixtures``): the encoding (loss only on target tokens, candidates), rank
classification and greedy generation against transformers on the same weights (with a soft
prompt / prefixes too), the target-only loss against transformers' ``labels`` loss, and
the SentencePiece-only T5 tokenizer folder.
"""

import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _seq2seq_fixtures as F  # noqa: E402

from peft_jax.data.tokenize import decode_target, encode_text_to_text  # noqa: E402
from peft_jax.models.registry import load_pretrained  # noqa: E402
from peft_jax.models.slots import Slots  # noqa: E402
from peft_jax.peft import PrefixTuning, PromptTuning, init_delta  # noqa: E402
from peft_jax.train import forward as FW  # noqa: E402

TOL = 1e-4
TEMPLATE = "{sentence} It was {mask}."


@pytest.fixture(scope="module")
def folders(tmp_path_factory, shared_data):
    return F.write_all(str(tmp_path_factory.mktemp("seq2seq_models")))


@pytest.fixture(scope="module")
def sst2(shared_data):
    from peft_jax.data import get_task
    task = get_task("sst2")
    return task, task.load("dev")[:6]


def _spec(pre, enc, methods=()):
    lw = enc.constants.get("label_word_ids")
    return FW.FormatSpec(kind=pre.kind, format="text_to_text", methods=tuple(methods),
                         label_word_ids=None if lw is None else tuple(map(tuple, np.asarray(lw).tolist())),
                         decoder_start_token_id=getattr(pre.config, "decoder_start_token_id", 0),
                         pad_token_id=pre.tokenizer.pad_token_id, eos_token_id=pre.tokenizer.eos_token_id)


def _padded(enc, keys=("input_ids", "attention_mask", "loss_mask")):
    from peft_jax.data import make_batches
    return next(make_batches(enc, len(enc), buckets=None, shuffle=False, drop_remainder=False,
                             num_epochs=1))


def _delta(pre, methods, batch, seed=0):
    model = pre.build(Slots(tuple(methods)))
    b = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask")}
    if pre.kind == "encoder_decoder":
        b["decoder_input_ids"] = jnp.zeros((b["input_ids"].shape[0], 1), jnp.int32)
    delta = init_delta(model, pre.base, b, jax.random.PRNGKey(seed))
    return model, delta


def _hf(folder):
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(folder).eval() if "t5" in folder \
        else transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


# ----------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("name", ["t5_v1.1", "llama"])
@pytest.mark.parametrize("template", [None, TEMPLATE])
def test_encoding_targets_candidates_and_loss_mask(folders, sst2, name, template):
    """The target is the class word + EOS; the candidates hold every class's target; for the
    decoder the loss mask covers exactly the target tokens at the end of the sequence."""
    task, ex = sst2
    pre = load_pretrained(folders[name])
    tok = pre.tokenizer
    fam = pre.kind
    enc = encode_text_to_text(ex, tok, task, 64, template=template, kind=fam)
    words = ["negative", "positive"] if template is None else ["terrible", "great"]
    lw = enc.constants["label_word_ids"]
    assert lw.shape[:2] == (2, 1)
    for i, e in enumerate(ex):
        tgt = enc.targets["targets"][i]
        assert tgt[-1] == tok.eos_token_id
        assert decode_target(tok, tgt, tok.eos_token_id) == words[e["label"]]
        cand = lw[e["label"], 0]
        np.testing.assert_array_equal(cand[cand >= 0], tgt)
        if fam == "decoder":
            ids, m = enc.features["input_ids"][i], enc.features["loss_mask"][i]
            np.testing.assert_array_equal(ids[m > 0], tgt)
            assert m[-len(tgt):].all() and not m[:-len(tgt)].any()
            assert enc.scalars["mask_pos"][i, 0] == len(ids) - len(tgt) - 1
        else:
            src = tok.decode(enc.features["input_ids"][i], skip_special_tokens=True)
            assert (src.startswith("sst2 sentence:") if template is None else "It was" in src)


def test_free_text_targets_from_a_file_task(folders, tmp_path, shared_data):
    """task.file.kind=text2text: the label field is the target text; no classes, no candidates."""
    from peft_jax.data import task_from_config
    paths = F.write_text2text_task(str(tmp_path), F.sst2_sentences(80), 8, 4)
    task = task_from_config({"name": "first_word", "files": paths, "kind": "text2text",
                             "text_fields": ["text"], "label_field": "target"})
    ex = task.load("train")
    for name, fam in (("t5_v1.1", "encoder_decoder"), ("llama", "decoder")):
        tok = load_pretrained(folders[name]).tokenizer
        enc = encode_text_to_text(ex, tok, task, 64, template="Q: {text} A: {mask}", kind=fam)
        assert "label_word_ids" not in enc.constants
        assert [decode_target(tok, t, tok.eos_token_id) for t in enc.targets["targets"]] == \
            [e["label"] for e in ex]


def test_encoder_models_are_refused(sst2):
    from peft_jax.data.readers import DataError
    task, ex = sst2
    with pytest.raises(DataError, match="not an encoder"):
        encode_text_to_text(ex, None, task, 64, kind="encoder")


# ----------------------------------------------------------------------------- model side


def _hf_target_logprob(hf, ids, mask, cand, embeds=None):
    """Sum of log p(cand tokens) under transformers (seq2seq: teacher forcing)."""
    labels = torch.tensor(np.asarray(cand, np.int64))[None].repeat(ids.shape[0], 1)
    kw = {"inputs_embeds": embeds} if embeds is not None else {"input_ids": torch.tensor(ids)}
    with torch.no_grad():
        logits = hf(**kw, attention_mask=torch.tensor(mask), labels=labels).logits
    lp = torch.log_softmax(logits.double(), -1)
    return lp.gather(-1, labels[..., None])[..., 0].sum(-1).numpy()


@pytest.mark.parametrize("name", [pytest.param("t5_v1.0", marks=pytest.mark.slow), "t5_v1.1"])
def test_t5_rank_scores_and_generation_match_transformers(folders, sst2, name):
    """Rank classification = transformers' summed target log-probs (candidates with EOS), and
    greedy generation = ``generate(do_sample=False)``, with a soft prompt on the encoder."""
    task, ex = sst2
    pre = load_pretrained(folders[name])
    enc = encode_text_to_text(ex, pre.tokenizer, task, 64, kind="encoder_decoder")
    batch = _padded(enc)
    prompt = PromptTuning(length=3, init_scale=1.0)
    model, delta = _delta(pre, [prompt], batch)
    spec = _spec(pre, enc, [prompt])
    v = {"params": pre.base, "peft": delta}
    ours = np.asarray(FW.scores(model, spec, v, {k: jnp.asarray(x) for k, x in batch.items()}))
    hf = _hf(folders[name])
    ids, mask = np.asarray(batch["input_ids"], np.int64), np.asarray(batch["attention_mask"], np.int64)
    with torch.no_grad():
        emb = hf.get_input_embeddings()(torch.tensor(ids))
        p = torch.tensor(np.asarray(delta["prompt"]))[None].repeat(len(ids), 1, 1)
        emb = torch.cat([p, emb], 1)
    pmask = np.concatenate([np.ones((len(ids), 3), np.int64), mask], 1)
    lw = enc.constants["label_word_ids"]
    theirs = np.stack([_hf_target_logprob(hf, ids, pmask, c[0][c[0] >= 0], emb) for c in lw], -1)
    err = float(np.max(np.abs(ours - theirs)))
    print(f"\n{name} rank scores: max abs err {err:.2e} (scores ~{np.abs(theirs).max():.1f})")
    assert err <= TOL * max(1.0, np.abs(theirs).max())

    n_new = 6
    ours = np.asarray(FW.generate(model, spec, v, batch, n_new))
    with torch.no_grad():
        theirs = hf.generate(inputs_embeds=emb, attention_mask=torch.tensor(pmask), do_sample=False,
                             num_beams=1, max_new_tokens=n_new, min_new_tokens=0,
                             pad_token_id=0, eos_token_id=1, decoder_start_token_id=0).numpy()
    theirs = theirs[:, 1:]   # drop the decoder start token
    theirs = np.pad(theirs, ((0, 0), (0, n_new - theirs.shape[1])), constant_values=0)
    np.testing.assert_array_equal(ours, theirs)


def test_t5_prefix_on_self_and_cross_attention_generates_its_teacher_forced_argmax(folders, sst2):
    """Greedy generation with key/value prefixes on encoder self, decoder self and cross
    attention (KV cache in the decoder) equals the argmax of the teacher-forced logits."""
    task, ex = sst2
    pre = load_pretrained(folders["t5_v1.1"])
    enc = encode_text_to_text(ex, pre.tokenizer, task, 64, kind="encoder_decoder")
    batch = _padded(enc)
    prefix = PrefixTuning(length=2, targets=r".*/(attention|cross_attention)")
    model, delta = _delta(pre, [prefix], batch, seed=1)
    assert "prefix_key" in delta["decoder"]["layer_1"]["cross_attention"]
    spec = _spec(pre, enc, [prefix])
    v = {"params": pre.base, "peft": delta}
    gen = np.asarray(FW.generate(model, spec, v, batch, 5))
    dec = np.concatenate([np.zeros((len(gen), 1), gen.dtype), gen[:, :-1]], 1)
    logits = model.apply(v, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                         jnp.asarray(dec))["logits"]
    forced = np.asarray(jnp.argmax(logits, -1))
    first_eos = [list(r).index(1) if 1 in r else len(r) for r in gen]
    for r, e in enumerate(first_eos):   # after EOS the rows are padding
        np.testing.assert_array_equal(gen[r, :e + 1], forced[r, :e + 1])


@pytest.mark.slow  # > 40 s on 2 busy cores; runs in CI (PEFT_JAX_SLOW=1)
def test_llama_rank_scores_and_generation_match_transformers(folders, sst2):
    """Decoder-only: each class target teacher-forced after the source (= transformers'
    log-probs of source + target) and generation from the left-aligned source."""
    task, ex = sst2
    pre = load_pretrained(folders["llama"])
    enc = encode_text_to_text(ex, pre.tokenizer, task, 64, template=TEMPLATE, kind="decoder")
    batch = _padded(enc)
    prompt = PromptTuning(length=2, init_scale=0.05)
    model, delta = _delta(pre, [prompt], batch)
    spec = _spec(pre, enc, [prompt])
    v = {"params": pre.base, "peft": delta}
    ours = np.asarray(FW.scores(model, spec, v, {k: jnp.asarray(x) for k, x in batch.items()}))
    hf = _hf(folders["llama"])
    lw, pos = enc.constants["label_word_ids"], enc.scalars["mask_pos"][:, 0]
    p = torch.tensor(np.asarray(delta["prompt"]))
    theirs = np.zeros_like(ours)
    for i in range(len(ex)):
        src = list(enc.features["input_ids"][i][:pos[i] + 1])
        for c in range(lw.shape[0]):
            cand = [int(t) for t in lw[c, 0] if t >= 0]
            with torch.no_grad():
                emb = hf.get_input_embeddings()(torch.tensor([src + cand]))
                logits = hf(inputs_embeds=torch.cat([p[None], emb], 1)).logits[0, 2:].double()
            lp = torch.log_softmax(logits, -1)
            theirs[i, c] = sum(float(lp[len(src) - 1 + j, t]) for j, t in enumerate(cand))
    err = float(np.max(np.abs(ours - theirs)))
    print(f"\nllama rank scores: max abs err {err:.2e}")
    assert err <= TOL * max(1.0, np.abs(theirs).max())

    n_new = 5
    gen = np.asarray(FW.generate(model, spec, v, batch, n_new))
    for i in range(len(ex)):
        src = torch.tensor([list(enc.features["input_ids"][i][:pos[i] + 1])])
        with torch.no_grad():
            emb = torch.cat([p[None], hf.get_input_embeddings()(src)], 1)
            out = hf.generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                              do_sample=False, num_beams=1, max_new_tokens=n_new,
                              eos_token_id=pre.tokenizer.eos_token_id,
                              pad_token_id=pre.tokenizer.pad_token_id).numpy()[0]
        out = np.pad(out, (0, n_new - len(out)), constant_values=pre.tokenizer.pad_token_id)
        np.testing.assert_array_equal(gen[i], out)


@pytest.mark.parametrize("name", ["t5_v1.1", "llama"])
def test_target_only_loss_matches_transformers_labels_loss(folders, sst2, name):
    """The text-to-text loss is transformers' loss with labels = the target tokens (-100
    elsewhere): mean over the batch's target tokens."""
    task, ex = sst2
    pre = load_pretrained(folders[name])
    fam = pre.kind
    enc = encode_text_to_text(ex, pre.tokenizer, task, 64, template=TEMPLATE, kind=fam)
    batch = _padded(enc)
    model = pre.build()
    spec = _spec(pre, enc)
    ours = float(FW.text_to_text_loss(model, spec, {"params": pre.base},
                                      {k: jnp.asarray(x) for k, x in batch.items()}, True))
    hf = _hf(folders[name])
    if fam == "encoder_decoder":
        labels = np.where(batch["target_mask"] > 0, batch["targets"], -100)
    else:
        labels = np.where(batch["loss_mask"] > 0, batch["input_ids"], -100)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(np.asarray(batch["input_ids"], np.int64)),
                    attention_mask=torch.tensor(np.asarray(batch["attention_mask"], np.int64)),
                    labels=torch.tensor(np.asarray(labels, np.int64))).loss.item()
    print(f"\n{name} loss ours {ours:.6f} transformers {theirs:.6f}")
    assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs))


# ----------------------------------------------------------------------------- tokenizer


def test_sentencepiece_only_t5_folder_loads_without_sentencepiece(folders, tmp_path):
    """A T5 folder with spiece.model and no tokenizer.json (what T5 checkpoints ship) loads
    and tokenizes exactly as the tokenizer.json it was made from."""
    from peft_jax.models.tokenizer import load_tokenizer, sentencepiece_only

    src = folders["t5_v1.1"]
    folder = str(tmp_path / "t5_spm")
    shutil.copytree(src, folder)
    os.remove(os.path.join(folder, "tokenizer.json"))
    ref = transformers.AutoTokenizer.from_pretrained(src)
    F.write_spiece_model(os.path.join(folder, "spiece.model"), ref)
    assert sentencepiece_only(folder) and not sentencepiece_only(src)
    tok = load_tokenizer(folder)
    texts = F.sst2_sentences(50) + ["Unseen WORDS, digits 1234 and <extra_id_0> sentinels."]
    assert tok(texts)["input_ids"] == ref(texts)["input_ids"]
    assert tok.convert_tokens_to_ids("<extra_id_0>") == ref.convert_tokens_to_ids("<extra_id_0>")
    assert len(tok) == len(ref)
    assert load_pretrained(folder).tokenizer("great")["input_ids"] == ref("great")["input_ids"]
