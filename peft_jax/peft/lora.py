"""LoRA (Hu et al., 2021): low-rank updates of dense kernels chosen by a path regex.

At every :class:`~peft_jax.models.layers.Dense` whose module path fully matches
``targets`` (e.g. ``encoder/layer_0/attention/query``) the ``dense`` slot adds

    y = base(x) + scale * dropout(x) @ lora_a @ lora_b

with ``lora_a [in, r]``, ``lora_b [r, out]`` and ``scale = alpha / r`` (``alpha / sqrt(r)``
with rsLoRA). ``lora_a`` is initialized as Hugging Face PEFT does (kaiming-uniform with
``a = sqrt(5)`` on the ``[r, in]`` weight, i.e. ``U(-1/sqrt(in), 1/sqrt(in))``; or
``init_a='gaussian'``: ``N(0, 1/r)``), ``lora_b`` with zeros, so a fresh delta leaves the
model unchanged. Hugging Face stores ``lora_A.weight = lora_a.T`` and
``lora_B.weight = lora_b.T``.

``rank_pattern`` / ``alpha_pattern`` override rank / alpha per module: keys are regexes
matched (as in HF PEFT) against the end of the path (``(.*/)?(key)$``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from peft_jax.models.layers import DEFAULT_DROPOUT_IMPL, apply_dropout
from peft_jax.models.slots import module_path

Array = Any


def _pairs(pattern: Any, field: str) -> tuple:
    """dict / list of pairs -> hashable tuple of (regex, number) pairs."""
    items = pattern.items() if isinstance(pattern, Mapping) else pattern
    out = []
    for item in items:
        k, v = item
        try:
            re.compile(k)
        except re.error as e:
            raise ValueError(f"LoRA.{field}: invalid regex {k!r} ({e})") from None
        out.append((str(k), v))
    return tuple(out)


def _pattern_value(pairs: tuple, path: str, default: Any) -> Any:
    for key, value in pairs:
        if re.fullmatch(rf"(.*/)?(?:{key})", path):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Low-rank adaptation of the dense layers whose path fully matches ``targets``."""

    targets: str = r".*/(query|value)$"
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: Any = ()
    alpha_pattern: Any = ()
    init_a: str = "kaiming"

    def __post_init__(self):
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"LoRA.targets: invalid regex {self.targets!r} ({e})") from None
        if int(self.rank) < 1:
            raise ValueError(f"LoRA.rank={self.rank!r} must be >= 1")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoRA.dropout={self.dropout!r} must be in [0, 1)")
        if self.init_a not in ("kaiming", "gaussian"):
            raise ValueError(f"LoRA.init_a={self.init_a!r}; supported: ['kaiming', 'gaussian']")
        object.__setattr__(self, "rank_pattern", _pairs(self.rank_pattern, "rank_pattern"))
        object.__setattr__(self, "alpha_pattern", _pairs(self.alpha_pattern, "alpha_pattern"))

    # -- per-module hyper-parameters

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.targets, path) is not None

    def rank_for(self, path: str) -> int:
        return int(_pattern_value(self.rank_pattern, path, self.rank))

    def alpha_for(self, path: str) -> float:
        return float(_pattern_value(self.alpha_pattern, path, self.alpha))

    def scale_for(self, path: str, rank: Optional[int] = None) -> float:
        r = self.rank_for(path) if rank is None else rank
        a = self.alpha_for(path)
        return a / math.sqrt(r) if self.use_rslora else a / r

    # -- the slot

    def _init_a(self, rng: Array, n_in: int, r: int) -> Array:
        if self.init_a == "gaussian":
            return jax.random.normal(rng, (n_in, r), jnp.float32) / r
        bound = 1.0 / math.sqrt(n_in)
        return jax.random.uniform(rng, (n_in, r), jnp.float32, -bound, bound)

    def dense(self, module, x: Array, base_fn, deterministic: bool = True) -> Array:
        """x ``[..., in]`` -> ``base_fn(x) + scale * dropout(x) @ lora_a @ lora_b``."""
        path = module_path(module)
        if not self.matches(path):
            return base_fn(x)
        n_in, n_out, r = x.shape[-1], module.features, self.rank_for(path)
        a = module.variable("peft", "lora_a",
                            lambda: self._init_a(module.make_rng("params"), n_in, r))
        b = module.variable("peft", "lora_b", lambda: jnp.zeros((r, n_out), jnp.float32))
        y = base_fn(x)
        h = x.astype(module.dtype)
        if not deterministic and self.dropout > 0.0:
            h = apply_dropout(h, self.dropout, module.make_rng("dropout"),
                              getattr(module, "dropout_impl", DEFAULT_DROPOUT_IMPL))
        lora = jnp.dot(jnp.dot(h, jnp.asarray(a.value, module.dtype)),
                       jnp.asarray(b.value, module.dtype))
        return y + jnp.asarray(self.scale_for(path, a.value.shape[1]), module.dtype) * lora

    # -- post-init

    def validate(self, delta: Mapping, dense_paths: Sequence[str]) -> None:
        """A ``targets`` regex that matched no dense module is an error naming it."""
        hit = [p for p in dense_paths if self.matches(p)]
        if not hit or not _has_leaf(delta, "lora_a"):
            raise ValueError(f"LoRA.targets={self.targets!r} matched no dense module; available "
                             f"module paths include: {list(dense_paths)[:12]}")


def _has_leaf(tree: Mapping, name: str) -> bool:
    for k, v in tree.items():
        if k == name or (isinstance(v, Mapping) and _has_leaf(v, name)):
            return True
    return False
