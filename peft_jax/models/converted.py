"""GGUF checkpoints converted once: a GGUF file's float32 base, config and tokenizer kept
as a Hugging Face folder in the user cache, so later loads read safetensors instead of
parsing the GGUF metadata (per-field, slow for a 49k-token vocabulary), building the
tokenizer from it and dequantizing every tensor (twice: the weights and the fingerprint).
The first load of a GGUF file converts it (:func:`conversion`); every load, the first
included, then reads the folder, with or without storage options or a mesh.

Where: ``$PEFT_JAX_MODEL_CACHE`` (a folder; ``off`` / ``0`` disables), else
``$XDG_CACHE_HOME/peft_jax/models`` (``~/.cache/peft_jax/models``). One folder per GGUF
file, named ``<file stem>-<hash of its absolute path, size, modification time and
CONVERSION_VERSION>``: a changed file or converter gets a new folder. A folder is used only
when complete: ``source.json`` is written last, after the saved config and tokenizer were
read back and found equal to the GGUF's, and it records the base fingerprint, which a
load from the folder must reproduce (the same dequantized float32 values). A failed write
is reported and the run goes on from the GGUF file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from typing import Any, Mapping, Optional

from peft_jax.compile_cache import OFF, user_cache_root
from peft_jax.models import gguf
from peft_jax.models.llama import LLAMA
from peft_jax.models.streaming import source_fingerprint
from peft_jax.models.tokenizer import load_tokenizer

ENV = "PEFT_JAX_MODEL_CACHE"
CONVERSION_VERSION = 1
MARKER = "source.json"


def folder_for(gguf_path: str, environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The cache folder of ``gguf_path`` (None: the cache is off)."""
    value = environ.get(ENV)
    if value is not None and value.strip().lower() in OFF + ("",):
        return None
    root = os.path.expanduser(value) if value else os.path.join(user_cache_root(environ), "models")
    path = os.path.abspath(gguf_path)
    st = os.stat(path)
    key = json.dumps([path, st.st_size, st.st_mtime_ns, CONVERSION_VERSION])
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(os.path.abspath(root), f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}")


def cached(gguf_path: str) -> Optional[tuple[str, str]]:
    """``(folder, fingerprint)`` of a complete conversion of ``gguf_path`` (None: none)."""
    folder = folder_for(gguf_path)
    marker = os.path.join(folder, MARKER) if folder else ""
    if not folder or not os.path.isfile(marker):
        return None
    try:
        with open(marker) as f:
            return folder, str(json.load(f)["fingerprint"])
    except (OSError, ValueError, KeyError):
        return None


def same_tokenizer(a: Any, b: Any) -> bool:
    """Equal vocabularies, special tokens and encodings of a sample text."""
    text = "Hello world! It was great. <|im_start|> 12345 éàü"
    return (a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens
            and a(text)["input_ids"] == b(text)["input_ids"])


def conversion(gguf_path: str) -> Optional[tuple[str, str]]:
    """``(folder, fingerprint)`` of the conversion of ``gguf_path``, made now if there is
    none yet (None: the cache is off, or the conversion could not be written)."""
    if folder_for(gguf_path) is None:
        return None
    return cached(gguf_path) or convert(gguf_path)


def convert(gguf_path: str) -> Optional[tuple[str, str]]:
    """Read ``gguf_path`` (config, float32 base, tokenizer), write its folder; returns
    ``(folder, fingerprint)``, or None (with a line on stderr) when the write fails."""
    config, source = gguf.open_gguf(gguf_path)
    base = LLAMA.params_from_hf(source, config)
    tokenizer = gguf.load_gguf_tokenizer(gguf_path)
    fingerprint = source_fingerprint(LLAMA, config, source)
    folder = folder_for(gguf_path)
    tmp = f"{folder}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        LLAMA.save(tmp, config, base)
        tokenizer.save_pretrained(tmp)
        reread, _ = LLAMA.open(tmp)
        if reread != config:
            raise ValueError(f"the saved config reads back as {reread}, not {config}")
        if not same_tokenizer(load_tokenizer(tmp), tokenizer):
            raise ValueError("the saved tokenizer does not read back equal")
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"gguf": os.path.abspath(gguf_path), "fingerprint": fingerprint,
                       "conversion_version": CONVERSION_VERSION}, f, indent=1)
        if os.path.exists(folder):   # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        return folder, fingerprint
    except (OSError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"[peft_jax] not caching the conversion of {gguf_path} ({e}); the next run "
              "reads the GGUF file again", file=sys.stderr, flush=True)
        return None
