"""Model-side halves of the task formats: batch arrays -> scores, and their losses.

A batch is a dict of fixed-shape arrays as made by ``peft_jax.data.make_batches``:
``input_ids``, ``attention_mask``, ``token_type_ids`` (``[b, l]``), ``label [b]`` (int
classes or float scores), ``example_mask [b]`` (0 for padding rows of a partial last
batch) and, for the verbalizer format, ``mask_pos [b, T]`` (positions whose logits score
the T answer tokens, before any soft-prompt insert). The text-to-text format adds
``targets``/``target_mask [b, T]`` (encoder-decoder: the decoder's target tokens) or
``loss_mask [b, l]`` (decoder-only: the target tokens inside ``input_ids``) and
``mask_pos [b, 1]`` (the last source position).

Everything here is a pure function of ``(variables, batch)``; the heads live in
``variables["peft"]["head"]`` and are split off before the model is applied.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from peft_jax.fewshot.scoring import multi_token_scores
from peft_jax.models import generation, pooling, t5
from peft_jax.models.family import for_model
from peft_jax.models.slots import Insert, remove_inserts
from peft_jax.peft.method import inserted_before
from peft_jax.train import losses

Array = Any


def model_variables(variables: dict) -> tuple[dict, Optional[dict]]:
    """Split the head off the delta: (variables for model.apply, head params or None)."""
    delta = dict(variables.get("peft", {}))
    head = delta.pop("head", None)
    out = {"params": variables["params"]}
    if delta:
        out["peft"] = delta
    return out, head


def prompt_inserts(methods: tuple) -> tuple:
    """The :class:`Insert` of every soft prompt of ``methods``, in application order."""
    return tuple(Insert(m.insert_at, int(m.length)) for m in methods
                 if hasattr(m, "input_embeddings") and hasattr(m, "insert_at"))


def last_real_index(mask: Array) -> Array:
    """Index of the last 1 in each row of ``mask [b, l]`` -> ``[b]``."""
    l = mask.shape[1]
    idx = jnp.arange(l)[None, :]
    return jnp.max(jnp.where(mask > 0, idx, -1), axis=1)


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """Static description of how to turn model outputs into class scores."""

    kind: str                    # 'encoder' | 'decoder' | 'encoder_decoder'
    format: str                  # 'classification' | 'regression' | 'verbalizer' | 'text_to_text'
    pooling: str = "mean"
    head: Any = None             # the Head method (classification / regression formats)
    label_word_ids: Optional[tuple] = None    # [C][W][T] token ids, -1 = padding (text-to-text:
                                              # every class's whole target sequence)
    methods: tuple = ()
    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    eos_token_id: Optional[int] = None        # generation stops there (text-to-text)


def _apply_model(model, spec: FormatSpec, mvars: dict, batch: dict, deterministic: bool,
                 rng: Optional[Array]) -> dict:
    """The family's uniform call (T5: one decoder step from the start token)."""
    rngs = {} if deterministic or rng is None else {"dropout": rng}
    need_all = spec.pooling in ("first_last_avg", "top2_avg")
    return for_model(model).apply(model, mvars, batch, deterministic=deterministic, rngs=rngs,
                                  output_hidden_states=need_all)


def scores(model, spec: FormatSpec, variables: dict, batch: dict, deterministic: bool = True,
           rng: Optional[Array] = None) -> Array:
    """Class logits ``[b, c]`` (classification / verbalizer) or predictions ``[b]`` (regression)."""
    mvars, head = model_variables(variables)
    if spec.format == "text_to_text":
        return rank_scores(model, spec, mvars, batch)
    if (spec.format == "verbalizer" and spec.kind == "decoder"
            and len(spec.label_word_ids[0][0]) > 1):
        return _causal_multi_token(model, spec, mvars, batch, deterministic, rng)
    if spec.format == "verbalizer" and spec.kind == "decoder":
        # the LM head at the answer position only: [b, 1, V] logits, not [b, l, V]
        pos = batch["mask_pos"][:, :1] + inserted_before(spec.methods, 1)
        rngs = {} if deterministic or rng is None else {"dropout": rng}
        logits = model.apply(mvars, batch["input_ids"], batch["attention_mask"],
                             deterministic=deterministic, rngs=rngs, logits_at=pos)["logits"]
        return label_word_scores(logits, jnp.zeros_like(pos),
                                 jnp.asarray(spec.label_word_ids, jnp.int32), causal=True)
    out = _apply_model(model, spec, mvars, batch, deterministic, rng)
    if spec.format == "verbalizer":
        logits = out["logits"]
        if spec.kind == "encoder_decoder":
            pos = jnp.zeros((logits.shape[0], 1), jnp.int32)
        else:
            pos = batch["mask_pos"] + inserted_before(spec.methods, 1)
        return label_word_scores(logits, pos, jnp.asarray(spec.label_word_ids, jnp.int32),
                                 causal=spec.kind == "decoder")
    if spec.kind == "encoder_decoder":
        hidden = {"hidden_states": out["encoder_hidden_states"],
                  "attention_mask": out["encoder_attention_mask"]}
    else:
        hidden = out
    pooled = pooling.pool(spec.pooling, hidden)
    head_rng = None if deterministic or rng is None else jax.random.fold_in(rng, 1)
    y = spec.head.apply(head, pooled, deterministic, head_rng)
    return y[:, 0] if spec.format == "regression" else y


