"""DoRA (Liu et al., 2024): weight-decomposed low-rank adaptation, as HF PEFT 0.21 computes it
with ``LoraConfig(use_dora=True)``.

At every Dense whose path fully matches ``targets`` the weight is split into a magnitude and
a direction, and LoRA adapts the direction:

    W' = m * (W + s * lora_a @ lora_b) / ||W + s * lora_a @ lora_b||

with the kernel ``W [in, out]``, LoRA's factors and scale ``s`` (:mod:`peft_jax.peft.lora`:
rank, alpha, rsLoRA, rank/alpha patterns, init), the trainable magnitude
``lora_magnitude [out]`` (initialized to the column norms ``||W||`` (``lora_b`` is zero), so
a fresh delta is the identity) and the norm taken over ``in`` for each output column. As in
HF PEFT (and the paper, section 4.3) the norm is DETACHED from the gradient. The ``dense``
slot computes, with ``g = m / stop_gradient(||W + s a b||)`` ``[out]``:

- without dropout (eval, or ``dropout=0``): ``y = base(x) + (g - 1) * (base(x) - bias)
  + g * s * x @ a @ b``; the bias is not rescaled;
- with LoRA dropout (training): ``y = base(x) + (g - 1) * (d(x) @ W) + g * s * d(x) @ a @ b``
  with ``d(x)`` the dropped-out input (HF PEFT's ``base_result=None`` path).

Merge folds ``W' `` into the kernel (bias unchanged). Unmerge is not possible from the merged
kernel: its columns have norm ``|m|`` whatever ``||W + s a b||`` was (HF PEFT keeps that norm
in a module cache), so :meth:`DoRA.unmerge` raises ``NotSupported``; keep the unmerged base.

HF PEFT adapters: ``peft_type='LORA'`` with ``use_dora=true``; the tensors are LoRA's plus
``base_model.model.<module>.lora_magnitude_vector`` ``[out]``. DoRA shares LoRA's leaf names
(``lora_a``, ``lora_b``), as in HF's one ``LoraConfig``: do not combine ``lora`` and
``dora`` in one run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.models.layers import matmul
from peft_jax.models.slots import module_path
from peft_jax.peft import hf_peft, tree
from peft_jax.peft.lora import LoRA
from peft_jax.peft.method import HfNames, NotSupported, register

Array = Any

MAGNITUDE = "lora_magnitude"
HF_MAGNITUDE = ".lora_magnitude_vector"


def column_norm(kernel: Array, update: Array) -> Array:
    """``||kernel + update||`` over ``in`` for each output column: ``[in, out]`` -> ``[out]``
    (float32)."""
    return jnp.linalg.norm(jnp.asarray(kernel, jnp.float32) + jnp.asarray(update, jnp.float32),
                           axis=0)


def base_param(module, name: str) -> Array:
    """The base parameter ``name`` (``kernel`` / ``bias``) of the calling Dense module."""
    return nn.meta.unbox(module.get_variable("params", name))


@register
@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
    """Weight-decomposed LoRA: a trainable magnitude per output column, LoRA on the direction.

    HF PEFT's ``LoraConfig(use_dora=True)``; the options are LoRA's."""

    name = "dora"
    leaf_names = ("lora_a", "lora_b", MAGNITUDE)

    def dense(self, module, x: Array, base_fn, deterministic: bool = True) -> Array:
        """x ``[..., in]`` -> ``[..., out]`` (see the module docstring)."""
        if not self.matches(module_path(module)):
            return base_fn(x)
        a, b, scale = self.lora_leaves(module, x.shape[-1])
        kernel = base_param(module, "kernel")
        update = lambda: scale * jnp.dot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
        m = module.variable("peft", MAGNITUDE, lambda: column_norm(kernel, update())).value
        g = (m / jax.lax.stop_gradient(column_norm(kernel, update()))).astype(module.dtype)
        y = base_fn(x)
        h = self.lora_input(module, x, deterministic)
        if deterministic or self.dropout == 0.0:
            base = y - jnp.asarray(base_param(module, "bias"), y.dtype) if module.use_bias else y
        else:
            base = matmul(h, jnp.asarray(kernel, module.dtype))
        lora = matmul(matmul(h, jnp.asarray(a, module.dtype)), jnp.asarray(b, module.dtype))
        return y + (g - 1) * base + g * jnp.asarray(scale, module.dtype) * lora

    # -- merge

    def merge(self, base: Mapping, delta: Mapping, sign: float = 1.0) -> dict:
        """``kernel' = m * (kernel + s a b) / ||kernel + s a b||`` at every DoRA module (the
        bias is unchanged). ``sign=-1`` (LoRA's unmerge) is :meth:`unmerge`."""
        if sign != 1.0:
            return self.unmerge(base, delta)
        out = tree.copy(base)
        for path, mod in tree.modules_with(delta, MAGNITUDE):
            upd = self.update(path, mod)
            m = jnp.asarray(mod[MAGNITUDE], jnp.float32)

            def fold(k, upd=upd, m=m):
                v = jnp.asarray(k, jnp.float32) + upd
                return (v * (m / column_norm(k, upd))[None, :]).astype(k.dtype)

            tree.update_leaf(out, path + "/kernel", fold)
        return out

    def unmerge(self, base: Mapping, delta: Mapping) -> dict:
        raise NotSupported("dora: a merged kernel cannot be unmerged (its columns have norm "
                           "|magnitude| whatever ||W + s*lora_a@lora_b|| was); keep the "
                           "unmerged base")

    # -- HF PEFT

    def to_hf_peft(self, delta: Mapping, names: HfNames) -> tuple[dict, dict]:
        fields, tensors = super().to_hf_peft(delta, names)
        for path, mod in tree.modules_with(delta, "lora_a"):
            if MAGNITUDE not in mod:
                raise ValueError(f"export dora: {path!r} has LoRA factors but no {MAGNITUDE!r}")
            mag = np.asarray(mod[MAGNITUDE])
            if mag.shape != (np.shape(mod["lora_b"])[1],):
                raise ValueError(f"export dora: {path!r}: {MAGNITUDE} {mag.shape} is not "
                                 f"[out] of lora_b {np.shape(mod['lora_b'])}")
            tensors[f"{hf_peft.HF_PREFIX}{names.hf(path)}{HF_MAGNITUDE}"] = mag
        return dict(fields, use_dora=True), tensors

    @classmethod
    def accepts_hf_peft(cls, config: Mapping[str, Any]) -> bool:
        return bool(config.get("use_dora", False))

    @classmethod
    def hf_peft_refusal(cls, config: Mapping[str, Any]) -> str:
        return "" if config.get("use_dora") else "DoRA reads use_dora=True adapters"

    hf_suffixes: ClassVar[tuple[str, ...]] = LoRA.hf_suffixes + (HF_MAGNITUDE,)

    @classmethod
    def hf_tensor_shape(cls, suffix: str, r: int, n_in: int, n_out: int) -> tuple:
        return (n_out,) if suffix == HF_MAGNITUDE else super().hf_tensor_shape(suffix, r, n_in, n_out)

    @classmethod
    def from_hf_peft(cls, config, tensors, names, where=""):
        flat, ranks, alphas = cls.read_hf_lora(config, tensors, names, where,
                                               extra=(HF_MAGNITUDE,))
        by_name = hf_peft.reverse_names(names)
        wpath = hf_peft.weights_path(where)
        for key in sorted(k for k in tensors if k.endswith(HF_MAGNITUDE)):
            mod, _ = hf_peft.module_of(key, HF_MAGNITUDE, by_name, where)
            if mod not in ranks:
                raise hf_peft.CheckpointError(f"{wpath}: {key!r} has no matching lora_A/lora_B")
            mag, n_out = tensors[key], flat[f"{mod}/lora_b"].shape[1]
            if mag.shape != (n_out,):
                raise hf_peft.CheckpointError(f"{wpath}: {key!r} has shape {mag.shape}; the "
                                              f"module's lora_B gives [{n_out}]")
            flat[f"{mod}/{MAGNITUDE}"] = np.ascontiguousarray(mag)
        missing = [m for m in tree.natural_sorted(ranks) if f"{m}/{MAGNITUDE}" not in flat]
        if missing:
            raise hf_peft.CheckpointError(f"{wpath}: use_dora=true but no magnitude vector "
                                          f"for {missing[:4]}")
        return cls.method_for(config, ranks, alphas), tree.unflatten(flat)
