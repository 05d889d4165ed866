"""Tiny random T5 (v1.0 / v1.1) and Llama folders with tokenizers trained here.

No T5 weights install offline, so the tests build them: a Unigram tokenizer (the model type
of T5's SentencePiece vocabulary) trained with the ``tokenizers`` library on a few hundred
SST-2 sentences and wrapped as transformers' ``T5Tokenizer``; a byte-level BPE tokenizer for
the Llama. Models are random ``transformers`` models built from peft_jax's tiny configs and
saved as safetensors folders (what ``peft-jax train --config.model.name=DIR`` reads).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

# Words the task formats use, so that they are in the tiny vocabularies.
EXTRA_TEXT = ["sst2 sentence: positive negative great terrible It was .",
              "Review: Sentiment: good bad"] * 5


def sst2_sentences(n: int = 400) -> list[str]:
    """The first ``n`` SST-2 training sentences (needs ../shared/data)."""
    from peft_jax.data import get_task
    return [ex["sentence"] for ex in get_task("sst2").load("train")[:n]]


SPECIALS = ("<pad>", "</s>", "<unk>")


def train_unigram_t5_tokenizer(sentences: Sequence[str], vocab_size: int = 400, extra_ids: int = 8):
    """A ``T5Tokenizer`` over a Unigram model trained on ``sentences`` (ids: <pad>=0, </s>=1,
    <unk>=2, pieces, then the sentinels <extra_id_{extra_ids-1}> ... <extra_id_0>, as T5).

    The ``tokenizers`` trainer selects the pieces (the same set on every run); its EM
    scores vary in the 4th decimal from run to run (hash-map order), so the scores are
    re-estimated deterministically: log relative frequency of each piece in the corpus's
    words, and the pieces ordered by score (as SentencePiece orders ids)."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    corpus = list(sentences) + EXTRA_TEXT
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")])
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, unk_token="<unk>",
                                      special_tokens=list(SPECIALS))
    tok.train_from_iterator(corpus, trainer)
    pieces = sorted(p for p, _ in json.loads(tok.to_str())["model"]["vocab"] if p not in SPECIALS)
    words = Counter("\u2581" + w for line in corpus for w in line.split())
    counts = {p: 1 + sum(n * w.count(p) for w, n in words.items()) for p in pieces}
    total = sum(counts.values())
    scored = sorted(((p, float(np.log(counts[p] / total))) for p in pieces), key=lambda x: (-x[1], x[0]))
    vocab = [(t, 0.0) for t in SPECIALS] + scored
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    return T5Tokenizer(vocab=vocab, extra_ids=extra_ids)


