"""A prompt library: a folder of exported soft prompts with metadata (SPoT sources).

Layout: ``<root>/<name>.npy`` (the prompt, [P, d], exactly as trained) and
``<root>/<name>.json`` (:class:`PromptMeta`). An entry exists once its ``.json`` exists;
both files are written atomically (temp file + rename), the array first, so a crash never
leaves a half-written entry that looks complete. Loading checks the array against the
recorded shape, dtype and SHA-256, so a replaced or truncated file fails clearly.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import hashlib
import io
import json
import os
import re
from typing import Any, Mapping, Optional

import numpy as np

from peft_jax.peft import delta_io

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


class LibraryError(ValueError):
    """A bad library entry, name or file; the message names it."""


@dataclasses.dataclass(frozen=True)
class PromptMeta:
    """Metadata of one library prompt.

    ``base_id``/``base_hash``: the base model the prompt was trained on (same meaning as in
    delta checkpoints); prompts are only comparable/transferable within one base model.
    ``metric``/``metric_value``: the source task's dev metric (e.g. "accuracy", 0.93).
    """

    name: str
    task: str
    base_id: str
    base_hash: Optional[str] = None
    length: int = 0
    d_model: int = 0
    dtype: str = "float32"
    init: Optional[str] = None
    seed: Optional[int] = None
    steps: Optional[int] = None
    metric: Optional[str] = None
    metric_value: Optional[float] = None
    sha256: str = ""
    source: Optional[str] = None
    created: str = ""
    extra: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str) -> "PromptMeta":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise LibraryError(f"{where}: unknown metadata field(s) {unknown}; allowed: {sorted(fields)}")
        for req in ("name", "task", "base_id"):
            if req not in d:
                raise LibraryError(f"{where}: metadata field {req!r} is missing")
        return cls(**d)


def array_sha256(x: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and raw bytes (C order)."""
    x = np.ascontiguousarray(x)
    h = hashlib.sha256()
    h.update(f"{x.dtype.str}{x.shape}".encode())
    h.update(x.tobytes())
    return h.hexdigest()


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise LibraryError(f"invalid prompt name {name!r}: use letters, digits and _ . + = - "
                           "(no path separators, not starting with a dot)")
    return name


