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
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.models.slots import module_path
from peft_jax.peft import hf_peft, tree
from peft_jax.peft.method import HfNames, PeftMethod, option, register

Array = Any

REPARAM = "prefix_reparam"


@register
@dataclasses.dataclass(frozen=True)
class PrefixTuning(PeftMethod):
    """Key/value prefixes of ``length`` at every attention matching ``targets``.

    ``init_scale``: std of the normal init of the prefixes / reparam embedding (HF's
    ``nn.Embedding`` default is 1.0). ``projection_hidden``: width of the reparam MLP
    (0: no reparameterization).
    """

    name = "prefix"
    peft_type = "PREFIX_TUNING"

    length: int = option(10, "prefix vectors per attention layer")
    projection_hidden: int = option(0, "MLP reparameterization width (0: none); folded at export")
    targets: str = option(r"(.*/)?attention", "regex over attention module paths")
    init_scale: float = option(1.0, "std of the normal init", init_only=True)

    def __post_init__(self):
        if self.projection_hidden is None:
            object.__setattr__(self, "projection_hidden", 0)
        self.check_int("length", 1)
        self.check_int("projection_hidden", 0)
        self.check_regex("targets")

    @property
    def kv_prefix_length(self) -> int:
        return int(self.length)

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.targets, path) is not None

    def owns(self, path: str) -> bool:
        return (tree.leaf_name(path) in ("prefix_key", "prefix_value")
                or path.startswith(REPARAM + "/"))

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
        if not self.projection_hidden:
            return tree.copy(delta)
        flat = tree.flatten(delta)
        keys = tree.natural_sorted(p for p in flat if tree.leaf_name(p) == "prefix_key")
        if not keys:
            return tree.copy(delta)
        found = [(tree.parent(p), flat[p]) for p in keys]
        for p in keys:
            del flat[p], flat[tree.parent(p) + "/prefix_value"]
        h_kv, dh = found[0][1].shape[1:]
        kv, hid = h_kv * dh, int(self.projection_hidden)
        rngs = jax.random.split(rng, 3 + 2 * len(found))
        lim1, lim2 = 1.0 / math.sqrt(kv), 1.0 / math.sqrt(hid)
        u = lambda key, shape, lim: jax.random.uniform(key, shape, jnp.float32, -lim, lim)
        for i, (path, _) in enumerate(found):
            flat[f"{REPARAM}/out/{path}/kernel"] = u(rngs[3 + 2 * i], (hid, 2, h_kv, dh), lim2)
            flat[f"{REPARAM}/out/{path}/bias"] = u(rngs[4 + 2 * i], (2, h_kv, dh), lim2)
        flat[f"{REPARAM}/embedding"] = self.init_scale * jax.random.normal(
            rngs[0], (self.length, kv), jnp.float32)
        flat[f"{REPARAM}/hidden/kernel"] = u(rngs[1], (kv, hid), lim1)
        flat[f"{REPARAM}/hidden/bias"] = u(rngs[2], (hid,), lim1)
        return tree.unflatten(flat)

    def materialize(self, delta: Mapping) -> dict:
        return materialize(delta)

    def validate(self, delta: Mapping, dense_paths: Sequence[str]) -> None:
        if not (tree.leaves_named(delta, "prefix_key") or REPARAM in delta):
            self.fail("targets", f"matched no attention module; available module paths "
                                 f"include: {list(dense_paths)[:12]}")

    # -- HF PEFT

    def to_hf_peft(self, delta: Mapping, names: HfNames) -> tuple[dict, dict]:
        if names.task_type == "SEQ_2_SEQ_LM":
            raise NotImplementedError(SEQ2SEQ_PREFIX)
        delta = materialize(delta)
        keys = tree.leaves_named(delta, "prefix_key")
        if not keys:
            raise ValueError("export prefix: the delta has no per-layer 'prefix_key' leaves")
        vals = tree.leaves_named(delta, "prefix_value")
        blocks, shape = [], None
        for pk in tree.natural_sorted(keys):
            pv = tree.parent(pk) + "/prefix_value" if "/" in pk else "prefix_value"
            if pv not in vals:
                raise ValueError(f"export prefix: {pk!r} has no matching {pv!r}")
            k, v = np.asarray(keys[pk]), np.asarray(vals[pv])
            if k.ndim != 3 or k.shape != v.shape or (shape is not None and k.shape != shape):
                raise ValueError(f"export prefix: {pk!r} has shape {k.shape} (value {v.shape}); "
                                 f"expected [P, h_kv, head_dim] alike in every layer ({shape})")
            shape = k.shape
            blocks += [k.reshape(k.shape[0], -1), v.reshape(v.shape[0], -1)]
        n_tok, h_kv, dh = shape
        if names.num_layers is not None and names.num_layers != len(keys):
            raise ValueError(f"export prefix: num_layers={names.num_layers} but the delta has "
                             f"prefixes in {len(keys)} attention modules")
        fields = dict(num_virtual_tokens=int(n_tok), token_dim=int(h_kv * dh),
                      num_layers=len(keys), num_attention_heads=int(h_kv),
                      encoder_hidden_size=int(h_kv * dh), prefix_projection=False,
                      num_transformer_submodules=1)
        return fields, {"prompt_embeddings": np.concatenate(blocks, axis=1)}

    @classmethod
    def hf_peft_shapes(cls, config, shapes, names, where=""):
        if config.get("task_type") == "SEQ_2_SEQ_LM" or config.get("num_transformer_submodules") == 2:
            return None  # refused by from_hf_peft (SEQ2SEQ_PREFIX)
        n_tok, n_layers = int(config["num_virtual_tokens"]), int(config["num_layers"])
        h = int(config["num_attention_heads"])
        return {"prompt_embeddings": (n_tok, 2 * n_layers * h * (int(config["token_dim"]) // h))}

    @classmethod
    def from_hf_peft(cls, config, tensors, names, where=""):
        if config.get("task_type") == "SEQ_2_SEQ_LM" or config.get("num_transformer_submodules") == 2:
            raise NotImplementedError(f"{hf_peft.config_path(where)}: " + SEQ2SEQ_PREFIX)
        where = hf_peft.weights_path(where)
        if "prompt_embeddings" not in tensors:
            raise hf_peft.CheckpointError(f"{where}: missing tensor 'prompt_embeddings'")
        # prefix_projection=True adapters are saved materialized too (HF runs the MLP at save
        # time), so both read the same way.
        emb, n_tok = tensors["prompt_embeddings"], int(config["num_virtual_tokens"])
        n_layers, h = int(config["num_layers"]), int(config["num_attention_heads"])
        dh = int(config["token_dim"]) // h
        attn = list(names.attention_paths)
        if len(attn) != n_layers:
            raise ValueError(f"import prefix: the adapter has {n_layers} layers; pass the "
                             f"attention module paths of the model in layer order (got {len(attn)})")
        if emb.shape != (n_tok, 2 * n_layers * h * dh):
            raise hf_peft.CheckpointError(f"{where}: prompt_embeddings has shape {emb.shape}, "
                                          f"config implies {(n_tok, 2 * n_layers * h * dh)}")
        blocks = emb.reshape(n_tok, 2 * n_layers, h, dh)
        flat = {}
        for i, path in enumerate(attn):
            flat[f"{path}/prefix_key"] = np.ascontiguousarray(blocks[:, 2 * i])
            flat[f"{path}/prefix_value"] = np.ascontiguousarray(blocks[:, 2 * i + 1])
        method = cls(length=n_tok, targets="(" + "|".join(re.escape(p) for p in attn) + ")")
        return method, tree.unflatten(flat)


SEQ2SEQ_PREFIX = (
    "prefix tuning for encoder-decoder (T5, task_type='SEQ_2_SEQ_LM') adapters is not "
    "supported by HF PEFT export/import: HF duplicates the flat prefix for two transformer "
    "submodules and gives decoder self-attention layer i the blocks 4i, 4i+1 of that doubled "
    "list (so layers i and i + num_layers/2 share one prefix); an independent per-layer delta "
    "cannot be written in that layout. Keep the delta in peft_jax's own format.")


def materialize(delta: Mapping) -> dict:
    """``prefix_reparam`` -> per-attention ``prefix_key/prefix_value [P, h_kv, dh]``
    (``[n, P, h_kv, dh]`` for a stacked delta, whose ``out`` kernels are ``[n, hid, 2, h_kv, dh]``).

    Differentiable (use it inside the loss); returns the delta without ``prefix_reparam``.
    Deltas without it are returned unchanged (shallow copy).
    """
    if REPARAM not in delta:
        return dict(delta)
    flat = {k: v for k, v in tree.flatten(delta).items() if not k.startswith(REPARAM + "/")}
    r = delta[REPARAM]
    hidden = jnp.tanh(jnp.dot(r["embedding"], r["hidden"]["kernel"]) + r["hidden"]["bias"])
    for path, mod in tree.modules_with(r["out"], "kernel"):
        kv = (jnp.einsum("ph,...hsnd->...psnd", hidden, mod["kernel"])
              + jnp.expand_dims(mod["bias"], -4))
        flat[f"{path}/prefix_key"], flat[f"{path}/prefix_value"] = kv[..., 0, :, :], kv[..., 1, :, :]
    return tree.unflatten(flat)


def reparam_paths(delta: Mapping) -> list[str]:
    """Attention module paths of a reparameterized delta, in module (layer) order."""
    return [p for p, _ in tree.modules_with(delta[REPARAM]["out"], "kernel")]
