"""A delta as a checkpoint of its own: ``delta.safetensors`` + ``delta.json``.

``delta.safetensors`` holds every leaf under its ``'/'``-joined path
(``encoder/layer_0/attention/query/lora_a``), in its own dtype (bit-exact). ``delta.json``
holds the metadata::

    {"format": "peft_jax.delta", "format_version": 1, "peft_jax_version": "0.1.0",
     "base_id": "sentence-transformers/all-MiniLM-L6-v2", "base_hash": "sha256:...",
     "methods": [{"type": "peft_jax.peft.prompt.PromptTuning", "fields": {...}}, ...],
     "tree": {"prompt": {"shape": [20, 384], "dtype": "float32"}, ...},
     "tensors_sha256": "...", "extra": {...}}

Loading checks the file against ``tree`` and ``tensors_sha256`` (a truncated or modified
file is a :class:`~peft_jax.models.hf_io.CheckpointError` naming it) and, when the caller
says what it expects, the base model and method configuration (:class:`DeltaMismatch`
naming the field and both values). No pickle anywhere; writes are atomic (a temporary
folder renamed into place).

Base content hash (:func:`base_fingerprint`): SHA-256 over, for every leaf in sorted path
order, its path, dtype, shape and a strided sample of at most ``samples`` elements
(``flat[::max(1, n // samples)][:samples]``) as raw bytes. Cheap (a few KB read per leaf,
no full transfer from device), deterministic, and sensitive to any change of
architecture, dtype or weights that touches the sampled elements (fine-tuning or another
checkpoint changes essentially every element). A base cast to another dtype hashes
differently by design. Needs fully addressable arrays (single host, or gathered).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import numpy as np

from peft_jax.models.family import base_fingerprint  # noqa: F401  (the base hash, re-exported)
from peft_jax.models.hf_io import CheckpointError
from peft_jax.peft.partition import leaf_paths

FORMAT = "peft_jax.delta"
FORMAT_VERSION = 1
TENSORS_FILE = "delta.safetensors"
META_FILE = "delta.json"


class DeltaMismatch(CheckpointError):
    """The delta was made for another base model or another method configuration."""


def peft_jax_version() -> str:
    try:
        from importlib.metadata import version
        return version("peft_jax")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


# ----------------------------------------------------------------------------- base hash


# ----------------------------------------------------------------------------- method configs


def _jsonable(v: Any, where: str) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return method_config(v)
    if isinstance(v, enum.Enum):
        return _jsonable(v.value, where)
    if isinstance(v, (str, bool, int, float)) or v is None:
        return v
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x, f"{where}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x, f"{where}.{k}") for k, x in v.items()}
    if hasattr(v, "pattern") and hasattr(v, "flags"):  # compiled regex
        return v.pattern
    if hasattr(v, "dtype") and np.ndim(v) == 0:
        return np.asarray(v).item()
    if isinstance(v, type) or callable(v):
        return f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', repr(v))}"
    raise TypeError(f"method config field {where} = {v!r} ({type(v).__name__}) cannot be "
                    "stored in JSON metadata")


def method_config(method: Any) -> dict:
    """A method dataclass as JSON: ``{"type": "module.Class", "fields": {name: value}}``."""
    if not (dataclasses.is_dataclass(method) and not isinstance(method, type)):
        raise TypeError(f"a PEFT method must be a dataclass instance, got {type(method).__name__}")
    t = type(method)
    fields = {f.name: _jsonable(getattr(method, f.name), f"{t.__name__}.{f.name}")
              for f in dataclasses.fields(method)}
    return {"type": f"{t.__module__}.{t.__qualname__}", "fields": fields}


def methods_config(methods: Sequence[Any]) -> list[dict]:
    """JSON form of a sequence of methods (or of a ``Slots``)."""
    methods = getattr(methods, "methods", methods)
    return [m if isinstance(m, Mapping) else method_config(m) for m in methods]


def check_methods(found: Sequence[Mapping], expected: Sequence[Any], where: str) -> None:
    """Raise :class:`DeltaMismatch` naming the first differing method field."""
    expected = methods_config(expected)
    if len(found) != len(expected):
        raise DeltaMismatch(
            f"{where}: the delta was made with {len(found)} method(s) "
            f"{[m['type'].rsplit('.', 1)[-1] for m in found]}, this run has {len(expected)} "
            f"{[m['type'].rsplit('.', 1)[-1] for m in expected]}")
    for i, (f, e) in enumerate(zip(found, expected)):
        name = e["type"].rsplit(".", 1)[-1]
        if f["type"] != e["type"]:
            raise DeltaMismatch(f"{where}: method {i} is {f['type']} in the delta but "
                                f"{e['type']} in this run")
        ff, ef = f.get("fields", {}), e.get("fields", {})
        for key in sorted(set(ff) | set(ef)):
            a, b = ff.get(key, "<absent>"), ef.get(key, "<absent>")
            if a != b:
                raise DeltaMismatch(
                    f"{where}: method {i} ({name}) field {key!r} is {a!r} in the delta but "
                    f"{b!r} in this run")


# ----------------------------------------------------------------------------- save / load


def flatten_delta(delta: Any) -> dict[str, np.ndarray]:
    """``{'a/b/c': array}`` of a nested-dict delta (arrays moved to host, dtype kept)."""
    out = {}
    for path, leaf in leaf_paths(delta):
        arr = np.asarray(nn.meta.unbox(leaf))
        out[path] = np.ascontiguousarray(arr)
    return out


def unflatten_delta(flat: Mapping[str, Any]) -> dict:
    """Inverse of :func:`flatten_delta`."""
    tree: dict = {}
    for path, arr in flat.items():
        keys = path.split("/")
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = arr
    return tree


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_folder(folder: str, write, overwrite: bool, marker: str) -> None:
    """Run ``write(tmp_folder)`` then move ``tmp_folder`` to ``folder`` (replacing it)."""
    folder = os.path.abspath(folder)
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(folder):
        if not overwrite:
            raise FileExistsError(f"{folder} exists (pass overwrite=True to replace it)")
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder}: exists and is not a folder")
        if os.listdir(folder) and not os.path.isfile(os.path.join(folder, marker)):
            raise CheckpointError(f"{folder}: refusing to replace a non-empty folder that "
                                  f"holds no {marker}")
    tag = uuid.uuid4().hex[:8]
    tmp = os.path.join(parent, f".{name}.tmp-{tag}")
    os.makedirs(tmp)
    try:
        write(tmp)
        if os.path.exists(folder):
            old = os.path.join(parent, f".{name}.old-{tag}")
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_delta(folder: str, delta: Any, *, base_id: str, base_hash: str,
               methods: Sequence[Any] = (), extra: Optional[Mapping[str, Any]] = None,
               overwrite: bool = True) -> str:
    """Write ``delta`` (nested dicts of arrays) to ``folder``; returns the folder.

    ``methods``: the method dataclasses (or a ``Slots``); ``extra``: any JSON metadata.
    """
    from safetensors.numpy import save_file

    flat = flatten_delta(delta)
    for path in flat:
        if any(not k for k in path.split("/")):
            raise ValueError(f"delta path {path!r} has an empty key")
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "peft_jax_version": peft_jax_version(),
        "base_id": str(base_id), "base_hash": str(base_hash),
        "methods": methods_config(methods),
        "tree": {p: {"shape": list(a.shape), "dtype": a.dtype.name} for p, a in flat.items()},
        "extra": json.loads(json.dumps(dict(extra or {}))),
    }

    def write(tmp: str) -> None:
        tpath = os.path.join(tmp, TENSORS_FILE)
        save_file(flat, tpath, metadata={"format": FORMAT})
        meta["tensors_sha256"] = _file_sha256(tpath)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())

    atomic_folder(folder, write, overwrite, META_FILE)
    return folder


def read_delta_meta(folder: str) -> dict:
    """The JSON metadata of a saved delta (validated to be one)."""
    path = os.path.join(folder, META_FILE)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such delta folder")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no {META_FILE} (not a peft_jax delta folder)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e}); the file is corrupted") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a peft_jax delta metadata file "
                              f"(format={meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version={meta['format_version']} is newer than "
                              f"this peft_jax ({FORMAT_VERSION}); upgrade peft_jax")
    for key in ("base_id", "base_hash", "methods", "tree", "tensors_sha256"):
        if key not in meta:
            raise CheckpointError(f"{path}: metadata field {key!r} is missing")
    return meta


def tree_spec(tree: Any) -> dict[str, tuple]:
    """``{path: (shape, dtype name)}`` of a nested-dict tree (arrays or ShapeDtypeStructs),
    the ``expected`` argument of :func:`load_delta`."""
    return {p: (tuple(np.shape(x)), np.dtype(x.dtype).name)
            for p, x in ((p, nn.meta.unbox(x)) for p, x in leaf_paths(tree))}


def load_delta(folder: str, *, base_id: Optional[str] = None, base_hash: Optional[str] = None,
               methods: Optional[Sequence[Any]] = None, expected: Optional[Mapping[str, tuple]] = None,
               partial: bool = False) -> tuple[dict, dict]:
    """Read a delta saved by :func:`save_delta` -> ``(delta of numpy arrays, meta)``.

    Each of ``base_id``, ``base_hash``, ``methods`` that is given must match the metadata
    (else :class:`DeltaMismatch` naming the field and both values). Before any tensor byte
    is read or hashed, the safetensors header is compared with the ``tree`` recorded in
    ``delta.json`` and with ``expected`` (``{path: (shape, dtype)}``, e.g.
    :func:`tree_spec` of the parameters the caller will fill): a tensor ``expected`` does
    not name, or of another shape or dtype, is refused naming it (:class:`DeltaMismatch`),
    so a file holding e.g. an extra multi-GB tensor fails at once. ``partial=True`` (for
    ``config.train.init_from``): expected tensors may be absent, and a tensor this run
    cannot use (another name or shape) that is no larger than the largest expected one is
    skipped (not read, not returned); larger ones are still refused.
    """
    from peft_jax.safetensors_header import check_expected, read_header, read_tensors

    meta = read_delta_meta(folder)
    where = os.path.join(folder, META_FILE)
    for key, want in (("base_id", base_id), ("base_hash", base_hash)):
        if want is not None and meta[key] != want:
            raise DeltaMismatch(f"{where}: field {key!r} is {meta[key]!r} in the delta but "
                                f"{want!r} for this base model (a delta made for another base)")
    if methods is not None:
        check_methods(meta["methods"], methods, where)
    tpath = os.path.join(folder, TENSORS_FILE)
    if not os.path.isfile(tpath):
        raise CheckpointError(f"{folder}: {TENSORS_FILE} is missing")
    infos = read_header(tpath)
    recorded = {p: (tuple(spec["shape"]), spec["dtype"]) for p, spec in meta["tree"].items()}
    check_expected(tpath, infos, recorded, what=f"the tree recorded in {META_FILE}")
    names = list(recorded)
    if expected is not None:
        try:
            names = check_expected(tpath, infos, expected, allow_missing=partial,
                                   skip_small_unusable=partial, what="this run")
        except CheckpointError as e:
            raise DeltaMismatch(str(e)) from None
    digest = _file_sha256(tpath)
    if digest != meta["tensors_sha256"]:
        raise CheckpointError(f"{tpath}: content hash {digest[:16]}... differs from the "
                              f"{meta['tensors_sha256'][:16]}... recorded in {META_FILE}: the "
                              "file is corrupted or was modified")
    flat = read_tensors(tpath, names)
    return unflatten_delta(flat), meta


# ----------------------------------------------------------------------------- prompts as .npy


def prompt_leaves(delta: Any) -> dict[str, np.ndarray]:
    """``{dotted.path: [P, d] array}`` of every soft prompt (leaves named ``prompt``)."""
    out = {}
    for path, leaf in leaf_paths(delta):
        if path.split("/")[-1] == "prompt":
            out[path.replace("/", ".")] = np.asarray(nn.meta.unbox(leaf))
    return out


def export_prompt_npy(delta: Any, folder: str) -> list[str]:
    """Write each prompt as ``<dotted.path>.npy`` (e.g. ``encoder.prompt.npy``), each
    atomically (temp file + rename); returns the written paths."""
    prompts = prompt_leaves(delta)
    if not prompts:
        raise ValueError("export_prompt_npy: the delta has no 'prompt' leaf; leaves: "
                         f"{[p for p, _ in leaf_paths(delta)][:10]}")
    os.makedirs(folder, exist_ok=True)
    written = []
    for name, arr in prompts.items():
        path = os.path.join(folder, name + ".npy")
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp.npy")
        try:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        written.append(path)
    return written


def load_prompt_npy(path: str) -> np.ndarray:
    """A ``[P, d]`` prompt from ``.npy`` (no pickle); clear errors on bad files."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read .npy prompt ({e})") from None
    if arr.ndim != 2:
        raise CheckpointError(f"{path}: a prompt must be [length, d_model], got shape {arr.shape}")
    return arr
