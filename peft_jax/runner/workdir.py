"""A run's workdir between runs: the resolved config it was trained with, what a rerun
finds there, and replacing a run on request.

- ``config.json``: the resolved config (every key, overrides applied), written when a run
  starts; ``peft-jax eval / export / params --workdir`` read it (:func:`run_config`).
- ``train.resume=false`` on a workdir that holds a run (checkpoints, a delta, results or
  metrics) is refused naming the workdir, unless ``train.overwrite=true``: then the old
  run's files are moved into ``<workdir>/replaced-<UTC time>/`` (never deleted).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Optional, Sequence

import ml_collections
from flax import traverse_util

from peft_jax.config import ConfigError

CONFIG_NAME = "config.json"
RUN_FILES = ("checkpoints", "best", "delta", "result.json", "metrics.jsonl", "tb", CONFIG_NAME)
# keys that define what a run trained (its delta's meaning): eval / export / params must not
# silently use other values than the run's
RUN_KEYS = ("model", "peft", "task.name", "task.format", "task.template", "task.label_words",
            "task.file.label_names", "task.file.kind", "optim.optimizer")


def run_files(workdir: str) -> list[str]:
    """The run files present in ``workdir`` (an empty checkpoint folder does not count)."""
    out = []
    for name in RUN_FILES:
        path = os.path.join(workdir, name)
        if os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path)):
            out.append(name)
    return out


def prepare_workdir(cfg) -> Optional[str]:
    """At the start of training (process 0, before the model loads): refuse or move aside
    an old run (module docstring), then save the resolved config. Returns the folder an
    old run was moved to (None: nothing moved)."""
    workdir, moved = cfg.workdir, None
    present = [n for n in run_files(workdir) if n != CONFIG_NAME]
    if present and not cfg.train.resume:
        if not cfg.train.overwrite:
            raise ConfigError(
                f"config.train.resume=False but {workdir} holds a run ({', '.join(present)}); "
                "rerun with config.train.resume=True to continue it, use another --workdir, or "
                "set config.train.overwrite=True to move the old run aside (into "
                f"{workdir}/replaced-<time>/)")
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        moved = os.path.join(workdir, f"replaced-{stamp}")
        os.makedirs(moved)
        for name in run_files(workdir):
            os.rename(os.path.join(workdir, name), os.path.join(moved, name))
        print(f"[peft_jax] config.train.overwrite=True: moved the previous run in {workdir} "
              f"to {moved}", flush=True)
    save_config(cfg, workdir)
    return moved


def save_config(cfg, workdir: str) -> str:
    """Write the resolved ``cfg`` as ``<workdir>/config.json`` (atomically)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg.copy_and_resolve_references().to_dict(), f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def load_config(workdir: str) -> Optional[ml_collections.ConfigDict]:
    """The locked config saved in ``workdir`` (None: the workdir has no ``config.json``)."""
    path = os.path.join(workdir, CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the run's saved config ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a JSON object")
    cfg = ml_collections.ConfigDict(raw)
    cfg.lock()
    return cfg


def run_key_differences(saved, other) -> list[tuple[str, Any, Any]]:
    """``(key, run's value, other value)`` for every :data:`RUN_KEYS` key that differs."""
    flat = lambda c: {k: list(v) if isinstance(v, tuple) else v for k, v in
                      traverse_util.flatten_dict(c.to_dict(), sep=".").items()}
    a, b = flat(saved), flat(other)
    keys = sorted(k for k in set(a) | set(b)
                  if any(k == r or k.startswith(r + ".") for r in RUN_KEYS))
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def run_config(workdir: str, file_cfg, overrides: Sequence[str], renamed=None):
    """The config of the run in ``workdir`` for eval / export / params: its saved
    ``config.json`` with ``overrides`` (``a.b=value``) applied; an override of a key that
    defines the run (:data:`RUN_KEYS`) to another value is a ConfigError naming it. The
    ``--config`` file (``file_cfg``, may be None) is not needed; where it differs from the
    run, that is said on stdout and the run's values are used. None: no saved config."""
    from peft_jax.config import apply_overrides

    saved = load_config(workdir)
    if saved is None:
        return None
    cfg = apply_overrides(saved.copy_and_resolve_references(), overrides, renamed)
    for key, run_value, given in run_key_differences(saved, cfg):
        raise ConfigError(f"--config.{key}={given!r} contradicts the run in {workdir}, "
                          f"trained with {key}={run_value!r} ({workdir}/{CONFIG_NAME}); "
                          "drop the override")
    if file_cfg is not None:
        diff = run_key_differences(saved, file_cfg)
        if diff:
            print(f"[peft_jax] using the run's config {workdir}/{CONFIG_NAME}; the --config file "
                  "differs in " + ", ".join(f"{k} (run: {a!r}, file: {b!r})" for k, a, b in diff[:6])
                  + (f" and {len(diff) - 6} more" if len(diff) > 6 else ""), flush=True)
    with cfg.unlocked():
        cfg.workdir = workdir
    return cfg
