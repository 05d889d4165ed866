"""Tokenization: parity with the tokenizers' own encodings (special tokens, longest-first
truncation), prompts with multi-token verbalizers, demonstrations, causal prompts (SmolLM2's
byte-level BPE), text-to-text targets."""

import numpy as np
import pytest

from peft_jax.data import (DataError, encode_classification, encode_prompt, encode_text_to_text, get_task,
                           parse_template, select_demonstrations, special_layout)


@pytest.fixture(scope="module")
def bert_tok(minilm_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_path)


def _wordlevel(single: str, pair: str, words):
    """A tiny word-level tokenizer with the given post-processor (RoBERTa / T5 special layouts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>", "<mask>", "<unk>", "<extra_id_0>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) - set(specials)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                      special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   mask_token="<mask>", unk_token="<unk>")


WORDS = "hello world it was great terrible . ? , yes no the film a good bad movie".split()


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf):
    from peft_jax.models.gguf import load_gguf_tokenizer
    return load_gguf_tokenizer(smollm2_gguf)


@pytest.mark.parametrize("name,split", [("lmbff/rte", "test"), ("lmbff/mrpc", "test"), ("sst2", "dev"),
                                        ("boolq", "validation")])
def test_classification_matches_tokenizer_pairs_and_truncation(shared_data, bert_tok, name, split):
    task = get_task(name)
    ex = task.load(split, str(shared_data))[:100]
    for max_len in (7, 23, 40, 128):
        enc = encode_classification(ex, bert_tok, max_len, task=task)
        for e, ids, types in zip(ex, enc.features["input_ids"], enc.features["token_type_ids"]):
            ref = bert_tok(*[e[f] for f in task.text_fields], truncation="longest_first", max_length=max_len)
            assert list(ids) == list(ref["input_ids"])
            assert list(types) == list(ref["token_type_ids"])
    assert enc.scalars["label"].tolist() == [e["label"] for e in ex]


def test_layout_read_off_roberta_and_t5_style_tokenizers():
    rob = _wordlevel("<s> $A </s>", "<s> $A </s> </s> $B </s>", WORDS)
    lay = special_layout(rob)
    assert (lay.prefix, lay.suffix, lay.pair_middle, lay.pair_suffix) == ((1,), (2,), (2, 2), (2,))
    ex = [{"sentence1": "the film was good", "sentence2": "a movie"}]
    enc = encode_classification(ex, rob, 32, text_fields=["sentence1", "sentence2"])
    assert list(enc.features["input_ids"][0]) == rob("the film was good", "a movie")["input_ids"]
    t5 = _wordlevel("$A </s>", "$A $B </s>", WORDS)
    lay = special_layout(t5)
    assert (lay.prefix, lay.suffix) == ((), (2,))


def test_mlm_prompt_equals_tokenizing_the_rendered_prompt(shared_data, bert_tok):
    """Segment-wise encoding (LM-BFF) == tokenizing the rendered text, for WordPiece."""
    for name in ("sst2", "lmbff/rte", "lmbff/mrpc", "trec", "lmbff/qnli"):
        task = get_task(name)
        ex = task.load("test" if name != "sst2" else "dev", str(shared_data))[:30]
        enc = encode_prompt(ex, None, None, bert_tok, "encoder", max_len=512, task=task)
        tmpl = parse_template(task.template, task.text_fields)
        lw = enc.constants["label_word_ids"]
        assert lw.shape[1:] == (1, 1)
        for i, e in enumerate(ex):
            ids = enc.features["input_ids"][i].copy()
            (pos,) = enc.scalars["mask_pos"][i]
            assert ids[pos] == bert_tok.mask_token_id and (ids == bert_tok.mask_token_id).sum() == 1
            y = e["label"]
            word = task.verbalizer[task.label_names[y]][0]
            ids[pos] = lw[y, 0, 0]
            assert list(ids) == bert_tok(tmpl.render(e, word))["input_ids"], name
        assert [bert_tok.decode([t]) for t in lw[:, 0, 0]] == \
            [task.verbalizer[k][0].lower() for k in task.label_names]


def test_multi_token_label_words_and_truncation(shared_data, bert_tok):
    task = get_task("sst2")
    ex = task.load("train", str(shared_data))[:50]
    verb = {"negative": ["terrible", "awful"], "positive": ["great", "wonderfully"]}
    enc = encode_prompt(ex, "{sentence} All in all, it was {mask}.", verb, bert_tok, "encoder", max_len=16, task=task)
    lw = enc.constants["label_word_ids"]
    T = lw.shape[-1]
    assert lw.shape == (2, 2, T) and T == len(bert_tok("wonderfully", add_special_tokens=False)["input_ids"]) > 1
    assert bert_tok.decode([t for t in lw[1, 1] if t >= 0]) == "wonderfully"
    assert (lw[0, 0, 1:] == -1).all()
    tail = bert_tok(" all in all, it was", add_special_tokens=False)["input_ids"]
    for i, e in enumerate(ex):
        ids = enc.features["input_ids"][i]
        assert len(ids) <= 16
        pos = enc.scalars["mask_pos"][i]
        assert list(pos) == list(range(pos[0], pos[0] + T)) and (ids[pos] == bert_tok.mask_token_id).all()
        assert list(ids[pos[0] - len(tail):pos[0]]) == tail  # the template survives truncation
        n = len(bert_tok(e["sentence"], add_special_tokens=False)["input_ids"])
        assert len(ids) == min(16, n + len(tail) + T + 3)  # [CLS] sentence tail masks . [SEP]
    with pytest.raises(DataError, match="leaves"):
        encode_prompt(ex, None, None, bert_tok, "encoder", max_len=5, task=task)


def test_truncate_side_left_keeps_the_end(bert_tok):
    ex = [{"sentence": "one two three four five six seven eight nine ten", "label": 1}]
    task = get_task("sst2")
    right = encode_prompt(ex, None, None, bert_tok, "encoder", max_len=10, task=task)
    left = encode_prompt(ex, None, None, bert_tok, "encoder", max_len=10, task=task, truncate_side="left")
    assert bert_tok.decode(right.features["input_ids"][0]) == "[CLS] one two three four it was [MASK]. [SEP]"
    assert bert_tok.decode(left.features["input_ids"][0]) == "[CLS] seven eight nine ten it was [MASK]. [SEP]"


def test_demonstrations_are_appended_with_label_words(shared_data, bert_tok):
    task = get_task("lmbff/sst2")
    train = task.load("train-13", str(shared_data))
    queries = task.load("test", str(shared_data))[:5]
    demos = select_demonstrations(queries, train, seed=0)
    enc = encode_prompt(queries, None, None, bert_tok, "encoder", max_len=512, task=task, demonstrations=demos)
    tmpl = parse_template(task.template)
    for i, q in enumerate(queries):
        text = tmpl.render(q, bert_tok.mask_token)
        d = " ".join(tmpl.render(x, task.verbalizer[task.label_names[x["label"]]][0]) for x in demos[i])
        assert list(enc.features["input_ids"][i]) == bert_tok(text, d)["input_ids"]
        (pos,) = enc.scalars["mask_pos"][i]
        assert enc.features["input_ids"][i][pos] == bert_tok.mask_token_id
    short = encode_prompt(queries, None, None, bert_tok, "encoder", max_len=48, task=task, demonstrations=demos)
    assert max(len(x) for x in short.features["input_ids"]) <= 48
    assert all(ids[p[0]] == bert_tok.mask_token_id
               for ids, p in zip(short.features["input_ids"], short.scalars["mask_pos"]))


def test_causal_prompt_smollm2(shared_data, smol_tok):
    task = get_task("sst2")
    ex = task.load("dev", str(shared_data))[:20]
    enc = encode_prompt(ex, None, None, smol_tok, "decoder", max_len=128, task=task)
    lw = enc.constants["label_word_ids"]
    # byte-level BPE: the label word carries the template's space (' great', not 'great')
    assert lw[1, 0, 0] == smol_tok(" great", add_special_tokens=False)["input_ids"][0]
    assert lw[1, 0, 0] != smol_tok("great", add_special_tokens=False)["input_ids"][0]
    for i, e in enumerate(ex):
        ids = list(enc.features["input_ids"][i])
        assert ids == smol_tok(e["sentence"] + " It was", add_special_tokens=False)["input_ids"]
        assert enc.scalars["mask_pos"][i].tolist() == [len(ids) - 1]
    gold = encode_prompt(ex, None, None, smol_tok, "decoder", max_len=128, task=task, include_answer=True)
    for i, e in enumerate(ex):
        ids = gold.features["input_ids"][i]
        p = gold.scalars["mask_pos"][i][0]
        assert ids[p + 1] == lw[e["label"], 0, 0] and len(ids) == p + 2
        assert list(ids[:p + 1]) == list(enc.features["input_ids"][i])
    chat = encode_prompt(ex[:2], None, None, smol_tok, "decoder", max_len=256, task=task, chat=True)
    text = smol_tok.decode(chat.features["input_ids"][0])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert ex[0]["sentence"].strip() in text
    with pytest.raises(DataError, match="no mask token"):
        encode_prompt(ex, None, None, smol_tok, "encoder", task=task)


def test_text_to_text_targets(shared_data):
    t5 = _wordlevel("$A </s>", "$A $B </s>", WORDS + "sst2 sentence: positive negative stsb sentence1: "
                                                      "sentence2: 3.8 0.0 5.0".split())
    task = get_task("sst2")
    ex = [{"sentence": "the film was good", "label": 1}, {"sentence": "a bad movie", "label": 0}]
    enc = encode_text_to_text(ex, t5, task, max_len=16)
    assert t5.decode(enc.features["input_ids"][0]) == "sst2 sentence: the film was good </s>"
    assert [t5.decode(x) for x in enc.targets["targets"]] == ["positive </s>", "negative </s>"]
    enc = encode_text_to_text(ex, t5, task, max_len=4)
    assert t5.decode(enc.features["input_ids"][0]) == "sst2 sentence: the </s>"
    sts = get_task("stsb")
    enc = encode_text_to_text([{"sentence1": "a", "sentence2": "the", "label": 3.77}], t5, sts)
    assert t5.decode(enc.targets["targets"][0]) == "3.8 </s>"
    enc = encode_text_to_text(ex, t5, task, template="{sentence} it was {mask} .")
    assert t5.decode(enc.features["input_ids"][0]) == "the film was good it was <extra_id_0> . </s>"
    assert t5.decode(enc.targets["targets"][0]) == "great </s>"


def test_named_tokenizer_class_equals_autotokenizer(shared_data, minilm_path, tmp_path):
    """A folder whose tokenizer_config.json names its class loads with that class directly
    (no AutoConfig lookup): the same class, tokens and special ids as AutoTokenizer, on
    real sentences; folders without tokenizer.json or with custom code go to AutoTokenizer."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from peft_jax.models.tokenizer import load_tokenizer, named_class

    texts = [ex["sentence"] for ex in get_task("lmbff/sst2").load("test")[:300]]
    texts += ["Héllo  WORLD ", "It was [MASK].", "", "a\tb\nc"]
    ours, ref = load_tokenizer(minilm_path), AutoTokenizer.from_pretrained(minilm_path)
    assert named_class(minilm_path) is not None and type(ours) is type(ref)
    assert ours(texts)["input_ids"] == ref(texts)["input_ids"]
    assert ours(texts[:20], texts[20:40])["input_ids"] == ref(texts[:20], texts[20:40])["input_ids"]
    for attr in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id", "unk_token_id",
                 "model_max_length", "padding_side", "truncation_side"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    custom = tmp_path / "custom"
    shutil.copytree(minilm_path, custom)
    cfg = json.loads((custom / "tokenizer_config.json").read_text())
    (custom / "tokenizer_config.json").write_text(json.dumps({**cfg, "auto_map": {"x": "y"}}))
    assert named_class(str(custom)) is None
    (custom / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "NoSuchTok"}))
    assert named_class(str(custom)) is None
    (custom / "tokenizer_config.json").write_text(json.dumps(cfg))
    (custom / "tokenizer.json").unlink()
    assert named_class(str(custom)) is None
