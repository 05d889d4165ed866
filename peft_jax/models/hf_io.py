"""Reading and writing Hugging Face checkpoint folders without torch and without pickle.

A folder holds ``config.json`` and either ``model.safetensors`` or sharded
``model-0000x-of-0000y.safetensors`` files with ``model.safetensors.index.json``.

Reading goes through a *tensor source* (:class:`TensorSource`): names, shapes and dtypes
come from the safetensors headers alone, and bytes are read tensor by tensor (or a range of
leading rows of one tensor) with ``os.pread`` when asked. So a layout can be checked against
the header before any tensor is read (an extra or oversized tensor fails in milliseconds),
and a sharded loader reads only the rows its devices hold. The header is parsed here rather
than through ``safetensors.safe_open`` because its numpy backend has no bfloat16; the format
is 8 bytes of header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, data.

Family objects (``peft_jax.models.family``) describe their checkpoint as a *layout*: one
entry per base leaf, ``(path in the base pytree, HF tensor name, kind, our shape)`` with kind
``"linear"`` (our kernel ``[in, out]`` = HF weight ``[out, in]`` transposed) or anything else
(as is). :func:`check_layout`, :func:`tree_from_layout` and :func:`tensors_from_layout` are
the one implementation of the conversion.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import ml_dtypes
import numpy as np
from flax import traverse_util

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 2 ** 20

DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
          "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
          "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


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


# ----------------------------------------------------------------------------- sources


class TensorSource:
    """Named tensors whose shapes and dtypes are known before any byte is read.

    ``read(name, rows)`` returns the tensor (or rows ``rows`` of its leading axis) as a
    numpy array in its stored dtype (bfloat16 as ``ml_dtypes.bfloat16``).
    """

    where: str = "checkpoint"
    cheap_rows: bool = True  # reading a few rows costs a few rows (not the whole tensor)

    def names(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        raise NotImplementedError

    def read(self, name: str, rows: Optional[slice] = None) -> np.ndarray:
        raise NotImplementedError

    def read_rows(self, name: str, rows: Sequence[int]) -> np.ndarray:
        """Rows ``rows`` (indices along the leading axis) of a tensor, ``[len(rows), ...]``."""
        return np.stack([self.read(name, slice(int(r), int(r) + 1))[0] for r in rows])

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def nbytes(self, name: str) -> int:
        shape, dtype = self.info(name)
        return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


class ArraySource(TensorSource):
    """In-memory tensors (a dict of arrays, e.g. a torch ``state_dict`` as numpy)."""

    def __init__(self, tensors: Mapping[str, Any], where: str = "checkpoint"):
        self.tensors, self.where = tensors, where

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name):
        a = self.tensors[name]
        return tuple(np.shape(a)), np.dtype(a.dtype)

    def read(self, name, rows=None):
        a = np.asarray(self.tensors[name])
        return a if rows is None else a[rows]


def as_source(tensors: Any, where: str = "checkpoint") -> TensorSource:
    return tensors if isinstance(tensors, TensorSource) else ArraySource(tensors, where)


def read_header(path: str) -> tuple[dict, int]:
    """(``{name: {dtype, shape, data_offsets}}``, offset of the data) of one safetensors file;
    a header that does not fit the file is a CheckpointError ("truncated or corrupted")."""
    bad = f"{path}: cannot read safetensors file"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{bad} (shorter than 8 bytes); is it truncated or corrupted?")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{bad} (header length {n} for a {size}-byte file); is it "
                                      "truncated or corrupted?")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{bad} ({e}); is it truncated or corrupted?") from None
    header.pop("__metadata__", None)
    start, data = 8 + n, size - 8 - n
    for name, t in header.items():
        try:
            dtype = DTYPES[t["dtype"]]
            shape = tuple(int(s) for s in t["shape"])
            lo, hi = (int(o) for o in t["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{bad}: tensor {name!r} has an unsupported or malformed header "
                                  f"entry {t!r}") from None
        if hi - lo != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or lo < 0 or hi > data:
            raise CheckpointError(f"{bad}: tensor {name!r} ({t['dtype']} {list(shape)}) does not "
                                  f"fit the file's {data} data bytes; is it truncated or corrupted?")
    return header, start


class SafetensorsFolder(TensorSource):
    """The tensors of a HF folder (single or sharded safetensors), read lazily."""

    def __init__(self, folder: str):
        self.where = folder
        self._entries: dict[str, tuple[str, np.dtype, tuple, int]] = {}
        for path in safetensors_files(folder):
            header, start = read_header(path)
            for name, t in header.items():
                self._entries[name] = (path, DTYPES[t["dtype"]], tuple(t["shape"]),
                                       start + int(t["data_offsets"][0]))

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def info(self, name):
        _, dtype, shape, _ = self._entries[name]
        return shape, dtype

    def file_of(self, name: str) -> str:
        return self._entries[name][0]

    def read(self, name, rows=None):
        path, dtype, shape, offset = self._entries[name]
        lo, hi = (0, shape[0] if shape else 1) if rows is None else rows.indices(shape[0])[:2]
        hi = max(hi, lo)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        buf = bytearray((hi - lo) * row)
        with open(path, "rb", buffering=0) as f:
            self._pread(f, name, memoryview(buf), offset + lo * row)
        return np.frombuffer(buf, dtype).reshape((hi - lo,) + tuple(shape[1:]) if shape else ())

    def read_rows(self, name, rows):
        """As :meth:`TensorSource.read_rows`, the file opened once for all rows."""
        path, dtype, shape, offset = self._entries[name]
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        buf = bytearray(len(rows) * row)
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            for i, r in enumerate(rows):
                if not 0 <= int(r) < shape[0]:
                    raise IndexError(f"{name}: row {r} of {shape[0]}")
                self._pread(f, name, view[i * row:(i + 1) * row], offset + int(r) * row)
        return np.frombuffer(buf, dtype).reshape((len(rows),) + tuple(shape[1:]))

    @staticmethod
    def _pread(f: Any, name: str, view: memoryview, at: int) -> None:
        """Fill ``view`` from byte ``at`` of the open file ``f``."""
        pos = 0
        while pos < len(view):
            n = os.preadv(f.fileno(), [view[pos:]], at + pos)
            if n <= 0:
                raise CheckpointError(f"{f.name}: tensor {name!r} is cut short; is the file "
                                      "truncated or corrupted?")
            pos += n


def load_safetensors(folder: str) -> dict[str, np.ndarray]:
    """All tensors of a folder as ``{hf_name: np.ndarray}`` (bf16/f16 upcast to f32)."""
    src = SafetensorsFolder(folder)
    return {k: _float32(src.read(k)) for k in src.names()}


def _float32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32) if a.dtype.kind == "f" or a.dtype == DTYPES["BF16"] else a


# ----------------------------------------------------------------------------- writing


def _write_file(path: str, items: Sequence[tuple[str, np.ndarray]], metadata: dict) -> None:
    header: dict = {"__metadata__": metadata}
    pos = 0
    for name, a in items:
        if a.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {a.dtype}, which "
                                  "safetensors cannot store")
        header[name] = {"dtype": DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, a in items:
            f.write(np.ascontiguousarray(a).tobytes())


def save_safetensors(folder: str, tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
                     config: Mapping[str, Any], max_shard_bytes: Optional[int] = None) -> list[str]:
    """Write ``config.json`` + ``model.safetensors`` (or, past ``max_shard_bytes``, shards
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``), atomically per
    file (temporary name, then rename). ``tensors`` may be an iterator of ``(name, array)``:
    then at most one shard is held in memory. Returns the files written."""
    os.makedirs(folder, exist_ok=True)
    items: Iterator = iter(tensors.items() if isinstance(tensors, Mapping) else tensors)
    shards: list[list[tuple[str, np.ndarray]]] = []
    tmp_names: list[str] = []
    current: list = []
    size = 0

    def flush():
        tmp = os.path.join(folder, f".shard-{len(tmp_names)}.tmp")
        _write_file(tmp, current, {"format": "pt"})
        tmp_names.append(tmp)
        shards.append([(k, None) for k, _ in current])

    for name, arr in items:
        a = np.asarray(arr)
        if current and max_shard_bytes and size + a.nbytes > max_shard_bytes:
            flush()
            current, size = [], 0
        current.append((name, a))
        size += a.nbytes
    flush()
    n = len(tmp_names)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    for tmp, fn in zip(tmp_names, names):
        os.replace(tmp, os.path.join(folder, fn))
    index = os.path.join(folder, "model.safetensors.index.json")
    if n > 1:
        weight_map = {k: fn for fn, shard in zip(names, shards) for k, _ in shard}
        with open(index + ".tmp", "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
        os.replace(index + ".tmp", index)
    elif os.path.exists(index):
        os.remove(index)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
    return [os.path.join(folder, fn) for fn in names]


# ----------------------------------------------------------------------------- config fields

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


def field_reader(cfg: Mapping[str, Any], source: str) -> Callable[..., Any]:
    """``field(name, kind, default=MISSING)``: :func:`config_field` of ``cfg`` for ``source``."""
    return functools.partial(config_field, cfg, source=source)


def construct(cls: type, kwargs: Mapping[str, Any], source: str) -> Any:
    """``cls(**kwargs)``; its validation errors become a CheckpointError naming ``source``."""
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def check_keys(config: Mapping[str, Any], supported: Mapping[str, Any], source: str) -> None:
    """Raise if a config field has a value we do not implement: {field: allowed values}."""
    for field, allowed in supported.items():
        if field in config and config[field] is not None and config[field] not in allowed:
            raise CheckpointError(f"{source}: config field {field}={config[field]!r} is not "
                                  f"supported; supported: {sorted(map(str, allowed))}")


# ----------------------------------------------------------------------------- layouts

LayoutEntry = tuple  # (tuple[str, ...], str, str, tuple[int, ...])
Rename = Optional[Callable[[str], str]]


def hf_shape(kind: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The HF tensor's shape for one of our leaves (``linear``: ``[out, in]``)."""
    return tuple(shape)[::-1] if kind == "linear" else tuple(shape)


