"""Reading and writing Hugging Face checkpoint folders without torch and without pickle.

A folder holds ``config.json`` and either ``model.safetensors`` or sharded
``model-0000x-of-0000y.safetensors`` files with ``model.safetensors.index.json``.
Family modules (``bert.py``, ``llama.py``, ``t5.py``) map the flat HF tensor names to
their nested base pytree; this module only moves bytes and validates.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be loaded; the message names the file/tensor."""


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None


def _refuse_pickles(folder: str) -> None:
    pickles = sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle-based weights found ({', '.join(pickles)}). peft_jax never "
            "unpickles (it can run arbitrary code). Convert once, in an environment you trust: "
            "`python -c \"import torch, safetensors.torch as st; "
            "st.save_file(torch.load('pytorch_model.bin', weights_only=True), "
            "'model.safetensors')\"` or `transformers`' `save_pretrained(..., "
            "safe_serialization=True)`.")


def safetensors_files(folder: str) -> list[str]:
    """The safetensors files of a folder (single file or the shards named by the index)."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a directory")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: missing 'weight_map'")
        files = sorted(set(weight_map.values()))
        for fn in files:
            if not os.path.isfile(os.path.join(folder, fn)):
                raise CheckpointError(f"{index}: names shard {fn!r}, which is missing from {folder}")
        return [os.path.join(folder, fn) for fn in files]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    others = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if others:
        return [os.path.join(folder, f) for f in others]
    _refuse_pickles(folder)
    raise CheckpointError(f"{folder}: no model.safetensors (or sharded index) found")


def load_safetensors(folder: str) -> dict[str, np.ndarray]:
    """All tensors of a folder as ``{hf_name: np.ndarray}`` (bf16/f16 upcast to f32)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for path in safetensors_files(folder):
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors file ({e}); "
                                  "is it truncated or corrupted?") from None
        except TypeError:  # bf16 is not a numpy dtype: go through ml_dtypes
            tensors = _load_bf16(path)
        for k, v in tensors.items():
            out[k] = np.asarray(v, np.float32) if v.dtype.kind == "f" or str(v.dtype) == "bfloat16" else v
    return out


def _load_bf16(path: str) -> dict[str, np.ndarray]:
    import ml_dtypes
    from safetensors import safe_open

    res = {}
    with safe_open(path, framework="flax") as f:  # jax arrays understand bf16
        for k in f.keys():
            res[k] = np.asarray(f.get_tensor(k)).astype(ml_dtypes.bfloat16)
    return res


def save_safetensors(folder: str, tensors: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Write ``config.json`` + ``model.safetensors`` (atomically: temp file, then rename)."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
    tmp = os.path.join(folder, ".model.safetensors.tmp")
    save_file(arrays, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)


MISSING = object()


def config_field(cfg: Mapping[str, Any], name: str, kind: type, default: Any = MISSING,
                 source: str = "config.json") -> Any:
    """``cfg[name]`` converted to ``kind`` (``default`` when absent or null); a missing
    required field or a value of the wrong type is a CheckpointError naming the field."""
    if cfg.get(name) is None:
        if default is MISSING:
            raise CheckpointError(f"{source}: missing config field {name!r}")
        return default
    value = cfg[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, (int, float))
                        or int(value) != value):
        raise CheckpointError(f"{source}: config field {name}={value!r} is not an integer")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: config field {name}={value!r} is not "
                              f"a valid {kind.__name__}") from None


def take(tensors: Mapping[str, np.ndarray], name: str, shape: tuple, source: str = "") -> np.ndarray:
    """Fetch tensor ``name`` and check its shape, naming it in any error."""
    if name not in tensors:
        raise CheckpointError(f"{source}: missing tensor {name!r}")
    arr = tensors[name]
    if tuple(arr.shape) != tuple(shape):
        raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, "
                              f"config implies {tuple(shape)}")
    return arr


def check_keys(config: Mapping[str, Any], supported: Mapping[str, Any], source: str) -> None:
    """Raise if a config field has a value we do not implement: {field: allowed values}."""
    for field, allowed in supported.items():
        if field in config and config[field] is not None and config[field] not in allowed:
            raise CheckpointError(f"{source}: config field {field}={config[field]!r} is not "
                                  f"supported; supported: {sorted(map(str, allowed))}")


# ----------------------------------------------------------------------------- layouts
# A family describes its checkpoint as a layout: one entry per base leaf,
# ``(path in the base pytree, HF tensor name, kind, our shape)`` with kind ``"linear"``
# (our kernel ``[in, out]`` = HF weight ``[out, in]`` transposed) or anything else (as is).

LayoutEntry = tuple  # (tuple[str, ...], str, str, tuple[int, ...])


def set_path(tree: dict, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def get_path(tree: Mapping, path: tuple) -> Any:
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            raise KeyError("/".join(path))
        tree = tree[k]
    return tree


def tree_from_layout(tensors: Mapping[str, np.ndarray], layout, source: str = "checkpoint",
                     rename=None) -> dict:
    """Flat HF tensors -> nested base pytree (float32), checking every name and shape.

    ``rename(hf_name) -> name in tensors`` handles prefixes and old spellings.
    """
    base: dict = {}
    for path, hf, kind, shape in layout:
        name = rename(hf) if rename else hf
        hf_shape = tuple(shape)[::-1] if kind == "linear" else tuple(shape)
        arr = np.asarray(take(tensors, name, hf_shape, source), np.float32)
        set_path(base, path, np.ascontiguousarray(arr.T) if kind == "linear" else arr)
    return base


def tensors_from_layout(base: Mapping, layout, rename=None) -> dict[str, np.ndarray]:
    """Nested base pytree -> flat HF tensors; a missing or mis-shaped leaf is named."""
    import flax.linen as nn

    base = nn.meta.unbox(base)
    out: dict[str, np.ndarray] = {}
    for path, hf, kind, shape in layout:
        where = "/".join(path)
        try:
            arr = np.asarray(get_path(base, path), np.float32)
        except KeyError:
            raise CheckpointError(f"base params: missing leaf {where!r}") from None
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"base params: leaf {where!r} has shape {tuple(arr.shape)}, "
                                  f"config implies {tuple(shape)}")
        out[rename(hf) if rename else hf] = np.ascontiguousarray(arr.T) if kind == "linear" else arr
    return out
