"""Model families: one object per architecture family, registered under its HF model types.

A *family* is everything peft_jax knows about one architecture family (BERT/RoBERTa,
T5, Llama/Qwen2/Mistral): the Flax model class, the config class, how its checkpoint is
laid out in Hugging Face files, how its modules are named there, and how it is called. A
family module (``bert.py``, ``t5.py``, ``llama.py``) defines a :class:`Family` subclass,
instantiates it once and registers it (:func:`register`); everything else looks families up
here, by HF ``model_type`` (:func:`for_model_type`) or by model object (:func:`for_model`).
Nothing outside a family file switches on family names.

What a new family provides (one file; see ``tests/test_family.py`` for a minimal one):

- ``name``, ``model_types`` (the HF ``model_type`` values it loads), ``kind`` (one of
  :data:`KINDS`: ``'encoder'`` | ``'decoder'`` | ``'encoder_decoder'``; the one vocabulary
  used by the data layer, the formats and the runner), ``model_class`` (a Flax module built
  as ``model_class(config=..., slots=..., dtype=...)`` that returns a dict with at least
  ``hidden_states`` and ``attention_mask``), ``config_class`` (a frozen dataclass with
  ``from_hf(dict, source, **overrides)`` and ``to_hf() -> dict``);
- ``layout(config)``: one entry per base leaf, ``(our path, HF tensor name, kind, our
  shape)`` (see ``hf_io``): the whole checkpoint conversion, both ways;
- ``module_map``: ``(regex on our module path, HF module name)`` pairs (a ``re`` template
  or a function ``(match, config) -> str``) behind :meth:`Family.hf_module_name`, which has
  one signature ``(path, config)`` for every family (HF PEFT adapter names);
- ``inputs(batch, config)``: the model's keyword arguments from a batch dict, behind the
  uniform :meth:`Family.apply` and :meth:`Family.init_inputs`.

Optional hooks: ``settle(config, source, forced)`` (config fields decided by the tensors
present, e.g. a pooler or an untied head), ``rename(config, source)`` (prefixes and old
spellings of tensor names), ``ignored`` (regexes of tensors a checkpoint may carry that are
not part of the base, e.g. other task heads), ``tied(config)`` (tensors that must equal
another one), ``hf_task_type(format)`` (HF PEFT's ``task_type`` for adapters).

Shared machinery (``hf_io``) does the rest: ``load(folder)`` reads ``config.json`` -> the
family config -> the safetensors header -> checks every name, shape and dtype against the
layout (refusing unexpected tensors before any byte is read) -> tensors -> base pytree;
``save`` writes the HF folder; the streaming sharded loader (``models/streaming.py``) uses
the same layout. GGUF files are a tensor source for the llama family (``gguf.py``).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Callable, Collection, Iterable, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from peft_jax.models import hf_io, quantize
from peft_jax.models.hf_io import CheckpointError, TensorSource
from peft_jax.models.slots import NO_SLOTS, Slots
from peft_jax.models.stack import unstack_layers

KINDS = ("encoder", "decoder", "encoder_decoder")
HF_TASK_TYPES = {"encoder": "FEATURE_EXTRACTION", "decoder": "CAUSAL_LM",
                 "encoder_decoder": "SEQ_2_SEQ_LM"}

_BY_MODEL_TYPE: dict[str, "Family"] = {}


class Family:
    """One architecture family (see the module docstring for what a subclass provides)."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    kind: str = ""
    model_class: type = None  # type: ignore[assignment]
    config_class: type = None  # type: ignore[assignment]
    module_map: tuple = ()
    ignored: tuple[str, ...] = ()

    # ------------------------------------------------------------------ to provide

    def layout(self, config: Any) -> list[hf_io.LayoutEntry]:
        """Every base leaf: ``(path, HF tensor name, kind, our shape)``."""
        raise NotImplementedError

    def inputs(self, batch: Mapping[str, Any], config: Any) -> dict:
        """Model keyword arguments from a batch (``input_ids``, ``attention_mask`` ... ``[b, l]``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optional hooks

    def config_from_hf(self, cfg: Mapping[str, Any], source: str, **overrides) -> Any:
        return self.config_class.from_hf(cfg, source, **overrides)

    def settle(self, config: Any, source: TensorSource, forced: Collection[str]) -> Any:
        """Config fields decided by the tensors present (``forced``: fields the caller set)."""
        return config

    def rename(self, config: Any, source: TensorSource) -> Optional[Callable[[str], str]]:
        """Canonical HF name -> the name in ``source`` (prefixes, old spellings)."""
        return None

    def tied(self, config: Any) -> list[tuple[str, str]]:
        """``(name, equal_to)`` canonical HF names: ``name`` may be stored but must equal ``equal_to``."""
        return []

    def hf_task_type(self, format: str) -> str:
        """HF PEFT ``task_type`` of an exported adapter. The runner's heads are not exported,
        so an encoder's adapter applies to the bare encoder (``FEATURE_EXTRACTION``) for every
        ``format``; decoders ``CAUSAL_LM``, encoder-decoders ``SEQ_2_SEQ_LM``."""
        return HF_TASK_TYPES[self.kind]

    # ------------------------------------------------------------------ model

    def build(self, config: Any, slots: Slots = NO_SLOTS, dtype: Any = jnp.float32):
        return self.model_class(config=config, slots=slots, dtype=dtype)

    def apply(self, model, variables: Mapping, batch: Mapping[str, Any], *,
              deterministic: bool = True, rngs: Optional[Mapping] = None,
              output_hidden_states: bool = False, **kw) -> dict:
        """``model.apply`` on a batch dict, the same call for every family -> output dict."""
        return model.apply(variables, **self.inputs(batch, model.config),
                           deterministic=deterministic, output_hidden_states=output_hidden_states,
                           rngs=dict(rngs or {}), **kw)

    def init_inputs(self, batch: Mapping[str, Any]) -> dict:
        """Dummy call arguments for ``model.init`` / ``jax.eval_shape`` from an example batch."""
        return self.inputs(batch, None)

    def hf_module_name(self, path: str, config: Any) -> str:
        """Our module path -> HF module name ('decoder/layer_0/attention/query' ->
        'model.layers.0.self_attn.q_proj'), as HF PEFT names adapter modules."""
        path = path.strip("/")
        for pattern, template in self.module_map:
            m = re.fullmatch(pattern, path)
            if m:
                return template(m, config) if callable(template) else m.expand(template)
        raise ValueError(f"hf_module_name: no Hugging Face module for path {path!r} "
                         f"({self.name} family)")

    # ------------------------------------------------------------------ checkpoints

    def expected_extras(self, config: Any, rename: Optional[Callable[[str], str]]) -> tuple:
        """Regexes of tensors a checkpoint may hold besides the layout."""
        tied = tuple(re.escape(rename(a) if rename else a) for a, _ in self.tied(config))
        return tuple(self.ignored) + tied

    def params_from_hf(self, tensors: Any, config: Any, source: str = "checkpoint") -> dict:
        """HF tensors (a dict or a :class:`hf_io.TensorSource`) -> base pytree (float32 numpy),
        every name/shape/dtype checked before any tensor is read."""
        src = hf_io.as_source(tensors, source)
        rename = self.rename(config, src)
        base = hf_io.tree_from_layout(src, self.layout(config), src.where, rename,
                                      self.expected_extras(config, rename))
        self.check_tied(config, src, rename)
        return base

    def check_tied(self, config: Any, src: TensorSource, rename) -> None:
        for name, equal_to in self.tied(config):
            a, b = (rename(n) if rename else n for n in (name, equal_to))
            if a in src and not (src.info(a)[0] == src.info(b)[0] and np.allclose(
                    np.asarray(src.read(a), np.float32), np.asarray(src.read(b), np.float32),
                    atol=1e-6)):
                raise CheckpointError(f"{src.where}: tensor {a!r} differs from {b!r}, but this "
                                      "config ties them; untied weights are not supported here")

    def params_to_hf(self, base: Mapping, config: Any) -> dict[str, np.ndarray]:
        """Base pytree (per-layer or stacked, float or int8) -> flat HF tensors under their
        canonical names."""
        return hf_io.tensors_from_layout(per_layer_float(base), self.layout(config))

    def open(self, folder: str, **overrides) -> tuple[Any, TensorSource]:
        """``config.json`` -> (config settled against the tensor names, lazy tensor source).

        ``overrides``: config fields not in HF configs; ``None`` means "decide from the
        tensors" (e.g. ``add_pooling_layer``)."""
        forced = {k: v for k, v in overrides.items() if v is not None}
        config = self.config_from_hf(hf_io.read_config(folder), os.path.join(folder, "config.json"),
                                     **forced)
        src = hf_io.SafetensorsFolder(folder)
        return self.settle(config, src, set(forced)), src

    def load(self, folder: str, **overrides) -> tuple[Any, dict]:
        """Read a HF folder (``config.json`` + safetensors) -> ``(config, base)``."""
        config, src = self.open(folder, **overrides)
        return config, self.params_from_hf(src, config, folder)

    def save(self, folder: str, config: Any, base: Mapping,
             max_shard_bytes: Optional[int] = None) -> list[str]:
        """Write ``config.json`` + safetensors that ``transformers`` loads."""
        return hf_io.save_safetensors(folder, self.params_to_hf(base, config), config.to_hf(),
                                      max_shard_bytes)


