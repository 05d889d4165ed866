"""A validated config -> the experiment's static parts: task, base model, methods, model.

``build_experiment(cfg)`` checks the config (``peft_jax.defaults.validate``), reads the
task, loads the base, builds the PEFT methods from the registry (``from_config`` with a
:class:`~peft_jax.peft.method.BuildContext`: tokenizer, label words, training texts read
once), checks them against the model's shapes (``check_model``) and builds the Flax model
with their slots.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from peft_jax import data as D
from peft_jax import defaults
from peft_jax.config import ConfigError
from peft_jax.data.templates import verbalizer_words
from peft_jax.data.tokenize import text_to_text_words
from peft_jax.models.registry import load_pretrained, with_storage
from peft_jax.models.slots import Slots
from peft_jax.models.stack import unstack_layers
from peft_jax.peft import tree
from peft_jax.peft.delta_io import base_fingerprint
from peft_jax.peft.heads import Head
from peft_jax.peft.method import ModelInfo, OptionError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Experiment:
    """Everything a run needs that does not depend on the data, built once from a config."""

    cfg: Any
    pre: Any                 # models.registry.Pretrained
    task: Any                # data.Task
    methods: tuple           # PeftMethod instances (the task head included when the format needs one)
    model: Any               # flax module with the methods' slots
    base_id: str
    base_hash: str
    embedder: Any = None     # similarity demonstrations: sentence encoder, built on first use

    @property
    def kind(self) -> str:
        return self.pre.kind

    @property
    def head(self) -> Optional[Head]:
        return next((m for m in self.methods if isinstance(m, Head)), None)


def load_task(cfg) -> Any:
    """The task of ``config.task`` (a registered name or the user's files)."""
    if cfg.task.name == "file":
        return D.task_from_config(defaults.file_task_config(cfg))
    return D.get_task(cfg.task.name)


def check_task(cfg, task) -> None:
    """What the config must agree on with the task, before the model loads (ConfigError
    naming the key): one label word (``a|b`` alternatives) per class, and a class-label
    prompt init with a vector per class."""
    words = label_words(cfg, task)
    keys = task.verbalizer_keys()
    if words is not None and len(words) != len(keys):
        raise ConfigError(f"config.task.label_words={cfg.task.label_words!r} gives {len(words)} "
                          f"label word(s); task {task.name!r} has {len(keys)} classes "
                          f"{list(keys)} (one word per class, in this order; 'a|b' for several)")
    if ("prompt" in defaults.method_list(cfg) and cfg.peft.prompt.init == "class_labels"
            and len(keys) > cfg.peft.prompt.length):
        raise ConfigError(f"config.peft.prompt.length={cfg.peft.prompt.length}: "
                          f"init='class_labels' puts one vector per class and task {task.name!r} "
                          f"has {len(keys)} classes")


def preflight(cfg) -> Any:
    """Every config check that needs no model (:func:`defaults.validate` with the mesh on
    this process's devices, :func:`check_task`); returns the task."""
    defaults.validate(cfg, jax.device_count())
    task = load_task(cfg)
    check_task(cfg, task)
    return task


def label_words(cfg, task) -> Any:
    """``config.task.label_words`` as ``[class][word]`` (None: the task's verbalizer)."""
    if not cfg.task.label_words:
        return None
    words = [w.strip() for w in cfg.task.label_words.split(",")]
    return [w.split("|") for w in words]  # "great|good,terrible|bad": several words per class


def with_model_options(pre: Any, cfg) -> Any:
    """``pre`` with ``config.model.dropout_impl`` / ``remat`` set on its model config (the
    weights are shared, not copied); a family without such a field is an error naming it."""
    fields = {f.name for f in dataclasses.fields(pre.config)}
    over = {}
    for k, default in (("dropout_impl", "hash"), ("remat", "none")):
        value = getattr(cfg.model, k)
        if k in fields:
            over[k] = value
        elif value != default:
            raise ConfigError(f"config.model.{k}={value!r}: the {type(pre.config).__name__} "
                              f"family does not support {k}")
    if all(getattr(pre.config, k) == v for k, v in over.items()):
        return pre
    return dataclasses.replace(pre, config=dataclasses.replace(pre.config, **over))


def model_info(pre: Any) -> ModelInfo:
    """Shapes the methods check against (``PeftMethod.check_model``)."""
    per_layer = jax.eval_shape(unstack_layers, pre.base)  # shapes only (scanned bases too)
    dense = {p: tuple(int(s) for s in mod["kernel"].shape[:2])
             for p, mod in tree.modules_with(per_layer, "kernel")
             if getattr(mod["kernel"], "ndim", 0) == 2}
    return ModelInfo(dense=dense, d_model=pre.d_model, kind=pre.kind,
                     has_lm_head=pre.kind != "encoder" or bool(getattr(pre.config, "with_mlm_head", False)))


def build_methods(cfg, pre: Any, task: Any) -> tuple:
    """The methods of ``config.peft.methods`` (+ the format's head), configured for this
    model and task, and checked against the model's shapes."""
    tok = getattr(pre, "tokenizer", None)
    if cfg.task.format == "text_to_text":   # the words the targets are made of
        words = text_to_text_words(task, cfg.task.template or None, label_words(cfg, task))
    else:
        words = label_words(cfg, task) or task.verbalizer

    @functools.lru_cache(maxsize=1)
    def train_texts() -> tuple:
        rows = task.load(cfg.task.train_split)
        return tuple(ex[f] for ex in rows for f in task.text_fields)

    per_class = verbalizer_words(words, task.verbalizer_keys()) if words else None
    ctx = defaults.method_context(cfg, tokenizer=tok, task=task, train_texts=train_texts,
                                  label_words=per_class, num_labels=task.num_labels,
                                  d_model=pre.d_model)
    info = model_info(pre)
    if cfg.task.format == "verbalizer" and not info.has_lm_head:
        raise ConfigError(f"config.task.format='verbalizer' scores label words with the model's "
                          f"LM head, and config.model.name={cfg.model.name!r} has none (a "
                          "*ForMaskedLM / *ForCausalLM checkpoint has one); use "
                          "config.task.format='classification' for a task head")
    methods = defaults.build_methods(cfg, ctx)
    for m in methods:
        try:
            m.check_model(info)
        except OptionError as e:
            raise ConfigError(defaults.option_error_message(e)) from None
    return methods


def check_experiment(cfg, pretrained: Any) -> None:
    """Every check :func:`build_experiment` makes, on an already loaded base, without
    building the model or reading data beyond what the methods need (a sweep validates
    all its cells this way before the first run starts). Raises the project's errors
    (``ConfigError``, ``DataError``, ...) naming the config key."""
    defaults.validate(cfg)
    build_methods(cfg, with_model_options(pretrained, cfg), load_task(cfg))


def storage_options(cfg) -> dict:
    """``config.model`` storage keys as ``load_pretrained`` / ``with_storage`` arguments."""
    m = cfg.model
    return dict(param_dtype=None if m.param_dtype == "auto" else m.param_dtype,
                quantize=m.quantize, quantize_group=int(m.quantize_group),
                scan_layers=bool(m.scan_layers))


def build_experiment(cfg, pretrained: Any = None, bare: bool = False, mesh: Any = None) -> Experiment:
    """Validate the config, load the base (or take ``pretrained``) and the task; with
    ``mesh`` the base is streamed straight into its shards (``models/streaming.py``).

    ``bare``: no PEFT method, the plain base model (zero-shot); only the task head the
    format needs is kept."""
    task = preflight(cfg)
    pre = with_model_options(with_storage(pretrained, **storage_options(cfg)) if pretrained
                             else load_pretrained(cfg.model.name, mesh=mesh, **storage_options(cfg)),
                             cfg)
    methods = build_methods(cfg, pre, task)
    if bare:
        methods = tuple(m for m in methods if isinstance(m, Head))
    model = pre.build(Slots(methods, dropout_impl=cfg.model.dropout_impl), DTYPES[cfg.model.dtype])
    return Experiment(cfg=cfg, pre=pre, task=task, methods=methods, model=model,
                      base_id=str(getattr(pre, "name", cfg.model.name)),
                      base_hash=pre.fingerprint or base_fingerprint(pre.base))
