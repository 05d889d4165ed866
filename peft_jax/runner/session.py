"""A prepared run: the experiment, its encoded data, the train state on the mesh, the
jitted predict function.

``setup(cfg)`` (training: encodes the train and eval splits, builds the batch iterator);
``setup(cfg, data="eval")`` (evaluation: the eval split only) and ``data="none"``
(export / parameter report: no data at all) build the state abstractly
(``jax.eval_shape``), ready for a checkpoint restore (:func:`restore_trained`).
:func:`zeroshot_experiment` evaluates the plain base model (no method, no training).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.config import ConfigError
from peft_jax.data import make_batches
from peft_jax.data.tokenize import pad_token_id
from peft_jax.parallel import distributed
from peft_jax.parallel.mesh import make_mesh, shard_batch, under_mesh
from peft_jax.phases import PhaseClock
from peft_jax.programs import ProgramCache, program, tree_signature
from peft_jax.peft.delta_io import load_delta, methods_config, tree_spec
from peft_jax.peft.optim import optimizer_from_config
from peft_jax.peft import tree
from peft_jax.runner.data import (encode_split, demonstration_pool, load_examples, model_batch,
                                  training_examples)
from peft_jax.runner.evaluation import exact_match_encoded, predict_encoded, task_metrics
from peft_jax.runner.experiment import Experiment, build_experiment
from peft_jax.runner.results import flat_config
from peft_jax.train.builder import TrainSetup, build_train_state
from peft_jax.train.checkpoint import CheckpointError, DeltaCheckpointer
from peft_jax.train.forward import FormatSpec, make_predict_fn
from peft_jax.train.step import make_eval_step

DATA_MODES = ("train", "eval", "none")
# flat config keys that choose only values (data, rng keys, the initial delta, file places),
# never a program: runs that differ only in these share compiled programs (program_key)
VALUE_KEYS = ("name", "workdir", "seed", "task.train_split", "task.eval_split",
              "task.test_split", "train.init_from")


@dataclasses.dataclass
class Session:
    """A prepared run (see the module docstring). ``batches`` / ``train_enc`` are None
    unless ``data="train"``; ``eval_enc`` is None with ``data="none"``."""

    exp: Experiment
    spec: Any
    ts: TrainSetup
    batches: Any
    train_enc: Any
    eval_enc: Any
    predict: Callable
    shard: Callable
    meta_base: dict

    # the train setup's parts, by name
    state = property(lambda self: self.ts.state)
    frozen = property(lambda self: self.ts.frozen)
    tx = property(lambda self: self.ts.tx)
    mesh = property(lambda self: self.ts.mesh)
    state_sh = property(lambda self: self.ts.state_sh)
    frozen_sh = property(lambda self: self.ts.frozen_sh)
    n_train = property(lambda self: len(self.train_enc) if self.train_enc is not None else 0)
    n_eval = property(lambda self: len(self.eval_enc) if self.eval_enc is not None else 0)

    def abstract_state(self) -> Any:
        return self.ts.abstract_state()

    def program_key(self) -> tuple:
        """:func:`program_key` of this run."""
        return program_key(self.exp, self.spec, self.ts)

    def predict_rows(self, trainable: Any, encoded: Any) -> tuple[np.ndarray, np.ndarray]:
        """(scores, labels) of every row of ``encoded``, in order."""
        c = self.exp.cfg.train
        return predict_encoded(self.predict, trainable, self.frozen, encoded, self.shard,
                               c.eval_batch_size, tuple(c.buckets))

    def evaluate(self, trainable: Any, encoded: Any = None) -> dict:
        """Task metrics of ``trainable`` on ``encoded`` (default: the eval split).

        text_to_text (``task.eval_mode``): rank classification (the task's metrics of the
        best-scoring class target) and/or greedy generation (``exact_match``)."""
        return self.evaluate_scored(trainable, encoded)[0]

    def evaluate_scored(self, trainable: Any, encoded: Any = None
                        ) -> tuple[dict, Optional[np.ndarray]]:
        """:meth:`evaluate`'s metrics and the scores they came from (``[n, C]`` class
        scores or ``[n]`` regression values, row order; None where generation alone
        scores): one pass, so a caller that also wants the scores (calibration) does not
        predict the split twice."""
        encoded = self.eval_enc if encoded is None else encoded
        cfg = self.exp.cfg
        if cfg.task.format != "text_to_text":
            y, lab = self.predict_rows(trainable, encoded)
            return task_metrics(self.exp.task, cfg.task.format, y, lab), y
        out, scores = {}, None
        if cfg.task.eval_mode in ("both", "rank") and self.spec.label_word_ids:
            scores, lab = self.predict_rows(trainable, encoded)
            out.update(task_metrics(self.exp.task, cfg.task.format, scores, lab))
        if cfg.task.eval_mode in ("both", "generate"):
            out["exact_match"] = exact_match_encoded(
                self.exp.model, self.spec, self.ts.variables, self.exp.pre.tokenizer, trainable,
                self.frozen, encoded, self.shard, cfg.train.eval_batch_size, tuple(cfg.train.buckets))
        return out, scores

    def predict_scores(self, trainable: Any, examples: list) -> np.ndarray:
        """Class scores ``[n, C]`` (or regression values ``[n]``) of ``examples``, in order."""
        return self.predict_rows(trainable, encode_split(self.exp, examples))[0]


def format_spec(exp: Experiment, encoded: Any = None) -> FormatSpec:
    """How model outputs become class scores for this run (label words from ``encoded``)."""
    cfg, lw = exp.cfg, None
    if (cfg.task.format in ("verbalizer", "text_to_text") and encoded is not None
            and "label_word_ids" in encoded.constants):
        lw = tuple(tuple(tuple(int(t) for t in w) for w in c)
                   for c in np.asarray(encoded.constants["label_word_ids"]))
    if (cfg.task.format == "text_to_text" and encoded is not None and lw is None
            and cfg.task.eval_mode == "rank"):
        raise ConfigError(f"config.task.eval_mode='rank' scores every class's target; task "
                          f"{exp.task.name} has no classes (use 'generate')")
    start = getattr(exp.pre.config, "decoder_start_token_id", 0) or 0
    tok = exp.pre.tokenizer
    return FormatSpec(kind=exp.kind, format=cfg.task.format, pooling=cfg.model.pooling,
                      head=exp.head, label_word_ids=lw, methods=exp.methods,
                      decoder_start_token_id=int(start), pad_token_id=pad_token_id(tok),
                      eos_token_id=tok.eos_token_id)


def init_inputs(exp: Experiment, batch: int = 1, length: int = 8) -> dict:
    """Model inputs for the delta init (their values and length do not matter)."""
    return exp.pre.family.init_inputs({"input_ids": jnp.ones((batch, length), jnp.int32),
                                       "attention_mask": jnp.ones((batch, length), jnp.int32)})


def init_from_delta(trainable: Any, folder: str, exp: Experiment) -> Any:
    """Start from a saved delta (intermediate-task fine-tuning): every trainable leaf whose
    path and shape appear in ``folder`` takes the saved value; the rest (e.g. a head for
    another number of classes) keep their fresh initialization. The delta must belong to
    the same base model."""
    saved, _ = load_delta(folder, base_id=exp.base_id, base_hash=exp.base_hash,
                          expected=tree_spec(trainable), partial=True)
    src = tree.flatten(saved)
    flat = tree.flatten(trainable)
    taken = [k for k, v in flat.items() if k in src and np.shape(src[k]) == np.shape(v)]
    if not taken:
        raise ConfigError(f"config.train.init_from={folder!r}: no leaf of the saved delta "
                          f"matches this run's trainable parameters (saved: {sorted(src)[:4]}...)")
    out = {k: (jnp.asarray(src[k], v.dtype) if k in taken else v) for k, v in flat.items()}
    skipped = sorted(set(flat) - set(taken))
    if jax.process_index() == 0:
        print(f"[peft_jax] init_from {folder}: {len(taken)} leaves loaded"
              + (f", {len(skipped)} fresh ({', '.join(skipped[:3])}{'...' if len(skipped) > 3 else ''})"
                 if skipped else ""), flush=True)
    return tree.unflatten(out)


def meta_base(exp: Experiment) -> dict:
    """Checkpoint metadata every restore must agree with (``train.checkpoint.check_meta``)."""
    cfg = exp.cfg
    return json.loads(json.dumps({
        "base_id": exp.base_id, "base_hash": exp.base_hash,
        "methods": methods_config(exp.methods), "format": cfg.task.format,
        "task": exp.task.name, "num_labels": int(exp.task.num_labels),
        "optimizer": cfg.optim.optimizer, "scan_layers": bool(cfg.model.scan_layers)}))


def program_key(exp: Experiment, spec: Any, ts: TrainSetup) -> tuple:
    """Everything a run's jitted train step and predict function capture, as a hashable key
    (:mod:`peft_jax.programs`): the config without :data:`VALUE_KEYS` (optimizer, schedule
    length, grad_accum, max_update_ratio, format, buckets, ...), the model (its config and
    methods), the format spec (label word ids, pad / eos ids, head), the mesh, and the
    structure (treedef, shapes, dtypes) and shardings of the train state and the frozen tree
    (the optimizer's groups follow the trainable tree)."""
    flat = {k: v for k, v in flat_config(exp.cfg).items() if k not in VALUE_KEYS}
    return (json.dumps(sorted(flat.items())), exp.model, spec, ts.methods, ts.mesh,
            tree_signature(ts.state), tree_signature(ts.frozen),
            tree_signature(ts.state_sh), tree_signature(ts.frozen_sh))


def setup(cfg, pretrained: Any = None, data: str = "train", bare: bool = False,
          clock: Optional[PhaseClock] = None, programs: Optional[ProgramCache] = None) -> Session:
    """Everything before the first step: load, (encode), init the delta, shard, jit.

    ``bare``: the plain base model, no PEFT method (the format's head only); its state is
    initialized even without training data. ``clock``: its ``model_load``, ``data`` and
    ``init`` phases end here. ``programs``: the delta init and the predict function are
    shared with earlier runs of an equal :func:`program_key` (:mod:`peft_jax.programs`)."""
    clock = clock or PhaseClock(from_process_start=False)
    if data not in DATA_MODES:
        raise ValueError(f"setup: data={data!r}; choose one of {DATA_MODES}")
    distributed.initialize()
    mesh = make_mesh(dict(cfg.mesh))
    exp = build_experiment(cfg, pretrained, bare=bare, mesh=mesh)
    clock.mark("model_load")
    c = cfg.train
    train_enc = eval_enc = batches = None
    if data == "train":
        pool = demonstration_pool(exp) if cfg.task.demonstrations else None
        train_enc = encode_split(exp, training_examples(exp), pool)
        batches = make_batches(train_enc, c.batch_size // max(jax.process_count(), 1),
                               buckets=tuple(c.buckets), seed=cfg.seed,
                               shard_index=jax.process_index(), shard_count=jax.process_count())
    if data in ("train", "eval"):
        eval_ex = load_examples(exp, cfg.task.eval_split, cfg.task.max_eval_examples)
        eval_enc = encode_split(exp, eval_ex,
                                demonstration_pool(exp) if cfg.task.demonstrations else None)
    clock.mark("data")
    spec = format_spec(exp, train_enc if train_enc is not None else eval_enc)
    transform = (lambda tr: init_from_delta(tr, c.init_from, exp)) if c.init_from else None
    ts = build_train_state(
        exp.model, exp.pre.base, exp.methods, init_inputs(exp), jax.random.PRNGKey(cfg.seed),
        lambda tr: optimizer_from_config(cfg.optim, tr, exp.methods, c.steps), mesh=mesh,
        transform=transform, abstract=data != "train" and not bare, programs=programs)
    predict = program(programs, ("predict", program_key(exp, spec, ts)), lambda: under_mesh(
        jax.jit(make_eval_step(make_predict_fn(exp.model, spec), ts.variables)), mesh))
    clock.mark("init")
    return Session(exp=exp, spec=spec, ts=ts, batches=batches, train_enc=train_enc,
                   eval_enc=eval_enc, predict=predict,
                   shard=lambda b: shard_batch(model_batch(b), mesh), meta_base=meta_base(exp))


def restore_trained(cfg, pretrained: Any = None, which: str = "latest", data: str = "eval",
                    clock: Optional[PhaseClock] = None) -> tuple[Session, Any]:
    """A session and its trained trainable tree, from the run's checkpoints (no training
    data is encoded). ``which``: ``"latest"`` or ``"best"`` (``train.best_metric``);
    ``clock``: :func:`setup`'s phases and ``restore``."""
    s = setup(cfg, pretrained, data=data, clock=clock)
    folder = os.path.join(cfg.workdir, "best" if which == "best" else "checkpoints")
    ckpt = DeltaCheckpointer(folder)
    try:
        if ckpt.latest_step() is None:
            raise CheckpointError(f"no checkpoint in {folder}: train first "
                                  f"(peft-jax train --config ... --workdir {cfg.workdir})")
        state, _ = ckpt.restore(s.abstract_state(), s.meta_base)
    finally:
        ckpt.close()
    if clock is not None:
        clock.mark("restore")
    return s, state.trainable


def zeroshot_experiment(cfg, split: Optional[str] = None, clock: Optional[PhaseClock] = None) -> dict:
    """Metrics of the untrained base model (no delta, no training step) on ``split``
    (default ``task.eval_split``) under the config's format, template and label words. With
    the classification / regression formats the head is freshly initialized (chance level)."""
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.task.eval_split = split or cfg.task.eval_split
    if cfg.task.format in ("classification", "regression"):
        print(f"[peft_jax] zeroshot: task.format={cfg.task.format!r} has a freshly initialized "
              "head (chance level); 'verbalizer' / 'text_to_text' score label words", flush=True)
    s = setup(cfg, data="eval", bare=True, clock=clock)
    return s.evaluate(s.state.trainable)


def evaluate_experiment(cfg, split: Optional[str] = None, which: str = "latest",
                        clock: Optional[PhaseClock] = None) -> dict:
    """Metrics of a trained run on ``split`` (default: ``config.task.eval_split``)."""
    s, trainable = restore_trained(cfg, which=which, clock=clock)
    enc = None
    if split and split != cfg.task.eval_split:
        enc = encode_split(s.exp, load_examples(s.exp, split))
    return s.evaluate(trainable, enc)
