"""VeRA (Kopiczko et al., 2024): vector-based random matrix adaptation, as HF PEFT 0.21
computes it with ``VeraConfig``.

One pair of frozen random projections is shared by every adapted layer; each layer trains
two vectors only. At every Dense whose path fully matches ``targets`` the ``dense`` slot adds

    y = base(x) + lambda_b * ((lambda_d * (dropout(x) @ vera_a[:in])) @ vera_b[:, :out])

The delta::

    vera_shared/vera_a       [max_in, r]   frozen, shared (HF ``vera_A`` [r, max_in], transposed)
    vera_shared/vera_b       [r, max_out]  frozen, shared (HF ``vera_B`` [max_out, r], transposed)
    <module>/vera_lambda_d   [r]           trainable, init ``d_initial``
    <module>/vera_lambda_b   [out]         trainable, init 0 (a fresh delta is the identity)

``max_in`` / ``max_out`` are the largest input / output widths of the adapted layers; each
layer uses the leading slice. The shared projections are **method-owned frozen state**
(``is_frozen``): the partition puts them in the frozen tree, so they get no gradient and no
optimizer state and are not in training checkpoints; :meth:`VeRA.finalize_delta`
regenerates them from the ``projection_prng_key`` field (kaiming-uniform as HF:
``U(-sqrt(6 / fan_in), sqrt(6 / fan_in))`` with fan_in ``max_in`` for ``vera_a`` and ``r``
for ``vera_b``). They are drawn with JAX's PRNG, so their VALUES differ from those HF PEFT
draws with torch's generator for the same key: HF PEFT parity goes through saved
projections (export always writes them, ``save_projection=true``; an adapter saved with
``save_projection=false`` cannot be imported). Delta files (the runner's ``delta/``) store
them beside the lambdas.

:meth:`VeRA.materialize` (run inside the loss, before ``model.apply``) hands every adapted
module a reference to the ONE stored copy (``<module>/vera_a``, ``<module>/vera_b``, not
stored) and the slot slices it. Merge: ``kernel += (vera_a[:in] * lambda_d) @
(vera_b[:, :out] * lambda_b)``; unmerge subtracts it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.models.layers import apply_dropout, matmul
from peft_jax.models.slots import module_path
from peft_jax.models.stack import leaf_shape
from peft_jax.peft import hf_peft, tree
from peft_jax.peft.method import HfNames, ModelInfo, PeftMethod, option, register

Array = Any

SHARED = "vera_shared"
LAMBDA_D, LAMBDA_B = "vera_lambda_d", "vera_lambda_b"
HF_A, HF_B = "base_model.vera_A", "base_model.vera_B"


@register
@dataclasses.dataclass(frozen=True)
class VeRA(PeftMethod):
    """Shared frozen random projections, trainable per-layer scaling vectors (HF VeraConfig)."""

    name = "vera"
    peft_type = "VERA"
    mergeable = True

    targets: str = option(r".*/(query|value)$", "regex over dense module paths")
    rank: int = option(256, "r: width of the shared random projections")
    dropout: float = option(0.0, "dropout on the VeRA input (HF vera_dropout)")
    d_initial: float = option(0.1, "init of every vera_lambda_d", init_only=True)
    projection_prng_key: int = option(0, "seed of the shared projections (JAX PRNG; "
                                               "frozen per-run state)", init_only=True)

    def __post_init__(self):
        self.check_regex("targets")
        self.check_int("rank", 1)
        self.check_rate("dropout")
        self.check_int("projection_prng_key", 0)

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.targets, path) is not None

    # -- leaves

    def owns(self, path: str) -> bool:
        return tree.leaf_name(path) in (LAMBDA_D, LAMBDA_B) or path.startswith(SHARED + "/")

    def is_frozen(self, path: str) -> bool:
        return path.startswith(SHARED + "/")

    def check_model(self, info: ModelInfo) -> None:
        if not any(self.matches(p) for p in info.dense):
            self.fail("targets", f"matches no dense module; module paths include "
                                 f"{sorted(info.dense)[:8]}")

    def validate(self, delta: Mapping, dense_paths: Sequence[str]) -> None:
        if not tree.leaves_named(delta, LAMBDA_D):
            self.fail("targets", f"matched no dense module; available module paths include: "
                                 f"{list(dense_paths)[:12]}")

    # -- shared projections

    def projections(self, max_in: int, max_out: int) -> dict:
        """``{"vera_a": [max_in, r], "vera_b": [r, max_out]}`` from ``projection_prng_key``."""
        k_a, k_b = jax.random.split(jax.random.PRNGKey(int(self.projection_prng_key)))
        r = int(self.rank)
        u = lambda key, shape, fan_in: jax.random.uniform(
            key, shape, jnp.float32, -math.sqrt(6.0 / fan_in), math.sqrt(6.0 / fan_in))
        return {"vera_a": u(k_a, (max_in, r), max_in), "vera_b": u(k_b, (r, max_out), r)}

    def finalize_delta(self, delta: Mapping, base: Mapping, rng: Array) -> dict:
        """Add ``vera_shared``, sized by the largest adapted layer (``rng`` is unused: the
        projections depend on ``projection_prng_key`` only)."""
        out = tree.copy(delta)
        mods = [p for p, _ in tree.modules_with(delta, LAMBDA_D)]
        if mods:
            shapes = [leaf_shape(base, m + "/kernel") for m in mods]   # base stacked or not
            out[SHARED] = self.projections(max(s[0] for s in shapes), max(s[1] for s in shapes))
        return out

    def materialize(self, delta: Mapping) -> dict:
        """Every adapted module gets ``vera_a`` / ``vera_b``: references to the one shared
        copy (no slicing or copying here; the slot slices), broadcast over the leading layer
        axis of a stacked module (``vera_lambda_d [n, r]``). Identity without ``vera_shared``."""
        if SHARED not in delta:
            return dict(delta)
        flat = {k: v for k, v in tree.flatten(delta).items() if not k.startswith(SHARED + "/")}
        for path, mod in tree.modules_with(delta, LAMBDA_D):
            lead = tuple(jnp.shape(mod[LAMBDA_D])[:-1])
            for name in ("vera_a", "vera_b"):
                shared = delta[SHARED][name]
                flat[f"{path}/{name}" if path else name] = (
                    jnp.broadcast_to(shared, lead + tuple(shared.shape)) if lead else shared)
        return tree.unflatten(flat)

    # -- forward

    def dense(self, module, x: Array, base_fn, deterministic: bool = True) -> Array:
        """x ``[..., in]`` -> ``base_fn(x) + lambda_b * ((lambda_d * d(x) @ a) @ b)``."""
        path = module_path(module)
        if not self.matches(path):
            return base_fn(x)
        n_in, n_out = x.shape[-1], module.features
        lam_d = module.variable("peft", LAMBDA_D, lambda: jnp.full((int(self.rank),),
                                                                   self.d_initial, jnp.float32))
        lam_b = module.variable("peft", LAMBDA_B, lambda: jnp.zeros((n_out,), jnp.float32))
        y = base_fn(x)
        if not module.has_variable("peft", "vera_a"):
            if module.is_mutable_collection("peft"):   # init: finalize_delta adds the projections
                return y
            raise ValueError(f"VeRA: no shared projections at {path!r}; the delta must hold "
                             f"'{SHARED}' and go through VeRA.materialize(delta) (the train "
                             "state's variables() does) before model.apply")
        a = jnp.asarray(module.get_variable("peft", "vera_a")[:n_in], module.dtype)
        b = jnp.asarray(module.get_variable("peft", "vera_b")[:, :n_out], module.dtype)
        h = x.astype(module.dtype)
        if not deterministic and self.dropout > 0.0:
            h = apply_dropout(h, self.dropout, module.make_rng("dropout"), module.slots.dropout_impl)
        h = matmul(h, a) * jnp.asarray(lam_d.value, module.dtype)
        return y + matmul(h, b) * jnp.asarray(lam_b.value, module.dtype)

    # -- merge

    def update(self, shared: Mapping, mod: Mapping, n_in: int, n_out: int) -> Array:
        """``(vera_a[:in] * lambda_d) @ (vera_b[:, :out] * lambda_b)`` ``[in, out]``."""
        a = jnp.asarray(shared["vera_a"], jnp.float32)[:n_in]
        b = jnp.asarray(shared["vera_b"], jnp.float32)[:, :n_out]
        lam_d = jnp.asarray(mod[LAMBDA_D], jnp.float32)
        return (a * lam_d[None, :]) @ (b * jnp.asarray(mod[LAMBDA_B], jnp.float32)[None, :])

    def merge(self, base: Mapping, delta: Mapping, sign: float = 1.0) -> dict:
        """``kernel + update`` at every module with VeRA lambdas."""
        if SHARED not in delta:
            raise ValueError(f"merge vera: the delta has no shared projections '{SHARED}'")
        out = tree.copy(base)
        for path, mod in tree.modules_with(delta, LAMBDA_D):
            def fold(k, mod=mod):
                upd = self.update(delta[SHARED], mod, *np.shape(k))
                return (jnp.asarray(k, jnp.float32) + sign * upd).astype(k.dtype)

            tree.update_leaf(out, path + "/kernel", fold)
        return out

    def unmerge(self, base: Mapping, delta: Mapping) -> dict:
        """Inverse of :meth:`merge` (up to float rounding)."""
        return self.merge(base, delta, -1.0)

    # -- HF PEFT

    def to_hf_peft(self, delta: Mapping, names: HfNames) -> tuple[dict, dict]:
        if SHARED not in delta:
            raise ValueError(f"export vera: the delta has no shared projections '{SHARED}'")
        a, b = np.asarray(delta[SHARED]["vera_a"]), np.asarray(delta[SHARED]["vera_b"])
        r = a.shape[1]
        tensors, targets = {HF_A: a.T, HF_B: b.T}, []
        for path, mod in tree.modules_with(delta, LAMBDA_D):
            lam_d, lam_b = np.asarray(mod[LAMBDA_D]), np.asarray(mod[LAMBDA_B])
            if lam_d.shape != (r,) or lam_b.ndim != 1 or lam_b.shape[0] > b.shape[1]:
                raise ValueError(f"export vera: {path!r}: {LAMBDA_D} {lam_d.shape} / {LAMBDA_B} "
                                 f"{lam_b.shape} do not fit the projections {a.shape}, {b.shape}")
            hf = names.hf(path)
            tensors[f"{hf_peft.HF_PREFIX}{hf}.{LAMBDA_D}"] = lam_d
            tensors[f"{hf_peft.HF_PREFIX}{hf}.{LAMBDA_B}"] = lam_b
            targets.append(hf)
        if not targets:
            raise ValueError(f"export vera: the delta has no '{LAMBDA_D}' leaf")
        return dict(r=int(r), target_modules=targets,
                    projection_prng_key=int(self.projection_prng_key), save_projection=True,
                    vera_dropout=float(self.dropout), d_initial=float(self.d_initial),
                    fan_in_fan_out=False, bias="none", init_weights=True,
                    layers_to_transform=None, layers_pattern=None), tensors

    @classmethod
    def from_hf_peft(cls, config, tensors, names, where=""):
        for field, ok in (("fan_in_fan_out", lambda v: not v), ("bias", lambda v: v == "none")):
            hf_peft.refuse(config, where, field, ok)
        cpath, wpath = hf_peft.config_path(where), hf_peft.weights_path(where)
        if not config.get("save_projection", True) or HF_A not in tensors or HF_B not in tensors:
            raise hf_peft.CheckpointError(
                f"{cpath}: save_projection={config.get('save_projection')!r}: the adapter must "
                f"hold the shared projections ({HF_A!r}, {HF_B!r}); HF PEFT regenerates missing "
                "ones with torch's generator and peft_jax draws with JAX's PRNG, so they cannot "
                "be rebuilt from projection_prng_key. Re-save it with save_projection=True")
        a, b, r = tensors[HF_A], tensors[HF_B], int(config["r"])
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise hf_peft.CheckpointError(f"{wpath}: {HF_A} {a.shape} / {HF_B} {b.shape} are not "
                                          f"[r, max_in] / [max_out, r] with r={r}")
        by_name = hf_peft.reverse_names(names)
        flat = {f"{SHARED}/vera_a": np.ascontiguousarray(a.T),
                f"{SHARED}/vera_b": np.ascontiguousarray(b.T)}
        for key in sorted(set(tensors) - {HF_A, HF_B}):
            leaf = next((n for n in (LAMBDA_D, LAMBDA_B) if key.endswith("." + n)), None)
            if leaf is None:
                raise hf_peft.CheckpointError(f"{wpath}: unexpected tensor {key!r} in a VeRA adapter")
            mod, _ = hf_peft.module_of(key, "." + leaf, by_name, where)
            t = tensors[key]
            if t.ndim != 1 or not (t.shape[0] == r if leaf == LAMBDA_D
                                   else t.shape[0] <= b.shape[0]):
                raise hf_peft.CheckpointError(f"{wpath}: {key!r} has shape {t.shape} (r={r}, "
                                              f"vera_B {b.shape})")
            flat[f"{mod}/{leaf}"] = np.ascontiguousarray(t)
        mods = tree.natural_sorted({tree.parent(p) for p in flat if not p.startswith(SHARED + "/")})
        for m in mods:
            if f"{m}/{LAMBDA_D}" not in flat or f"{m}/{LAMBDA_B}" not in flat:
                raise hf_peft.CheckpointError(f"{wpath}: module {m!r} lacks {LAMBDA_D} or {LAMBDA_B}")
        if not mods:
            raise hf_peft.CheckpointError(f"{wpath}: no {LAMBDA_D} tensors")
        method = cls(targets="(" + "|".join(re.escape(m) for m in mods) + ")", rank=r,
                     dropout=float(config.get("vera_dropout") or 0.0),
                     d_initial=float(config.get("d_initial", 0.1)),
                     projection_prng_key=int(config.get("projection_prng_key", 0)))
        return method, tree.unflatten(flat)
