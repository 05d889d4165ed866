"""Hugging Face PEFT interop: export a delta as an HF PEFT adapter folder and import one.

An HF PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
(what ``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained`` reads). This
module moves files and names; each method class owns its own tensors
(``to_hf_peft`` / ``from_hf_peft``, see :mod:`peft_jax.peft.method`), and the adapter's
``peft_type`` picks the class from the registry. Tensor names, as peft 0.21 writes them
(adapter name removed), are ``base_model.model.<module>.<tensor>`` for per-module
methods (LoRA, IA3, ...) and ``prompt_embeddings`` for prompt / prefix tuning.

``<module>`` is the model family's HF module name of our module path, plus the prefix of
the HF class the adapter is for (``""`` for ``BertModel`` and ``*ForCausalLM``;
``"bert."`` for ``BertForSequenceClassification``): :class:`~peft_jax.peft.method.HfNames`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from safetensors.numpy import save_file

from peft_jax.models.hf_io import CheckpointError
from peft_jax.peft import tree
from peft_jax.peft.delta_io import atomic_folder
from peft_jax.peft.method import HfNames, NotSupported, PeftMethod, hf_peft_class
from peft_jax.peft.partition import leaf_paths
from peft_jax.safetensors_header import check_expected, read_header, read_tensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
HF_PREFIX = "base_model.model."

ModuleNameFn = Callable[[str], str]

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "HF_PREFIX", "HfNames", "export_method",
           "import_hf_peft", "read_adapter", "module_paths"]


def _peft_version() -> str:
    try:
        from importlib.metadata import version
        return version("peft")
    except Exception:
        return "0.21.0"


def dense_shapes(base: Any) -> dict[str, tuple[int, int]]:
    """``{module path: (in, out)}`` of every 2-D ``kernel`` of a base pytree (arrays or
    ShapeDtypeStructs), the ``dense`` field of :class:`HfNames`."""
    return {tree.parent(p): tuple(int(n) for n in np.shape(x)) for p, x in leaf_paths(base)
            if p.endswith("/kernel") and len(np.shape(x)) == 2}


def module_paths(base: Any) -> list[str]:
    """Every module path of a base pytree (all proper prefixes of leaf paths)."""
    out = set()
    for p, _ in leaf_paths(base):
        keys = p.split("/")[:-1]
        for i in range(1, len(keys) + 1):
            out.add("/".join(keys[:i]))
    return tree.natural_sorted(out)


# ----------------------------------------------------------------------------- helpers for methods


def patterns(names_values) -> tuple[Any, dict]:
    """Default (most common value) and HF ``*_pattern`` dict (exact, escaped names) of the rest."""
    vals = [v for _, v in names_values]
    default = max(sorted(set(vals), key=str), key=vals.count)
    return default, {re.escape(n): v for n, v in names_values if v != default}


def config_path(folder: str) -> str:
    return os.path.join(folder, CONFIG_FILE)


def weights_path(folder: str) -> str:
    return os.path.join(folder, WEIGHTS_FILE)


def refuse(cfg: Mapping, folder: str, field: str, ok) -> None:
    """A config field whose value peft_jax does not implement is an error naming it."""
    if field in cfg and not ok(cfg[field]):
        raise CheckpointError(f"{config_path(folder)}: {field}={cfg[field]!r} is not supported "
                              "by peft_jax import")


def reverse_names(names: HfNames) -> dict[str, str]:
    """HF module name -> our module path, for every module of the base."""
    out = {}
    for p in names.module_paths:
        try:
            out[names.hf(p)] = p
        except ValueError:
            continue
    return out


def module_of(key: str, suffix: str, by_name: Mapping[str, str], folder: str) -> tuple[str, str]:
    """``(our module path, HF module name)`` of tensor ``key`` = prefix + module + suffix."""
    where = weights_path(folder)
    if not key.startswith(HF_PREFIX) or not key.endswith(suffix):
        raise CheckpointError(f"{where}: unexpected tensor {key!r}")
    hf = key[len(HF_PREFIX): -len(suffix)]
    if hf not in by_name:
        close = [n for n in by_name if n.split(".")[-1] == hf.split(".")[-1]][:5]
        raise CheckpointError(f"{where}: tensor {key!r} is for module {hf!r}, which this model "
                              f"does not have (similar: {close})")
    return by_name[hf], hf


def hf_pattern_value(patterns_: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """HF PEFT's ``get_pattern_key`` rule: first key with ``(.*\\.)?(key)$`` matching."""
    for key, value in patterns_.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


# ----------------------------------------------------------------------------- export


def export_method(folder: str, delta: Any, method: PeftMethod, names: Optional[HfNames] = None,
                  *, overwrite: bool = True, hf_module_name: Optional[ModuleNameFn] = None,
                  **names_kw) -> str:
    """Write ``method``'s part of ``delta`` as an HF PEFT adapter folder; returns ``folder``.

    ``names``: the naming context (or give its fields as keywords: ``hf_module_name=``,
    ``task_type=``...). HF's ``PeftModel`` only applies prompts and prefixes with a
    ``task_type`` (``"FEATURE_EXTRACTION"``, ``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...).
    """
    if names is None:
        names = HfNames(module_name=hf_module_name, **names_kw)
    fields, tensors = method.to_hf_peft(delta, names)
    cfg: dict[str, Any] = {"peft_type": method.peft_type, "peft_version": _peft_version(),
                           "task_type": names.task_type, "inference_mode": True,
                           "base_model_name_or_path": names.base_model_name_or_path,
                           "revision": None, "modules_to_save": None}
    cfg.update(fields)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}

    def write(tmp: str) -> None:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)

    atomic_folder(folder, write, overwrite, CONFIG_FILE)
    return folder


