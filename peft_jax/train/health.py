"""Training health: the first step whose update was refused, read without a sync per step.

The jitted step (:func:`peft_jax.train.step.make_train_step`) refuses, every step, an
update that is not finite or that explodes, and reports it in ``metrics["applied"]``.
Reading that scalar every step would block the host on the device each step, so the loop
keeps the (device) flags of the steps since the last check in a :class:`HealthLog` and
reads them all at once where it synchronizes anyway: at logging steps, before every
checkpoint save and at the end. The first refused step raises :class:`NonFiniteLoss`
naming that step, the reason and the last good checkpoint. A checkpoint is only written
after the check, so every saved step holds a state all of whose updates were applied.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.peft.partition import leaf_paths

HEALTH_KEYS = ("applied", "finite", "update_ratio", "loss", "grad_norm")


class NonFiniteLoss(FloatingPointError):
    """Training produced NaN/Inf or an exploding update; the message names the step."""


def _reason(step: int, m: dict, max_update_ratio: float) -> str:
    if float(m.get("finite", 1.0)) < 1.0:
        what = "loss" if not np.isfinite(float(m["loss"])) else (
            "gradient norm" if not np.isfinite(float(m.get("grad_norm", 0.0))) else
            "update, updated parameters or optimizer state")
        return (f"non-finite {what} at step {step} (loss={float(m['loss']):.4g}, "
                f"grad_norm={float(m.get('grad_norm', float('nan'))):.4g})")
    return (f"exploding update at step {step}: its largest element is "
            f"{float(m['update_ratio']):.3g}x the largest parameter (limit "
            f"config.train.max_update_ratio={max_update_ratio:g})")


class HealthLog:
    """Device health flags of the steps not yet checked (see the module docstring)."""

    def __init__(self, max_update_ratio: float = 100.0):
        self.max_update_ratio = max_update_ratio
        self._pending: list[tuple[int, dict]] = []

    def add(self, step: int, metrics: dict) -> None:
        if "applied" in metrics:
            self._pending.append((step, {k: metrics[k] for k in HEALTH_KEYS if k in metrics}))

    def check(self, last_good: Callable[[], Optional[int]]) -> None:
        """Raise :class:`NonFiniteLoss` for the first refused step since the last check.

        ``last_good()``: the newest checkpoint step (called only on failure, after the
        caller's pending saves finished)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        flags = jax.device_get([m for _, m in pending])
        for (step, _), m in zip(pending, flags):
            if float(m["applied"]) < 1.0:
                good = last_good()
                where = (f"the last good checkpoint is step {good}" if good is not None
                         else "no checkpoint was written")
                raise NonFiniteLoss(
                    f"{_reason(step, m, self.max_update_ratio)}; the update was not applied and "
                    f"training stopped ({where}). Lower config.optim.lr, set "
                    "config.optim.clip_norm, or check the data and the initial delta.")


def check_initial(trainable: Any, where: str) -> None:
    """Raise :class:`NonFiniteLoss` naming the first leaf of ``trainable`` holding NaN/Inf.

    ``where`` says where the values came from (e.g. the init options or a checkpoint)."""
    ok = jax.device_get(jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), trainable))
    bad = [p for p, v in leaf_paths(ok) if not bool(v)]
    if bad:
        raise NonFiniteLoss(f"the starting parameters hold NaN/Inf before any step, in "
                            f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}: the cause is "
                            f"{where}, not the learning rate")
