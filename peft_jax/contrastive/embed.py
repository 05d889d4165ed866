"""Sentence embeddings from any model family: tokenize, batch, run, pool, (whiten).

:class:`Embedder` is a callable ``list[str] -> np.ndarray [n, d]`` (the ``embed_fn`` of
:mod:`peft_jax.contrastive.sts_eval`). Batches have a fixed number of rows and lengths
rounded up to a multiple of ``length_bucket``, so a run compiles only a few shapes.
Sentences are processed longest-first (less padding) and returned in input order.

:func:`semantic_search` is inner-product top-k; :func:`embed_main` is the
``peft-jax embed`` command (text file of sentences -> ``.npy``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.contrastive.whitening import (Whitening, apply_whitening, fit_whitening,
                                            load_whitening, save_whitening)
from peft_jax.models import pooling as pooling_lib

Array = Any
LAYER_POOLERS = ("first_last_avg", "top2_avg")


class HFTokenizer:
    """Adapter over a Hugging Face (fast) tokenizer: ``encode(texts) -> list[list[int]]``."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tok = tokenizer
        self.max_length = int(max_length)
        pad = tokenizer.pad_token_id
        if pad is None:  # decoder tokenizers often have none; pad positions are masked anyway
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)

    @classmethod
    def from_folder(cls, folder: str, max_length: int = 128) -> "HFTokenizer":
        from transformers import AutoTokenizer
        return cls(AutoTokenizer.from_pretrained(folder, local_files_only=True), max_length)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tok(list(texts), truncation=True, max_length=self.max_length)["input_ids"]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def embed_outputs(model: Any, variables: dict, input_ids: Array, attention_mask: Array,
                  pooling: str, rngs: Optional[dict] = None, deterministic: bool = True) -> Array:
    """Run ``model`` and pool: ``[b, l]`` ids/mask -> ``[b, d]`` (fp32). Shared by training."""
    outputs = model.apply(variables, input_ids=input_ids, attention_mask=attention_mask,
                          deterministic=deterministic,
                          output_hidden_states=pooling in LAYER_POOLERS, rngs=rngs)
    return pooling_lib.pool(pooling, outputs).astype(jnp.float32)


def state_at_outputs(model: Any, variables: dict, input_ids: Array, attention_mask: Array,
                     pos: Array, rngs: Optional[dict] = None, deterministic: bool = True) -> Array:
    """Run ``model`` and take the last layer's state at ``pos [b]`` (an input position;
    soft-prompt inserts before the text are accounted for): ``[b, d]`` fp32."""
    out = model.apply(variables, input_ids=input_ids, attention_mask=attention_mask,
                      deterministic=deterministic, rngs=rngs)
    h = out["hidden_states"]
    shift = h.shape[1] - input_ids.shape[1]
    return jnp.take_along_axis(h, (pos + shift)[:, None, None], axis=1)[:, 0].astype(jnp.float32)


