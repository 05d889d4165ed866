"""Delta checkpoints with orbax: train state + JSON metadata, never the base.

A checkpoint step folder holds ``state`` (trainable delta, optimizer state, step, rng) and
``meta`` (JSON: base model id and content hash, method configuration, task, label count,
optimizer, data iterator position, and ``digest``). Orbax writes each step to a temporary
folder and renames it when complete, so a run killed mid-save leaves the previous
checkpoint restorable.

Integrity: ``digest`` is :func:`state_digest` of the state as saved (SHA-256 over every
leaf's path, dtype, shape and bytes, leaves in sorted path order, computed on the host
copy of the arrays handed to orbax) -- orbax's zstd/OCDBT files carry no checksum of their
own. :meth:`DeltaCheckpointer.restore` reads steps newest first and uses the first intact
one: a step folder that is empty, lacks or has a malformed ``meta/metadata``, cannot be
read, or whose restored state does not match its digest is reported (a warning naming the
step and the file) and skipped. Damaged steps newer than the one restored are moved (not
deleted) to ``<checkpoints>.damaged/`` so training can write those steps again; nothing is
ever deleted on the user's behalf (only orbax's ``keep`` policy removes old steps).

Restoring validates the metadata against the current run: another base model, method
configuration, task, format, label count or optimizer -> :class:`CheckpointMismatch`
naming the field and both values (a good checkpoint of another run, not damage), as is a
saved state whose leaves differ in path, shape or dtype from this run's. Arrays are placed
with the shardings of the current mesh, so a run can resume on another device count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from peft_jax.models.hf_io import CheckpointError
from peft_jax.peft.partition import leaf_paths


class CheckpointMismatch(CheckpointError):
    """The checkpoint was made for another base model, method configuration, task, label
    count or optimizer (it is intact, but not this run's)."""


# Metadata fields that must agree between a checkpoint and the run restoring it.
# ``scan_layers``: the state is stacked under it (``models.stack``), per layer without.
MUST_MATCH = ("base_id", "base_hash", "task", "format", "num_labels", "optimizer", "scan_layers",
              "methods")
DIGEST_VERSION = "peft_jax.state_digest/v1"


def _flat(tree: Any) -> list[tuple[str, Any]]:
    """``[(path, leaf)]`` with ``'/'``-joined key names, sorted by path."""
    return sorted(leaf_paths(tree), key=lambda t: t[0])


def _host(x: Any) -> Optional[np.ndarray]:
    """A leaf's values on the host (None when this process cannot see all of them)."""
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if not x.is_fully_addressable:
            if not x.is_fully_replicated:
                return None
            x = x.addressable_data(0)
    return np.ascontiguousarray(np.asarray(x))


def state_digest(state: Any) -> tuple[Optional[str], dict[str, str]]:
    """``("sha256:<hex>", {path: leaf sha256 (16 hex)})`` of a state pytree (see the module
    docstring; the per-leaf digests only say which leaf differs). ``(None, {})`` if a leaf
    is sharded across processes (not visible from one host)."""
    h = hashlib.sha256(DIGEST_VERSION.encode() + b"\n")
    leaves = {}
    for path, leaf in _flat(state):
        a = _host(leaf)
        if a is None:
            return None, {}
        head = f"{path}|{a.dtype.str}|{a.shape}\n".encode()
        h.update(head)
        h.update(a.tobytes())
        leaves[path] = hashlib.sha256(head + a.tobytes()).hexdigest()[:16]
    return "sha256:" + h.hexdigest(), leaves


def _short(e: BaseException, limit: int = 500) -> str:
    """An exception as one short line (orbax/tensorstore messages carry whole specs)."""
    text = " ".join(str(e).split("[tensorstore_spec")[0].split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _drop_closed_loop_callbacks() -> None:
    """When orbax fails on a damaged file, tensorstore's still-pending reads call back into
    the closed asyncio loop; each prints a ``RuntimeError: Event loop is closed`` traceback
    (as an unraisable exception), dozens of them. Filter exactly those out of
    ``sys.unraisablehook`` (installed once per process, before a restore, chained to the
    previous hook)."""
    previous = sys.unraisablehook
    if getattr(previous, "_peft_jax_filter", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook._peft_jax_filter = True
    sys.unraisablehook = hook
    # The same reads can also end as futures whose error (e.g. tensorstore's DATA_LOSS /
    # CRC-32C failure on a damaged chunk) nobody retrieves: asyncio then logs "exception was
    # never retrieved" with a traceback. The damaged step is reported by us, naming it.
    logging.getLogger("asyncio").addFilter(_NeverRetrieved())


class _NeverRetrieved(logging.Filter):
    """Drops asyncio's "... exception was never retrieved" records of tensorstore reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "never retrieved" not in str(record.msg)


def _warn(msg: str) -> None:
    print(f"[peft_jax] warning: {msg}", file=sys.stderr, flush=True)


class DeltaCheckpointer:
    """Keeps the last ``keep`` checkpoints (and the best by a metric, if asked) of a run."""

    def __init__(self, directory: str, keep: int = 3, best_metric: Optional[str] = None,
                 best_mode: str = "max", async_save: bool = True):
        if keep < 1:
            raise ValueError(f"DeltaCheckpointer: keep={keep} must be >= 1")
        self.directory = os.path.abspath(directory)
        opts = dict(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        if best_metric:
            opts.update(best_fn=lambda m: m[best_metric], best_mode=best_mode,
                        keep_checkpoints_without_metrics=False)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(**opts),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any],
             metrics: Optional[Mapping[str, float]] = None, force: bool = False) -> bool:
        """Save asynchronously; ``meta`` gets the state's ``digest`` (hashed from the host
        copy before orbax starts writing: the arrays are immutable, so it is exactly
        what orbax writes even if the caller donates ``state`` to the next step)."""
        digest, leaves = state_digest(state)
        meta = {**dict(meta), "digest": digest, "leaf_digests": leaves}
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)),
            metrics=dict(metrics) if metrics else None, force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def best_step(self) -> Optional[int]:
        """The kept step with the best metric (``best_metric``), else the latest step."""
        best = getattr(self.manager, "best_step", None)
        step = best() if callable(best) else None
        return self.latest_step() if step is None else step

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def read_meta(self, step: Optional[int] = None) -> dict:
        """The JSON metadata of ``step`` (default: latest); :class:`CheckpointError` naming
        the path when the folder is empty, or the file is missing or malformed."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        folder = self.step_dir(step)
        path = os.path.join(folder, "meta", "metadata")
        if not os.path.isdir(folder) or not os.listdir(folder):
            raise CheckpointError(f"{folder}: empty step folder (no state, no meta/metadata)")
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (the step folder is incomplete)")
        try:
            with open(path, "rb") as f:
                meta = json.loads(f.read().decode("utf-8"))
        except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise CheckpointError(f"{path}: malformed checkpoint metadata ({e})") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: malformed checkpoint metadata (a JSON "
                                  f"{type(meta).__name__}, not an object)")
        return meta

    def _check_structure(self, step: int, abstract_state: Any, where: str) -> None:
        try:
            saved = self.manager.item_metadata(step)["state"]
            saved = getattr(saved, "tree", saved)
        except Exception as e:  # orbax raises many types for damaged metadata files
            raise CheckpointError(f"{where}/state: unreadable array metadata ({_short(e)})"
                                  ) from None
        got = {p: (tuple(x.shape), np.dtype(x.dtype).name) for p, x in _flat(saved)}
        want = {p: (tuple(x.shape), np.dtype(x.dtype).name) for p, x in _flat(abstract_state)}
        for p in sorted(set(got) | set(want)):
            if got.get(p) != want.get(p):
                fmt = lambda v: "absent" if v is None else f"{v[1]}{list(v[0])}"
                raise CheckpointMismatch(
                    f"{where}: state leaf {p!r} is {fmt(got.get(p))} in the checkpoint but "
                    f"{fmt(want.get(p))} in this run (another method, head, label count or "
                    "optimizer)")

    def _restore_step(self, step: int, abstract_state: Any,
                      expected_meta: Mapping[str, Any]) -> tuple[Any, dict]:
        where = self.step_dir(step)
        _drop_closed_loop_callbacks()
        meta = self.read_meta(step)
        check_meta(meta, expected_meta, where)
        self._check_structure(step, abstract_state, where)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointError(f"{where}/state: cannot be read ({_short(e)})") from None
        want = meta.get("digest")
        if want:
            got, leaves = state_digest(restored)
            if got is not None and got != want:
                recorded = meta.get("leaf_digests") or {}
                bad = [p for p, d in leaves.items() if recorded.get(p) not in (None, d)]
                raise CheckpointError(
                    f"{where}/state: the data read back differs from what was written (digest "
                    f"{got[:19]}... vs {want[:19]}... recorded in {where}/meta/metadata"
                    + (f"; leaves {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}" if bad else "")
                    + "): a damaged data file")
        return restored, meta

    def restore(self, abstract_state: Any, expected_meta: Mapping[str, Any],
                step: Optional[int] = None) -> tuple[Any, dict]:
        """Restore ``(state, meta)`` onto the shardings of ``abstract_state``.

        ``abstract_state``: a tree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (e.g.
        ``jax.eval_shape`` of the initial state plus target shardings). ``step=None``: the
        newest intact step, falling back past damaged ones (see the module docstring);
        an explicit ``step`` has no fallback.
        """
        self.manager.reload()
        steps = sorted(self.manager.all_steps(), reverse=True)
        if step is not None:
            return self._restore_step(step, abstract_state, expected_meta)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        damaged: list[tuple[int, str]] = []
        for s in steps:
            try:
                state, meta = self._restore_step(s, abstract_state, expected_meta)
            except CheckpointMismatch:
                raise
            except CheckpointError as e:
                damaged.append((s, str(e)))
                _warn(f"checkpoint step {s} is damaged: {e}; "
                      + (f"falling back to step {steps[len(damaged)]}" if len(damaged) < len(steps)
                         else "no older step"))
                continue
            if damaged:
                self._set_aside([d for d, _ in damaged])
            return state, meta
        aside = self._set_aside([d for d, _ in damaged])
        raise CheckpointError(
            f"no intact checkpoint in {self.directory} ("
            + "; ".join(f"step {s}: {why}" for s, why in damaged)
            + f"). The damaged step folders were moved to {aside}; rerun to start from step 0")

    def _set_aside(self, steps: list[int]) -> str:
        """Move damaged step folders to ``<directory>.damaged/`` (process 0; all wait)."""
        aside = self.directory + ".damaged"
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            for s in steps:
                dst = os.path.join(aside, str(s))
                if os.path.exists(dst):
                    dst += time.strftime("-%Y%m%d-%H%M%S")
                shutil.move(self.step_dir(s), dst)
                _warn(f"moved damaged checkpoint step {s} to {dst} (nothing was deleted)")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("peft_jax_checkpoint_set_aside")
        self.manager.reload()
        return aside

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_meta(found: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    """Raise :class:`CheckpointMismatch` naming the first :data:`MUST_MATCH` field that
    both name and that differs."""
    for key in MUST_MATCH:
        if key in expected and key in found and found[key] != expected[key]:
            raise CheckpointMismatch(
                f"{where}: checkpoint field {key!r} is {found[key]!r} but this run has "
                f"{expected[key]!r}: the checkpoint belongs to another run configuration "
                "(use another workdir, or rerun with the checkpoint's settings)")


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