def train_bpe_llama_tokenizer(sentences: Sequence[str], vocab_size: int = 500):
    """A byte-level BPE tokenizer (<s>=0, </s>=1, <pad>=2; BOS prepended) on ``sentences``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(sentences) + EXTRA_TEXT, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def _vocab(tokenizer) -> int:
    return -(-len(tokenizer) // 8) * 8


def _random_base(model, seed: int, **inputs) -> dict:
    """Random base weights of ``model``'s shapes (no compilation): kernels ~ N(0, 1/fan_in),
    tables ~ N(0, 1) (T5's relative position bias N(0, 0.5)), norm scales 1, biases 0."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    ids = jnp.ones((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, **inputs))["params"]
    flat = traverse_util.flatten_dict(jax.tree.map(lambda x: getattr(x, "value", x), shapes,
                                                   is_leaf=lambda x: hasattr(x, "value")))
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in sorted(flat.items()):
        name, shape = path[-1], leaf.shape
        if name == "scale":
            out[path] = np.ones(shape, np.float32)
        elif name == "bias":
            out[path] = np.zeros(shape, np.float32)
        else:
            std = 0.5 if "relative_attention_bias" in path else (
                1.0 if name == "embedding" else shape[0] ** -0.5)
            out[path] = (std * rng.standard_normal(shape)).astype(np.float32)
    return traverse_util.unflatten_dict(out)


def write_tiny_t5(folder: str, tokenizer, version: str = "v1.1", seed: int = 0,
                  dropout: float = 0.0) -> str:
    """A random 2+2-layer T5 (d=32) as a HF folder: ``v1.0`` (ReLU FFN, tied head) or
    ``v1.1`` (gated GELU, untied head; the LM-adapted checkpoints have this architecture)."""
    import jax.numpy as jnp

    from peft_jax.models import t5

    arch = (dict(feed_forward_proj="relu") if version == "v1.0" else
            dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                 scale_decoder_outputs=False))
    cfg = t5.T5Config.tiny(vocab_size=_vocab(tokenizer), d_ff=64, dropout_rate=dropout,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           decoder_start_token_id=tokenizer.pad_token_id, **arch)
    base = _random_base(t5.T5Model(cfg), seed, decoder_input_ids=jnp.ones((1, 2), jnp.int32))
    t5.T5.save(folder, cfg, base)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_llama(folder: str, tokenizer, seed: int = 0) -> str:
    """A random 2-layer Llama (d=32, GQA 4/2 heads, untied head) as a HF folder."""
    from peft_jax.models import llama

    cfg = llama.LlamaConfig.tiny(vocab_size=_vocab(tokenizer), max_position_embeddings=256,
                                 bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
    llama.LLAMA.save(folder, cfg, _random_base(llama.LlamaModel(cfg), seed))
    tokenizer.save_pretrained(folder)
    return folder


def tiny_llama_folder(root: str, n_sentences: int = 200) -> str:
    """A tiny random Llama under ``root/llama`` with a BPE tokenizer trained on the first
    ``n_sentences`` SST-2 sentences (needs ../shared/data)."""
    return write_tiny_llama(os.path.join(root, "llama"), train_bpe_llama_tokenizer(sst2_sentences(n_sentences)))


def write_spiece_model(path: str, tokenizer) -> str:
    """The Unigram vocabulary of a ``T5Tokenizer`` as a SentencePiece ``.model`` file (what
    T5 checkpoints ship), written with the protobuf schema bundled in transformers."""
    from transformers.convert_slow_tokenizer import import_protobuf

    pb = import_protobuf()
    m = pb.ModelProto()
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    special = {tokenizer.pad_token: 3, tokenizer.eos_token: 3, tokenizer.unk_token: 2}
    for piece, score in model["vocab"]:
        if piece.startswith("<extra_id_"):
            continue   # T5 appends the sentinels; they are not in spiece.model
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, float(score), special.get(piece, 1)
    m.trainer_spec.model_type = 1          # UNIGRAM
    m.trainer_spec.unk_id = tokenizer.unk_token_id
    m.trainer_spec.pad_id = tokenizer.pad_token_id
    m.trainer_spec.eos_id = tokenizer.eos_token_id
    m.trainer_spec.bos_id = -1
    m.normalizer_spec.add_dummy_prefix = True
    with open(path, "wb") as f:
        f.write(m.SerializeToString())
    return path


def write_text2text_task(folder: str, sentences: Sequence[str], n_train: int = 48,
                         n_dev: int = 16) -> dict:
    """A free-text target task from real sentences: the target is the sentence's first word
    (JSONL ``{"text": ..., "target": ...}``) -> {split: path}."""
    os.makedirs(folder, exist_ok=True)
    rows = [{"text": s, "target": s.split()[0]} for s in sentences if s.split()]
    paths = {}
    for split, part in (("train", rows[:n_train]), ("dev", rows[n_train:n_train + n_dev])):
        paths[split] = os.path.join(folder, f"{split}.jsonl")
        with open(paths[split], "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in part))
    return paths


def write_all(root: str) -> dict:
    """The tiny T5 v1.0, T5 v1.1 and Llama folders under ``root`` -> {name: folder}."""
    sentences = sst2_sentences()
    t5_tok = train_unigram_t5_tokenizer(sentences)
    llama_tok = train_bpe_llama_tokenizer(sentences)
    return {"t5_v1.0": write_tiny_t5(os.path.join(root, "t5_v1.0"), t5_tok, "v1.0"),
            "t5_v1.1": write_tiny_t5(os.path.join(root, "t5_v1.1"), t5_tok, "v1.1"),
            "llama": write_tiny_llama(os.path.join(root, "llama"), llama_tok)}


def compare_to_peft_model(cfg, trained: dict, pm, tol: float = 1e-4) -> float:
    """Logits of the run's model with its trained delta (flat, as ``delta/`` holds it) vs
    the HF ``PeftModel`` ``pm`` (teacher forcing of the targets), on dev examples encoded by
    the run's own encoder; max abs difference over real positions (a soft prompt's virtual
    positions included) asserted <= ``tol``; returns it."""
    import torch

    from peft_jax.data import make_batches
    from peft_jax.models.t5 import shift_right
    from peft_jax.peft.delta_io import unflatten_delta
    from peft_jax.peft.method import materialize_all
    from peft_jax.runner import encode_split, load_examples, setup

    s = setup(cfg)
    enc = encode_split(s.exp, load_examples(s.exp, "dev", 4))
    b = next(make_batches(enc, 4, buckets=None, shuffle=False, drop_remainder=False, num_epochs=1))
    ids, mask = np.asarray(b["input_ids"]), np.asarray(b["attention_mask"])
    args, kw = [ids, mask], {}
    if s.exp.kind == "encoder_decoder":
        dec = np.asarray(shift_right(b["targets"], 0, 0))
        args.append(dec)
        kw["decoder_input_ids"] = torch.tensor(dec.astype(np.int64))
    peft_delta = materialize_all(s.exp.methods, unflatten_delta(trained)["peft"])  # VeRA, prefix MLP
    ours = np.asarray(s.exp.model.apply({"params": s.exp.pre.base, "peft": peft_delta}, *args)["logits"])
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(ids.astype(np.int64)),
                    attention_mask=torch.tensor(mask.astype(np.int64)), **kw).logits.numpy()
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    real = np.asarray(b["target_mask"] if s.exp.kind == "encoder_decoder" else mask).astype(bool)
    virtual = ours.shape[1] - real.shape[1]   # soft-prompt positions prepended by both
    real = np.concatenate([np.ones((real.shape[0], virtual), bool), real], axis=1)
    err = float(np.max(np.abs(ours - theirs)[real]))
    print(f"\nPeftModel reload ({s.exp.kind}, {cfg.peft.methods}): max abs err {err:.2e}")
    assert err <= tol, err
    return err


if __name__ == "__main__":   # python tests/_seq2seq_fixtures.py OUT_DIR
    import sys
    for name, folder in write_all(sys.argv[1]).items():
        print(f"{name}: {folder}")
