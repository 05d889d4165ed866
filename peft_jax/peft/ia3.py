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
import numpy as np

from peft_jax.models.slots import module_path
from peft_jax.peft import hf_peft, tree
from peft_jax.peft.method import HfNames, ModelInfo, PeftMethod, option, register

Array = Any


@register
@dataclasses.dataclass(frozen=True)
class IA3(PeftMethod):
    """Rescale keys, values and the FFN input (``ia3_scale`` leaves, init ones)."""

    name = "ia3"
    peft_type = "IA3"
    mergeable = True

    targets: str = option(r".*/(key|value|down)$", "regex over dense module paths")
    feedforward: str = option(r".*/down$", "regex of targets scaled at their input ('' = none)")

    def __post_init__(self):
        self.check_regex("targets", "feedforward")

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.targets, path) is not None

    def is_feedforward(self, path: str) -> bool:
        return bool(self.feedforward) and re.fullmatch(self.feedforward, path) is not None

    def owns(self, path: str) -> bool:
        return tree.leaf_name(path) == "ia3_scale"

    def check_model(self, info: ModelInfo) -> None:
        self.validate({}, list(info.dense), check_leaves=False)

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

    def validate(self, delta: Mapping, dense_paths: Sequence[str], check_leaves: bool = True) -> None:
        """Regexes that match no dense module are errors naming them."""
        if not any(self.matches(p) for p in dense_paths):
            self.fail("targets", f"matched no dense module; available module paths include: "
                                 f"{list(dense_paths)[:12]}")
        if self.feedforward and not any(self.matches(p) and self.is_feedforward(p)
                                        for p in dense_paths):
            self.fail("feedforward", f"matched none of the modules selected by "
                                     f"targets={self.targets!r}; use feedforward='' for none")

    # -- merge

    def merge(self, base: Mapping, delta: Mapping) -> dict:
        """Fold ``ia3_scale`` into the kernels (and, for output scaling, the biases)."""
        out = tree.copy(base)
        for path, mod in tree.modules_with(delta, "ia3_scale"):
            s = jnp.asarray(mod["ia3_scale"], jnp.float32)
            if self.is_feedforward(path):
                tree.update_leaf(out, path + "/kernel", lambda k: (k * s[:, None]).astype(k.dtype))
                continue
            tree.update_leaf(out, path + "/kernel", lambda k: (k * s[None, :]).astype(k.dtype))
            if "bias" in tree.get(out, path):
                tree.update_leaf(out, path + "/bias", lambda b: (b * s).astype(b.dtype))
        return out

    # -- HF PEFT

    def to_hf_peft(self, delta: Mapping, names: HfNames) -> tuple[dict, dict]:
        tensors, targets, ff = {}, [], []
        for path, mod in tree.modules_with(delta, "ia3_scale"):
            s = np.asarray(mod["ia3_scale"])
            if s.ndim != 1:
                raise ValueError(f"export ia3: {path!r} has shape {s.shape}, expected a vector")
            name = names.hf(path)
            is_ff = self.is_feedforward(path)
            tensors[f"{hf_peft.HF_PREFIX}{name}.ia3_l"] = s[None, :] if is_ff else s[:, None]
            targets.append(name)
            if is_ff:
                ff.append(name)
        if not targets:
            raise ValueError("export ia3: the delta has no 'ia3_scale' leaf")
        return dict(target_modules=targets, feedforward_modules=ff, fan_in_fan_out=False,
                    init_ia3_weights=True, exclude_modules=None), tensors

    @classmethod
    def hf_peft_shapes(cls, config, shapes, names, where=""):
        # [1, in] (feed-forward: scales the input) or [out, 1]
        return hf_peft.module_tensor_shapes(
            shapes, names, where, (".ia3_l",),
            lambda sfx, hf, n_in, n_out, got: got if got == (1, n_in) else (n_out, 1))

    @classmethod
    def from_hf_peft(cls, config, tensors, names, where=""):
        hf_peft.refuse(config, where, "fan_in_fan_out", lambda v: not v)
        by_name = hf_peft.reverse_names(names)
        flat, ff = {}, []
        for key in sorted(tensors):
            mod, _ = hf_peft.module_of(key, ".ia3_l", by_name, where)
            t = tensors[key]
            if t.ndim != 2 or 1 not in t.shape:
                raise hf_peft.CheckpointError(f"{hf_peft.weights_path(where)}: {key!r} has shape {t.shape}, expected "
                                              "[out, 1] or [1, in]")
            flat[f"{mod}/ia3_scale"] = np.ascontiguousarray(t.reshape(-1))
            if t.shape[0] == 1 and t.shape[1] != 1:
                ff.append(mod)
        alt = lambda ms: "(" + "|".join(re.escape(m) for m in tree.natural_sorted(ms)) + ")" if ms else ""
        method = cls(targets=alt({tree.parent(p) for p in flat}), feedforward=alt(ff))
        return method, tree.unflatten(flat)
