"""LoRA (Hu et al., 2021): low-rank updates of dense kernels chosen by a path regex.

At every :class:`~peft_jax.models.layers.Dense` whose module path fully matches
``targets`` (e.g. ``encoder/layer_0/attention/query``) the ``dense`` slot adds

    y = base(x) + scale * dropout(x) @ lora_a @ lora_b

with ``lora_a [in, r]``, ``lora_b [r, out]`` and ``scale = alpha / r`` (``alpha / sqrt(r)``
with rsLoRA). ``lora_a`` is initialized as Hugging Face PEFT does (kaiming-uniform with
``a = sqrt(5)`` on the ``[r, in]`` weight, i.e. ``U(-1/sqrt(in), 1/sqrt(in))``; or
``init_a='gaussian'``: ``N(0, 1/r)``), ``lora_b`` with zeros, so a fresh delta leaves the
model unchanged. Hugging Face stores ``lora_A.weight = lora_a.T`` and
``lora_B.weight = lora_b.T``; merged: ``kernel' = kernel + scale * lora_a @ lora_b``.

``rank_pattern`` / ``alpha_pattern`` override rank / alpha per module: keys are regexes
matched (as in HF PEFT) against the end of the path (``(.*/)?(key)$``). In a config they
are written ``"query=4,value=16"`` or as a dict literal ``"{'query': 4}"``.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from typing import Any, ClassVar, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.models.layers import apply_dropout, matmul
from peft_jax.models.slots import module_path
from peft_jax.peft import hf_peft, tree
from peft_jax.peft.method import (HfNames, ModelInfo, PeftMethod, internal, option,
                                  register)

Array = Any
INITS = ("kaiming", "gaussian")


def parse_pattern(value: Any) -> tuple:
    """``{regex: number}`` / pairs / ``"a=1,b=2"`` / a dict literal -> ``((regex, number), ...)``."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return ()
        if text.startswith("{"):
            value = ast.literal_eval(text)
        else:
            value = [item.rsplit("=", 1) for item in text.split(",") if item.strip()]
            if any(len(kv) != 2 for kv in value):
                raise ValueError(f"expected 'regex=number,...', got {text!r}")
            value = [(k.strip(), ast.literal_eval(v.strip())) for k, v in value]
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    for item in items:
        k, v = item
        try:
            re.compile(k)
        except re.error as e:
            raise ValueError(f"invalid regex {k!r} ({e})") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{k!r}: {v!r} is not a number")
        out.append((str(k), v))
    return tuple(out)


def _pattern_value(pairs: tuple, path: str, default: Any) -> Any:
    for key, value in pairs:
        if re.fullmatch(rf"(.*/)?(?:{key})", path):
            return value
    return default


