"""Positive-pair generators beyond dropout: ConSERT augmentations and DeCLUTR spans.

ConSERT (Yan et al. 2021) makes the two views of a sentence with data augmentations:

- :func:`token_shuffle` permutes the real tokens of each row (the first and last real token,
  e.g. ``[CLS]``/``[SEP]``, stay); shuffling the tokens is ConSERT's shuffle of position ids.
- :func:`token_cutoff` zeroes whole rows (tokens) of the input token-embedding matrix
  ``[b, l, d]``; :func:`feature_cutoff` zeroes whole columns (feature dimensions).
- adversarial attack: the embedding matrix plus ``eps * g / ||g||`` where ``g`` is the
  gradient of the loss with respect to the embeddings (in
  :class:`peft_jax.contrastive.objectives.ConSERT`).

Embedding-level augmentations act on the output of the model's token-embedding table through
a Flax method interceptor (:func:`perturb_input_embeddings`), so no model file changes.

DeCLUTR (Giorgi et al. 2021): anchor and positive are spans of the same longer document
(:func:`sample_spans`, :class:`SpanBatches`); the positive may overlap, be adjacent to or be
contained in the anchor.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.contrastive.batches import pad_rows
from peft_jax.models.layers import Embed

Array = Any
INF = jnp.inf


def _random_ranks(rng: Array, eligible: Array) -> Array:
    """Per row, a random order of the eligible positions: ``[b, l]`` ranks (0 = first);
    ineligible positions rank after every eligible one."""
    keys = jnp.where(eligible, jax.random.uniform(rng, eligible.shape), INF)
    order = jnp.argsort(keys, axis=1)
    return jnp.argsort(order, axis=1)


def inner_tokens(mask: Array) -> Array:
    """``[b, l]`` bool: real tokens except each row's first and last real token."""
    m = mask > 0
    idx = jnp.arange(mask.shape[1])[None, :]
    first = jnp.argmax(m, axis=1)[:, None]
    last = (mask.shape[1] - 1 - jnp.argmax(m[:, ::-1], axis=1))[:, None]
    return m & (idx > first) & (idx < last)


def token_shuffle(rng: Array, input_ids: Array, attention_mask: Array) -> Array:
    """``input_ids [b, l]`` with each row's inner real tokens randomly permuted in place."""
    eligible = inner_tokens(attention_mask)
    b, l = input_ids.shape
    idx = jnp.broadcast_to(jnp.arange(l)[None, :], (b, l))
    # slots: eligible positions in index order (then the rest, in order); perm: eligible
    # positions in random order (then the rest, in the same order): slots[k] <- ids[perm[k]]
    slots = jnp.argsort(jnp.where(eligible, idx, l + idx), axis=1)
    keys = jnp.where(eligible, jax.random.uniform(rng, (b, l)), 2.0 + idx / l)
    perm = jnp.argsort(keys, axis=1)
    rows = jnp.arange(b)[:, None]
    return input_ids.at[rows, slots].set(input_ids[rows, perm])


def cutoff_count(n: Array, rate: float) -> Array:
    """How many of ``n`` items a cutoff of ``rate`` erases: ``floor(rate * n)``, at least 1
    when ``n >= 2`` and ``rate > 0``."""
    k = jnp.floor(rate * n).astype(jnp.int32)
    return jnp.where((rate > 0) & (n >= 2), jnp.maximum(k, 1), k)


def token_cutoff(rng: Array, x: Array, attention_mask: Array, rate: float = 0.15) -> Array:
    """Zero ``floor(rate * n)`` random token rows of ``x [b, l, d]`` per row (inner real
    tokens only; ``n`` = their count)."""
    eligible = inner_tokens(attention_mask)
    k = cutoff_count(jnp.sum(eligible, axis=1), rate)
    cut = eligible & (_random_ranks(rng, eligible) < k[:, None])
    return jnp.where(cut[..., None], jnp.zeros((), x.dtype), x)


def feature_cutoff(rng: Array, x: Array, rate: float = 0.2) -> Array:
    """Zero ``floor(rate * d)`` random feature columns of ``x [b, l, d]`` per row."""
    b, _, d = x.shape
    k = cutoff_count(jnp.asarray(d), rate)
    cut = _random_ranks(rng, jnp.ones((b, d), bool)) < k
    return jnp.where(cut[:, None, :], jnp.zeros((), x.dtype), x)


