"""Hidden states at the answer position of a prompt, from a frozen model (ProtoVerb's instances).

The prompt is the task's template (``{sentence} It was {mask}.``); for an MLM the state is the
last layer at the mask token, for a causal LM at the last prompt token (whose next-token
logits score the label words). When the model has an LM head the manual verbalizer's class
scores at the same position come along, so ProtoVerb can be combined with it.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.data import make_batches
from peft_jax.data.tokenize import encode_prompt
from peft_jax.train.forward import label_word_scores

Array = Any


def answer_states(pre: Any, task: Any, examples: Sequence[dict], template: Optional[str] = None,
                  label_words: Any = None, max_len: int = 128, batch_size: int = 32,
                  variables: Optional[dict] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """``(z [n, d], verbalizer_scores [n, C] or None)`` for ``examples`` in order.

    ``pre``: a :class:`peft_jax.models.registry.Pretrained` (``kind`` encoder or decoder);
    ``variables``: defaults to the frozen base ``{"params": pre.base}``.
    """

    if pre.kind not in ("encoder", "decoder"):
        raise ValueError(f"answer_states: model kind {pre.kind!r}; encoder or decoder models only")
    enc = encode_prompt(list(examples), template, label_words, pre.tokenizer, kind=pre.kind,
                        max_len=max_len, task=task)
    lw = jnp.asarray(enc.constants["label_word_ids"], jnp.int32)
    model = pre.build()
    variables = variables or {"params": pre.base}
    causal = pre.kind == "decoder"
    has_head = []   # set while tracing: does the model return LM logits?

    @jax.jit
    def run(ids, mask, types, pos):
        if causal:   # LM head at the answer position only
            out = model.apply(variables, ids, mask, deterministic=True, logits_at=pos[:, :1])
        else:
            out = model.apply(variables, ids, mask, types, deterministic=True)
        h = out["hidden_states"]
        z = jnp.take_along_axis(h, pos[:, :1, None], axis=1)[:, 0].astype(jnp.float32)
        logits = out.get("logits")
        has_head.append(logits is not None)
        if logits is None:
            return z, jnp.zeros((z.shape[0], lw.shape[0]), jnp.float32)
        if causal:
            return z, label_word_scores(logits, jnp.zeros_like(pos[:, :1]), lw, causal=True)
        return z, label_word_scores(logits, pos, lw, causal=False)

    buckets = tuple(sorted({b for b in (32, 64, 128, 256, 512) if b < max_len} | {max_len}))
    it = make_batches(enc, batch_size, buckets=buckets, shuffle=False, drop_remainder=False,
                      num_epochs=1)
    zs, vs, rows = [], [], []
    for b in it:
        z, v = run(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["mask_pos"])
        keep = b["example_mask"] > 0
        zs.append(np.asarray(z)[keep])
        vs.append(np.asarray(v)[keep])
        rows.append(b["row"][keep])
    order = np.argsort(np.concatenate(rows), kind="stable")
    z = np.concatenate(zs)[order]
    return z, (np.concatenate(vs)[order] if has_head and has_head[0] else None)


def answer_logprobs(pre: Any, task: Any, examples: Sequence[dict], template: Optional[str] = None,
                    max_len: int = 128, batch_size: int = 32) -> np.ndarray:
    """Log-probabilities over the whole vocabulary at the answer position ``[n, V]`` (the
    candidates of automatic label-word search). Needs a model with an LM head."""

    if pre.kind not in ("encoder", "decoder"):
        raise ValueError(f"answer_logprobs: model kind {pre.kind!r}; encoder or decoder models only")
    # the label words do not matter here; any one-token word per class keeps encode_prompt happy
    dummy = [["a"] for _ in range(task.num_labels)]
    enc = encode_prompt(list(examples), template, dummy, pre.tokenizer, kind=pre.kind,
                        max_len=max_len, task=task)
    model = pre.build()
    variables = {"params": pre.base}

    @jax.jit
    def run(ids, mask, types, pos):
        if pre.kind == "decoder":
            logits = model.apply(variables, ids, mask, deterministic=True, logits_at=pos[:, :1])["logits"][:, 0]
        else:
            out = model.apply(variables, ids, mask, types, deterministic=True)
            if out.get("logits") is None:
                raise ValueError("answer_logprobs: this model has no LM head")
            logits = jnp.take_along_axis(out["logits"], pos[:, :1, None], axis=1)[:, 0]
        return jax.nn.log_softmax(logits.astype(jnp.float32), -1)

    buckets = tuple(sorted({b for b in (32, 64, 128, 256, 512) if b < max_len} | {max_len}))
    out, rows = [], []
    for b in make_batches(enc, batch_size, buckets=buckets, shuffle=False, drop_remainder=False,
                          num_epochs=1):
        keep = b["example_mask"] > 0
        out.append(np.asarray(run(b["input_ids"], b["attention_mask"], b["token_type_ids"],
                                  b["mask_pos"]))[keep])
        rows.append(b["row"][keep])
    return np.concatenate(out)[np.argsort(np.concatenate(rows), kind="stable")]
