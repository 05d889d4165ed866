"""Tokenization for the model families, tokenizer-agnostic.

The tokenizer is any transformers tokenizer object. Its special-token layout (``[CLS] a [SEP]
b [SEP]`` for BERT, ``<s> a </s></s> b </s>`` for RoBERTa, ``a </s>`` for T5, ``<s> a`` for
Llama, nothing for SmolLM2) is read off the tokenizer itself by ``special_layout`` instead of
being hard-coded per family; the model *kind* (``peft_jax.models.family.KINDS``) decides what
a prompt's answer slot becomes:

- ``encoder`` (BERT/RoBERTa MLMs): ``T`` mask tokens, ``T`` = the longest label word in tokens;
- ``decoder`` (causal LMs): the prompt ends at the answer slot; ``mask_pos`` are the positions
  whose next-token logits predict the answer tokens (optionally a chat template around it);
- ``encoder_decoder`` (T5, text-to-text): input text and target text (``encode_text_to_text``,
  which also writes text-to-text examples for decoders: source + target in one sequence).

Encoders return an ``Encoded``: ragged token features (padded later by ``make_batches`` to a
length bucket), per-example scalars, ragged targets (padded to a fixed target length) and
per-task constants such as ``label_word_ids`` [classes, words, tokens] (-1 = padding).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from peft_jax.data.readers import DataError
from peft_jax.data.tasks import Task
from peft_jax.data.templates import Template, apply_mods, parse_template, verbalizer_words
from peft_jax.models.family import KINDS

def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise DataError(f"unknown model kind {kind!r} (known: {list(KINDS)})")
    return kind


@dataclasses.dataclass
class Encoded:
    """Tokenized examples. ``features``/``targets``: name -> list of 1-d int arrays (ragged);
    ``scalars``: name -> [n, ...] array; ``constants``: per-task arrays; ``pad``: pad values."""
    features: dict[str, list]
    scalars: dict[str, np.ndarray]
    targets: dict[str, list] = dataclasses.field(default_factory=dict)
    constants: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    pad: dict[str, int] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.features["input_ids"])

    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.features["input_ids"]], np.int64)

    def target_lengths(self) -> np.ndarray:
        key = next(iter(self.targets), None)
        return np.array([len(x) for x in self.targets[key]], np.int64) if key else np.zeros(len(self), np.int64)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Special tokens the tokenizer adds around one text (prefix, suffix) and a pair (prefix,
    middle, suffix); ``pair_type_b``: token type id of the second text; ``strip_space``:
    the tokenizer turns a leading space into a token of its own (SentencePiece)."""
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    pair_prefix: tuple[int, ...]
    pair_middle: tuple[int, ...]
    pair_suffix: tuple[int, ...]
    pair_type_b: int
    strip_space: bool


def _find(seq: Sequence[int], sub: Sequence[int], start: int = 0) -> int:
    for i in range(start, len(seq) - len(sub) + 1):
        if list(seq[i:i + len(sub)]) == list(sub):
            return i
    return -1


def special_layout(tokenizer) -> Layout:
    """Read the special-token layout off ``tokenizer`` by encoding two probe words."""
    a = tokenizer("hello", add_special_tokens=False)["input_ids"]
    b = tokenizer("world", add_special_tokens=False)["input_ids"]
    one = tokenizer("hello")["input_ids"]
    pair = tokenizer("hello", "world")
    i = _find(one, a)
    ia = _find(pair["input_ids"], a)
    ib = _find(pair["input_ids"], b, ia + len(a)) if ia >= 0 else -1
    if i < 0 or ib < 0:
        raise DataError(f"cannot infer the special tokens of {type(tokenizer).__name__}: probe words "
                        "not found in its encodings")
    ids = list(pair["input_ids"])
    types = pair.get("token_type_ids")
    sp = tokenizer(" hello", add_special_tokens=False)["input_ids"]
    strip = len(sp) == len(a) + 1 and list(sp[1:]) == list(a)
    return Layout(tuple(one[:i]), tuple(one[i + len(a):]), tuple(ids[:ia]), tuple(ids[ia + len(a):ib]),
                  tuple(ids[ib + len(b):]), int(types[ib]) if types is not None else 0, strip)


