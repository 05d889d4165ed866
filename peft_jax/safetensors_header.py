"""Safetensors headers: names, dtypes, shapes and byte ranges, read before any tensor byte.

A safetensors file is ``<u64 little-endian n><n bytes of JSON header><data>``; the header
maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into
the data). :func:`read_header` reads and validates only that header (the header size
against the file size, each tensor's byte range against its dtype and shape and against
the data actually present), so a file can be compared with what a caller expects
(:func:`check_expected`) and refused -- naming the tensors -- before anything large is
read. :func:`read_tensors` then reads only the named tensors (memory-mapped, one at a time).
Errors are :class:`~peft_jax.models.hf_io.CheckpointError` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Iterable, Mapping, Optional

import numpy as np

from peft_jax.models.hf_io import CheckpointError

# safetensors dtype -> (numpy-style name, bytes per element)
DTYPES = {"BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "U16": ("uint16", 2),
          "I16": ("int16", 2), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
          "U32": ("uint32", 4), "I32": ("int32", 4), "F32": ("float32", 4),
          "U64": ("uint64", 8), "I64": ("int64", 8), "F64": ("float64", 8),
          "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1)}
MAX_HEADER_BYTES = 100 << 20  # the format's own limit


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str                   # numpy-style name: "float32", "bfloat16", ...
    shape: tuple[int, ...]
    begin: int                   # byte offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)} ({human_bytes(self.nbytes)})"


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n} B"


def read_header(path: str) -> dict[str, TensorInfo]:
    """``{name: TensorInfo}`` of a safetensors file, validated (see the module docstring)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: not a safetensors file (header size {n} for a "
                                      f"file of {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header (not a JSON object)")
    data_size = size - 8 - n
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, itemsize = DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(o) for o in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}: "
                                  f"{json.dumps(spec)[:200]}") from None
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != count * itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} has byte range [{begin}, {end}) "
                                  f"for {dtype}{list(shape)}")
        if end > data_size:
            raise CheckpointError(f"{path}: tensor {name!r} ends at byte {end} of the data but "
                                  f"the file holds {data_size} (truncated or corrupted)")
        out[name] = TensorInfo(name, dtype, shape, begin, end)
    return out


Spec = Mapping[str, tuple]  # name -> (shape, dtype name)


def check_expected(path: str, infos: Mapping[str, TensorInfo], expected: Spec, *,
                   allow_missing: bool = False, skip_small_unusable: bool = False,
                   what: str = "this run") -> list[str]:
    """Compare a header with ``expected`` (``{name: (shape, dtype)}``); returns the names
    to read. Refused (:class:`CheckpointError` naming the tensors): a tensor ``expected``
    does not name, or one whose shape or dtype differs -- with ``skip_small_unusable``,
    such a tensor that is no larger than the largest expected one is skipped instead (not
    read) -- and an expected tensor the file lacks (unless ``allow_missing``)."""
    largest = max((int(np.prod(s, dtype=np.int64)) * np.dtype(_np_dtype(d)).itemsize
                   for s, d in expected.values()), default=0)
    refuse = lambda info: not (skip_small_unusable and info.nbytes <= largest)
    unexpected = sorted(k for k in infos if k not in expected and refuse(infos[k]))
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected tensor(s) "
            + ", ".join(f"{k!r} {infos[k].describe()}" for k in unexpected[:5])
            + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
            + f" that {what} does not have; nothing was read")
    take, bad = [], []
    for name, info in infos.items():
        if name not in expected:
            continue
        shape, dtype = expected[name]
        if (tuple(shape), str(dtype)) == (info.shape, info.dtype):
            take.append(name)
        elif refuse(info):
            bad.append(f"{name!r} is {info.describe()}, {what} expects {dtype}{list(shape)}")
    if bad:
        raise CheckpointError(f"{path}: " + "; ".join(bad[:5]) + "; nothing was read")
    missing = sorted(set(expected) - set(infos))
    if missing and not allow_missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]} that {what} expects")
    return take


def _np_dtype(name: str):
    if name == "bfloat16" or name.startswith("float8"):
        import ml_dtypes
        return getattr(ml_dtypes, name)
    return np.dtype(name)


def read_tensors(path: str, names: Optional[Iterable[str]] = None) -> dict[str, np.ndarray]:
    """The named tensors (default: all) as numpy arrays; only their bytes are read
    (bfloat16 / float8 come back as ``ml_dtypes`` arrays)."""
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(path, framework="numpy") as f:
            for k in (list(f.keys()) if names is None else names):
                try:
                    out[k] = f.get_tensor(k)
                except TypeError:  # a dtype numpy lacks: go through jax (ml_dtypes)
                    with safe_open(path, framework="flax") as g:
                        out[k] = np.asarray(g.get_tensor(k))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    return out
