"""Prefix tuning (Li & Liang, 2021): ``length`` trainable key/value vectors per attention.

At every Attention whose module path fully matches ``targets`` (default: self-attention,
``.../attention``), the ``attention_kv`` slot prepends ``prefix_key`` / ``prefix_value``
``[P, h_kv, head_dim]`` to the keys/values ``[b, s, h_kv, head_dim]``. ``kv_prefix_length``
(= P) tells families to offset positions / position bias as Hugging Face does when the
prefix arrives as ``past_key_values`` (HF PEFT's prefix tuning).

MLP reparameterization (``projection_hidden=H``; HF ``prefix_projection=True``): the delta
then holds, instead of per-layer leaves, the top-level ``prefix_reparam`` tree::

    prefix_reparam/embedding        [P, kv]           (kv = h_kv * head_dim)
    prefix_reparam/hidden/{kernel [kv, H], bias [H]}
    prefix_reparam/out/<attention module path>/{kernel [H, 2, h_kv, dh], bias [2, h_kv, dh]}

and :func:`materialize` computes each layer's ``prefix_key/value`` as
``tanh(embedding @ hidden + b) @ out + b``. This is exactly HF's PrefixEncoder
(``Embedding -> Linear(kv, H) -> Tanh -> Linear(H, layers * 2 * kv)``): the HF output
Linear is the per-layer ``out`` kernels concatenated in layer order (key, then value).
Call :func:`materialize` inside the loss (gradients flow to the MLP) and to fold the MLP
away for export; :func:`materialize` is the identity on deltas without ``prefix_reparam``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from peft_jax.models.slots import module_path

Array = Any

REPARAM = "prefix_reparam"


@dataclasses.dataclass(frozen=True)
class PrefixTuning:
    """Key/value prefixes of ``length`` at every attention matching ``targets``.

    ``init_scale``: std of the normal init of the prefixes / reparam embedding (HF's
    ``nn.Embedding`` default is 1.0). ``projection_hidden``: width of the reparam MLP (None:
    no reparameterization).
    """

    length: int = 20
    projection_hidden: Optional[int] = None
    targets: str = r"(.*/)?attention"
    init_scale: float = 1.0

    def __post_init__(self):
        if int(self.length) < 1:
            raise ValueError(f"PrefixTuning.length={self.length!r} must be >= 1")
        if self.projection_hidden is not None and int(self.projection_hidden) < 1:
            raise ValueError(f"PrefixTuning.projection_hidden={self.projection_hidden!r} must be "
                             ">= 1 or None")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"PrefixTuning.targets: invalid regex {self.targets!r} ({e})") from None

    @property
    def kv_prefix_length(self) -> int:
        return int(self.length)

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.targets, path) is not None

    def attention_kv(self, module, k: Array, v: Array, deterministic: bool = True
                     ) -> tuple[Array, Array, int]:
        """k, v ``[b, s, h_kv, dh]`` -> ``[b, P + s, h_kv, dh]`` each, and P."""
        path = module_path(module)
        if not self.matches(path):
            return k, v, 0
        shape = (self.length,) + tuple(k.shape[2:])
        if not module.has_variable("peft", "prefix_key") and not module.is_mutable_collection("peft"):
            raise ValueError(f"PrefixTuning: no 'prefix_key' at {path!r} in the delta; a delta with "
                             f"'{REPARAM}' must go through peft_jax.peft.prefix.materialize(delta) "
                             "before model.apply")
        init = lambda: self.init_scale * jax.random.normal(module.make_rng("params"), shape,
                                                           jnp.float32)
        pk = module.variable("peft", "prefix_key", init).value
        pv = module.variable("peft", "prefix_value", init).value
        b = k.shape[0]
        pk = jnp.broadcast_to(jnp.asarray(pk, k.dtype)[None], (b,) + shape)
        pv = jnp.broadcast_to(jnp.asarray(pv, v.dtype)[None], (b,) + shape)
        return jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1), self.length

    # -- post-init

    def finalize_delta(self, delta: Mapping, base: Mapping, rng: Array) -> dict:
        """Post-init step of ``init_delta``: with ``projection_hidden``, replace the
        per-layer prefixes by the ``prefix_reparam`` tree (torch-default Linear init)."""
        delta = _copy(delta)
        if self.projection_hidden is None:
            return delta
        found = _pop_prefixes(delta, ())
        if not found:
            return delta
        h_kv, dh = found[0][1].shape[1:]
        kv, hid = h_kv * dh, int(self.projection_hidden)
        keys = jax.random.split(rng, 3 + 2 * len(found))
        lim1, lim2 = 1.0 / math.sqrt(kv), 1.0 / math.sqrt(hid)
        u = lambda key, shape, lim: jax.random.uniform(key, shape, jnp.float32, -lim, lim)
        out: dict = {}
        for i, (path, _) in enumerate(found):
            node = out
            for part in path:
                node = node.setdefault(part, {})
            node["kernel"] = u(keys[3 + 2 * i], (hid, 2, h_kv, dh), lim2)
            node["bias"] = u(keys[4 + 2 * i], (2, h_kv, dh), lim2)
        delta[REPARAM] = {
            "embedding": self.init_scale * jax.random.normal(keys[0], (self.length, kv), jnp.float32),
            "hidden": {"kernel": u(keys[1], (kv, hid), lim1), "bias": u(keys[2], (hid,), lim1)},
            "out": out,
        }
        return delta

    def materialize(self, delta: Mapping) -> dict:
        return materialize(delta)

    def validate(self, delta: Mapping, dense_paths: Sequence[str]) -> None:
        if not (_has(delta, "prefix_key") or REPARAM in delta):
            raise ValueError(f"PrefixTuning.targets={self.targets!r} matched no attention module; "
                             f"available module paths include: {list(dense_paths)[:12]}")


def materialize(delta: Mapping) -> dict:
    """``prefix_reparam`` -> per-attention ``prefix_key/prefix_value [P, h_kv, dh]``.

    Differentiable (use it inside the loss); returns the delta without ``prefix_reparam``.
    Deltas without it are returned unchanged (shallow copy).
    """
    if REPARAM not in delta:
        return dict(delta)
    out = _copy({k: v for k, v in delta.items() if k != REPARAM})
    r = delta[REPARAM]
    hidden = jnp.tanh(jnp.dot(r["embedding"], r["hidden"]["kernel"]) + r["hidden"]["bias"])

    def walk(node: Mapping, path: tuple):
        if "kernel" in node and not isinstance(node["kernel"], Mapping):
            kv = jnp.einsum("ph,hsnd->psnd", hidden, node["kernel"]) + node["bias"]
            dst = out
            for part in path:
                dst = dst.setdefault(part, {})
            dst["prefix_key"], dst["prefix_value"] = kv[:, 0], kv[:, 1]
            return
        for k, v in node.items():
            walk(v, path + (k,))

    walk(r["out"], ())
    return out


def reparam_paths(delta: Mapping) -> list[str]:
    """Attention module paths of a reparameterized delta, in module (layer) order."""
    paths: list[str] = []

    def walk(node: Mapping, path: tuple):
        if "kernel" in node and not isinstance(node["kernel"], Mapping):
            paths.append("/".join(path))
            return
        for k, v in node.items():
            walk(v, path + (k,))

    walk(delta[REPARAM]["out"], ())
    return sorted(paths, key=natural_key)


def natural_key(path: str) -> list:
    """Sort key that orders 'layer_2' before 'layer_10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _pop_prefixes(tree: dict, path: tuple) -> list:
    found = []
    if "prefix_key" in tree and not isinstance(tree["prefix_key"], Mapping):
        found.append((path, tree.pop("prefix_key")))
        tree.pop("prefix_value", None)
    for k in list(tree):
        v = tree[k]
        if isinstance(v, dict):
            found += _pop_prefixes(v, path + (k,))
            if not v:
                del tree[k]
    return found


def _has(tree: Mapping, name: str) -> bool:
    return any(k == name or (isinstance(v, Mapping) and _has(v, name)) for k, v in tree.items())


def _copy(tree: Mapping) -> dict:
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}
