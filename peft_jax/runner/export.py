"""A trained run's delta written out, and its parameter report.

Formats (``peft-jax export --format``): ``npy`` (prompts by dotted path), ``hf-peft``
(``adapter_config.json`` + ``adapter_model.safetensors`` for ``peft.PeftModel``),
``merged`` (a HF model folder with every mergeable method folded into the kernels) and
``delta`` (peft_jax's own safetensors + metadata). Every method speaks for itself
(``to_hf_peft``, ``merge``); what a format cannot carry is refused naming it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from peft_jax import defaults
from peft_jax.config import ConfigError
from peft_jax.models.family import per_layer_float
from peft_jax.models.registry import save_pretrained
from peft_jax.peft import delta_io, tree
from peft_jax.peft.heads import Head
from peft_jax.peft.hf_peft import export_method, module_paths
from peft_jax.peft.merge import merge
from peft_jax.peft.method import HfNames, NotSupported
from peft_jax.peft.partition import assemble
from peft_jax.peft.report import param_report
from peft_jax.runner.run import delta_tree
from peft_jax.runner.session import Session, restore_trained, setup
from peft_jax.transfer.library import LibraryError, PromptLibrary, run_metadata

FORMATS = ("npy", "hf-peft", "merged", "delta")


def hf_names(s: Session) -> HfNames:
    """The HF naming context of this run's model (module names, attention layers)."""
    pre = s.exp.pre
    paths = module_paths(pre.base)
    attention = [p for p in paths if p.endswith("/attention")]
    return HfNames(module_name=pre.hf_module_name, module_paths=paths, attention_paths=attention,
                   task_type=pre.family.hf_task_type(s.exp.cfg.task.format),
                   base_model_name_or_path=s.exp.base_id)


def check_hf_peft_carries(acting: list, trained_base: Any) -> None:
    """Refuse (``ConfigError``, naming it) what an HF PEFT adapter cannot carry: trained
    base weights (BitFit, full fine-tuning), a peft_jax task head (HF PEFT's
    ``modules_to_save`` holds copies of the HF class's own modules, e.g.
    ``BertForSequenceClassification.classifier`` on the [CLS] pooler; the head here pools
    and projects differently, so it would load as a different classifier) or more than one
    method."""
    names = [m.name for m in acting]
    base = tree.natural_sorted(tree.flatten(trained_base))
    if base:
        raise ConfigError(f"hf-peft export cannot carry trained base weights ({len(base)} tensors, "
                          f"e.g. {base[:3]}): use --format merged or --format delta")
    heads = [m.name for m in acting if isinstance(m, Head)]
    if heads:
        raise ConfigError(f"hf-peft export cannot carry the task head {heads} of this run's delta "
                          f"{names}: HF PEFT's modules_to_save holds copies of the HF model's own "
                          "head modules, which peft_jax's head is not; use --format delta, or "
                          "task.format='verbalizer' / 'text_to_text' (no head)")
    if len(acting) != 1:
        raise ConfigError(f"hf-peft export holds one method; this run's delta has {names} "
                          "(use --format delta)")


def prompt_metadata(cfg, exp) -> dict:
    """Library metadata of the run's prompts (:func:`~peft_jax.transfer.library.run_metadata`
    of the finished run; the config's values and no metric for an unfinished one), with
    the base model's id and hash."""
    try:
        meta = run_metadata(cfg.workdir, cfg.train.best_metric or "accuracy")
    except LibraryError:
        meta = dict(task=cfg.task.name, init=cfg.peft.prompt.init, seed=cfg.seed)
    return {**meta, "base_id": exp.base_id, "base_hash": exp.base_hash}


def export_prompts(cfg, exp, delta: Any, out: str) -> list[str]:
    """Each soft prompt of ``delta`` as ``<out>/<dotted.path>.npy`` [P, d] with its metadata
    sidecar ``<dotted.path>.json`` (task, base id and hash, length, init, seed, steps, dev
    metric): ``out`` is a SPoT prompt library (``peft-jax spot list OUT``)."""
    prompts = delta_io.prompt_leaves(delta)
    if not prompts:
        raise ConfigError(f"npy export: the run's delta has no soft prompt (leaves: "
                          f"{sorted(tree.flatten(delta))[:5]}); config.peft.methods has no 'prompt'")
    lib, meta = PromptLibrary(out, create=True), prompt_metadata(cfg, exp)
    for name, arr in prompts.items():
        lib.add(name, np.asarray(arr), source=os.path.abspath(cfg.workdir), overwrite=True, **meta)
    return [os.path.join(out, n + ".npy") for n in prompts]


def export_experiment(cfg, fmt: str, out: str, which: str = "latest") -> str:
    """Write the trained delta of the run in ``cfg.workdir`` as ``fmt`` to ``out``."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r}; choose one of {list(FORMATS)}")
    s, trainable = restore_trained(cfg, which=which, data="none")
    exp = s.exp
    full = delta_tree(trainable, s.frozen)
    delta = full.get("peft", {})
    if fmt == "npy":
        export_prompts(cfg, exp, delta, out)
    elif fmt == "delta":
        delta_io.save_delta(out, full, base_id=exp.base_id, base_hash=exp.base_hash,
                            methods=exp.methods, overwrite=True)
    elif fmt == "hf-peft":
        acting = [m for m in exp.methods if any(m.owns(p) for p in tree.flatten(delta))]
        check_hf_peft_carries(acting, full.get("params") or {})
        try:
            export_method(out, delta, acting[0], hf_names(s))
        except NotSupported as e:
            raise ConfigError(f"hf-peft export: {e} (use --format delta)") from None
    else:
        base = per_layer_float(assemble(jax.device_get(s.frozen), jax.device_get(trainable))["params"])
        try:
            base = merge(base, delta, exp.methods)
        except NotSupported as e:
            raise ConfigError(f"merged export: {e}") from None
        save_pretrained(exp.pre, out, base=base)
    return out


def parameter_report(cfg) -> str:
    """Trainable / total parameters per method and module, and optimizer-state bytes
    (computed abstractly: no data is read, no optimizer state allocated)."""
    s = setup(cfg, data="none")
    full = delta_tree(s.state.trainable, s.frozen, per_layer=False)   # the tree s.tx is over
    frozen_base = s.frozen["params"]
    base = tree.merge(frozen_base, full.get("params", {})) if full.get("params") else frozen_base
    table = param_report(base, full.get("peft", {}), tx=s.tx, methods=s.exp.methods).table()
    return table + ("\n\n" + head_note(cfg) if s.exp.head is not None else "")


def head_note(cfg) -> str:
    """Why a head trains: the classification / regression formats put one on the pooled
    states; only the label-word formats (verbalizer, text_to_text) train the methods alone."""
    note = (f"note: task.format={cfg.task.format!r} trains a task head (delta 'head') together "
            f"with peft.methods={cfg.peft.methods!r}.")
    if "prompt" in defaults.method_list(cfg):
        note += (" Prompt tuning as Lester et al. define it (only the prompt trains; the frozen "
                 "LM scores the label words) is task.format='verbalizer' or 'text_to_text'.")
    return note
