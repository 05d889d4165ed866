"""Delta checkpoints with orbax: train state + JSON metadata, never the base.

A checkpoint step folder holds ``state`` (trainable delta, optimizer state, step, rng) and
``meta`` (JSON: base model id and content hash, method configuration, data iterator
position, config). Orbax writes each step to a temporary folder and renames it when
complete, so a run killed mid-save leaves the previous checkpoint restorable.

Restoring validates the metadata against the current run (another base model, another
method configuration -> :class:`CheckpointMismatch` naming the field) and places arrays
with the shardings of the current mesh, so a run can resume on another device count.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
    """The checkpoint was made for another base model or method configuration."""


# Metadata fields that must agree between a checkpoint and the run restoring it.
MUST_MATCH = ("base_id", "base_hash", "methods")


class DeltaCheckpointer:
    """Keeps the last ``keep`` checkpoints (and the best by a metric, if asked) of a run."""

    def __init__(self, directory: str, keep: int = 3, best_metric: Optional[str] = None,
                 best_mode: str = "max", async_save: bool = True):
        self.directory = os.path.abspath(directory)
        opts = dict(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        if best_metric:
            opts.update(best_fn=lambda m: m[best_metric], best_mode=best_mode,
                        keep_checkpoints_without_metrics=False)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(**opts),
            item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any],
             metrics: Optional[Mapping[str, float]] = None, force: bool = False) -> bool:
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(dict(meta))),
            metrics=dict(metrics) if metrics else None, force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def best_step(self) -> Optional[int]:
        """The kept step with the best metric (``best_metric``), else the latest step."""
        best = getattr(self.manager, "best_step", None)
        step = best() if callable(best) else None
        return self.latest_step() if step is None else step

    def read_meta(self, step: Optional[int] = None) -> dict:
        step = self.latest_step() if step is None else step
        return dict(self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, abstract_state: Any, expected_meta: Mapping[str, Any],
                step: Optional[int] = None) -> tuple[Any, dict]:
        """Restore ``(state, meta)`` onto the shardings of ``abstract_state``.

        ``abstract_state``: a tree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (e.g.
        ``jax.eval_shape`` of the initial state plus target shardings).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        meta = self.read_meta(step)
        check_meta(meta, expected_meta, f"{self.directory}/{step}")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))
        except Exception as e:  # orbax raises many types for damaged files
            raise ValueError(f"checkpoint {self.directory}/{step} could not be restored "
                             f"({type(e).__name__}: {e}); it may be corrupted — delete that "
                             "step folder to fall back to the previous one") from e
        return restored["state"], meta

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_meta(found: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    for key in MUST_MATCH:
        if key in expected and key in found and found[key] != expected[key]:
            raise CheckpointMismatch(
                f"{where}: checkpoint field {key!r} is {found[key]!r} but this run has "
                f"{expected[key]!r} (a delta made for another base model or method configuration)")


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