def _batch_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return list(tokenizer(list(texts), add_special_tokens=False)["input_ids"])


def _fit(lengths: Sequence[int], budget: int) -> list[int]:
    """Longest-first truncation: the largest lengths ``l_i' <= l_i`` with ``sum <= budget`` that
    shorten the longest segments first (the HF tokenizers' 'longest_first' result for pairs)."""
    total = sum(lengths)
    if total <= budget:
        return list(lengths)
    if budget < 0:
        budget = 0
    lo, hi = 0, max(lengths)
    while lo < hi:  # largest cap c with sum(min(l, c)) <= budget
        c = (lo + hi + 1) // 2
        if sum(min(l, c) for l in lengths) <= budget:
            lo = c
        else:
            hi = c - 1
    out = [min(l, lo) for l in lengths]
    left = budget - sum(out)
    # The spare tokens go to the longest segments (ties: the later one), as HF tokenizers do.
    for k in sorted(range(len(lengths)), key=lambda k: (-lengths[k], -k)):
        if left and lengths[k] > lo:
            out[k] += 1
            left -= 1
    return out


def _cut(ids: Sequence[int], n: int, side: str) -> list[int]:
    if n >= len(ids):
        return list(ids)
    return list(ids[len(ids) - n:]) if side == "left" else list(ids[:n])


def _side(truncate_side, field: str) -> str:
    s = truncate_side.get(field, "right") if isinstance(truncate_side, Mapping) else (truncate_side or "right")
    if s not in ("left", "right"):
        raise DataError(f"truncate side for field {field!r} must be 'left' or 'right', got {s!r}")
    return s


def _labels(examples: Sequence[Mapping], task: Optional[Task]) -> tuple[np.ndarray, np.ndarray]:
    ys = [ex.get("label") for ex in examples]
    has = np.array([y is not None for y in ys], np.int32)
    regression = (task is not None and task.kind == "regression") or any(isinstance(y, float) for y in ys)
    if regression:
        return np.array([np.nan if y is None else float(y) for y in ys], np.float32), has
    if any(isinstance(y, str) for y in ys):
        return np.full(len(ys), -1, np.int32), has  # text targets: see encode_text_to_text
    return np.array([-1 if y is None else int(y) for y in ys], np.int32), has


def _common_scalars(examples, task) -> dict[str, np.ndarray]:
    label, has = _labels(examples, task)
    out = {"label": label, "has_label": has,
           "idx": np.array([int(ex.get("idx", i)) for i, ex in enumerate(examples)], np.int64)}
    soft = _soft_labels(examples, label)
    if soft is not None:
        out["soft_label"] = soft
    if task is not None and task.kind == "regression" and task.label_range:
        lo, hi = task.label_range
        out["label_scaled"] = ((label - lo) / (hi - lo)).astype(np.float32)
    return out