def check_layout(source: TensorSource, layout: Sequence[LayoutEntry], rename: Rename = None,
                 ignored: Sequence[str] = ()) -> dict[tuple, str]:
    """Names, shapes and dtypes of the header against the layout, before any byte is read.

    Returns ``{our path: name in the source}``. A missing tensor, one of another shape, a
    non-float one, or a tensor that neither the layout nor the ``ignored`` regexes account
    for is a CheckpointError naming it (with its size: a stray multi-GB tensor is refused
    without being read).
    """
    where = source.where
    names: dict[tuple, str] = {}
    for path, hf, kind, shape in layout:
        name = rename(hf) if rename else hf
        if name not in source:
            raise CheckpointError(f"{where}: missing tensor {name!r}")
        got, dtype = source.info(name)
        if tuple(got) != hf_shape(kind, shape):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(got)}, "
                                  f"config implies {hf_shape(kind, shape)}")
        if DTYPE_NAMES.get(np.dtype(dtype)) not in FLOAT_DTYPES:
            raise CheckpointError(f"{where}: tensor {name!r} has dtype {dtype}; expected a "
                                  "floating-point tensor")
        names[tuple(path)] = name
    used = set(names.values())
    pattern = re.compile("|".join(f"(?:{p})" for p in ignored)) if ignored else None
    extra = [n for n in source.names()
             if n not in used and not (pattern and pattern.fullmatch(n))]
    if extra:
        shown = ", ".join(f"{n!r} ({list(source.info(n)[0])}, {source.info(n)[1]}, "
                          f"{source.nbytes(n):,} bytes)" for n in extra[:5])
        raise CheckpointError(f"{where}: unexpected tensor(s) {shown}"
                              + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
                              + "; not part of this model's checkpoint layout (not read)")
    return names


