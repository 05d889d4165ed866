"""Rotary position embeddings (RoPE) as transformers 5 computes them.

The Hugging Face "rotate-half" layout: for position ``p`` and inverse frequencies
``inv_freq [dh/2]``, ``emb = concat(p * inv_freq, p * inv_freq)`` and
``cos = cos(emb) * attention_scaling``, ``sin = sin(emb) * attention_scaling``
(:func:`peft_jax.models.layers.apply_rotary` applies them to queries and keys).

Scaling variants (``rope_parameters["rope_type"]`` in transformers 5, ``rope_scaling`` in
older config files): ``default``, ``linear``, ``dynamic`` (NTK, recomputed from the longest
position of the call, as transformers' ``dynamic_rope_update``), ``llama3`` and ``yarn``.
Inverse frequencies are computed in float32 numpy the way transformers computes them in
float32 torch, so logits agree to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import numpy as np

Array = Any

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


class RopeConfigError(ValueError):
    """An unsupported or inconsistent rotary-embedding configuration (names the field)."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Hashable rotary configuration; build it with :meth:`from_hf`."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: Optional[float] = None
    original_max_position_embeddings: Optional[int] = None
    low_freq_factor: Optional[float] = None   # llama3
    high_freq_factor: Optional[float] = None  # llama3
    beta_fast: Optional[float] = None         # yarn
    beta_slow: Optional[float] = None         # yarn
    attention_factor: Optional[float] = None  # yarn
    mscale: Optional[float] = None            # yarn
    mscale_all_dim: Optional[float] = None    # yarn
    truncate: bool = True                     # yarn

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise RopeConfigError(f"rope_parameters.rope_type={self.rope_type!r} is not supported; "
                                  f"supported: {list(ROPE_TYPES)}")
        needs = {"linear": ("factor",), "dynamic": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings"),
                 "yarn": ("original_max_position_embeddings",)}.get(self.rope_type, ())
        for name in needs:
            if getattr(self, name) is None:
                raise RopeConfigError(f"rope_parameters.{name} is required for "
                                      f"rope_type={self.rope_type!r}")
        if self.rope_type == "yarn" and self.factor is None:
            raise RopeConfigError("rope_parameters.factor is required for rope_type='yarn'")

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], source: str = "config.json") -> "RopeConfig":
        """From a HF config dict: ``rope_parameters`` (transformers 5) or ``rope_theta`` +
        ``rope_scaling`` (older files). ``partial_rotary_factor != 1`` is rejected."""
        params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        if any(isinstance(v, Mapping) for v in params.values()):
            raise RopeConfigError(f"{source}: per-layer-type rope_parameters are not supported")
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        prf = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
        if prf is not None and float(prf) != 1.0:
            raise RopeConfigError(f"{source}: config field partial_rotary_factor={prf!r} is not "
                                  "supported (Llama-family rotary covers the whole head)")
        original = params.get("original_max_position_embeddings",
                              cfg.get("original_max_position_embeddings"))
        if rope_type in ("llama3", "yarn") and original is None:
            original = cfg.get("max_position_embeddings")
        opt = lambda k, kind=float: None if params.get(k) is None else kind(params[k])
        try:
            return cls(rope_type=str(rope_type), theta=float(theta), factor=opt("factor"),
                       original_max_position_embeddings=None if original is None else int(original),
                       low_freq_factor=opt("low_freq_factor"), high_freq_factor=opt("high_freq_factor"),
                       beta_fast=opt("beta_fast"), beta_slow=opt("beta_slow"),
                       attention_factor=opt("attention_factor"), mscale=opt("mscale"),
                       mscale_all_dim=opt("mscale_all_dim"),
                       truncate=bool(params.get("truncate", True)))
        except RopeConfigError as e:
            raise RopeConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict:
        """The transformers-5 ``rope_parameters`` dict."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        for f in dataclasses.fields(self):
            if f.name in ("rope_type", "theta", "truncate"):
                continue
            v = getattr(self, f.name)
            if v is not None:
                out[f.name] = v
        if self.rope_type == "yarn" and not self.truncate:
            out["truncate"] = False
        return out


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    """``1 / theta ** (arange(0, dim, 2) / dim)`` in float32 ``[dim/2]``."""
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)


def inverse_frequencies(rope: RopeConfig, head_dim: int, max_position_embeddings: int
                        ) -> tuple[np.ndarray, float]:
    """Static inverse frequencies ``[head_dim/2]`` and the cos/sin ``attention_scaling``.

    For ``dynamic`` these are the unscaled frequencies (used while the sequence fits in
    ``max_position_embeddings``); :func:`rotary` rescales longer calls.
    """
    dim, r = head_dim, rope
    inv = _base_inv_freq(r.theta, dim)
    if r.rope_type in ("default", "dynamic"):
        return inv, 1.0
    if r.rope_type == "linear":
        return (inv / np.float32(r.factor)).astype(np.float32), 1.0
    if r.rope_type == "llama3":
        old = r.original_max_position_embeddings
        low_wl, high_wl = old / r.low_freq_factor, old / r.high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv
        scaled = np.where(wavelen > low_wl, inv / np.float32(r.factor), inv)
        smooth = (np.float32(old) / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
        smoothed = (1 - smooth) * scaled / np.float32(r.factor) + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    return _yarn(r, dim, max_position_embeddings)


def _yarn(r: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    factor, base, original = r.factor, r.theta, r.original_max_position_embeddings

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = r.attention_factor
    if attention_factor is None:
        attention_factor = (float(get_mscale(factor, r.mscale) / get_mscale(factor, r.mscale_all_dim))
                            if r.mscale and r.mscale_all_dim else get_mscale(factor))
    beta_fast, beta_slow = r.beta_fast or 32, r.beta_slow or 1

    def correction_dim(n_rot):
        return (dim * math.log(original / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = np.power(np.float32(base), np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    extra_factor = 1 - ramp
    inv = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv.astype(np.float32), float(attention_factor)


def rotary(rope: RopeConfig, positions: Array, head_dim: int, max_position_embeddings: int
           ) -> tuple[Array, Array]:
    """cos, sin ``[b, l, head_dim]`` (float32) for integer positions ``[b, l]``."""
    inv, scaling = inverse_frequencies(rope, head_dim, max_position_embeddings)
    pos = jnp.asarray(positions).astype(jnp.float32)
    inv_j = jnp.asarray(inv)
    if rope.rope_type == "dynamic":
        longest = jnp.max(jnp.asarray(positions)) + 1
        inv_j = jnp.where(longest > max_position_embeddings,
                          _dynamic_inv_freq(rope, positions, head_dim, max_position_embeddings), inv_j)
    freqs = pos[..., None] * inv_j
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def _dynamic_inv_freq(rope: RopeConfig, positions: Array, dim: int, max_pos: int) -> Array:
    """Dynamic NTK: base grows with ``seq_len = max(positions) + 1`` beyond ``max_pos``."""
    seq_len = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1.0, float(max_pos))
    f = rope.factor
    base = rope.theta * ((f * seq_len / max_pos) - (f - 1)) ** (dim / (dim - 2))
    exponent = jnp.arange(0, dim, 2).astype(jnp.float32) / dim
    return 1.0 / jnp.power(base.astype(jnp.float32), exponent)