def _soft_labels(examples: Sequence[Mapping], label: np.ndarray) -> Optional[np.ndarray]:
    """``[n, C]`` class distributions when any example has ``soft_label`` (PET distillation);
    examples without one get the one-hot of their ``label``. None when no example has one."""
    rows = [ex.get("soft_label") for ex in examples]
    given = [i for i, r in enumerate(rows) if r is not None]
    if not given:
        return None
    c = len(rows[given[0]])
    out = np.zeros((len(examples), c), np.float32)
    for i, r in enumerate(rows):
        if r is None:
            y = int(label[i]) if label.dtype.kind == "i" else -1
            if not 0 <= y < c:
                raise DataError(f"example {i}: no soft_label and label {examples[i].get('label')!r} "
                                f"is not a class in [0, {c})")
            out[i, y] = 1.0
            continue
        r = np.asarray(r, np.float64)
        if r.shape != (c,) or not np.all(np.isfinite(r)) or np.any(r < 0) or abs(r.sum() - 1) > 1e-3:
            raise DataError(f"example {i}: soft_label {r.tolist()} must be {c} non-negative "
                            "probabilities summing to 1")
        out[i] = r
    return out


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id (else EOS, else 0)."""
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pid)


def encode_classification(examples: Sequence[Mapping], tokenizer, max_len: int,
                          text_fields: Optional[Sequence[str]] = None, task: Optional[Task] = None,
                          truncate_side: Any = "right") -> Encoded:
    """Text (pair) classification/regression input: the tokenizer's own special tokens around
    the first field and the remaining fields joined by spaces (``[CLS] a [SEP] b [SEP]``);
    longest-first truncation to ``max_len`` (``truncate_side``: 'right' keeps the start, 'left'
    keeps the end; a dict gives it per field). Scalars: label, has_label, idx (label_scaled)."""
    fields = list(text_fields or (task.text_fields if task else ()))
    if not fields:
        raise DataError("encode_classification: give text_fields or task")
    lay = special_layout(tokenizer)
    for f in fields:
        for i, ex in enumerate(examples):
            if not isinstance(ex.get(f), str):
                raise DataError(f"example {i}: missing text field {f!r} (keys: {sorted(ex)})")
    a_ids = _batch_ids(tokenizer, [ex[fields[0]] for ex in examples])
    b_ids = (_batch_ids(tokenizer, [" ".join(ex[f] for f in fields[1:]) for ex in examples])
             if len(fields) > 1 else None)
    side_a = _side(truncate_side, fields[0])
    side_b = _side(truncate_side, fields[1]) if len(fields) > 1 else "right"
    ids_out, types_out = [], []
    for k in range(len(examples)):
        if b_ids is None:
            budget = max_len - len(lay.prefix) - len(lay.suffix)
            (na,) = _fit([len(a_ids[k])], budget)
            ids = [*lay.prefix, *_cut(a_ids[k], na, side_a), *lay.suffix]
            types = [0] * len(ids)
        else:
            budget = max_len - len(lay.pair_prefix) - len(lay.pair_middle) - len(lay.pair_suffix)
            na, nb = _fit([len(a_ids[k]), len(b_ids[k])], budget)
            first = [*lay.pair_prefix, *_cut(a_ids[k], na, side_a), *lay.pair_middle]
            second = [*_cut(b_ids[k], nb, side_b), *lay.pair_suffix]
            ids, types = first + second, [0] * len(first) + [lay.pair_type_b] * len(second)
        if len(ids) > max_len:
            raise DataError(f"max_len={max_len} is shorter than the special tokens alone")
        ids_out.append(np.asarray(ids, np.int32))
        types_out.append(np.asarray(types, np.int32))
    return Encoded(
        features={"input_ids": ids_out, "attention_mask": [np.ones(len(x), np.int32) for x in ids_out],
                  "token_type_ids": types_out},
        scalars=_common_scalars(examples, task),
        pad={"input_ids": pad_token_id(tokenizer), "attention_mask": 0, "token_type_ids": 0})


def _label_word_ids(tokenizer, words: list[list[str]], space: bool, strip: bool) -> np.ndarray:
    """[C, W, T] token ids of each class's label words (-1 padded)."""
    pre = " " if space and not strip else ""
    toks = [[list(tokenizer(pre + w, add_special_tokens=False)["input_ids"]) for w in ws] for ws in words]
    for ws, ts in zip(words, toks):
        for w, t in zip(ws, ts):
            if not t:
                raise DataError(f"label word {w!r} tokenizes to nothing")
    return _ragged_table(toks)