def _causal_multi_token(model, spec: FormatSpec, mvars: dict, batch: dict, deterministic: bool,
                        rng: Optional[Array]) -> Array:
    """Class scores ``[b, C]`` of multi-token label words for a causal LM: every candidate
    word teacher-forced after the prompt and scored by the sum of its tokens' log-probs
    (:func:`peft_jax.fewshot.scoring.multi_token_scores`); one forward per candidate word."""
    rngs = {} if deterministic or rng is None else {"dropout": rng}
    shift = inserted_before(spec.methods, 1)

    def logits_fn(ids, mask):
        out = model.apply(mvars, ids, mask, deterministic=deterministic, rngs=rngs)["logits"]
        return out[:, shift:] if shift else out   # back to input positions

    return multi_token_scores(logits_fn, batch["input_ids"], batch["attention_mask"],
                              batch["mask_pos"][:, 0], jnp.asarray(spec.label_word_ids, jnp.int32))


def label_word_scores(logits: Array, pos: Array, label_word_ids: Array, causal: bool) -> Array:
    """Class log-scores ``[b, C]`` from LM logits ``[b, l, V]`` at answer positions ``pos [b, T]``.

    ``label_word_ids [C, W, T]`` (-1 = padding). A word's score is the sum of its tokens'
    log-probabilities at the T positions (independent masks for MLMs; for causal LMs only
    the first token is scored, since later tokens need the answer teacher-forced: the
    few-shot module scores multi-token words that way). A class's words are combined by
    log-mean-exp.
    """
    if causal:
        label_word_ids = label_word_ids[..., :1]
        pos = pos[:, :1]
    t = label_word_ids.shape[-1]
    logp = jax.nn.log_softmax(
        jnp.take_along_axis(logits, pos[:, :t, None], axis=1).astype(jnp.float32), axis=-1)
    ids = jnp.maximum(label_word_ids, 0)                            # [C, W, T]
    tok = logp[:, jnp.arange(t)[None, None, :], ids]                # [b, C, W, T]
    tok = jnp.where(label_word_ids[None] >= 0, tok, 0.0)
    return combine_words(jnp.sum(tok, axis=-1), label_word_ids)


def combine_words(word: Array, label_word_ids: Array) -> Array:
    """Word scores ``[b, C, W]`` -> class scores ``[b, C]``: log-mean-exp over each class's
    real words (``label_word_ids [C, W, T]``, a word of all -1 is absent)."""
    real = jnp.any(label_word_ids >= 0, axis=-1)[None]              # [1, C, W]
    word = jnp.where(real, word, -jnp.inf)
    n = jnp.sum(real, axis=-1).astype(jnp.float32)
    return jax.nn.logsumexp(word, axis=-1) - jnp.log(n)


# ----------------------------------------------------------------------------- text-to-text


def rank_scores(model, spec: FormatSpec, mvars: dict, batch: dict) -> Array:
    """Rank classification ``[b, C]``: the log-probability of every class's target sequence
    (``spec.label_word_ids [C, W, T]``, EOS included) given the source; several targets of
    a class are combined by log-mean-exp. Encoder-decoder: the encoder runs once, the
    decoder on the ``C * W`` candidates; decoder-only: each candidate teacher-forced after
    the source (:func:`_causal_multi_token`)."""
    if spec.kind != "encoder_decoder":
        return _causal_multi_token(model, spec, mvars, batch, True, None)
    lw = jnp.asarray(spec.label_word_ids, jnp.int32)
    c, w, t = lw.shape
    enc = model.apply(mvars, batch["input_ids"], batch["attention_mask"], method="encode")
    b, k = enc["hidden_states"].shape[0], c * w
    cand = jnp.broadcast_to(lw.reshape(1, k, t), (b, k, t)).reshape(b * k, t)
    dec_in = t5.shift_right(jnp.where(cand >= 0, cand, spec.pad_token_id),
                            spec.decoder_start_token_id, spec.pad_token_id)
    rep = lambda x: jnp.repeat(x, k, axis=0)
    logits = model.apply(mvars, dec_in, rep(enc["hidden_states"]), rep(enc["attention_mask"]),
                         method="decode")["logits"]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(logp, jnp.maximum(cand, 0)[..., None], axis=-1)[..., 0]
    word = jnp.sum(jnp.where(cand >= 0, tok, 0.0), axis=-1).reshape(b, c, w)
    return combine_words(word, lw)


