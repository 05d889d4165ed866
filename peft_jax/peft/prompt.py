"""Prompt tuning (Lester et al., 2021): ``length`` trainable input embeddings.

The method fills the ``input_embeddings`` slot: a ``prompt`` leaf ``[P, d]`` lives at the
module that calls the slot (the model root for every family), and is inserted into each
sequence ``[b, l, d] -> [b, l + P, d]`` before the first token (``placement='prefix'``,
Hugging Face PEFT's layout), right after the first token (``'after_bos'``) or after the
last position (``'suffix'``; appended after any right padding). Inserted positions are real
tokens for the attention mask.

Initializers are pure functions over the base model's embedding table ``[vocab, d]``
(``uniform``, :func:`sampled_vocab`, :func:`class_labels`, :func:`text`, :func:`from_file`);
:meth:`PromptTuning.finalize_delta` (run by ``init_delta``) applies the configured one, and
:func:`set_prompt` places any ``[P, d]`` array into a delta.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.models.slots import Insert

Array = Any

PLACEMENTS = ("prefix", "after_bos", "suffix")
INITS = ("uniform", "sampled_vocab", "class_labels", "text", "file")
# Tokenizer families whose ids are NOT ordered by frequency (so top-k ids are not the most
# frequent tokens without an explicit ranking).
UNORDERED_TOKENIZERS = ("bpe", "wordpiece")


# ----------------------------------------------------------------------------- initializers


def uniform(rng: Array, length: int, d: int, scale: float = 0.5) -> Array:
    """``[length, d]`` drawn from ``U(-scale, scale)`` (Lester et al.'s random init)."""
    return jax.random.uniform(rng, (length, d), jnp.float32, -scale, scale)


def sampled_vocab(table: Array, length: int, rng: Array, top_k: int = 5000,
                  ranking: Optional[Sequence[int]] = None,
                  tokenizer_kind: Optional[str] = None) -> Array:
    """Rows of ``table [vocab, d]`` sampled without replacement from the ``top_k`` most
    frequent token ids -> ``[length, d]``.

    Token ids are taken as frequency-ordered (id 0 most frequent) unless ``ranking`` (ids
    sorted by decreasing frequency, e.g. from counting a corpus or a frequency file) is
    given. SentencePiece vocabularies (T5, Llama) are roughly frequency-ordered by
    construction; BPE (GPT-2, RoBERTa) and WordPiece (BERT) ids are NOT, so for those
    (``tokenizer_kind='bpe'|'wordpiece'``) a missing ``ranking`` gives a warning.
    """
    vocab = table.shape[0]
    if ranking is None:
        if tokenizer_kind is not None and tokenizer_kind.lower() in UNORDERED_TOKENIZERS:
            warnings.warn(f"sampled_vocab: {tokenizer_kind} token ids are not frequency-ordered; "
                          "pass ranking= (ids sorted by corpus frequency) to sample frequent tokens",
                          stacklevel=2)
        pool = np.arange(min(top_k, vocab))
    else:
        pool = np.asarray(list(ranking), np.int64)[:top_k]
        if pool.size and (pool.min() < 0 or pool.max() >= vocab):
            raise ValueError(f"sampled_vocab: ranking contains ids outside [0, {vocab})")
    if length > pool.size:
        raise ValueError(f"sampled_vocab: cannot sample {length} distinct rows from the "
                         f"top_k={pool.size} candidate ids")
    ids = jax.random.choice(rng, jnp.asarray(pool), (length,), replace=False)
    return jnp.take(jnp.asarray(table, jnp.float32), ids, axis=0)


def class_labels(table: Array, label_token_ids: Sequence[Sequence[int]], length: int,
                 rng: Array, top_k: int = 5000, ranking: Optional[Sequence[int]] = None) -> Array:
    """Row ``i`` = mean embedding of label ``i``'s sub-tokens; remaining rows
    :func:`sampled_vocab` -> ``[length, d]`` (Lester et al.'s class-label init)."""
    labels = [list(ids) for ids in label_token_ids]
    if not labels or any(len(ids) == 0 for ids in labels):
        raise ValueError("class_labels: label_token_ids must be a non-empty list of non-empty "
                         "token id lists")
    if len(labels) > length:
        raise ValueError(f"class_labels: {len(labels)} labels do not fit in a prompt of "
                         f"length {length}")
    tab = jnp.asarray(table, jnp.float32)
    rows = [jnp.mean(jnp.take(tab, jnp.asarray(ids), axis=0), axis=0) for ids in labels]
    head = jnp.stack(rows)
    if len(labels) == length:
        return head
    rest = sampled_vocab(tab, length - len(labels), rng, top_k, ranking)
    return jnp.concatenate([head, rest], axis=0)


def text(table: Array, token_ids: Sequence[int], length: int) -> Array:
    """Embeddings of ``token_ids``, repeated to fill / truncated to ``length`` -> ``[length, d]``
    (Hugging Face PEFT's ``PromptTuningInit.TEXT``)."""
    ids = list(token_ids)
    if not ids:
        raise ValueError("text: token_ids is empty")
    reps = -(-length // len(ids))
    ids = (ids * reps)[:length]
    return jnp.take(jnp.asarray(table, jnp.float32), jnp.asarray(ids), axis=0)


def from_file(path: str, length: int, allow_resize: Optional[str] = None,
              d: Optional[int] = None) -> Array:
    """A ``[length, d]`` prompt from a ``.npy`` file (no pickle).

    A different number of rows is an error naming the file and both shapes, unless
    ``allow_resize='truncate'`` (keep the first rows; needs at least ``length``) or
    ``'tile'`` (repeat rows cyclically, then truncate). ``d``: the expected width (the
    model's ``d_model``); a different width is always an error.
    """
    if allow_resize not in (None, "truncate", "tile"):
        raise ValueError(f"from_file: allow_resize={allow_resize!r}; expected None, 'truncate' "
                         "or 'tile'")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"from_file: prompt file {path!r} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # bad header, object arrays, ...
        raise ValueError(f"from_file: cannot read {path!r} as a .npy array ({e})") from None
    want = (length, d if d is not None else (arr.shape[-1] if arr.ndim else -1))
    if arr.ndim != 2 or (d is not None and arr.shape[1] != d):
        raise ValueError(f"from_file: {path!r} holds a prompt of shape {arr.shape}, expected "
                         f"{want}")
    if arr.shape[0] != length:
        if allow_resize is None:
            raise ValueError(f"from_file: {path!r} holds a prompt of shape {arr.shape}, expected "
                             f"{want}; pass allow_resize='truncate' or 'tile' to resize")
        if allow_resize == "truncate":
            if arr.shape[0] < length:
                raise ValueError(f"from_file: cannot truncate {path!r} of shape {arr.shape} to "
                                 f"{want} (too few rows; use allow_resize='tile')")
            arr = arr[:length]
        else:
            arr = np.concatenate([arr] * (-(-length // arr.shape[0])), axis=0)[:length]
    return jnp.asarray(arr, jnp.float32)


# ----------------------------------------------------------------------------- delta helpers


def embedding_table(base: Mapping) -> Array:
    """The word embedding table ``[vocab, d]`` of any family's base pytree
    (``embeddings/word_embeddings``, ``embed_tokens`` or ``shared``)."""
    for path in (("embeddings", "word_embeddings", "embedding"), ("embed_tokens", "embedding"),
                 ("shared", "embedding")):
        node: Any = base
        for k in path:
            node = node.get(k) if isinstance(node, Mapping) else None
            if node is None:
                break
        if node is not None:
            return getattr(node, "value", node)
    raise KeyError("no word embedding table found in the base params (looked for "
                   "embeddings/word_embeddings, embed_tokens, shared)")


def _prompt_paths(delta: Mapping, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in delta.items():
        if isinstance(v, Mapping):
            out += _prompt_paths(v, prefix + (k,))
        elif k == "prompt":
            out.append(prefix + (k,))
    return out


def set_prompt(delta: Mapping, array: Array, path: Optional[Sequence[str]] = None) -> dict:
    """A copy of ``delta`` whose ``prompt`` leaf is ``array`` ``[P, d]`` (shape must match).

    ``path``: the leaf's path when the delta has several prompts (default: the only one).
    """
    paths = [tuple(path)] if path is not None else _prompt_paths(delta)
    if len(paths) != 1:
        raise ValueError(f"set_prompt: expected exactly one 'prompt' leaf, found {paths}; pass path=")
    p = paths[0]
    out = _copy(delta)
    node = out
    for k in p[:-1]:
        node = node[k]
    old = node.get(p[-1])
    if old is None:
        raise KeyError(f"set_prompt: no leaf {'/'.join(p)!r} in the delta")
    array = jnp.asarray(array)
    if tuple(array.shape) != tuple(old.shape):
        raise ValueError(f"set_prompt: prompt {'/'.join(p)!r} has shape {tuple(old.shape)}, got "
                         f"an array of shape {tuple(array.shape)}")
    node[p[-1]] = array.astype(old.dtype)
    return out


def _copy(tree: Mapping) -> dict:
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


# ----------------------------------------------------------------------------- the method


@dataclasses.dataclass(frozen=True)
class PromptTuning:
    """Soft prompt of ``length`` vectors (leaf ``prompt [length, d]``).

    ``init``: ``'uniform'`` (``U(-init_scale, init_scale)``), ``'sampled_vocab'`` (rows of
    the ``top_k`` most frequent ids; ``ranking`` / ``tokenizer_kind`` as in
    :func:`sampled_vocab`), ``'class_labels'`` (``label_token_ids``), ``'text'``
    (``text_token_ids``) or ``'file'`` (``init_file``, ``allow_resize``).
    """

    length: int = 20
    placement: str = "prefix"
    init: str = "uniform"
    init_scale: float = 0.5
    top_k: int = 5000
    ranking: Optional[tuple] = None
    tokenizer_kind: Optional[str] = None
    label_token_ids: tuple = ()
    text_token_ids: tuple = ()
    init_file: Optional[str] = None
    allow_resize: Optional[str] = None

    def __post_init__(self):
        if int(self.length) < 1:
            raise ValueError(f"PromptTuning.length={self.length!r} must be >= 1")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"PromptTuning.placement={self.placement!r}; supported: {list(PLACEMENTS)}")
        if self.init not in INITS:
            raise ValueError(f"PromptTuning.init={self.init!r}; supported: {list(INITS)}")
        # Hashable (Flax module fields): lists -> tuples.
        object.__setattr__(self, "label_token_ids",
                           tuple(tuple(int(i) for i in ids) for ids in self.label_token_ids))
        object.__setattr__(self, "text_token_ids", tuple(int(i) for i in self.text_token_ids))
        if self.ranking is not None:
            object.__setattr__(self, "ranking", tuple(int(i) for i in self.ranking))
        if self.init == "class_labels" and not self.label_token_ids:
            raise ValueError("PromptTuning.init='class_labels' needs label_token_ids")
        if self.init == "text" and not self.text_token_ids:
            raise ValueError("PromptTuning.init='text' needs text_token_ids")
        if self.init == "file" and not self.init_file:
            raise ValueError("PromptTuning.init='file' needs init_file")

    @property
    def insert_at(self) -> int:
        return {"prefix": 0, "after_bos": 1, "suffix": -1}[self.placement]

    def input_embeddings(self, module, embeds: Array, mask: Array, deterministic: bool = True
                         ) -> tuple[Array, Array, Insert]:
        """``[b, l, d]``, ``[b, l]`` -> ``[b, l + P, d]``, ``[b, l + P]``, the Insert."""
        b, _, d = embeds.shape
        scale = self.init_scale
        prompt = module.variable("peft", "prompt",
                                 lambda: uniform(module.make_rng("params"), self.length, d, scale))
        p = jnp.broadcast_to(jnp.asarray(prompt.value, embeds.dtype)[None], (b, self.length, d))
        ins = Insert(self.insert_at, self.length)
        if ins.at == -1:
            embeds = jnp.concatenate([embeds, p], axis=1)
        else:
            embeds = jnp.concatenate([embeds[:, :ins.at], p, embeds[:, ins.at:]], axis=1)
        return embeds, ins.apply(mask, 1), ins

    def initial_prompt(self, base: Mapping, rng: Array) -> Optional[Array]:
        """The configured initialization ``[P, d]`` (None for ``'uniform'``, done in the hook)."""
        if self.init == "uniform":
            return None
        table = embedding_table(base)
        if self.init == "file":
            return from_file(self.init_file, self.length, self.allow_resize, d=table.shape[1])
        if self.init == "sampled_vocab":
            return sampled_vocab(table, self.length, rng, self.top_k, self.ranking,
                                 self.tokenizer_kind)
        if self.init == "class_labels":
            return class_labels(table, self.label_token_ids, self.length, rng, self.top_k,
                                self.ranking)
        return text(table, self.text_token_ids, self.length)

    def finalize_delta(self, delta: Mapping, base: Mapping, rng: Array) -> dict:
        """Post-init step of ``init_delta``: apply the configured initializer."""
        init = self.initial_prompt(base, rng)
        if init is None:
            return dict(delta)
        return set_prompt(delta, init)

    def validate(self, delta: Mapping, dense_paths: Sequence[str]) -> None:
        if not _prompt_paths(delta):
            raise ValueError("PromptTuning: the model never called the input_embeddings slot "
                             "(no 'prompt' leaf was created)")