def _ragged_table(seqs: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
    """``[C][W]`` token lists -> ``[C, W, T]`` int32, -1 padded."""
    T = max(len(t) for ws in seqs for t in ws)
    W = max(len(ws) for ws in seqs)
    out = np.full((len(seqs), W, T), -1, np.int32)
    for c, ws in enumerate(seqs):
        for w, t in enumerate(ws):
            out[c, w, :len(t)] = t
    return out


def _chat_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids before and after the user message in the tokenizer's chat template
    (with the generation prompt), so that the answer follows the assistant header."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{type(tokenizer).__name__} has no chat template (chat=True)")
    marker = "\u2063PROMPT\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    before, _, after = text.partition(marker)
    return _batch_ids(tokenizer, [before])[0], _batch_ids(tokenizer, [after])[0] if after else []


def encode_prompt(examples: Sequence[Mapping], template: Any, verbalizer: Any, tokenizer,
                  kind: str = "encoder", max_len: int = 256, task: Optional[Task] = None,
                  truncate_side: Any = "right", demonstrations: Optional[Sequence[Sequence[Mapping]]] = None,
                  include_answer: bool = False, chat: bool = False,
                  answer_ids: Optional[Sequence[Sequence[int]]] = None) -> Encoded:
    """Prompt + verbalizer encoding (LM-BFF / PET style).

    ``template``/``verbalizer`` default to the task's (None). Features: input_ids,
    attention_mask, token_type_ids; scalars: mask_pos [n, T] (positions whose logits score
    the T answer tokens), label, has_label, idx; constants: label_word_ids [C, W, T] (-1 pad).
    ``encoder``: T mask tokens at the slot. ``decoder``: the sequence ends at the slot (text after
    it is dropped); ``include_answer`` appends the gold label word (scalar answer_len) for
    teacher-forced training, ``answer_ids[i]`` (causal) appends those tokens instead (any
    target sequence; the verbalizer may then be absent: ``label_word_ids`` is ``[0, 1, 1]``);
    ``chat`` wraps the prompt in the tokenizer's chat template.
    ``demonstrations[i]``: examples shown with example i, rendered with their label word (after
    the query for encoders, separated by the tokenizer's pair separator; before it for decoders).
    Fields are truncated longest-first to fit ``max_len``.
    """
    kind = check_kind(kind)
    if kind == "encoder_decoder":
        raise DataError("encode_prompt: for T5 use encode_text_to_text(template=..., verbalizer=...)")
    fields = task.text_fields if task else None
    tmpl: Template = parse_template(template if template is not None else (task.template if task else None)
                                    or _no_template(task), fields)
    keys = task.verbalizer_keys() if task else (list(verbalizer) if isinstance(verbalizer, Mapping) else
                                                [str(i) for i in range(len(verbalizer))])
    given = verbalizer if verbalizer is not None else (task.verbalizer if task else None)
    lay = special_layout(tokenizer)
    if given is None and answer_ids is not None:   # free-text answers, no classes
        words, lw = [], np.full((0, 1, 1), -1, np.int32)
    else:
        words = verbalizer_words(given, keys)
        lw = _label_word_ids(tokenizer, words, tmpl.mask_space, lay.strip_space)
    T = lw.shape[-1]
    label, _ = _labels(examples, task)
    is_reg = task is not None and task.kind == "regression"
    if kind == "encoder" and tokenizer.mask_token_id is None:
        raise DataError(f"{type(tokenizer).__name__} has no mask token; kind 'encoder' needs one")
    if (include_answer or answer_ids is not None) and kind != "decoder":
        raise DataError("include_answer / answer_ids are for decoder (causal LM) models")
    if answer_ids is not None and len(answer_ids) != len(examples):
        raise DataError(f"answer_ids: {len(answer_ids)} answers for {len(examples)} examples")
    if chat and kind != "decoder":
        raise DataError("chat templates are for decoder (causal LM) models")
    chat_pre, chat_post = _chat_wrap(tokenizer) if chat else ([], [])
    parts = list(tmpl.parts)
    if kind == "decoder":
        parts = parts[:tmpl.mask_index + 1]

    @functools.lru_cache(maxsize=None)
    def lit(text: str) -> tuple[int, ...]:
        return tuple(_batch_ids(tokenizer, [text])[0])

    def render_fields(ex: Mapping, where: str) -> list[str]:
        out = []
        for p in parts:
            if p.kind == "field":
                if not isinstance(ex.get(p.value), str):
                    raise DataError(f"{where}: missing text field {p.value!r} (keys: {sorted(ex)})")
                pre = " " if p.space and not lay.strip_space else ""
                out.append(pre + apply_mods(ex[p.value], p.mods))
        return out

    # One batched tokenizer call for every field segment of every query and demonstration.
    demos = demonstrations or [[] for _ in examples]
    if len(demos) != len(examples):
        raise DataError(f"demonstrations: {len(demos)} lists for {len(examples)} examples")
    texts, spans = [], []
    for i, ex in enumerate(examples):
        seq = [ex] + list(demos[i])
        row = []
        for j, e in enumerate(seq):
            t = render_fields(e, f"example {i}" + (f" demonstration {j - 1}" if j else ""))
            row.append((len(texts), len(t)))
            texts.extend(t)
        spans.append(row)
    tok = _batch_ids(tokenizer, texts)
    mask_tok = tokenizer.mask_token_id
    sep = list(lay.pair_middle)
    ids_out, pos_out, alen_out = [], [], []
    for i, ex in enumerate(examples):
        seq = [ex] + list(demos[i])
        field_ids = [tok[s:s + n] for s, n in spans[i]]
        fixed = 0
        for j, e in enumerate(seq):
            fixed += sum(len(lit(p.value)) for p in parts if p.kind == "text")
            if j == 0:
                fixed += T if kind == "encoder" else 0
            else:
                y = e.get("label")
                if y is None:
                    raise DataError(f"example {i} demonstration {j - 1} has no label")
                fixed += int(np.sum(lw[_demo_class(y, task, len(words))][0] >= 0))
        answer = [] if answer_ids is None else [int(t) for t in answer_ids[i]]
        if include_answer and answer_ids is None and not is_reg and int(label[i]) >= 0:
            answer = [int(t) for t in lw[int(label[i])][0] if t >= 0]
        if kind == "encoder":
            n_demo = len(seq) - 1
            fixed += len(lay.pair_prefix) + len(lay.pair_suffix) + len(sep) if n_demo else \
                len(lay.prefix) + len(lay.suffix)
        else:
            fixed += len(lay.prefix) + len(chat_pre) + len(chat_post) + len(answer)
        flat = [len(x) for fi in field_ids for x in fi]
        budget = max_len - fixed
        if budget < len(flat):  # at least one token per field
            raise DataError(f"example {i}: max_len={max_len} leaves {budget} tokens for {len(flat)} "
                            "text fields after template, label words and special tokens")
        keep = _fit(flat, budget)
        k = 0
        rendered = []
        for j, e in enumerate(seq):
            body, slot = [], -1
            fi = iter(field_ids[j])
            for p in parts:
                if p.kind == "text":
                    body += lit(p.value)
                elif p.kind == "field":
                    body += _cut(next(fi), keep[k], _side(truncate_side, p.value))
                    k += 1
                elif j == 0:
                    slot = len(body)
                    if kind == "encoder":
                        body += [mask_tok] * T
                else:
                    c = _demo_class(e["label"], task, len(words))
                    body += [int(t) for t in lw[c][0] if t >= 0]
            rendered.append((body, slot))
        query, slot = rendered[0]
        if kind == "encoder":
            if len(seq) > 1:
                demo_ids = [t for body, _ in rendered[1:] for t in body]
                ids = [*lay.pair_prefix, *query, *sep, *demo_ids, *lay.pair_suffix]
                start = len(lay.pair_prefix)
            else:
                ids = [*lay.prefix, *query, *lay.suffix]
                start = len(lay.prefix)
            pos = [start + slot + t for t in range(T)]
        else:
            demo_ids = [t for body, _ in rendered[1:] for t in body]
            head = [*lay.prefix, *chat_pre, *demo_ids, *query[:slot]]
            ids = head + list(chat_post) + answer
            p0 = len(head) + len(chat_post)
            pos = [p0 - 1 + t for t in range(T)]
        ids_out.append(np.asarray(ids, np.int32))
        pos_out.append(pos)
        alen_out.append(len(answer))
    scalars = _common_scalars(examples, task)
    scalars["mask_pos"] = np.asarray(pos_out, np.int32).reshape(len(examples), T)
    if kind == "decoder":
        scalars["answer_len"] = np.asarray(alen_out, np.int32)
    return Encoded(
        features={"input_ids": ids_out, "attention_mask": [np.ones(len(x), np.int32) for x in ids_out],
                  "token_type_ids": [np.zeros(len(x), np.int32) for x in ids_out]},
        scalars=scalars, constants={"label_word_ids": lw},
        pad={"input_ids": pad_token_id(tokenizer), "attention_mask": 0, "token_type_ids": 0})