# ----------------------------------------------------------------------------- import


def adapter_files(folder: str) -> tuple[dict, str]:
    """``(adapter_config, weights path)`` of an HF PEFT adapter folder (no tensor read)."""
    cpath, wpath = config_path(folder), weights_path(folder)
    if not os.path.isfile(cpath):
        raise CheckpointError(f"{folder}: no {CONFIG_FILE} (not an HF PEFT adapter folder)")
    try:
        with open(cpath) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cpath}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cpath}: not a JSON object")
    if not os.path.isfile(wpath):
        if os.path.isfile(os.path.join(folder, "adapter_model.bin")):
            raise CheckpointError(f"{folder}: only adapter_model.bin (pickle) found; peft_jax "
                                  "never unpickles. Re-save with safe_serialization=True")
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE}")
    return cfg, wpath


def read_adapter(folder: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(adapter_config, tensors)`` of an HF PEFT adapter folder (no pickle; every tensor
    its validated header names -- :func:`import_hf_peft` checks them against the model
    before reading)."""
    cfg, wpath = adapter_files(folder)
    read_header(wpath)
    return cfg, read_tensors(wpath)


FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def module_tensor_shapes(shapes: Mapping[str, tuple], names: HfNames, folder: str,
                         suffixes: Sequence[str],
                         shape_of: Callable[[str, str, int, int, tuple], tuple]
                         ) -> Optional[dict[str, tuple]]:
    """Expected shapes of a per-module adapter's tensors ``HF_PREFIX + module + suffix``
    found in its header ``shapes``: ``shape_of(suffix, hf module name, n_in, n_out, shape in
    the header)``. A tensor with none of ``suffixes`` is left out (so refused as unexpected);
    one of a module this model lacks is refused by :func:`module_of`. None when ``names``
    has no kernel shapes (``dense``)."""
    if not names.dense:
        return None
    by_name = reverse_names(names)
    out = {}
    for key, got in shapes.items():
        suffix = next((x for x in suffixes if key.endswith(x)), None)
        if suffix is None or not key.startswith(HF_PREFIX):
            continue
        mod, hf = module_of(key, suffix, by_name, folder)
        if mod in names.dense:
            out[key] = tuple(int(n) for n in shape_of(suffix, hf, *names.dense[mod], tuple(got)))
    return out


def check_adapter_header(cls: type, cfg: Mapping, folder: str, names: HfNames) -> None:
    """Compare the adapter's safetensors header with what ``cfg`` and the model give
    (``cls.hf_peft_shapes``), before reading any tensor: an unexpected tensor, one of another
    shape or a non-float one is a :class:`CheckpointError` naming it (and its size)."""
    wpath = weights_path(folder)
    infos = read_header(wpath)
    what = f"a {cfg.get('peft_type')} adapter for this model with its {CONFIG_FILE}"
    odd = [f"{k!r} {i.describe()}" for k, i in infos.items() if i.dtype not in FLOAT_DTYPES]
    if odd:
        raise CheckpointError(f"{wpath}: non-float tensor(s) {', '.join(odd[:5])} that {what} "
                              "does not have; nothing was read")
    try:
        shapes = cls.hf_peft_shapes(cfg, {k: i.shape for k, i in infos.items()}, names, folder)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path(folder)}: unusable field ({e!r})") from None
    if shapes is not None:
        check_expected(wpath, infos, {k: (s, infos[k].dtype if k in infos else "float32")
                                      for k, s in shapes.items()}, allow_missing=True, what=what)


def import_hf_peft(folder: str, names: Optional[HfNames] = None, *, base: Any = None,
                   hf_module_name: Optional[ModuleNameFn] = None,
                   attention_paths: Optional[Sequence[str]] = None, **names_kw
                   ) -> tuple[dict, dict]:
    """Read an HF PEFT adapter folder into ``(delta, info)``.

    ``names`` (or ``base=`` + ``hf_module_name=`` + ``attention_paths=``): per-module
    methods (LoRA, IA3) need the base's module paths and the family's module names; prefix
    tuning needs the attention modules in layer order. ``info``: ``method`` (the equivalent
    peft_jax method), ``kind`` (its registry name), ``config`` (the adapter config) and
    ``modules`` (our module paths holding its leaves).

    Before any tensor byte is read, the file's header is compared with the shapes the
    adapter config and the model give (:func:`check_adapter_header`).
    """
    if names is None:
        names = HfNames(module_name=hf_module_name,
                        module_paths=module_paths(base) if base is not None else (),
                        attention_paths=tuple(attention_paths or ()),
                        dense=dense_shapes(base) if base is not None else {}, **names_kw)
    cfg, wpath = adapter_files(folder)
    cpath = config_path(folder)
    refuse(cfg, folder, "modules_to_save", lambda v: not v)
    try:
        cls = hf_peft_class(cfg)
    except NotSupported as e:
        raise CheckpointError(f"{cpath}: {e}") from None
    check_adapter_header(cls, cfg, folder, names)
    tensors = read_tensors(wpath)
    try:
        method, delta = cls.from_hf_peft(cfg, tensors, names, folder)
    except NotSupported as e:
        raise CheckpointError(f"{cpath}: {e}") from None
    mods = tree.natural_sorted({tree.parent(p) for p in tree.flatten(delta)})
    return delta, {"method": method, "kind": method.name, "config": cfg, "modules": mods}
