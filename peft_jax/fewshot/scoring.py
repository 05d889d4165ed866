"""Multi-token label words for causal LMs: per-candidate teacher forcing.

A causal LM sees only the prompt when it predicts the answer's first token; later tokens of
a multi-token label word need the earlier ones in the input. Each (class, word) candidate is
appended after the answer position and its score is the sum of its tokens' log-probabilities
(Schick & Schütze's PET for multi-token verbalizers; the single-token case reduces to
``peft_jax.train.forward.label_word_scores``). A class's words are combined by log-mean-exp.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = Any


def candidate_inputs(input_ids: Array, attention_mask: Array, pos: Array, word: Array
                     ) -> tuple[Array, Array]:
    """Inputs with ``word [T]`` (-1 = padding) written after the answer position.

    ``input_ids``/``attention_mask [b, l]``, ``pos [b]``: index of the last prompt token
    (whose logits predict the answer). Returns ``[b, l + T]`` arrays: the prompt up to
    ``pos``, then the word's first T-1 tokens (teacher forcing), nothing after.
    """
    b, l = input_ids.shape
    t = word.shape[0]
    ids = jnp.concatenate([input_ids, jnp.zeros((b, t), input_ids.dtype)], axis=1)
    j = jnp.arange(l + t)[None, :]
    off = j - pos[:, None] - 1                                   # index into the word
    w = jnp.maximum(word, 0)
    in_word = (off >= 0) & (off < t - 1) & (word[jnp.clip(off, 0, t - 1)] >= 0)
    ids = jnp.where(in_word, w[jnp.clip(off, 0, t - 1)], ids)
    mask = jnp.concatenate([attention_mask, jnp.zeros((b, t), attention_mask.dtype)], axis=1)
    mask = jnp.where(off < 0, mask, in_word.astype(mask.dtype))
    ids = jnp.where((off < 0) | in_word, ids, 0)
    return ids, mask


def word_logprob(logits: Array, pos: Array, word: Array) -> Array:
    """Sum of log p(word tokens) ``[b]`` from logits ``[b, l, V]`` of a candidate input:
    token i of the word is scored at position ``pos + i``."""
    t = word.shape[0]
    idx = pos[:, None] + jnp.arange(t)[None, :]                  # [b, T]
    lp = jax.nn.log_softmax(jnp.take_along_axis(
        logits, jnp.minimum(idx, logits.shape[1] - 1)[:, :, None], axis=1).astype(jnp.float32), -1)
    tok = jnp.take_along_axis(lp, jnp.maximum(word, 0)[None, :, None].repeat(lp.shape[0], 0), -1)[..., 0]
    return jnp.sum(jnp.where(word[None] >= 0, tok, 0.0), axis=-1)


def multi_token_scores(logits_fn: Callable[[Array, Array], Array], input_ids: Array,
                       attention_mask: Array, pos: Array, label_word_ids: Array) -> Array:
    """Class scores ``[b, C]`` by teacher forcing every candidate word.

    ``logits_fn(ids [b, l'], mask [b, l']) -> [b, l', V]`` (e.g. a closure over
    ``model.apply``); ``pos [b]`` the answer position; ``label_word_ids [C, W, T]``
    (-1 = padding; a word of all -1 is absent). One forward pass per candidate word.
    """
    lw = jnp.asarray(label_word_ids)
    c, w, _ = lw.shape
    out = []
    for ci in range(c):
        words = []
        for wi in range(w):
            word = lw[ci, wi]
            ids, mask = candidate_inputs(input_ids, attention_mask, pos, word)
            words.append(word_logprob(logits_fn(ids, mask), pos, word))
        words = jnp.stack(words, axis=-1)                           # [b, W]
        real = jnp.any(lw[ci] >= 0, axis=-1)[None]
        words = jnp.where(real, words, -jnp.inf)
        out.append(jax.nn.logsumexp(words, axis=-1) - jnp.log(jnp.sum(real)))
    return jnp.stack(out, axis=-1)
