"""Methods that train leaves of the base itself, selected by path rules (no slots, no delta).

- ``bitfit`` (Ben Zaken et al., 2022): every bias of the base (dense and LayerNorm).
- ``full``: every base leaf (the full fine-tuning baseline); it cannot be combined with
  another method except a task head.

The selected leaves move to the trainable tree (``trainable["params"]``,
:func:`peft_jax.peft.partition.split`); the rest of the base stays frozen.
"""

from __future__ import annotations

import dataclasses

from peft_jax.peft.method import PeftMethod, register
from peft_jax.peft.partition import bitfit_patterns, full_finetuning_patterns


@register
@dataclasses.dataclass(frozen=True)
class BitFit(PeftMethod):
    """Train the base's biases."""

    name = "bitfit"

    def base_patterns(self) -> tuple[str, ...]:
        return bitfit_patterns()


@register
@dataclasses.dataclass(frozen=True)
class FullFinetuning(PeftMethod):
    """Train every base weight."""

    name = "full"
    exclusive = True

    def base_patterns(self) -> tuple[str, ...]:
        return full_finetuning_patterns()