@dataclasses.dataclass
class Embedder:
    """``embedder(sentences) -> np.ndarray [n, d]`` (or ``[n, k]`` after whitening).

    ``model``: a family model (BertModel, LlamaModel, ...) built with its slots;
    ``variables``: ``{"params": base}`` plus ``"peft": delta`` for an adapted model;
    ``tokenizer``: has ``encode(list[str]) -> list[list[int]]`` and ``pad_id``;
    ``pooling``: a name from :data:`peft_jax.models.pooling.POOLERS`;
    ``normalize``: L2-normalize the final vectors.
    """

    model: Any
    variables: dict
    tokenizer: Any
    pooling: str = "mean"
    batch_size: int = 64
    length_bucket: int = 16
    whitening: Optional[Whitening] = None
    normalize: bool = False

    def __post_init__(self):
        if self.pooling not in pooling_lib.POOLERS:
            raise ValueError(f"unknown pooling {self.pooling!r}; supported: "
                             f"{sorted(pooling_lib.POOLERS)}")
        self._fn = jax.jit(functools.partial(embed_outputs, self.model, pooling=self.pooling))

    def _token_ids(self, sentences: list[str]) -> tuple[list[list[int]], Optional[list[int]]]:
        """Token ids per sentence and (subclasses) the position to read, or None."""
        return self.tokenizer.encode(sentences), None

    def _forward(self, tok: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> Array:
        return self._fn(self.variables, tok, mask)

    def raw(self, sentences: Sequence[str]) -> np.ndarray:
        """Pooled embeddings before whitening / normalization: ``[n, d]`` float32."""
        sentences = list(sentences)
        if not sentences:
            raise ValueError("Embedder: no sentences given")
        ids, positions = self._token_ids(sentences)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out: list[Optional[np.ndarray]] = [None] * len(ids)
        bs = self.batch_size
        for start in range(0, len(order), bs):
            rows = order[start:start + bs]
            length = _round_up(max(max(len(ids[i]) for i in rows), 1), self.length_bucket)
            tok = np.full((bs, length), self.tokenizer.pad_id, np.int32)
            mask = np.zeros((bs, length), np.int32)
            pos = np.zeros((bs,), np.int32)
            for r, i in enumerate(rows):
                tok[r, :len(ids[i])] = ids[i]
                mask[r, :len(ids[i])] = 1
                pos[r] = positions[i] if positions is not None else 0
            mask[len(rows):, 0] = 1  # filler rows: one real token, results dropped
            emb = np.asarray(jax.device_get(self._forward(tok, mask, pos)))
            for r, i in enumerate(rows):
                out[i] = emb[r]
        return np.stack(out).astype(np.float32)

    def __call__(self, sentences: Sequence[str]) -> np.ndarray:
        emb = self.raw(sentences)
        if self.whitening is not None:
            emb = apply_whitening(self.whitening, emb)
        if self.normalize:
            emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
        return emb


# ---------------------------------------------------------------------------- loading

def make_tokenizer(source: Any, max_length: int) -> Any:
    """A tokenizer with ``encode``/``pad_id`` from a folder or a HF tokenizer object."""
    if isinstance(source, str):
        return HFTokenizer.from_folder(source, max_length)
    if hasattr(source, "encode") and hasattr(source, "pad_id"):
        return source
    return HFTokenizer(source, max_length)


def load_embedder(path: str, pooling: str = "mean", max_length: int = 128, batch_size: int = 64,
                  whitening: Optional[Whitening] = None, normalize: bool = False) -> Embedder:
    """An :class:`Embedder` for a pretrained model (a registry name such as ``minilm`` /
    ``smollm2``, a HF folder or a ``.gguf`` file; no delta)."""
    from peft_jax.models.registry import load_pretrained
    pre = load_pretrained(path)
    return Embedder(pre.build(), {"params": pre.base}, make_tokenizer(pre.tokenizer, max_length),
                    pooling=pooling,
                    batch_size=batch_size, whitening=whitening, normalize=normalize)


# ---------------------------------------------------------------------------- search

def semantic_search(queries: np.ndarray, corpus: np.ndarray, k: int = 10, normalize: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` corpus rows per query by inner product (cosine when ``normalize``).

    ``queries [q, d]``, ``corpus [n, d]`` -> ``(scores [q, k], indices [q, k])``, best first.
    """
    q = np.asarray(queries, np.float32)
    c = np.asarray(corpus, np.float32)
    if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
        raise ValueError(f"semantic_search: queries {q.shape} and corpus {c.shape} must be "
                         "[q, d] and [n, d] with the same d")
    if normalize:
        q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
        c = c / np.maximum(np.linalg.norm(c, axis=-1, keepdims=True), 1e-12)
    k = min(int(k), c.shape[0])
    scores = q @ c.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    return np.take_along_axis(top_scores, order, 1), np.take_along_axis(top, order, 1)


# ---------------------------------------------------------------------------- CLI

def read_sentences(path: str) -> list[str]:
    """One sentence per line (blank lines skipped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: input sentence file not found")
    with open(path, encoding="utf8") as f:
        sents = [line.rstrip("\n") for line in f]
    sents = [s for s in sents if s.strip()]
    if not sents:
        raise ValueError(f"{path}: no sentences (expected one sentence per line)")
    return sents


def embed_main(argv: Optional[Sequence[str]] = None) -> int:
    """``peft-jax embed --model PATH --input sentences.txt --output emb.npy [...]``."""
    p = argparse.ArgumentParser(prog="peft-jax embed",
                                description="Embed one sentence per line into an .npy [n, d].")
    p.add_argument("--model", required=True, help="minilm | smollm2 | HF model folder (BERT/RoBERTa/Llama) | .gguf")
    p.add_argument("--input", required=True, help="text file, one sentence per line")
    p.add_argument("--output", required=True, help="output .npy path")
    p.add_argument("--pooling", default="mean", choices=sorted(pooling_lib.POOLERS))
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--whitening", default=None, help="apply a whitening .npz (mu, W)")
    p.add_argument("--fit-whitening", default=None, metavar="PATH",
                   help="fit whitening on these sentences, save it to PATH and apply it")
    p.add_argument("--whitening-dim", type=int, default=None, help="k kept by --fit-whitening")
    p.add_argument("--flow", default=None, help="apply a BERT-flow .npz (peft_jax.contrastive.flow)")
    p.add_argument("--fit-flow", default=None, metavar="PATH",
                   help="fit BERT-flow on these sentences, save it to PATH and apply it")
    p.add_argument("--flow-steps", type=int, default=300, help="optimizer steps of --fit-flow")
    p.add_argument("--normalize", action="store_true", help="L2-normalize the output vectors")
    args = p.parse_args(argv)
    post = [f for f in ("whitening", "fit_whitening", "flow", "fit_flow") if getattr(args, f)]
    if len(post) > 1:
        p.error(f"--{post[0].replace('_', '-')} and --{post[1].replace('_', '-')} are exclusive "
                "(one post-processor)")
    sents = read_sentences(args.input)
    emb = load_embedder(args.model, pooling=args.pooling, max_length=args.max_length,
                        batch_size=args.batch_size)
    x = emb.raw(sents)
    if args.fit_whitening:
        w = fit_whitening(x, args.whitening_dim)
        save_whitening(args.fit_whitening, w)
        x = apply_whitening(w, x)
    elif args.whitening:
        x = apply_whitening(load_whitening(args.whitening), x)
    elif args.fit_flow or args.flow:
        from peft_jax.contrastive import flow
        if args.fit_flow:
            post_fn = flow.fit_flow(x, steps=args.flow_steps)
            flow.save_flow(args.fit_flow, post_fn)
        else:
            post_fn = flow.load_flow(args.flow)
        x = post_fn(x)
    if args.normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    np.save(args.output, x.astype(np.float32), allow_pickle=False)
    print(json.dumps({"sentences": len(sents), "shape": list(x.shape), "output": args.output}))
    return 0