def per_layer_float(base: Mapping) -> dict:
    """The base as Hugging Face files hold it: per layer (``scan_layers`` stacks unstacked)
    and in floating point (int8 kernels dequantized)."""
    return unstack_layers(quantize.dequantize(base))


def sample_index(n: int, samples: int) -> np.ndarray:
    """Flat indices of a leaf's fingerprint sample: ``arange(n)[::max(1, n // samples)][:samples]``."""
    step = max(1, n // samples) if samples > 0 else max(n, 1)
    return np.arange(0, max(n, 1), step)[:samples] if n else np.zeros((0,), np.int64)


def fingerprint(items: Iterable[tuple[str, Any, tuple, np.ndarray]], samples: int) -> str:
    """``"sha256:<hex>"`` over ``(path, dtype, shape, sample)`` in sorted path order: the base
    content hash (``peft_jax.peft.delta_io`` docstring). Loaders compute it from the
    checkpoint (per layer, float32) so that storage dtype, int8 and ``scan_layers`` do not
    change a base's identity."""
    h = hashlib.sha256()
    h.update(f"peft_jax.base_fingerprint/v1/samples={samples}\n".encode())
    for path, dtype, shape, sample in sorted(items, key=lambda t: t[0]):
        dtype = np.dtype(dtype)
        h.update(f"{path}|{dtype.str}|{dtype.name}|{tuple(shape)}\n".encode())
        h.update(np.asarray(sample).astype(dtype, copy=False).tobytes())
    return "sha256:" + h.hexdigest()


def _sample(x: Any, samples: int) -> np.ndarray:
    x = nn.meta.unbox(x)
    n = int(np.prod(np.shape(x), dtype=np.int64))
    step = max(1, n // samples) if samples > 0 else max(n, 1)
    # on a jax array the slice runs on device: only the sample is transferred
    return np.ascontiguousarray(np.asarray(x.reshape(-1)[::step][:samples]))


def base_fingerprint(base: Mapping, samples: int = 1024) -> str:
    """:func:`fingerprint` of an in-memory base pytree (every leaf as stored)."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(base))
    return fingerprint((("/".join(p), np.dtype(a.dtype), np.shape(a), _sample(a, samples))
                        for p, a in flat.items()), samples)


def register(family: Family) -> Family:
    """Add ``family`` to the registry under each of its ``model_types``; returns it."""
    if family.kind not in KINDS:
        raise ValueError(f"family {family.name!r}: kind={family.kind!r}; one of {list(KINDS)}")
    if not family.model_types or family.model_class is None or family.config_class is None:
        raise ValueError(f"family {family.name!r}: model_types, model_class and config_class "
                         "are required")
    for t in family.model_types:
        other = _BY_MODEL_TYPE.get(t)
        if other is not None and other is not family and type(other) is not type(family):
            raise ValueError(f"model_type {t!r} is already registered by family {other.name!r}")
        _BY_MODEL_TYPE[t] = family
    return family


def unregister(family: Family) -> None:
    for t in family.model_types:
        if _BY_MODEL_TYPE.get(t) is family:
            del _BY_MODEL_TYPE[t]


def model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def for_model_type(model_type: Any, source: str = "config.json") -> Family:
    """The family registered for a HF ``model_type``; others are a CheckpointError."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except (KeyError, TypeError):
        raise CheckpointError(f"{source}: model_type={model_type!r} is not supported; "
                              f"supported: {model_types()}") from None


def for_model(model: Any) -> Family:
    """The family of a built model (by its class)."""
    for fam in _BY_MODEL_TYPE.values():
        if isinstance(model, fam.model_class):
            return fam
    raise ValueError(f"{type(model).__name__} is not the model class of a registered family")