def from_hf_array(kind: str, arr: np.ndarray) -> np.ndarray:
    """HF tensor -> our leaf (``linear``: transposed)."""
    return np.ascontiguousarray(arr.T) if kind == "linear" else arr


def tree_from_layout(tensors: Any, layout: Sequence[LayoutEntry], source: str = "checkpoint",
                     rename: Rename = None, ignored: Sequence[str] = (),
                     dtype: Any = np.float32) -> dict:
    """HF tensors (a :class:`TensorSource` or a dict) -> nested base pytree in ``dtype``,
    every name, shape and dtype checked (:func:`check_layout`) before any is read.

    ``rename(hf_name) -> name in tensors`` handles prefixes and old spellings.
    """
    src = as_source(tensors, source)
    names = check_layout(src, layout, rename, ignored)
    flat = {path: from_hf_array(kind, np.asarray(src.read(names[tuple(path)]), dtype))
            for path, _, kind, _ in layout}
    return traverse_util.unflatten_dict(flat)


def tensors_from_layout(base: Mapping, layout: Sequence[LayoutEntry], rename: Rename = None,
                        dtype: Any = None) -> dict[str, np.ndarray]:
    """Nested base pytree -> flat HF tensors (in ``dtype``, default: each leaf's own);
    a missing or mis-shaped leaf is named."""
    import flax.linen as nn

    flat = traverse_util.flatten_dict(nn.meta.unbox(base))
    out: dict[str, np.ndarray] = {}
    for path, hf, kind, shape in layout:
        where = "/".join(path)
        if tuple(path) not in flat:
            raise CheckpointError(f"base params: missing leaf {where!r}")
        arr = np.asarray(flat[tuple(path)], dtype)
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"base params: leaf {where!r} has shape {tuple(arr.shape)}, "
                                  f"config implies {tuple(shape)}")
        out[rename(hf) if rename else hf] = from_hf_array(kind, arr)
    return out