def text_to_text_loss(model, spec: FormatSpec, variables: dict, batch: dict,
                      deterministic: bool = False, rng: Optional[Array] = None) -> Array:
    """Token cross-entropy on the target tokens only, averaged over the batch's target
    tokens (Hugging Face's loss with ``labels=-100`` elsewhere). Encoder-decoder: teacher
    forcing of ``targets`` (decoder input = targets shifted right after the start token);
    decoder-only: next-token loss at the ``loss_mask`` positions of ``input_ids``."""
    mvars, _ = model_variables(variables)
    rngs = {} if deterministic or rng is None else {"dropout": rng}
    w = batch["example_mask"][:, None] if "example_mask" in batch else 1
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if spec.kind == "encoder_decoder":
        tgt = batch["targets"]
        dec_in = t5.shift_right(tgt, spec.decoder_start_token_id, spec.pad_token_id)
        logits = model.apply(mvars, ids, mask, dec_in, deterministic=deterministic,
                             rngs=rngs)["logits"]
        return losses.token_cross_entropy(logits, tgt, batch["target_mask"] * w)[0]
    logits = model.apply(mvars, ids, mask, deterministic=deterministic, rngs=rngs)["logits"]
    logits = remove_inserts(prompt_inserts(spec.methods), logits)   # back to input positions
    return losses.causal_lm_loss(logits, ids, batch["loss_mask"] * w)


def left_aligned(input_ids: Array, last: Array, pad_id: int) -> tuple[Array, Array]:
    """Each row's tokens ``0..last`` moved to the right end: ``[b, l]`` ids and mask, left
    padded with ``pad_id`` (the layout decoder-only generation needs)."""
    l = input_ids.shape[1]
    src = jnp.arange(l)[None, :] - (l - 1 - last)[:, None]
    valid = src >= 0
    ids = jnp.take_along_axis(input_ids, jnp.maximum(src, 0), axis=1)
    return jnp.where(valid, ids, pad_id), valid.astype(jnp.int32)


def generate(model, spec: FormatSpec, variables: dict, batch: dict, max_new_tokens: int) -> Array:
    """Greedy generation of the target after the source -> ``[b, max_new_tokens]`` tokens
    (``spec.pad_token_id`` after a row's EOS). Encoder-decoder: from the encoder input
    (:func:`peft_jax.models.t5.greedy_generate`); decoder-only: from ``input_ids`` up to
    ``mask_pos`` (:func:`peft_jax.models.generation.greedy_generate`)."""
    mvars, _ = model_variables(variables)
    if spec.kind == "encoder_decoder":
        out = t5.greedy_generate(model, mvars, batch["input_ids"], batch["attention_mask"],
                                 max_new_tokens, spec.decoder_start_token_id, spec.eos_token_id,
                                 spec.pad_token_id)
        return out[:, 1:]
    ids, mask = left_aligned(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["mask_pos"])[:, 0],
                             spec.pad_token_id)
    return generation.greedy_generate(model, mvars, ids, mask, max_new_tokens, spec.eos_token_id,
                                      spec.pad_token_id)


def make_loss_fn(model, spec: FormatSpec) -> Callable:
    """``loss_fn(variables, batch, rng, deterministic) -> (loss, metrics)`` for train/step.py."""

    def loss_fn(variables, batch, rng, deterministic):
        if spec.format == "text_to_text":
            return text_to_text_loss(model, spec, variables, batch, deterministic, rng), {}
        y = scores(model, spec, variables, batch, deterministic, rng)
        w = batch.get("example_mask")
        if spec.format == "regression":
            return losses.regression_loss(y, batch["label"], w), {}
        if "soft_label" in batch:  # distillation targets (PET); one-hot rows for gold labels
            loss = losses.soft_label_loss(y, batch["soft_label"], w)
        else:
            loss = losses.classification_loss(y, batch["label"], w)
        hit = (jnp.argmax(y, -1) == batch["label"]).astype(jnp.float32)
        acc = jnp.sum(hit * w) / jnp.maximum(jnp.sum(w), 1) if w is not None else jnp.mean(hit)
        return loss, {"train_accuracy": acc}

    return loss_fn


def make_predict_fn(model, spec: FormatSpec) -> Callable:
    """``predict(variables, batch) -> [b, c]`` scores or ``[b]`` regression values."""

    def predict(variables, batch):
        return scores(model, spec, variables, batch, True, None)

    return predict