@register
@dataclasses.dataclass(frozen=True)
class LoRA(PeftMethod):
    """Low-rank adaptation of the dense layers whose path fully matches ``targets``."""

    name = "lora"
    peft_type = "LORA"
    mergeable = True
    leaf_names = ("lora_a", "lora_b")

    targets: str = option(r".*/(query|value)$", "regex over dense module paths")
    rank: int = option(8, "r")
    alpha: float = option(8.0, "scale = alpha / rank (alpha / sqrt(rank) with use_rslora)",
                          config_default=16.0)
    dropout: float = option(0.0, "dropout on the LoRA input")
    use_rslora: bool = option(False, "rsLoRA scaling alpha / sqrt(rank)")
    rank_pattern: Any = option((), "per-module ranks: 'regex=rank,...'", parse=parse_pattern,
                               config_default="")
    alpha_pattern: Any = option((), "per-module alphas: 'regex=alpha,...'", parse=parse_pattern,
                                config_default="")
    init_a: str = option("kaiming", "lora_a init: kaiming | gaussian", init_only=True)

    def __post_init__(self):
        self.check_regex("targets")
        self.check_int("rank", 1)
        self.check_rate("dropout")
        if float(self.alpha) <= 0:
            self.fail("alpha", "must be > 0")
        if self.init_a not in INITS:
            self.fail("init_a", f"choose one of {list(INITS)}")
        for field in ("rank_pattern", "alpha_pattern"):
            try:
                object.__setattr__(self, field, parse_pattern(getattr(self, field)))
            except (ValueError, SyntaxError) as e:
                self.fail(field, str(e))

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

    # -- protocol

    def owns(self, path: str) -> bool:
        return path.rsplit("/", 1)[-1] in self.leaf_names

    def check_model(self, info: ModelInfo) -> None:
        hit = {p: s for p, s in info.dense.items() if self.matches(p)}
        if not hit:
            self.fail("targets", f"matches no dense module; module paths include "
                                 f"{sorted(info.dense)[:8]}")
        for path, (n_in, n_out) in hit.items():
            r = self.rank_for(path)
            if r > min(n_in, n_out):
                field = "rank" if r == self.rank else "rank_pattern"
                self.fail(field, f"rank {r} exceeds the {n_in}x{n_out} layer {path!r} "
                                 f"(at most {min(n_in, n_out)})")

    def _init_a(self, rng: Array, n_in: int, r: int) -> Array:
        if self.init_a == "gaussian":
            return jax.random.normal(rng, (n_in, r), jnp.float32) / r
        bound = 1.0 / math.sqrt(n_in)
        return jax.random.uniform(rng, (n_in, r), jnp.float32, -bound, bound)

    def lora_leaves(self, module, n_in: int) -> tuple[Array, Array, float]:
        """``(lora_a [in, r], lora_b [r, out], scale)`` of ``module`` (created at init)."""
        path = module_path(module)
        r = self.rank_for(path)
        a = module.variable("peft", "lora_a",
                            lambda: self._init_a(module.make_rng("params"), n_in, r)).value
        b = module.variable("peft", "lora_b",
                            lambda: jnp.zeros((r, module.features), jnp.float32)).value
        return a, b, self.scale_for(path, a.shape[1])

    def lora_input(self, module, x: Array, deterministic: bool) -> Array:
        """``dropout(x)`` in the compute dtype."""
        h = x.astype(module.dtype)
        if not deterministic and self.dropout > 0.0:
            h = apply_dropout(h, self.dropout, module.make_rng("dropout"),
                              module.slots.dropout_impl)
        return h

    def dense(self, module, x: Array, base_fn, deterministic: bool = True) -> Array:
        """x ``[..., in]`` -> ``base_fn(x) + scale * dropout(x) @ lora_a @ lora_b``."""
        if not self.matches(module_path(module)):
            return base_fn(x)
        a, b, scale = self.lora_leaves(module, x.shape[-1])
        h = self.lora_input(module, x, deterministic)
        lora = matmul(matmul(h, jnp.asarray(a, module.dtype)), jnp.asarray(b, module.dtype))
        return base_fn(x) + jnp.asarray(scale, module.dtype) * lora

    def validate(self, delta: Mapping, dense_paths: Sequence[str]) -> None:
        """A ``targets`` regex that matched no dense module is an error naming it."""
        if not any(self.matches(p) for p in dense_paths) or not tree.leaves_named(delta, "lora_a"):
            self.fail("targets", f"matched no dense module; available module paths include: "
                                 f"{list(dense_paths)[:12]}")

    # -- merge

    def update(self, path: str, mod: Mapping) -> Array:
        """``scale * lora_a @ lora_b`` ``[in, out]`` of one module's leaves."""
        a = jnp.asarray(mod["lora_a"], jnp.float32)
        b = jnp.asarray(mod["lora_b"], jnp.float32)
        return self.scale_for(path, a.shape[1]) * (a @ b)

    def merge(self, base: Mapping, delta: Mapping, sign: float = 1.0) -> dict:
        """``kernel + scale * lora_a @ lora_b`` at every module of ``delta`` with LoRA leaves."""
        out = tree.copy(base)
        for path, mod in tree.modules_with(delta, "lora_a"):
            upd = sign * self.update(path, mod)
            tree.update_leaf(out, path + "/kernel",
                             lambda k: (jnp.asarray(k, jnp.float32) + upd).astype(k.dtype))
        return out

    def unmerge(self, base: Mapping, delta: Mapping) -> dict:
        """Inverse of :meth:`merge` (up to float rounding)."""
        return self.merge(base, delta, -1.0)

    # -- HF PEFT

    def hf_config(self, mods: list[tuple[str, str, int]]) -> dict:
        """adapter_config fields for modules ``[(hf name, our path, rank)]``."""
        r, rank_pattern = hf_peft.patterns([(n, r) for n, _, r in mods])
        alpha, alpha_pattern = hf_peft.patterns([(n, self.alpha_for(p)) for n, p, _ in mods])
        return dict(r=int(r), lora_alpha=float(alpha), lora_dropout=float(self.dropout),
                    use_rslora=bool(self.use_rslora), target_modules=[n for n, _, _ in mods],
                    bias="none", fan_in_fan_out=False, init_lora_weights=True, use_dora=False,
                    lora_bias=False, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                    layers_to_transform=None, layers_pattern=None, exclude_modules=None)

    def to_hf_peft(self, delta: Mapping, names: HfNames) -> tuple[dict, dict]:
        tensors, mods = {}, []
        for path, mod in tree.modules_with(delta, "lora_a"):
            a, b = np.asarray(mod["lora_a"]), np.asarray(mod.get("lora_b"))
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                raise ValueError(f"export lora: {path!r}: lora_a {a.shape} and lora_b "
                                 f"{b.shape} are not [in, r] and [r, out]")
            hf = names.hf(path)
            tensors[f"{hf_peft.HF_PREFIX}{hf}.lora_A.weight"] = a.T
            tensors[f"{hf_peft.HF_PREFIX}{hf}.lora_B.weight"] = b.T
            mods.append((hf, path, int(a.shape[1])))
        if not mods:
            raise ValueError("export lora: the delta has no 'lora_a' leaf")
        return self.hf_config(mods), tensors

    @classmethod
    def accepts_hf_peft(cls, config: Mapping[str, Any]) -> bool:
        return not config.get("use_dora", False)

    @classmethod
    def hf_peft_refusal(cls, config: Mapping[str, Any]) -> str:
        return "use_dora=True is not supported by LoRA" if config.get("use_dora") else ""

    @classmethod
    def hf_tensor_shape(cls, suffix: str, r: int, n_in: int, n_out: int) -> tuple:
        """Shape of an HF LoRA tensor (``suffix``) of a module ``[n_in, n_out]``, rank ``r``."""
        return (r, n_in) if suffix == ".lora_A.weight" else (n_out, r)

    hf_suffixes: ClassVar[tuple[str, ...]] = (".lora_A.weight", ".lora_B.weight")

    @classmethod
    def hf_peft_shapes(cls, config, shapes, names, where=""):
        r, ranks = int(config["r"]), dict(config.get("rank_pattern") or {})
        return hf_peft.module_tensor_shapes(
            shapes, names, where, cls.hf_suffixes,
            lambda sfx, hf, n_in, n_out, got: cls.hf_tensor_shape(
                sfx, int(hf_peft.hf_pattern_value(ranks, hf, r)), n_in, n_out))

    @classmethod
    def read_hf_lora(cls, config: Mapping[str, Any], tensors: Mapping[str, Any],
                     names: HfNames, where: str, extra: Sequence[str] = ()
                     ) -> tuple[dict, dict, dict]:
        """``(flat delta, ranks, alphas)`` of the HF LoRA adapter in folder ``where`` (our paths); tensor
        suffixes in ``extra`` are left to the caller (DoRA's magnitudes)."""
        for field, ok in (("lora_bias", lambda v: not v), ("fan_in_fan_out", lambda v: not v),
                          ("bias", lambda v: v == "none")):
            hf_peft.refuse(config, where, field, ok)
        by_name = hf_peft.reverse_names(names)
        r, alpha = int(config["r"]), float(config["lora_alpha"])
        rank_pattern = dict(config.get("rank_pattern") or {})
        alpha_pattern = dict(config.get("alpha_pattern") or {})
        flat, ranks, alphas = {}, {}, {}
        for key in sorted(tensors):
            if key.endswith(".lora_A.weight"):
                mod, hf = hf_peft.module_of(key, ".lora_A.weight", by_name, where)
                kb = key[: -len(".lora_A.weight")] + ".lora_B.weight"
                if kb not in tensors:
                    raise hf_peft.CheckpointError(f"{hf_peft.weights_path(where)}: {key!r} has "
                                                  f"no matching {kb!r}")
                a, b = tensors[key], tensors[kb]
                want = int(hf_peft.hf_pattern_value(rank_pattern, hf, r))
                if a.ndim != 2 or b.ndim != 2 or a.shape[0] != want or b.shape[1] != want:
                    raise hf_peft.CheckpointError(
                        f"{hf_peft.weights_path(where)}: {key!r} {a.shape} / {kb!r} {b.shape} "
                        f"do not have the rank "
                        f"{want} given by {hf_peft.CONFIG_FILE}")
                flat[f"{mod}/lora_a"] = np.ascontiguousarray(a.T)
                flat[f"{mod}/lora_b"] = np.ascontiguousarray(b.T)
                ranks[mod] = want
                alphas[mod] = float(hf_peft.hf_pattern_value(alpha_pattern, hf, alpha))
            elif not key.endswith(".lora_B.weight") and not key.endswith(tuple(extra)):
                raise hf_peft.CheckpointError(f"{hf_peft.weights_path(where)}: unexpected "
                                              f"tensor {key!r} in a LoRA adapter")
        return flat, ranks, alphas

    @classmethod
    def method_for(cls, config: Mapping[str, Any], ranks: dict, alphas: dict) -> "LoRA":
        """The method equivalent to an imported adapter (targets = its exact modules)."""
        mods = tree.natural_sorted(ranks)
        r, alpha = int(config["r"]), float(config["lora_alpha"])
        return cls(targets="(" + "|".join(re.escape(m) for m in mods) + ")", rank=r,
                   alpha=alpha, dropout=float(config.get("lora_dropout") or 0.0),
                   use_rslora=bool(config.get("use_rslora", False)),
                   rank_pattern={re.escape(m): ranks[m] for m in mods if ranks[m] != r},
                   alpha_pattern={re.escape(m): alphas[m] for m in mods if alphas[m] != alpha})

    @classmethod
    def from_hf_peft(cls, config, tensors, names, where=""):
        flat, ranks, alphas = cls.read_hf_lora(config, tensors, names, where)
        return cls.method_for(config, ranks, alphas), tree.unflatten(flat)
