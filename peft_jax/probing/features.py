"""Frozen representations of every layer: ``[L + 1, n, d]`` (embedding output, then each layer).

Two readouts per layer:

- ``mean``: the mask-weighted mean over the sentence's tokens;
- ``answer``: the state at the answer position of a prompt template: the ``[MASK]`` token
  for encoders (``"{sentence} It was {mask} ."``), the last prompt token for decoders
  (whose next-token distribution would score the label words), as in prompting.

Batching, length bucketing and input order come from
:class:`peft_jax.contrastive.embed.Embedder`; the model is called with
``output_hidden_states=True`` (every family returns ``all_hidden_states``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.contrastive.embed import Embedder, make_tokenizer
from peft_jax.contrastive.prompt_embed import PromptRenderer

Array = Any
READOUTS = ("mean", "answer")
DEFAULT_TEMPLATES = {"encoder": "{sentence} It was {mask} .", "decoder": "{sentence} It was"}


def layer_states(model: Any, variables: dict, input_ids: Array, attention_mask: Array,
                 pos: Array, readout: str) -> Array:
    """``[b, L + 1, d]`` fp32: every layer's mean-pooled state or its state at ``pos [b]``."""
    out = model.apply(variables, input_ids=input_ids, attention_mask=attention_mask,
                      deterministic=True, output_hidden_states=True)
    hs = jnp.stack([h.astype(jnp.float32) for h in out["all_hidden_states"]], 1)  # [b, L+1, l', d]
    if readout == "answer":
        shift = hs.shape[2] - input_ids.shape[1]
        return jnp.take_along_axis(hs, (pos + shift)[:, None, None, None], axis=2)[:, :, 0]
    m = out["attention_mask"].astype(jnp.float32)[:, None, :, None]
    return jnp.sum(hs * m, 2) / jnp.maximum(jnp.sum(m, 2), 1e-9)


@dataclasses.dataclass
class LayerEmbedder(Embedder):
    """``embedder(texts) -> [n, L + 1, d]`` per-layer readouts (``readout``: mean | answer;
    ``template``: the prompt of the answer readout)."""

    readout: str = "mean"
    template: Optional[str] = None
    max_length: int = 128

    def __post_init__(self):
        if self.readout not in READOUTS:
            raise ValueError(f"readout {self.readout!r}: choose from {READOUTS}")
        self.renderer = (PromptRenderer(self.tokenizer, self.template, self.max_length)
                         if self.readout == "answer" else None)
        self._fn = jax.jit(functools.partial(layer_states, self.model, readout=self.readout))

    def _token_ids(self, sentences):
        if self.renderer is None:
            return self.tokenizer.encode(sentences), None
        return self.renderer(sentences)

    def _forward(self, tok, mask, pos):
        return self._fn(self.variables, tok, mask, pos)


def layer_features(pre: Any, texts: Sequence[str], readout: str = "mean",
                   template: Optional[str] = None, max_length: int = 64, batch_size: int = 32,
                   variables: Optional[dict] = None) -> np.ndarray:
    """``[L + 1, n, d]`` features of ``texts`` from a :class:`Pretrained` (frozen base, or
    ``variables``). ``template`` defaults to :data:`DEFAULT_TEMPLATES` for the model kind."""
    if readout == "answer" and template is None:
        template = DEFAULT_TEMPLATES.get(pre.kind)
        if template is None:
            raise ValueError(f"answer readout: no default template for model kind {pre.kind!r}")
    emb = LayerEmbedder(pre.build(), variables or {"params": pre.base},
                        make_tokenizer(pre.tokenizer, max_length), batch_size=batch_size,
                        readout=readout, template=template, max_length=max_length)
    return np.ascontiguousarray(np.moveaxis(emb.raw(list(texts)), 1, 0))
