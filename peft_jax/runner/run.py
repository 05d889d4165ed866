"""``run_experiment(cfg)``: train (or resume) a run, select, test, save, write its row.

Data flow (DESIGN.md): config -> task (load, encode, fixed-shape batches) -> base loaded
once -> delta initialized by the methods -> jitted train step over a mesh -> metrics
(progress bar, JSONL, TensorBoard) -> orbax checkpoint of the delta + optimizer + data
position -> eval -> ``result.json`` row.

Formats (``config.task.format``):
- ``classification`` / ``regression``: pooled states (``config.model.pooling``) -> the
  task head (the ``head`` method, ``delta["head"]``) -> softmax CE / MSE.
- ``verbalizer``: prompt-based (LM-BFF): a template with the answer slot, label words; the
  LM's scores of the label words at the mask (MLM) or next-token (causal LM) position. No
  head: with ``peft.methods=prompt`` only the prompt trains.
- ``text_to_text``: encoder-decoder (T5) or decoder-only models: the source (template or
  T5's task format) -> the target text (a class's word, or the example's text target); token
  cross-entropy on the target only; evaluated by rank classification (every class's target
  scored) and greedy generation + exact match (``task.eval_mode``). No head either.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.models.stack import unstack_layers
from peft_jax.parallel import distributed
from peft_jax.parallel.prefetch import DevicePrefetcher
from peft_jax.phases import PhaseClock
from peft_jax.models.quantize import weight_count
from peft_jax.programs import ProgramCache, program
from peft_jax.peft import tree
from peft_jax.peft.delta_io import save_delta
from peft_jax.peft.partition import tree_size
from peft_jax.runner.data import encode_split, load_examples
from peft_jax.runner.experiment import preflight
from peft_jax.runner.results import flat_config, read_result, results_table, write_json
from peft_jax.runner.session import Session, setup
from peft_jax.runner.workdir import prepare_workdir
from peft_jax.train.checkpoint import DeltaCheckpointer
from peft_jax.train.forward import make_loss_fn
from peft_jax.train.loop import LoopConfig, run_loop
from peft_jax.train.step import jit_train_step, make_train_step
from peft_jax.train.writers import MetricWriter


# the untrained delta is kept for its baseline evaluation after training while it holds at
# most this fraction of the base's parameter count (PEFT methods); larger ones (full
# fine-tuning) are evaluated before training instead of doubling their memory
BASELINE_COPY_FRACTION = 0.1


@dataclasses.dataclass
class RunResult:
    """What a run produced: ``row`` (the JSON row written to ``result.json``) and the live
    objects (final state, frozen tree, the selected trainable tree, the session);
    ``test_scores``: the selected tree's scores on the test subset, row order (``[n, C]``,
    or ``[n]`` for regression), when this process tested it (not for a finished run found
    on disk)."""

    row: dict
    state: Any
    frozen: Any
    selected: Any
    session: Session
    test_scores: Optional[np.ndarray] = None


def run_experiment(cfg, pretrained: Any = None, on_step: Optional[Callable[[int], None]] = None,
                   clock: Optional[PhaseClock] = None,
                   programs: Optional[ProgramCache] = None) -> RunResult:
    """Train (or resume) the run described by ``cfg``; returns its result (and writes it).
    ``clock``: the run's phases up to its first step (:mod:`peft_jax.phases`; default: a
    clock started now), in its row as ``phases`` and in its log. ``programs``: the jitted
    train step, predict function and delta init are shared with the earlier runs of this
    cache whose programs are the same (:func:`peft_jax.runner.session.program_key`: runs
    that differ only in seed, data splits, initial delta or workdir); None: built anew."""
    clock = clock or PhaseClock(from_process_start=False)
    with clock:
        return _run(cfg, pretrained, on_step, clock, programs)


def _run(cfg, pretrained: Any, on_step: Optional[Callable[[int], None]], clock: PhaseClock,
         programs: Optional[ProgramCache]) -> RunResult:
    t_start = time.perf_counter()
    distributed.initialize()
    main = jax.process_index() == 0
    if main:   # refuse / move aside an old run, save the resolved config (before the model loads)
        preflight(cfg)
        prepare_workdir(cfg)
    clock.mark("config")
    s = setup(cfg, pretrained, clock=clock, programs=programs)
    exp, c = s.exp, cfg.train
    state, frozen, batches, shard, meta = s.state, s.frozen, s.batches, s.shard, s.meta_base
    train_step = program(programs, ("train_step", s.program_key()), lambda: jit_train_step(
        make_train_step(make_loss_fn(exp.model, s.spec), s.ts.variables, s.tx, c.grad_accum,
                        c.max_update_ratio),
        s.state_sh, s.frozen_sh, None))

    ckpt = DeltaCheckpointer(os.path.join(cfg.workdir, "checkpoints"), keep=c.keep)
    best = (DeltaCheckpointer(os.path.join(cfg.workdir, "best"), keep=1, best_metric=c.best_metric)
            if c.best_metric else None)
    resumed_from = None
    if c.resume and ckpt.latest_step() is not None:
        state, restored = ckpt.restore(s.abstract_state(), meta)
        batches.set_state(restored["data"])
        resumed_from = int(restored["step"])
    stored = read_result(cfg.workdir) if resumed_from is not None else {}
    if (resumed_from is not None and resumed_from >= c.steps and stored.get("status") == "finished"
            and stored.get("steps") == resumed_from and stored.get("metrics")):
        # a rerun of a finished run: its results stand (nothing is rewritten)
        for c_ in (ckpt, best):
            if c_ is not None:
                c_.close()
        selected, _ = select(cfg, s, state.trainable)
        if main:
            print(f"[peft_jax] already finished at step {resumed_from}; its results "
                  f"({os.path.join(cfg.workdir, 'result.json')}):\n{results_table(stored)}",
                  flush=True)
        return RunResult(row=stored, state=state, frozen=frozen, selected=selected, session=s)

    feed, loop_shard = batches, shard
    if c.prefetch > 0:   # host collation + transfer of step t+1 overlap step t
        feed, loop_shard = DevicePrefetcher(batches, shard, depth=c.prefetch), (lambda b: b)

    def meta_fn(step: int) -> dict:
        # the position after the batches consumed (not after those prefetched)
        return {**meta, "step": int(step), "data": feed.get_state()}

    # the untrained delta's metrics (kept from an interrupted run's row): evaluated after
    # training (so training starts sooner) from a copy of the untrained delta when that is
    # small, else now
    baseline, untrained = (stored.get("baseline") or {}) if c.baseline else {}, None
    if c.baseline and not baseline:
        if tree_size(s.state.trainable) <= BASELINE_COPY_FRACTION * weight_count(exp.pre.base):
            untrained = jax.tree.map(jnp.copy, s.state.trainable)
        else:
            baseline = s.evaluate(s.state.trainable)
    writer = MetricWriter(cfg.workdir, resume_step=resumed_from or 0) if main else None
    n_params = tree_size(state.trainable)
    if main:
        print(f"[peft_jax] {exp.base_id}: {exp.kind}, methods={[m.name for m in exp.methods]}, "
              f"trainable={n_params:,} / base={weight_count(exp.pre.base):,} params; "
              f"mesh={dict(s.mesh.shape)}; train={s.n_train} eval={s.n_eval} examples"
              + (f"; resumed from step {resumed_from}" if resumed_from is not None else ""),
              flush=True)
    clock.mark("prepare")
    try:
        loop = run_loop(
            state=state, frozen=frozen, train_step=train_step, batches=feed, shard=loop_shard,
            cfg=LoopConfig(total_steps=c.steps, log_every=c.log_every, eval_every=c.eval_every,
                           ckpt_every=c.ckpt_every, progress=c.progress and main,
                           ckpt_every_s=c.ckpt_every_s, max_update_ratio=c.max_update_ratio),
            eval_fn=lambda st: s.evaluate(st.trainable), checkpointer=ckpt, meta_fn=meta_fn,
            writer=writer, examples_per_step=c.batch_size, best_metric=c.best_metric or None,
            best_checkpointer=best, on_step=on_step, clock=clock)
    finally:
        if feed is not batches:
            feed.close()
        ckpt.close()
        if best is not None:
            best.close()
        if writer:
            writer.close()

    metrics = loop.last_eval
    if loop.status == "finished" and not metrics:
        # resumed at the last step (killed after the final checkpoint, before result.json):
        # the final evaluation of the same state
        metrics = s.evaluate(loop.state.trainable)
    if untrained is not None and loop.status == "finished":
        baseline = s.evaluate(untrained)
    row = {
        "name": cfg.name, "status": loop.status, "config": flat_config(cfg),
        "metrics": metrics, "baseline": baseline,
        "trainable_params": int(n_params), "base_params": int(weight_count(exp.pre.base)),
        "steps": int(jax.device_get(loop.state.step)), "wall_s": time.perf_counter() - t_start,
        "train_wall_s": loop.wall_s, "compilations": loop.compilations,
        "resumed_from": resumed_from, "phases": clock.summary(),
    }
    selected = loop.state.trainable
    if loop.status == "finished":
        selected, step = select(cfg, s, selected)
        if step is not None:
            row["selected_step"] = step
    test_scores = None
    if loop.status == "finished" and cfg.task.test_split:
        row["test"], test_scores = s.evaluate_scored(selected, encoded_test_split(cfg, s))
    if main:
        save_outputs(cfg, exp, row, selected, frozen)
    return RunResult(row=row, state=loop.state, frozen=frozen, selected=selected, session=s,
                     test_scores=test_scores)


def select(cfg, s: Session, last: Any) -> tuple[Any, Optional[int]]:
    """The trainable tree a finished run is tested and saved with, and its step: the
    ``train.best_metric`` checkpoint's (model selection, e.g. LM-BFF's dev-set best step)
    if one is kept, else ``last`` (None)."""
    if not cfg.train.best_metric:
        return last, None
    sel = DeltaCheckpointer(os.path.join(cfg.workdir, "best"), keep=1,
                            best_metric=cfg.train.best_metric)
    try:
        step = sel.best_step()
        if step is None:
            return last, None
        return sel.restore(s.abstract_state(), s.meta_base, step=step)[0].trainable, int(step)
    finally:
        sel.close()


def encoded_test_split(cfg, s: Session) -> Any:
    """The run's encoded test split (``task.test_split``; ``task.max_test_examples`` of it,
    the same subset for every seed)."""
    return encode_split(s.exp, load_examples(s.exp, cfg.task.test_split, cfg.task.max_test_examples))


def save_outputs(cfg, exp: Any, row: dict, selected: Any, frozen: Any) -> None:
    """A run's files: ``delta`` (finished runs: the whole delta, i.e. trainable and
    method-owned frozen leaves and any trained base leaves; the selected step's under
    ``train.best_metric``, else the last) and ``result.json``; prints a finished row's table."""
    if row["status"] == "finished":
        save_delta(os.path.join(cfg.workdir, "delta"), delta_tree(selected, frozen),
                   base_id=exp.base_id, base_hash=exp.base_hash, methods=exp.methods,
                   overwrite=True)
    write_json(os.path.join(cfg.workdir, "result.json"), row)
    if row["status"] == "finished":
        print(results_table(row), flush=True)


def delta_tree(trainable: Any, frozen: Any, per_layer: bool = True) -> dict:
    """What a delta file holds: the trainable tree, plus method-owned frozen delta leaves,
    in per-layer form (``per_layer=False``: as the train state holds them, stacked under
    ``scan_layers``; see ``models.stack``)."""
    out = dict(jax.device_get(trainable))
    frozen_delta = jax.device_get(frozen.get("peft", {}))
    if frozen_delta:
        out["peft"] = tree.merge(out.get("peft", {}), frozen_delta)
    return unstack_layers(out) if per_layer else out
