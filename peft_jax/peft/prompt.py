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

from peft_jax.models.hf_io import CheckpointError
from peft_jax.models.slots import Insert
from peft_jax.peft import hf_peft, tree
from peft_jax.peft.method import BuildContext, HfNames, PeftMethod, internal, option, register

Array = Any

PLACEMENTS = ("prefix", "after_bos", "suffix")
INITS = ("uniform", "sampled_vocab", "class_labels", "text", "file")
RANKINGS = ("auto", "ids", "corpus")
RESIZES = ("", "truncate", "tile")
RESIZE_MODES = ("exact", "truncate", "tile")
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
                          "set config.peft.prompt.ranking=corpus (ranking= in Python: ids sorted "
                          "by corpus frequency) to sample frequent tokens",
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


def fit_length(source: np.ndarray, length: int, mode: str = "exact") -> np.ndarray:
    """``[Ps, d]`` -> ``[length, d]``: ``exact`` needs ``Ps == length``; ``truncate`` keeps
    the first rows (needs ``Ps >= length``); ``tile`` repeats rows cyclically, then cuts."""
    mode = mode or "exact"
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown length mode {mode!r}; choose one of {RESIZE_MODES}")
    ps = source.shape[0]
    if ps == length:
        return source
    if mode == "exact":
        raise ValueError(f"source prompt has length {ps} but the target prompt has length "
                         f"{length}; resize it: truncate (keep the first tokens) or tile (repeat "
                         "tokens) - config.peft.prompt.resize")
    if mode == "truncate":
        if ps < length:
            raise ValueError(f"cannot truncate a length-{ps} source prompt to the longer target "
                             f"length {length} (too few rows); use tile")
        return source[:length]
    return np.concatenate([source] * (-(-length // ps)), axis=0)[:length]


def from_file(path: str, length: int, resize: Optional[str] = None,
              d: Optional[int] = None) -> Array:
    """A ``[length, d]`` prompt from a ``.npy`` file (no pickle; ``config.peft.prompt.file``).

    A different number of rows is an error naming the file and both shapes, unless
    ``resize`` is ``'truncate'`` or ``'tile'`` (:func:`fit_length`;
    ``config.peft.prompt.resize``). ``d``: the expected width (the model's ``d_model``); a
    different width is always an error, as is a NaN or Inf anywhere in the file (named as
    the cause, with its row). Errors are :class:`~peft_jax.models.hf_io.CheckpointError`.
    """
    where = f"config.peft.prompt.file={path!r}"
    if not os.path.isfile(path):
        raise CheckpointError(f"{where}: no such file")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # bad header, object arrays, ...
        raise CheckpointError(f"{where}: cannot read it as a .npy array ({e})") from None
    want = (length, d if d is not None else (arr.shape[-1] if arr.ndim else -1))
    if arr.ndim != 2 or (d is not None and arr.shape[1] != d):
        raise CheckpointError(f"{where}: holds a prompt of shape {arr.shape}, expected {want} "
                              "([config.peft.prompt.length, the model's d_model])")
    if arr.dtype.kind not in "fiu":
        raise CheckpointError(f"{where}: holds {arr.dtype} values, not numbers")
    bad = np.argwhere(~np.isfinite(arr)) if arr.dtype.kind == "f" else np.zeros((0, 2), int)
    if len(bad):
        r, c = (int(v) for v in bad[0])
        raise CheckpointError(f"{where}: holds {len(bad)} NaN/Inf value(s) (first at row {r}, "
                              f"column {c}: {arr[r, c]}); a prompt initialized from it would make "
                              "every loss NaN")
    try:
        arr = fit_length(arr, length, resize or "exact")
    except ValueError as e:
        raise CheckpointError(f"{where}: holds a prompt of shape {arr.shape} (expected {want}): "
                              f"{e}") from None
    return jnp.asarray(arr, jnp.float32)


# ----------------------------------------------------------------------------- vocabulary


def tokenizer_kind(tokenizer) -> str:
    """'sentencepiece' (ids roughly frequency-ordered), 'wordpiece' or 'bpe'."""
    name = type(tokenizer).__name__.lower()
    model = ""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        model = type(backend.model).__name__.lower()
    if "unigram" in model or "t5" in name or "sentencepiece" in name:
        return "sentencepiece"
    if "wordpiece" in model or "bert" in name:
        return "wordpiece"
    return "bpe"


def corpus_ranking(tokenizer, texts: Sequence[str]) -> tuple[int, ...]:
    """Token ids sorted by decreasing count over ``texts`` (ties: smaller id first)."""
    counts: dict[int, int] = {}
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
    return tuple(sorted(counts, key=lambda i: (-counts[i], i)))


def word_ids(tokenizer, word: str, kind: str) -> tuple[int, ...]:
    """Sub-token ids of ``word`` as it appears after a space (BPE) or alone."""
    text = " " + word if kind == "bpe" else word
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- delta helpers


def embedding_table(base: Mapping) -> Array:
    """The word embedding table ``[vocab, d]`` of any family's base pytree
    (``embeddings/word_embeddings``, ``embed_tokens`` or ``shared``)."""
    for path in ("embeddings/word_embeddings/embedding", "embed_tokens/embedding",
                 "shared/embedding"):
        try:
            node = tree.get(base, path)
        except KeyError:
            continue
        return getattr(node, "value", node)
    raise KeyError("no word embedding table found in the base params (looked for "
                   "embeddings/word_embeddings, embed_tokens, shared)")


def place_prompt(delta: Mapping, source: Any, *, path: Optional[str] = None,
                 mode: str = "exact", cast: bool = False) -> dict:
    """A copy of ``delta`` whose ``prompt`` leaf ``[P, d]`` is ``source`` ``[Ps, d]``, fitted
    to ``P`` by ``mode`` (:func:`fit_length`); the one way a prompt enters a delta (config
    inits, ``init=file``, SPoT transfer).

    ``path``: the leaf's '/'-joined path when the delta holds several prompts. Bit-exact:
    another dtype is an error unless ``cast``. The new leaf keeps the old one's kind: a
    ``jax.Array`` keeps its sharding, numpy stays numpy, a boxed leaf keeps its axis names.
    The input delta is not modified.
    """
    flat = tree.flatten(delta)
    if path is None:
        found = [p for p in flat if tree.leaf_name(p) == "prompt"]
        if not found:
            raise ValueError(f"delta has no 'prompt' leaf (is a soft-prompt method active?); "
                             f"leaves: {list(flat)[:10]}")
        if len(found) > 1:
            raise ValueError(f"delta has several prompt leaves {found}; pass path=")
        path = found[0]
    if path not in flat:
        raise ValueError(f"delta has no leaf {path!r}; prompt leaves: "
                         f"{[p for p in flat if tree.leaf_name(p) == 'prompt']}")
    box = flat[path]
    boxed = hasattr(box, "unbox") and hasattr(box, "replace_boxed")  # flax nn.Partitioned etc.
    leaf = box.unbox() if boxed else box
    src = np.asarray(source)
    if src.ndim != 2 or len(leaf.shape) != 2:
        raise ValueError(f"{path}: expected [length, d_model] prompts, source {src.shape} vs "
                         f"target {tuple(leaf.shape)}")
    if src.shape[1] != leaf.shape[1]:
        raise ValueError(f"{path}: source prompt width d_model={src.shape[1]} differs from the "
                         f"target's {leaf.shape[1]} (a prompt from another base model)")
    src = fit_length(src, int(leaf.shape[0]), mode)
    if src.dtype != np.dtype(leaf.dtype):
        if not cast:
            raise ValueError(f"{path}: source prompt dtype {src.dtype} differs from the target's "
                             f"{np.dtype(leaf.dtype)}; pass cast=True to convert (not bit-exact)")
        src = src.astype(leaf.dtype)
    src = np.array(src, copy=True)
    if not isinstance(leaf, np.ndarray):
        sharding = getattr(leaf, "sharding", None)
        src = jax.device_put(src, sharding) if sharding is not None else jnp.asarray(src)
    flat[path] = box.replace_boxed(src) if boxed else src
    return tree.unflatten(flat)


def set_prompt(delta: Mapping, array: Array, path: Optional[str] = None) -> dict:
    """``delta`` with its ``prompt`` leaf set to ``array`` of the same shape (cast to the
    leaf's dtype): :func:`place_prompt` without resizing."""
    prompts = {p: v for p, v in tree.flatten(delta).items() if tree.leaf_name(p) == "prompt"}
    key = path or (next(iter(prompts)) if len(prompts) == 1 else None)
    if key in prompts and tuple(np.shape(array)) != tuple(prompts[key].shape):
        raise ValueError(f"set_prompt: prompt {key!r} has shape {tuple(prompts[key].shape)}, "
                         f"got an array of shape {tuple(np.shape(array))}")
    return place_prompt(delta, np.asarray(array), path=path, cast=True)


# ----------------------------------------------------------------------------- the method


@register
@dataclasses.dataclass(frozen=True)
class PromptTuning(PeftMethod):
    """Soft prompt of ``length`` vectors (leaf ``prompt [length, d]``).

    ``init``: ``'uniform'`` (``U(-init_scale, init_scale)``), ``'sampled_vocab'`` (rows of
    the ``top_k`` most frequent ids; ``ranking`` as in :func:`sampled_vocab`),
    ``'class_labels'`` (the task's label words), ``'text'`` (``text``) or ``'file'``
    (``file``, ``resize``). ``from_config`` resolves the token ids these need
    (``ranking_ids``, ``label_token_ids``, ``text_token_ids``) with the tokenizer.
    """

    name = "prompt"
    peft_type = "PROMPT_TUNING"
    lr_group = "prompt"

    length: int = option(20, "number of soft-prompt vectors")
    placement: str = option("prefix", "prefix | after_bos | suffix")
    init: str = option("uniform", "uniform | sampled_vocab | class_labels | text | file",
                       init_only=True)
    init_scale: float = option(0.5, "uniform init range [-init_scale, init_scale]",
                               init_only=True)
    top_k: int = option(5000, "sampled_vocab: sample from the top_k most frequent ids",
                        init_only=True)
    ranking: str = option("auto", "sampled_vocab: ids (ids are frequency-ordered), corpus "
                                  "(rank ids by counts over the training texts), auto",
                          init_only=True)
    text: str = option("", "init=text: the text whose token embeddings start the prompt",
                       init_only=True)
    file: str = option("", "init=file: an .npy [length, d] (SPoT transfer)", init_only=True)
    resize: str = option("", "init=file with another length: '' (error) | truncate | tile",
                         init_only=True)
    ranking_ids: Optional[tuple] = internal(None, "resolved frequency ranking of token ids")
    tokenizer_kind: Optional[str] = internal(None, "sentencepiece | wordpiece | bpe")
    label_token_ids: tuple = internal((), "class_labels: sub-token ids per class")
    text_token_ids: tuple = internal((), "text: token ids")

    def __post_init__(self):
        self.check_int("length", 1)
        self.check_int("top_k", 1)
        if self.placement not in PLACEMENTS:
            self.fail("placement", f"choose one of {list(PLACEMENTS)}")
        if self.init not in INITS:
            self.fail("init", f"choose one of {list(INITS)}")
        if self.ranking not in RANKINGS:
            self.fail("ranking", f"choose one of {list(RANKINGS)}")
        if self.resize not in RESIZES:
            self.fail("resize", f"choose one of {list(RESIZES)}")
        # Hashable (Flax module fields): lists -> tuples.
        object.__setattr__(self, "label_token_ids",
                           tuple(tuple(int(i) for i in ids) for ids in self.label_token_ids))
        object.__setattr__(self, "text_token_ids", tuple(int(i) for i in self.text_token_ids))
        if self.ranking_ids is not None:
            object.__setattr__(self, "ranking_ids", tuple(int(i) for i in self.ranking_ids))
        if self.init == "class_labels":
            if not self.label_token_ids:
                self.fail("init", "class_labels needs label words (config.task.label_words or "
                                  "a task with a default verbalizer)")
            if len(self.label_token_ids) > self.length:
                self.fail("length", f"init='class_labels' puts one vector per class: "
                                    f"{len(self.label_token_ids)} classes do not fit in "
                                    f"{self.length} prompt vectors")
        if self.init == "text" and not (self.text_token_ids or self.text):
            self.fail("text", "init='text' needs config.peft.prompt.text")
        if self.init == "file" and not self.file:
            self.fail("file", "init='file' needs config.peft.prompt.file (an .npy)")

    @classmethod
    def from_config(cls, section, ctx: BuildContext = BuildContext()) -> "PromptTuning":
        """Resolve the token ids the configured initializer needs (with ``ctx.tokenizer``)."""
        kw = cls.kwargs_from_config(section)
        tok, init = ctx.tokenizer, kw.get("init", "uniform")
        if tok is not None and init in ("sampled_vocab", "class_labels"):
            kind = tokenizer_kind(tok)
            kw["tokenizer_kind"] = kind
            ranking = kw.get("ranking", "auto")
            if (ranking == "corpus" or (ranking == "auto" and kind != "sentencepiece")) \
                    and ctx.train_texts is not None:
                kw["ranking_ids"] = corpus_ranking(tok, ctx.train_texts())
        if init == "class_labels" and tok is not None and ctx.label_words:
            kind = kw.get("tokenizer_kind") or tokenizer_kind(tok)
            kw["label_token_ids"] = tuple(word_ids(tok, ws[0], kind) for ws in ctx.label_words)
        if init == "text" and tok is not None:
            kw["text_token_ids"] = tuple(tok(kw.get("text", ""), add_special_tokens=False)["input_ids"])
        return cls(**kw)

    @property
    def insert_at(self) -> int:
        return {"prefix": 0, "after_bos": 1, "suffix": -1}[self.placement]

    def owns(self, path: str) -> bool:
        return tree.leaf_name(path) == "prompt"

    def inserted_before(self, position: int) -> int:
        at = self.insert_at
        return int(self.length) if at != -1 and at <= position else 0

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
            return from_file(self.file, self.length, self.resize or None, d=table.shape[1])
        if self.init == "sampled_vocab":
            return sampled_vocab(table, self.length, rng, self.top_k, self.ranking_ids,
                                 self.tokenizer_kind)
        if self.init == "class_labels":
            return class_labels(table, self.label_token_ids, self.length, rng, self.top_k,
                                self.ranking_ids)
        if not self.text_token_ids:
            self.fail("text", "init='text' needs the text's token ids (built by from_config "
                              "with the tokenizer, or pass text_token_ids=)")
        return text(table, self.text_token_ids, self.length)

    def finalize_delta(self, delta: Mapping, base: Mapping, rng: Array) -> dict:
        """Post-init step of ``init_delta``: apply the configured initializer."""
        init = self.initial_prompt(base, rng)
        if init is None:
            return dict(delta)
        if isinstance(init, jax.core.Tracer):   # traced (abstract state for a restore): shapes only
            flat = tree.flatten(delta)
            path = next(p for p in flat if tree.leaf_name(p) == "prompt")
            flat[path] = jnp.asarray(init, flat[path].dtype).reshape(flat[path].shape)
            return tree.unflatten(flat)
        return set_prompt(delta, init)

    def validate(self, delta: Mapping, dense_paths: Sequence[str]) -> None:
        if not tree.leaves_named(delta, "prompt"):
            raise ValueError("PromptTuning: the model never called the input_embeddings slot "
                             "(no 'prompt' leaf was created)")

    # -- HF PEFT

    def to_hf_peft(self, delta: Mapping, names: HfNames) -> tuple[dict, dict]:
        if self.placement != "prefix":
            self.fail("placement", "HF PEFT prompts are always a prefix (placement='prefix')")
        prompts = tree.leaves_named(delta, "prompt")
        if len(prompts) != 1:
            raise ValueError(f"export prompt: expected exactly one 'prompt' leaf, found "
                             f"{sorted(prompts)}")
        (path, p), = prompts.items()
        p = np.asarray(p)
        if p.ndim != 2:
            raise ValueError(f"export prompt: {path!r} has shape {p.shape}, expected [P, d]")
        fields = dict(num_virtual_tokens=int(p.shape[0]), token_dim=int(p.shape[1]),
                      num_transformer_submodules=1, num_layers=names.num_layers,
                      num_attention_heads=names.num_attention_heads,
                      prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
                      tokenizer_name_or_path=None, tokenizer_kwargs=None)
        return fields, {"prompt_embeddings": p}

    @classmethod
    def hf_peft_shapes(cls, config, shapes, names, where=""):
        n_tok, n_sub = int(config["num_virtual_tokens"]), int(config.get("num_transformer_submodules") or 1)
        got = tuple(shapes.get("prompt_embeddings", ()))
        dim = int(config.get("token_dim") or (got[-1] if got else 0))
        return {"prompt_embeddings": (n_tok * n_sub, dim)}

    @classmethod
    def from_hf_peft(cls, config, tensors, names, where=""):
        where = hf_peft.weights_path(where)
        if "prompt_embeddings" not in tensors:
            raise hf_peft.CheckpointError(f"{where}: missing tensor 'prompt_embeddings'")
        emb, n_tok = tensors["prompt_embeddings"], int(config["num_virtual_tokens"])
        if emb.ndim != 2 or emb.shape[0] < n_tok:
            raise hf_peft.CheckpointError(f"{where}: prompt_embeddings has shape {emb.shape}, "
                                          f"config num_virtual_tokens={n_tok}")
        # seq2seq adapters store one prompt per transformer submodule; the encoder's first
        return cls(length=n_tok, placement="prefix"), {"prompt": np.ascontiguousarray(emb[:n_tok])}
