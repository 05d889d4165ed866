"""Write what both frameworks load, once per model: a Hugging Face folder holding the very
same fp32 weights (``config.json`` + ``model.safetensors`` + tokenizer), ``spec.json``
(sizes for the FLOP count) and the tokenized SST-2 data (``tokens.npz``: flat ids +
lengths + labels). Run by ``step_bench.py`` / ``epoch_bench.py`` in a subprocess::

    python benchmarks/prepare.py --model minilm --out /tmp/peft_jax_bench/minilm --examples 1000

``--quick``: a tiny random-init config of the family and synthetic token ids (no tokenizer,
no downloads, no data files) for the smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def model_spec(pre_kind: str, config, num_labels: int = 2) -> dict:
    """Sizes used by :func:`common.step_flops`."""
    if pre_kind == "decoder":
        return dict(kind="decoder", d=config.d_model, layers=config.num_layers,
                    heads=config.num_heads, kv_heads=config.num_kv_heads,
                    head_dim=config.head_dim, d_ff=config.d_ff, vocab=config.vocab_size,
                    tied=bool(config.tie_word_embeddings), num_labels=num_labels,
                    max_length=config.max_position_embeddings)
    return dict(kind="encoder", d=config.d_model, layers=config.num_layers,
                heads=config.num_heads, kv_heads=config.num_heads, head_dim=config.head_dim,
                d_ff=config.d_ff, vocab=config.vocab_size, tied=True, num_labels=num_labels,
                max_length=config.max_length)


def _tiny(model: str):
    """(family, config, random base) of a tiny config (``--quick``)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    if model == "minilm":
        from peft_jax.models.bert import BERT as fam
        config = fam.config_class.tiny(max_position_embeddings=128)
    else:
        from peft_jax.models.llama import LLAMA as fam
        config = fam.config_class.tiny(max_position_embeddings=128, tie_word_embeddings=True)
    ids = jnp.ones((1, 8), jnp.int32)
    base = nn.meta.unbox(fam.build(config).init(jax.random.PRNGKey(0), ids)["params"])
    return fam, config, jax.tree.map(np.asarray, base)


def prepare(model: str, out: str, examples: int, data_dir: str, quick: bool, seed: int = 0) -> dict:
    os.makedirs(out, exist_ok=True)
    if quick:
        fam, config, base = _tiny(model)
        fam.save(out, config, base)
        kind = "decoder" if model == "smollm2" else "encoder"
        pad_id = int(getattr(config, "pad_token_id", 0) or 0)
        rows = common.synthetic_token_ids(examples, config.vocab_size, seed, pad_id)
        labels = np.random.default_rng(seed).integers(0, 2, len(rows)).astype(np.int32)
    else:
        from peft_jax.models import registry
        pre = registry.load_pretrained(model)
        registry.save_pretrained(pre, out)
        config, kind, tok = pre.config, pre.kind, pre.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
            tok.save_pretrained(out)
        pad_id = int(tok.pad_token_id)
        sents, labels = common.read_sst2(data_dir, "train")
        order = np.random.default_rng(seed).permutation(len(sents))[:examples]
        sents = [sents[i] for i in order]
        labels = labels[order]
        rows = tok(sents, add_special_tokens=True, truncation=True,
                   max_length=min(512, int(model_spec(kind, config)["max_length"])))["input_ids"]
    lengths = np.asarray([len(r) for r in rows], np.int32)
    flat = np.concatenate([np.asarray(r, np.int32) for r in rows])
    np.savez(os.path.join(out, "tokens.npz"), ids=flat, lengths=lengths, labels=labels)
    spec = model_spec(kind, config)
    spec.update(pad_id=pad_id, model=model, quick=quick, examples=int(len(rows)))
    with open(os.path.join(out, "spec.json"), "w") as f:
        json.dump(spec, f)
    return spec


def load_tokens(folder: str) -> tuple[list[np.ndarray], np.ndarray]:
    """(list of token id rows, labels [n]) written by :func:`prepare`."""
    z = np.load(os.path.join(folder, "tokens.npz"))
    ends = np.cumsum(z["lengths"])
    rows = np.split(z["ids"], ends[:-1])
    return rows, z["labels"]


def load_spec(folder: str) -> dict:
    with open(os.path.join(folder, "spec.json")) as f:
        return json.load(f)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=common.MODELS, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--data-dir", default=common.DEFAULT_DATA)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    spec = prepare(a.model, a.out, a.examples, a.data_dir, a.quick)
    common.emit(spec)


if __name__ == "__main__":
    main()