def _no_template(task):
    raise DataError(f"task {task.name if task else '?'} has no default template; set "
                    "config.task.template (e.g. \"{sentence} It was {mask}.\")")


def _demo_class(y, task: Optional[Task], n_classes: int) -> int:
    """Class whose label word shows a demonstration's label (regression: low/high by midpoint)."""
    if task is not None and task.kind == "regression":
        lo, hi = task.label_range or (0.0, 1.0)
        return int(float(y) >= (lo + hi) / 2)
    c = int(y)
    if not 0 <= c < n_classes:
        raise DataError(f"demonstration label {y!r} is not a class index in [0, {n_classes})")
    return c


def t5_input_text(example: Mapping, task: Task) -> str:
    """T5's GLUE format: ``'<prefix> <field>: <text> <field2>: <text2>'``."""
    parts = [task.t5_prefix or task.name]
    for f in task.text_fields:
        parts.append(f"{f}: {example[f]}")
    return " ".join(parts)


def t5_template(task: Task) -> str:
    """:func:`t5_input_text` as a template whose answer slot ends it (for causal LMs)."""
    esc = lambda t: t.replace("{", "{{").replace("}", "}}")
    fields = "".join(f" {esc(f)}: {{{f}}}" for f in task.text_fields)
    return f"{esc(task.t5_prefix or task.name)}{fields} {{mask}}"