class PromptLibrary:
    """Folder of prompts ``<name>.npy`` + ``<name>.json``; see the module docstring."""

    def __init__(self, root: str, create: bool = False):
        self.root = os.path.abspath(root)
        if create:
            os.makedirs(self.root, exist_ok=True)
        elif not os.path.isdir(self.root):
            raise LibraryError(f"prompt library {root!r} does not exist (create it with `spot add`)")

    def _paths(self, name: str) -> tuple[str, str]:
        check_name(name)
        return os.path.join(self.root, name + ".npy"), os.path.join(self.root, name + ".json")

    def names(self) -> list[str]:
        """Entry names, sorted."""
        return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(self.root, "*.json")))

    def __contains__(self, name: str) -> bool:
        return os.path.isfile(self._paths(name)[1])

    def __len__(self) -> int:
        return len(self.names())

    def add(self, name: str, prompt: Any, *, task: str, base_id: str, base_hash: Optional[str] = None,
            init: Optional[str] = None, seed: Optional[int] = None, steps: Optional[int] = None,
            metric: Optional[str] = None,
            metric_value: Optional[float] = None, source: Optional[str] = None,
            extra: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> PromptMeta:
        """Store ``prompt`` [P, d] bit-exactly (its own dtype) under ``name``."""
        npy_path, json_path = self._paths(name)
        if os.path.exists(json_path) and not overwrite:
            raise LibraryError(f"prompt {name!r} already exists in {self.root} (--overwrite replaces it; overwrite=True in Python)")
        arr = np.asarray(prompt)
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise LibraryError(f"prompt {name!r}: expected [length, d_model], got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise LibraryError(f"prompt {name!r}: expected a floating dtype, got {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise LibraryError(f"prompt {name!r}: contains NaN or inf")
        meta = PromptMeta(
            name=name, task=str(task), base_id=str(base_id), base_hash=base_hash,
            length=int(arr.shape[0]), d_model=int(arr.shape[1]), dtype=str(arr.dtype),
            init=init, seed=None if seed is None else int(seed),
            steps=None if steps is None else int(steps), metric=metric,
            metric_value=None if metric_value is None else float(metric_value),
            sha256=array_sha256(arr), source=source,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            extra=dict(extra or {}))
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        _atomic_write(npy_path, buf.getvalue())
        _atomic_write(json_path, (json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n").encode())
        return meta

    def meta(self, name: str) -> PromptMeta:
        _, json_path = self._paths(name)
        if not os.path.isfile(json_path):
            close = [n for n in self.names() if name.lower() in n.lower()][:5]
            raise LibraryError(f"no prompt {name!r} in library {self.root}"
                               + (f"; similar: {close}" if close else f"; it holds {len(self)} prompts"))
        try:
            with open(json_path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise LibraryError(f"{json_path}: invalid JSON ({e})") from e
        return PromptMeta.from_json(d, json_path)

    def list(self, task: Optional[str] = None, base_hash: Optional[str] = None) -> list[PromptMeta]:
        """Metadata of all entries (optionally of one task / one base model), sorted by name."""
        out = [self.meta(n) for n in self.names()]
        if task is not None:
            out = [m for m in out if m.task == task]
        if base_hash is not None:
            out = [m for m in out if m.base_hash == base_hash]
        return out

    def load(self, name: str, verify: bool = True) -> np.ndarray:
        """The stored prompt [P, d], bit-exact; verified against the metadata."""
        meta = self.meta(name)
        npy_path, _ = self._paths(name)
        if not os.path.isfile(npy_path):
            raise LibraryError(f"prompt {name!r}: metadata exists but {npy_path} is missing")
        try:
            arr = np.load(npy_path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise LibraryError(f"{npy_path}: not a readable .npy array ({e})") from e
        if verify:
            if arr.shape != (meta.length, meta.d_model) or str(arr.dtype) != meta.dtype:
                raise LibraryError(f"{npy_path}: array is {arr.dtype}{list(arr.shape)} but metadata says "
                                   f"{meta.dtype}[{meta.length}, {meta.d_model}]")
            if meta.sha256 and array_sha256(arr) != meta.sha256:
                raise LibraryError(f"{npy_path}: content hash differs from the metadata (file replaced "
                                   "or corrupted)")
        return arr

    def load_all(self, base_hash: Optional[str] = None, task: Optional[str] = None) -> dict[str, np.ndarray]:
        return {m.name: self.load(m.name) for m in self.list(task=task, base_hash=base_hash)}

    def inspect(self, name: str) -> dict:
        """Metadata plus summary statistics of the prompt (token norms, value range)."""
        arr = self.load(name).astype(np.float64)
        norms = np.linalg.norm(arr, axis=1)
        stats = dict(token_norm_mean=float(norms.mean()), token_norm_min=float(norms.min()),
                     token_norm_max=float(norms.max()), value_mean=float(arr.mean()),
                     value_std=float(arr.std()), value_min=float(arr.min()), value_max=float(arr.max()))
        return {**self.meta(name).to_json(), "stats": stats}

    def remove(self, name: str) -> None:
        npy_path, json_path = self._paths(name)
        self.meta(name)
        os.remove(json_path)  # entry disappears first
        if os.path.exists(npy_path):
            os.remove(npy_path)


def find_prompt_file(workdir: str) -> Optional[str]:
    """The single exported prompt ``.npy`` under a run's workdir (names containing
    'prompt'), or None when there is none."""
    hits = sorted(p for p in glob.glob(os.path.join(workdir, "**", "*.npy"), recursive=True)
                  if "prompt" in os.path.basename(p))
    if len(hits) > 1:
        raise LibraryError(f"{workdir}: expected one exported prompt *prompt*.npy, found "
                           f"{len(hits)}: {hits[:5]} (pass the file explicitly)")
    return hits[0] if hits else None


def prompt_from_run(workdir: str) -> tuple[np.ndarray, str]:
    """``(prompt [P, d], where)`` of a run: its exported ``*prompt*.npy`` if there is one,
    else the ``prompt`` leaf of the delta the run saved at the end (``<workdir>/delta``)."""
    path = find_prompt_file(workdir)
    if path:
        return np.load(path, allow_pickle=False), path
    folder = os.path.join(workdir, "delta")
    if not os.path.isfile(os.path.join(folder, delta_io.META_FILE)):
        raise LibraryError(f"{workdir}: no exported *prompt*.npy and no saved delta ({folder}); "
                           "is it a finished prompt-tuning run?")
    delta, _ = delta_io.load_delta(folder)
    prompts = delta_io.prompt_leaves(delta)
    if len(prompts) != 1:
        raise LibraryError(f"{folder}: expected one soft prompt in the run's delta, found "
                           f"{sorted(prompts)} (config.peft.methods must include 'prompt')")
    (name, arr), = prompts.items()
    return np.asarray(arr), f"{folder}:{name}"


def run_metadata(workdir: str, metric: str = "accuracy") -> dict:
    """Library metadata of a finished run from its ``result.json`` (and the saved delta's
    ``delta.json``): task, base_id / base_hash, init, seed, steps, the dev ``metric`` (best
    value when the run kept one) -> keyword arguments of :meth:`PromptLibrary.add`."""
    delta_meta = _delta_meta(workdir)
    row = read_result(workdir)
    if row.get("status") != "finished":
        raise LibraryError(f"{workdir}: run status is {row.get('status')!r}, not 'finished'")
    cfg = row.get("config", {})
    value = (row.get("best") or {}).get(metric, (row.get("metrics") or {}).get(metric))
    bid = delta_meta.get("base_id") or cfg.get("model.name") or cfg.get("model.path") or cfg.get("model.id")
    if not bid:
        raise LibraryError(f"{workdir}: result.json config has no model.name/model.path; pass base_id")
    if not cfg.get("task.name"):
        raise LibraryError(f"{workdir}: result.json config has no task.name")
    seed = cfg.get("seed", cfg.get("train.seed"))
    return dict(task=cfg["task.name"], base_id=bid, base_hash=delta_meta.get("base_hash") or cfg.get("model.hash"),
                init=cfg.get("peft.prompt.init"), seed=seed, steps=row.get("steps") or cfg.get("train.steps"),
                metric=metric if value is not None else None, metric_value=value)


def read_result(workdir: str) -> dict:
    path = os.path.join(workdir, "result.json")
    if not os.path.isfile(path):
        raise LibraryError(f"{workdir}: no result.json (not a finished run folder)")
    with open(path) as f:
        return json.load(f)


def _delta_meta(workdir: str) -> dict:
    """Metadata of the first ``delta.json`` under ``workdir`` (sorted paths), or {}."""
    for path in sorted(glob.glob(os.path.join(workdir, "**", "delta.json"), recursive=True)):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
    return {}


def add_from_run(library: PromptLibrary, workdir: str, name: Optional[str] = None,
                 prompt_file: Optional[str] = None, metric: str = "accuracy",
                 base_id: Optional[str] = None, base_hash: Optional[str] = None,
                 overwrite: bool = False) -> PromptMeta:
    """Add a finished run's prompt (``prompt_file``, else :func:`prompt_from_run`: an
    exported ``.npy`` or the run's ``delta/``) with :func:`run_metadata`; ``base_id`` /
    ``base_hash`` override what the run recorded."""
    meta = run_metadata(workdir, metric)
    meta["base_id"] = base_id or meta["base_id"]
    meta["base_hash"] = base_hash or meta["base_hash"]
    arr = np.load(prompt_file, allow_pickle=False) if prompt_file else prompt_from_run(workdir)[0]
    row = read_result(workdir)
    return library.add(name or row.get("name") or os.path.basename(os.path.abspath(workdir)), arr,
                       source=os.path.abspath(workdir), overwrite=overwrite, **meta)


# Below this many training steps, prompts that started from the same init mostly still
# look like it (the 20-step prompts: sst2/trec 0.93 token cosine).
MIN_STEPS_APART = 1000


def shared_init_warnings(metas, min_steps: int = MIN_STEPS_APART) -> list[str]:
    """Warnings for pairs of compared prompts that started from the same random init
    (same ``init`` and ``seed``, not loaded from a file) while one of them trained fewer than
    ``min_steps`` steps: their similarity then mostly measures the shared start, not the
    tasks. SPoT (Vu et al. 2022) avoids it by training every prompt to convergence."""
    groups: dict[tuple, list] = {}
    for m in metas:
        if m.init and m.init != "file" and m.seed is not None:
            groups.setdefault((m.init, m.seed), []).append(m)
    out = []
    for (init, seed), ms in sorted(groups.items(), key=lambda kv: str(kv[0])):
        short = [m for m in ms if m.steps is not None and m.steps < min_steps]
        if len(ms) > 1 and short:
            out.append(f"warning: prompts {[m.name for m in ms]} share init={init!r} seed={seed} and "
                       f"{[m.name for m in short]} trained < {min_steps} steps "
                       f"({sorted({m.steps for m in short})}): their similarity mostly measures the "
                       "shared init; train longer or use different seeds")
    return out
