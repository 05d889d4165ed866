"""Tokenizers from a model folder, including SentencePiece-only T5 folders.

T5 checkpoints (v1.0, v1.1, LM-adapted) ship their Unigram vocabulary as ``spiece.model``,
often without a ``tokenizer.json``. transformers converts such a file only when the
``sentencepiece`` package is installed; :func:`load_tokenizer` reads the file's protobuf
itself (with the schema bundled in transformers) and builds the same tokenizer, so these
folders load without it. A folder with ``tokenizer.json`` whose ``tokenizer_config.json``
names a tokenizer class of transformers loads with that class directly (what
``AutoTokenizer`` picks for it: same tokens, same special ids), which skips AutoTokenizer's
model-config lookup (for Llama folders it imports torch: 2-3 s of a run's start).
Everything else goes to ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from peft_jax.models.hf_io import CheckpointError

UNIGRAM = 1   # sentencepiece ModelProto.TrainerSpec.model_type
# tokenizer_config.json entries that are not constructor arguments
_NOT_INIT = ("tokenizer_class", "added_tokens_decoder", "auto_map", "backend", "name_or_path",
             "processor_class", "tokenizer_file", "vocab_file")


def sentencepiece_only(folder: str) -> str | None:
    """The ``*.model`` file of a folder without ``tokenizer.json`` (else None)."""
    if not os.path.isdir(folder) or os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return None
    models = sorted(f for f in os.listdir(folder) if f.endswith(".model"))
    return os.path.join(folder, models[0]) if models else None


def named_class(folder: str) -> Any:
    """The transformers tokenizer class the folder's ``tokenizer_config.json`` names, where
    the folder has a ``tokenizer.json`` and no custom code (``auto_map``); else None."""
    import transformers

    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if not (os.path.isfile(cfg_path) and os.path.isfile(os.path.join(folder, "tokenizer.json"))):
        return None
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None   # AutoTokenizer reports it
    name = cfg.get("tokenizer_class") if isinstance(cfg, dict) and "auto_map" not in cfg else None
    try:
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
    except Exception:   # a class whose backend is missing: AutoTokenizer reports it
        return None
    return cls if isinstance(cls, type) and hasattr(cls, "from_pretrained") else None


def load_tokenizer(folder: str) -> Any:
    """The tokenizer of a model folder (see the module docstring)."""
    cls = named_class(folder)
    if cls is not None:
        return cls.from_pretrained(folder)
    from transformers import AutoTokenizer

    spm = sentencepiece_only(folder)
    if spm is None or importlib.util.find_spec("sentencepiece") is not None:
        return AutoTokenizer.from_pretrained(folder)
    return unigram_from_sentencepiece(folder, spm)


def unigram_from_sentencepiece(folder: str, spm_file: str) -> Any:
    """A Unigram ``spm_file`` + the folder's ``tokenizer_config.json`` -> the tokenizer class
    it names (T5Tokenizer by default), as transformers' own conversion builds it."""
    import transformers
    from transformers.convert_slow_tokenizer import SLOW_TO_FAST_CONVERTERS, import_protobuf

    proto = import_protobuf().ModelProto()
    with open(spm_file, "rb") as f:
        try:
            proto.ParseFromString(f.read())
        except Exception as e:  # protobuf's DecodeError
            raise CheckpointError(f"{spm_file}: not a SentencePiece model ({e})") from None
    if proto.trainer_spec.model_type != UNIGRAM:
        raise CheckpointError(f"{spm_file}: a SentencePiece BPE model; converting it needs the "
                              "sentencepiece package (pip install sentencepiece)")
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    cfg = json.load(open(cfg_path)) if os.path.isfile(cfg_path) else {}
    name = cfg.get("tokenizer_class") or "T5Tokenizer"
    cls = getattr(transformers, name.removesuffix("Fast"), None)
    if cls is None or getattr(getattr(cls, "model", None), "__name__", "") != "Unigram":
        raise CheckpointError(f"{cfg_path}: tokenizer_class={name!r} is not a Unigram tokenizer; "
                              "converting its SentencePiece model needs the sentencepiece package")
    kwargs = {k: v for k, v in cfg.items() if k not in _NOT_INIT}
    kwargs["vocab"] = [(p.piece, p.score) for p in proto.pieces]
    kwargs["_spm_precompiled_charsmap"] = proto.normalizer_spec.precompiled_charsmap or None
    converter = SLOW_TO_FAST_CONVERTERS.get(cls.__name__)
    if converter is not None and hasattr(converter, "convert_from_spm"):
        kwargs = converter.convert_from_spm(**kwargs)   # e.g. T5 appends its sentinels
    return cls(**kwargs)