@contextlib.contextmanager
def perturb_input_embeddings(fn: Callable[[Array], Array], vocab_size: int):
    """Within the context, the model's token-embedding lookup ``[b, l] -> [b, l, d]`` (the
    :class:`peft_jax.models.layers.Embed` with ``vocab_size`` rows) returns ``fn(x)``;
    position / token-type tables and the tied LM head (``attend``) are untouched."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if (context.method_name == "__call__" and isinstance(mod, Embed)
                and mod.num_embeddings == vocab_size):
            return fn(out)
        return out

    with nn.intercept_methods(interceptor):
        yield


# ----------------------------------------------------------------------------- DeCLUTR spans

def sample_spans(rng: np.random.Generator, n_tokens: int, min_len: int, max_len: int
                 ) -> tuple[tuple[int, int], tuple[int, int]]:
    """DeCLUTR's anchor and positive ``(start, end)`` spans of a document of ``n_tokens``.

    Anchor length ~ uniform in ``[min_len, max_len]`` (capped by the document); the positive
    has its own length in ``[min_len, anchor length]`` and starts anywhere within
    ``[anchor start - positive length, anchor end]`` (clipped to the document): overlapping,
    adjacent or contained, as DeCLUTR's sampling allows.
    """
    if n_tokens < min_len:
        raise ValueError(f"DeCLUTR: a document of {n_tokens} tokens is shorter than the "
                         f"minimum span length {min_len}")
    la = int(rng.integers(min_len, min(max_len, n_tokens) + 1))
    sa = int(rng.integers(0, n_tokens - la + 1))
    lp = int(rng.integers(min_len, la + 1))
    lo, hi = max(0, sa - lp), min(n_tokens - lp, sa + la)
    sp = int(rng.integers(lo, hi + 1))
    return (sa, sa + la), (sp, sp + lp)


class SpanBatches:
    """Endless batches of DeCLUTR span pairs from tokenized documents: anchor
    ``input_ids``/``attention_mask`` and positive ``pos_input_ids``/``pos_attention_mask``,
    each ``[b, max_length]``; ``bos``/``eos`` (e.g. ``[CLS]``/``[SEP]``) wrap every span.
    Resumable (``get_state``/``set_state``: the number of batches drawn)."""

    def __init__(self, doc_ids: Sequence[Sequence[int]], batch_size: int, max_length: int,
                 pad_id: int, min_len: int, max_len: int, bos: Sequence[int] = (),
                 eos: Sequence[int] = (), seed: int = 0):
        self.bos, self.eos = list(bos), list(eos)
        room = max_length - len(self.bos) - len(self.eos)
        if max_len > room:
            raise ValueError(f"DeCLUTR: max span length {max_len} + special tokens exceeds "
                             f"max_length={max_length}")
        self.docs = [list(d) for d in doc_ids if len(d) >= min_len]
        if len(self.docs) < batch_size:
            raise ValueError(f"DeCLUTR needs at least batch_size={batch_size} documents of "
                             f">= {min_len} tokens, got {len(self.docs)}")
        self.batch_size, self.max_length, self.pad_id = batch_size, max_length, pad_id
        self.min_len, self.max_len, self.seed, self.drawn = min_len, max_len, seed, 0

    def get_state(self) -> dict:
        return {"drawn": self.drawn}

    def set_state(self, state: dict) -> None:
        self.drawn = int(state["drawn"])

    def __iter__(self) -> Iterator[dict]:
        return self

    def peek(self) -> dict:
        """The next batch without moving the position."""
        drawn = self.drawn
        out = next(self)
        self.drawn = drawn
        return out

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, self.drawn])
        self.drawn += 1
        rows = rng.choice(len(self.docs), self.batch_size, replace=False)
        anchors, positives = [], []
        for r in rows:
            doc = self.docs[int(r)]
            (a0, a1), (p0, p1) = sample_spans(rng, len(doc), self.min_len, self.max_len)
            anchors.append(self.bos + doc[a0:a1] + self.eos)
            positives.append(self.bos + doc[p0:p1] + self.eos)
        ids, mask = pad_rows(anchors, self.max_length, self.pad_id)
        pids, pmask = pad_rows(positives, self.max_length, self.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "pos_input_ids": pids,
                "pos_attention_mask": pmask}


def special_ends(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer's ``encode`` puts before / after a text (``[CLS]`` / ``[SEP]`` for
    BERT; often none for decoders), read off by encoding ``"a"`` and ``"a a"``."""
    e1, e2 = (list(t) for t in tokenizer.encode(["a", "a a"]))
    k = len(e2) - len(e1)
    for i in range(len(e1) - k + 1):
        if k > 0 and e1[:i] + e1[i:i + k] * 2 + e1[i + k:] == e2:
            return e1[:i], e1[i + k:]
    return [], []


def plain_ids(tokenizer: Any, texts: Sequence[str], limit: Optional[int] = None) -> list[list[int]]:
    """Token ids of ``texts`` without special tokens (documents for :class:`SpanBatches`)."""
    tok = getattr(tokenizer, "tok", None)
    if tok is None:   # a tokenizer with encode() only: strip the ends it adds
        bos, eos = special_ends(tokenizer)
        out = [t[len(bos):len(t) - len(eos)] for t in tokenizer.encode(texts)]
    else:
        out = tok(list(texts), add_special_tokens=False)["input_ids"]
    return [list(t)[:limit] if limit else list(t) for t in out]
