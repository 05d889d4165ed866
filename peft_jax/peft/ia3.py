"""(IA)^3 (Liu et al., 2022): learned rescaling of selected dense layers.

At every Dense whose path fully matches ``targets``, a vector ``ia3_scale`` (ones at init,
so a fresh delta is the identity) rescales

- the layer's OUTPUT (``[out]``; keys, values): ``y = base(x) * ia3_scale`` (bias included,
  as Hugging Face PEFT), or
- its INPUT when the path also matches ``feedforward`` (``[in]``; the FFN down projection):
  ``y = base(x * ia3_scale)``; ``feedforward=''`` selects none.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from peft_jax.models.slots import module_path

Array = Any


@dataclasses.dataclass(frozen=True)
class IA3:
    """Rescale keys, values and the FFN input (``ia3_scale`` leaves, init ones)."""

    targets: str = r".*/(key|value|down)$"
    feedforward: str = r".*/down$"

    def __post_init__(self):
        for field in ("targets", "feedforward"):
            try:
                re.compile(getattr(self, field))
            except re.error as e:
                raise ValueError(f"IA3.{field}: invalid regex {getattr(self, field)!r} ({e})") from None

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.targets, path) is not None

    def is_feedforward(self, path: str) -> bool:
        return re.fullmatch(self.feedforward, path) is not None

    def dense(self, module, x: Array, base_fn, deterministic: bool = True) -> Array:
        path = module_path(module)
        if not self.matches(path):
            return base_fn(x)
        if self.is_feedforward(path):
            s = module.variable("peft", "ia3_scale", lambda: jnp.ones((x.shape[-1],), jnp.float32))
            return base_fn(x * jnp.asarray(s.value, x.dtype))
        s = module.variable("peft", "ia3_scale", lambda: jnp.ones((module.features,), jnp.float32))
        y = base_fn(x)
        return y * jnp.asarray(s.value, y.dtype)

    def validate(self, delta: Mapping, dense_paths: Sequence[str]) -> None:
        """Regexes that match no dense module are errors naming them."""
        if not any(self.matches(p) for p in dense_paths):
            raise ValueError(f"IA3.targets={self.targets!r} matched no dense module; available "
                             f"module paths include: {list(dense_paths)[:12]}")
        if self.feedforward and not any(self.matches(p) and self.is_feedforward(p)
                                        for p in dense_paths):
            raise ValueError(f"IA3.feedforward={self.feedforward!r} matched none of the modules "
                             f"selected by targets={self.targets!r}; use feedforward='' for none")
