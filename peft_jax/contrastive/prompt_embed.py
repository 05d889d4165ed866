"""Prompt-based sentence embeddings: PromptBERT (Jiang et al. 2022) and PromptEOL (2023).

A sentence is rendered into a template and represented by one hidden state:

- encoders (a template with ``{mask}``): the last layer at the ``[MASK]`` token of
  ``This sentence : "{sentence}" means [MASK] .`` (PromptBERT);
- decoders (no ``{mask}``): the last token of
  ``This sentence : "{sentence}" means in one word:"`` (PromptEOL's "in one word").

Template denoising (PromptBERT): the representation of the template with an empty sentence
is subtracted, removing the template's own bias. (PromptBERT feeds the bare template with
the position ids it would have next to the sentence; this interface cannot pass position
ids to every family, so the bias is one vector per template.)

:class:`PromptEmbedder` works on an untrained model or a trained delta (the
:class:`peft_jax.contrastive.objectives.PromptBERT` objective).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import numpy as np

from peft_jax.contrastive.batches import SentenceBatches
from peft_jax.contrastive.embed import Embedder, state_at_outputs

ENCODER_TEMPLATE = 'This sentence : "{sentence}" means {mask} .'
DECODER_TEMPLATE = 'This sentence : "{sentence}" means in one word:"'
DECODER_TEMPLATES = (DECODER_TEMPLATE, 'This sentence : "{sentence}" can be summarized in one word:"')


def default_templates(kind: str) -> tuple[str, str]:
    """Two templates for a model ``kind`` ('encoder' -> PromptBERT's, else PromptEOL-style)."""
    if kind == "encoder":
        return (ENCODER_TEMPLATE, 'This sentence of "{sentence}" means {mask} .')
    return DECODER_TEMPLATES


class PromptRenderer:
    """Sentences -> template token ids and the answer position of each.

    ``tokenizer``: has ``encode(list[str])`` (``.tok``: the HF tokenizer, for its mask
    token); a sentence too long for ``max_length`` loses words from its end, the template
    stays whole."""

    def __init__(self, tokenizer: Any, template: str, max_length: int):
        if "{sentence}" not in template:
            raise ValueError(f"prompt template {template!r} has no {{sentence}} slot")
        self.tokenizer, self.template = tokenizer, template
        # a tokenizer that truncates sooner bounds the length too
        self.max_length = min(int(max_length), int(getattr(tokenizer, "max_length", max_length)))
        self.mask_id: Optional[int] = None
        self.mask_token = ""
        if "{mask}" in template:
            hf = getattr(tokenizer, "tok", tokenizer)
            self.mask_token = getattr(hf, "mask_token", None) or ""
            self.mask_id = getattr(hf, "mask_token_id", None)
            if self.mask_id is None:
                raise ValueError(f"prompt template {template!r} has {{mask}} but the tokenizer "
                                 "has no mask token (decoders: use a template without {mask}, "
                                 "read at the last token)")

    def text(self, sentence: str) -> str:
        return self.template.replace("{mask}", self.mask_token).replace("{sentence}", sentence)

    def _position(self, ids: Sequence[int]) -> int:
        if self.mask_id is None:
            return len(ids) - 1
        hits = [i for i, t in enumerate(ids) if t == self.mask_id]
        return hits[-1] if hits else -1

    def __call__(self, sentences: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        out, pos = [], []
        for s in sentences:
            words = s.split()
            while True:
                (ids,) = self.tokenizer.encode([self.text(" ".join(words))])
                p = self._position(ids)
                # strictly shorter: a tokenizer that truncates at max_length may have cut the
                # template's end
                if p >= 0 and len(ids) < self.max_length or not words:
                    break
                words = words[:-max(1, len(words) // 8)]
            if p < 0 or len(ids) >= self.max_length:
                raise ValueError(f"template {self.template!r} does not fit max_length="
                                 f"{self.max_length} tokens")
            out.append(list(ids))
            pos.append(p)
        return out, pos


@dataclasses.dataclass
class PromptEmbedder(Embedder):
    """``embedder(sentences) -> [n, d]``: template states (denoised when ``denoise``)."""

    template: str = DECODER_TEMPLATE
    denoise: bool = True
    max_length: int = 64

    def __post_init__(self):
        self.renderer = PromptRenderer(self.tokenizer, self.template, self.max_length)
        self._at = jax.jit(functools.partial(state_at_outputs, self.model))
        self._bias: Optional[np.ndarray] = None

    def _token_ids(self, sentences):
        return self.renderer(sentences)

    def _forward(self, tok, mask, pos):
        return self._at(self.variables, tok, mask, pos)

    def template_bias(self) -> np.ndarray:
        """The bare template's representation ``[d]`` (empty sentence)."""
        if self._bias is None:
            self._bias = super().raw([""])[0]
        return self._bias

    def raw(self, sentences: Sequence[str]) -> np.ndarray:
        h = super().raw(sentences)
        return h - self.template_bias()[None] if self.denoise else h


class PromptBatches(SentenceBatches):
    """Batches for the PromptBERT objective: ``input_ids``/``attention_mask``/``answer_pos``
    (``templates[0]``), ``pos_*`` the same with ``templates[1]``, and ``tmpl_*`` (``[2, l]``)
    the two bare templates (empty sentence) for denoising. Resumable as
    :class:`SentenceBatches`."""

    def __init__(self, sentences: Sequence[str], tokenizer: Any, templates: Sequence[str],
                 batch_size: int, max_length: int, seed: int = 0):
        if len(templates) != 2:
            raise ValueError(f"PromptBERT needs two templates, got {len(templates)}")
        r1, r2 = (PromptRenderer(tokenizer, t, max_length) for t in templates)
        ids1, self.pos1 = r1(sentences)
        ids2, self.pos2 = r2(sentences)
        super().__init__(ids1, batch_size, max_length, tokenizer.pad_id, seed)
        self.ids2 = ids2
        (b1,), (p1,) = r1([""])
        (b2,), (p2,) = r2([""])
        self.tmpl = self._pad([b1, b2])
        self.tmpl_pos = np.asarray([p1, p2], np.int32)

    def _batch(self, rows: np.ndarray) -> dict:
        out = super()._batch(rows)
        out["answer_pos"] = np.asarray([self.pos1[i] for i in rows], np.int32)
        out["pos_input_ids"], out["pos_attention_mask"] = self._pad([self.ids2[i] for i in rows])
        out["pos_answer_pos"] = np.asarray([self.pos2[i] for i in rows], np.int32)
        out["tmpl_input_ids"], out["tmpl_attention_mask"] = self.tmpl
        out["tmpl_answer_pos"] = self.tmpl_pos
        return out