def text_to_text_words(task: Task, template: Any = None, verbalizer: Any = None
                       ) -> Optional[list[list[str]]]:
    """Target word(s) of every class: the verbalizer, else the task's default one when a
    template is given, else the class names (T5's targets); None for tasks without classes."""
    if task.kind != "classification":
        return None
    if verbalizer is None and template is not None:
        verbalizer = task.verbalizer
    if verbalizer is None:
        return [[name] for name in task.label_names]
    return verbalizer_words(verbalizer, task.verbalizer_keys())


def _target_text(example: Mapping, task: Task, words: Optional[list[list[str]]]) -> str:
    y = example.get("label")
    if y is None:
        return ""
    if isinstance(y, str):
        return y
    if words is not None:
        return words[int(y)][0]
    return task.label_text(y)


def encode_text_to_text(examples: Sequence[Mapping], tokenizer, task: Task, max_len: int = 512,
                        target_len: Optional[int] = None, template: Any = None, verbalizer: Any = None,
                        mask_text: Optional[str] = None, kind: str = "encoder_decoder") -> Encoded:
    """Text-to-text: a source text and a target text; the loss is on the target tokens only.

    Source: ``template`` (its fields, truncated to fit) or T5's task format
    (:func:`t5_input_text`). Target: the class's first word (:func:`text_to_text_words`), the
    score rounded to 0.2 (regression) or the example's text label (text2text tasks), followed
    by the end token (``'</s>'`` / the tokenizer's EOS). Targets longer than ``target_len``
    are cut (keeping the end token).

    ``kind='encoder_decoder'`` (T5): features input_ids, attention_mask (``{mask}`` rendered
    as ``mask_text``, default the first sentinel ``'<extra_id_0>'`` when the vocabulary has
    one; inputs cut to ``max_len``); targets: targets, target_mask ``[T]``.
    ``kind='decoder'`` (causal LMs): one sequence ``source + target``, the source ending at
    the answer slot (text after ``{mask}`` is dropped, fields truncated longest-first);
    features input_ids, attention_mask, loss_mask (1 on the target tokens); scalar mask_pos
    ``[n, 1]`` (the last source position, whose logits predict the target); targets as for T5
    (for exact match).

    Both: scalars label, has_label, idx; for classification tasks the constant
    ``label_word_ids [C, W, T]``: every class's candidate target sequences (with the end
    token, -1 padded) for rank classification.
    """
    kind = check_kind(kind)
    if kind == "encoder":
        raise DataError("text-to-text needs an encoder-decoder or a decoder (causal LM), "
                        "not an encoder (use the verbalizer or classification format)")
    lay = special_layout(tokenizer)
    eos = list(lay.suffix) or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    tmpl = parse_template(template, task.text_fields) if template is not None else None
    words = text_to_text_words(task, template, verbalizer)
    lead = kind == "decoder" and (tmpl is None or tmpl.mask_space) and not lay.strip_space
    tbudget = (target_len - len(eos)) if target_len else None

    def target_ids(texts: Sequence[str]) -> list[list[int]]:
        ids = _batch_ids(tokenizer, [(" " if lead else "") + t if t else "" for t in texts])
        return [list(x[:tbudget] if tbudget is not None else x) + eos for x in ids]

    gold = target_ids([_target_text(ex, task, words) for ex in examples])
    constants = {"label_word_ids": _ragged_table([target_ids(ws) for ws in words])} if words else {}
    tg_out = [np.asarray(x, np.int32) for x in gold]
    targets = {"targets": tg_out, "target_mask": [np.ones(len(x), np.int32) for x in tg_out]}
    pad = {"input_ids": pad_token_id(tokenizer), "attention_mask": 0, "targets": pad_token_id(tokenizer),
           "target_mask": 0}
    if kind == "decoder":
        enc = encode_prompt(examples, template if template is not None else t5_template(task),
                            words, tokenizer, "decoder", max_len, task=task, answer_ids=gold)
        ids = enc.features["input_ids"]
        enc.features["loss_mask"] = [np.asarray([0] * (len(x) - len(g)) + [1] * len(g), np.int32)
                                     for x, g in zip(ids, gold)]
        enc.scalars["mask_pos"] = enc.scalars["mask_pos"][:, :1]
        enc.scalars.pop("answer_len", None)
        enc.targets, enc.constants = targets, constants
        enc.pad.update(pad, loss_mask=0)
        return enc
    prefix = list(lay.prefix)
    if tmpl is not None:
        if mask_text is None:
            mask_text = "<extra_id_0>" if "<extra_id_0>" in tokenizer.get_vocab() else ""
        inputs = [tmpl.render(ex, mask_text) for ex in examples]
    else:
        inputs = [t5_input_text(ex, task) for ex in examples]
    budget = max_len - len(prefix) - len(eos)
    ids_out = [np.asarray(prefix + list(x[:budget]) + eos, np.int32) for x in _batch_ids(tokenizer, inputs)]
    return Encoded(
        features={"input_ids": ids_out, "attention_mask": [np.ones(len(x), np.int32) for x in ids_out]},
        scalars=_common_scalars(examples, task), targets=targets, constants=constants, pad=pad)


def decode_target(tokenizer, ids: Sequence[int], eos_id: Optional[int]) -> Optional[str]:
    """Text of a target or a generated sequence up to its end token (special tokens dropped,
    whitespace stripped); None when ``eos_id`` is set and never occurs (an unfinished
    generation cannot match a target)."""
    ids = [int(t) for t in ids]
    if eos_id is not None:
        if eos_id not in ids:
            return None
        ids = ids[:ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
