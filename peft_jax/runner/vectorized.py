"""Many runs in one program: K runs whose delta shapes agree (they differ only in seed,
initial delta, data, data order and learning rate) train as one ``jax.vmap``-ed step
over one shared frozen base::

    results = run_vectorized([cfg_seed13, cfg_seed21, cfg_seed42], pretrained)

One compilation of the train step and one of the predict step serve all K runs, and every
step reads the frozen base weights once for all of them (the runs' activations
``[K, batch, length, d_model]`` go through the same weight matrices). Each run keeps its own

- initial delta and rng (``setup`` of its own config: ``PRNGKey(seed)`` and the methods'
  ``init_only`` options, e.g. ``peft.prompt.init``, ``peft.lora.init_a``), training and
  eval data and data order (its own batch iterator); the state is stacked on a leading
  run axis ``[K, ...]``, and so is method-owned frozen delta state (e.g. VeRA's
  projections), while the frozen base is not;
- learning rate: run k's updates are scaled by ``lr_k / lr_0``, a hyperparameter in its
  optimizer state (``optax.inject_hyperparams``). Every optimizer of
  :mod:`peft_jax.peft.optim` applies the learning rate (with its schedule) linearly as its
  last transformation, so this is run k's own optimizer up to float rounding (run 0:
  exactly). Runs may differ in ``optim.lr`` only while no group rate
  (``optim.<group>_lr``) is set;
- evaluation every ``train.eval_every`` steps on its own eval split, its dev-selected
  step (``train.best_metric``; ties go to the later step, as with the sequential best
  checkpoint), test metrics of that step, ``metrics.jsonl``, ``delta`` and
  ``result.json`` in its own workdir.

A run's row equals its sequential :func:`~peft_jax.runner.run.run_experiment` row up to
float summation order: the K batches of a step are right-padded to the longest of them
(padding is masked out), evaluation batches hold one length per split. Differences from
the sequential runner: no checkpoints during training and no resume (the selected delta
is kept in memory), one process (the mesh's devices split each run's batch, as for a
single run).

:func:`vector_groups` splits any list of runs (a sweep's cells) into such groups.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from peft_jax.config import ConfigError
from peft_jax.data import make_batches
from peft_jax.models.quantize import weight_count
from peft_jax.parallel.mesh import batch_sharding
from peft_jax.peft.method import REGISTRY
from peft_jax.phases import PhaseClock
from peft_jax.programs import ProgramCache
from peft_jax.peft.partition import BASE_KEY, DELTA_KEY, tree_size
from peft_jax.runner.data import model_batch
from peft_jax.runner.evaluation import in_row_order, task_metrics
from peft_jax.runner.results import flat_config
from peft_jax.runner.experiment import preflight
from peft_jax.runner.run import RunResult, encoded_test_split, save_outputs
from peft_jax.runner.workdir import prepare_workdir
from peft_jax.runner.session import Session, setup
from peft_jax.train.forward import make_loss_fn, make_predict_fn
from peft_jax.train.loop import NonFiniteLoss, compile_count
from peft_jax.train.step import TrainState, make_eval_step, make_train_step
from peft_jax.train.writers import MetricWriter

# config keys (flat, as on the command line) in which vectorized runs may differ, besides
# the methods' init-only options (``peft.<method>.<option>``, :func:`varying_keys`)
VARYING = ("name", "workdir", "seed", "optim.lr", "train.init_from", "task.train_split",
           "task.eval_split")
# in_axes of the frozen tree: the base is shared, method-owned frozen delta state is per run
FROZEN_AXES = {BASE_KEY: None, DELTA_KEY: 0}


def varying_keys() -> tuple[str, ...]:
    """:data:`VARYING` and every registered method's ``init_only`` options (they only
    choose initial values, which are per run)."""
    return VARYING + tuple(f"peft.{name}.{o}" for name, cls in sorted(REGISTRY.items())
                           for o in cls.init_options())


def group_lr_keys(flat: Mapping[str, Any]) -> list[str]:
    """The group learning rates (``optim.<group>_lr``) a flat config sets."""
    return sorted(k for k, v in flat.items() if k.startswith("optim.") and k.endswith("_lr") and v)


def fixed_values(cfg: Any) -> dict[str, Any]:
    """The flat config values vectorized runs must share: every key but
    :func:`varying_keys`, and ``optim.lr`` too while a group learning rate is set."""
    flat, varying = flat_config(cfg), set(varying_keys())
    if group_lr_keys(flat):
        varying.discard("optim.lr")
    return {k: v for k, v in flat.items() if k not in varying}


def vector_groups(cfgs: Sequence[Any], max_runs: int = 0) -> list[list[int]]:
    """Indices of ``cfgs`` in groups that can train as one vectorized program (equal
    :func:`fixed_values`; a group lists its runs in order, groups are ordered by their first
    run), each cut into pieces of at most ``max_runs`` (0: no limit). One process only:
    with several, every run is its own group."""
    if jax.process_count() > 1:
        return [[i] for i in range(len(cfgs))]
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        key = json.dumps(sorted(fixed_values(cfg).items()), default=repr)
        if float(cfg.optim.lr) == 0:   # the others' rates are scaled from run 0's
            key += "#lr=0"
        groups.setdefault(key, []).append(i)
    size = max_runs if max_runs > 0 else len(cfgs)
    return [g[j:j + size] for g in groups.values() for j in range(0, len(g), size)]


def check_runs(cfgs: Sequence[Any]) -> None:
    """Raise :class:`ConfigError` (naming the key) unless the runs differ only in
    :func:`varying_keys` and their learning rates can be vectorized."""
    if not cfgs:
        raise ConfigError("vectorized runs: no config given")
    flats = [flat_config(c) for c in cfgs]
    varying = varying_keys()
    for key in sorted(set().union(*flats) - set(varying)):
        values = [f.get(key) for f in flats]
        other = next((i for i, v in enumerate(values) if v != values[0]), None)
        if other is not None:
            raise ConfigError(
                f"config.{key}: run {other} ({cfgs[other].workdir}) has {values[other]!r}, run 0 "
                f"has {values[0]!r}; vectorized runs may differ only in "
                f"{', '.join(VARYING)} and the methods' init options")
    lrs = [float(c.optim.lr) for c in cfgs]
    if len(set(lrs)) > 1:
        groups = group_lr_keys(flats[0])
        if groups:
            raise ConfigError(f"config.optim.lr differs between vectorized runs while config."
                              f"{groups[0]}={flats[0][groups[0]]} is fixed; vary the rates "
                              "of runs without group learning rates only")
        if lrs[0] == 0:
            raise ConfigError("config.optim.lr: run 0 of vectorized runs has learning rate 0 "
                              "(the others' rates are scaled from it)")
    if jax.process_count() > 1:
        raise ConfigError("vectorized runs: one process only (jax.process_count() = "
                          f"{jax.process_count()})")


def stack(trees: Sequence[Any]) -> Any:
    """Trees of one structure -> one tree of ``[K, ...]`` leaves."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def run_slice(tree: Any, k: int) -> Any:
    """Run ``k``'s tree out of a stacked one (new arrays: safe from buffer donation)."""
    return jax.tree.map(lambda x: x[k], tree)


def pad_ids(encoded: Any) -> dict[str, int]:
    """Pad value of every token feature and target of an encoded split."""
    return {k: int(encoded.pad.get(k, 0)) for k in (*encoded.features, *encoded.targets)}


def stack_batches(batches: Sequence[Mapping[str, np.ndarray]], pads: Mapping[str, int]) -> dict:
    """The K runs' host batches -> one dict of ``[K, batch, ...]`` arrays. Token features
    and targets (the keys of ``pads``) are right-padded with their pad value to the
    longest of the K (their masks pad with 0, so padding never attends or scores)."""
    out = {}
    for key in batches[0]:
        arrs = [np.asarray(b[key]) for b in batches]
        if key in pads:
            width = max(a.shape[1] for a in arrs)
            arrs = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=pads[key])
                    for a in arrs]
        out[key] = np.stack(arrs)
    return out


def place_stacked(batch: Mapping[str, np.ndarray], mesh: Any) -> dict:
    """A stacked batch ``[K, batch, ...]`` on ``mesh``: the run axis replicated, the batch
    axis sharded as :func:`~peft_jax.parallel.mesh.shard_batch` shards a run's batch."""
    return {k: jax.device_put(v, NamedSharding(mesh, P(None, *batch_sharding(mesh, v.ndim - 1).spec)))
            for k, v in batch.items()}


def with_lr_scale(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` followed by a per-run scale of the updates (``step_size`` in the state)."""
    return optax.chain(tx, optax.inject_hyperparams(optax.scale)(step_size=1.0))


def scaled_state(state: TrainState, scale: float) -> TrainState:
    """A run's state for :func:`with_lr_scale` of its optimizer, with ``scale`` set."""
    inject = optax.inject_hyperparams(optax.scale)(step_size=scale).init(state.trainable)
    return state.replace(opt_state=(state.opt_state, inject))


def shared_sessions(cfgs: Sequence[Any], pretrained: Any, clock: Optional[PhaseClock] = None
                    ) -> list[Session]:
    """``setup`` of every run; the runs share run 0's frozen base and jitted predict (the
    same base and methods: the others' copies are dropped as soon as they are made) and
    the compiled delta init of equal programs (:class:`~peft_jax.programs.ProgramCache`)."""
    sessions: list[Session] = []
    programs = ProgramCache()
    for cfg in cfgs:
        s = setup(cfg, pretrained, clock=clock, programs=programs)
        if sessions:
            s0 = sessions[0]
            shapes = lambda t: [np.shape(x) for x in jax.tree.leaves(t)]
            if (jax.tree.structure(s.state) != jax.tree.structure(s0.state)
                    or shapes(s.state) != shapes(s0.state)):
                raise ConfigError(f"{cfg.workdir}: its trainable state's shapes differ from "
                                  f"{cfgs[0].workdir}'s; such runs cannot be vectorized")
            s.ts.frozen = {**s.ts.frozen, BASE_KEY: s0.frozen[BASE_KEY]}
            s = dataclasses.replace(s, predict=s0.predict)
        sessions.append(s)
    return sessions


def same_rows(encodeds: Sequence[Any]) -> bool:
    """Whether the runs' encoded splits hold the same rows (e.g. the one fixed test subset
    every seed is tested on): equal token features, targets and scalars, in order."""
    def equal(a: Any, b: Any) -> bool:   # ragged lists of 1-d arrays, or [n, ...] arrays
        return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))

    first = encodeds[0]
    fields = lambda e: {**e.features, **e.targets, **e.scalars}
    return all(e is first or (fields(e).keys() == fields(first).keys() and all(
        equal(v, fields(first)[k]) for k, v in fields(e).items())) for e in encodeds[1:])


def predict_runs(vpredict: Any, trainables: Any, frozen: Any, encodeds: Sequence[Any],
                 batch_size: int, pads: Mapping[str, int], mesh: Any,
                 buckets: Optional[tuple] = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(scores, labels) of every row of each run's split, in row order: run k's stacked
    ``trainables[k]`` on ``encodeds[k]``, all runs in one vmapped call per batch. A run
    with fewer batches gets masked filler rows. ``buckets`` (the runs' length buckets)
    apply when every run has the same rows, so the K batches of a call share a length;
    splits that differ are batched at their full length (one shape per split: bucketing
    them would pad every call to the longest run's bucket and add partial batches)."""
    buckets = buckets if buckets and same_rows(encodeds) else None
    iters = [iter(make_batches(e, batch_size, buckets=buckets, shuffle=False, drop_remainder=False,
                               num_epochs=1)) for e in encodeds]
    parts = [([], [], [], []) for _ in encodeds]
    while True:
        host = [next(it, None) for it in iters]
        if all(b is None for b in host):
            break
        filler = next(b for b in host if b is not None)
        host = [b if b is not None else {**filler, "example_mask": np.zeros_like(filler["example_mask"]),
                                         "row": np.full_like(filler["row"], -1)} for b in host]
        y = np.asarray(jax.device_get(
            vpredict(trainables, frozen,
                     place_stacked(stack_batches([model_batch(b) for b in host], pads), mesh))))
        for k, b in enumerate(host):
            for part, v in zip(parts[k], (y[k], b["label"], b["example_mask"] > 0, b["row"])):
                part.append(v)
    return [in_row_order(*p) for p in parts]


def evaluate_runs(sessions: Sequence[Session], vpredict: Any, trainables: Any, frozen: Any,
                  encodeds: Sequence[Any], pads: Mapping[str, int]
                  ) -> list[tuple[dict, Optional[np.ndarray]]]:
    """Each run's task metrics on its split and the scores they came from
    (:meth:`Session.evaluate_scored`'s, vectorized; text-to-text generation is evaluated
    run by run)."""
    cfg = sessions[0].exp.cfg
    if cfg.task.format == "text_to_text" and cfg.task.eval_mode != "rank":
        return [s.evaluate_scored(run_slice(trainables, k), e)
                for k, (s, e) in enumerate(zip(sessions, encodeds))]
    preds = predict_runs(vpredict, trainables, frozen, encodeds, cfg.train.eval_batch_size, pads,
                         sessions[0].mesh, tuple(cfg.train.buckets))
    return [(task_metrics(s.exp.task, cfg.task.format, y, lab), y)
            for s, (y, lab) in zip(sessions, preds)]


@dataclasses.dataclass
class _Best:
    """A run's best evaluation so far (``train.best_metric``) and its trainable tree."""

    value: Optional[float] = None
    step: Optional[int] = None
    trainable: Any = None

    def offer(self, value: float, step: int, trainable: Any) -> None:
        if self.value is None or value >= self.value:   # ties: the later step
            self.value, self.step, self.trainable = value, step, trainable


def run_vectorized(cfgs: Sequence[Any], pretrained: Any = None,
                   clock: Optional[PhaseClock] = None) -> list[RunResult]:
    """Train the runs of ``cfgs`` as one vmapped program (see the module docstring); each
    run's ``result.json`` and ``delta`` are written as by ``run_experiment``. Returns
    their results, in order (the sessions share one frozen base). ``clock``: the
    program's phases (every run's row holds them), as for ``run_experiment``."""
    clock = clock or PhaseClock(from_process_start=False)
    with clock:
        return _run_vectorized(cfgs, pretrained, clock)


def _run_vectorized(cfgs: Sequence[Any], pretrained: Any, clock: PhaseClock) -> list[RunResult]:
    t_start = time.perf_counter()
    check_runs(cfgs)
    if jax.process_index() == 0:   # as run_experiment: refuse / move aside old runs
        for cfg in cfgs:
            preflight(cfg)
            prepare_workdir(cfg)
    clock.mark("config")
    sessions = shared_sessions(cfgs, pretrained, clock)
    s0, c, n = sessions[0], cfgs[0].train, len(cfgs)
    replicated = NamedSharding(s0.mesh, P())
    frozen = {BASE_KEY: s0.frozen[BASE_KEY],
              DELTA_KEY: jax.device_put(stack([s.frozen[DELTA_KEY] for s in sessions]), replicated)}
    lr0 = float(cfgs[0].optim.lr)
    state = jax.device_put(stack([scaled_state(s.state, float(cfg.optim.lr) / lr0 if lr0 else 1.0)
                                  for s, cfg in zip(sessions, cfgs)]), replicated)
    train_step = make_train_step(make_loss_fn(s0.exp.model, s0.spec), s0.ts.variables,
                                 with_lr_scale(s0.tx), c.grad_accum, c.max_update_ratio)
    vstep = jax.jit(jax.vmap(train_step, in_axes=(0, FROZEN_AXES, 0)), donate_argnums=(0,))
    vpredict = jax.jit(jax.vmap(make_eval_step(make_predict_fn(s0.exp.model, s0.spec),
                                               s0.ts.variables), in_axes=(0, FROZEN_AXES, 0)))
    pads = pad_ids(s0.train_enc)
    evaluate_scored = lambda tr, encs: evaluate_runs(sessions, vpredict, tr, frozen, encs, pads)
    evaluate = lambda tr, encs: [m for m, _ in evaluate_scored(tr, encs)]
    main = jax.process_index() == 0
    print(f"[peft_jax] {n} runs vectorized: {s0.exp.base_id}, methods="
          f"{[m.name for m in s0.exp.methods]}, trainable={tree_size(s0.state.trainable):,} "
          f"params per run; train={s0.n_train} eval={s0.n_eval} examples per run", flush=True)
    baselines = (evaluate(state.trainable, [s.eval_enc for s in sessions]) if c.baseline
                 else [{}] * n)
    writers = [MetricWriter(cfg.workdir) if main else None for cfg in cfgs]
    best = [_Best() for _ in cfgs]
    last_eval: list[dict] = [{}] * n
    clock.mark("prepare")
    t0 = time.perf_counter()
    try:
        for step in range(1, c.steps + 1):
            batch = place_stacked(stack_batches([model_batch(next(s.batches)) for s in sessions],
                                                pads), s0.mesh)
            state, metrics = vstep(state, frozen, batch)
            last = step == c.steps
            if step % max(c.log_every, 1) == 0 or last or step == 1:
                m = jax.device_get(metrics)
                if step == 1:
                    clock.mark("first_step")
                    if main:
                        print(clock.line(), flush=True)
                bad = np.nonzero(np.asarray(m.get("applied", m["finite"])) < 1.0)[0]
                if bad.size:
                    k = int(bad[0])
                    raise NonFiniteLoss(
                        f"{cfgs[k].workdir}: update refused at step {step} (loss="
                        f"{float(m['loss'][k])}, finite={float(m['finite'][k])}); vectorized "
                        "training stopped. Lower the "
                        "learning rate, enable gradient clipping (config.optim.clip_norm) or "
                        "check the data.")
                for k, w in enumerate(writers):
                    if w:
                        w.write(step, {key: v[k] for key, v in m.items()}, prefix="train/")
            if last or (c.eval_every and step % c.eval_every == 0):
                last_eval = evaluate(state.trainable, [s.eval_enc for s in sessions])
                for k, (ev, w) in enumerate(zip(last_eval, writers)):
                    if w:
                        w.write(step, ev, prefix="eval/")
                    if c.best_metric and c.best_metric in ev:
                        best[k].offer(float(ev[c.best_metric]), step, run_slice(state.trainable, k))
    finally:
        for w in writers:
            if w:
                w.close()
    train_wall = time.perf_counter() - t0
    selected = stack([b.trainable if b.step is not None else run_slice(state.trainable, k)
                      for k, b in enumerate(best)])
    tests = ([({}, None)] * n if not cfgs[0].task.test_split else
             # one encoding: runs share task.test_split and max_test_examples (check_runs),
             # and the subset does not depend on the seed
             evaluate_scored(selected, [encoded_test_split(cfgs[0], s0)] * n))
    wall = time.perf_counter() - t_start
    results = []
    for k, (cfg, s) in enumerate(zip(cfgs, sessions)):
        row = {
            "name": cfg.name, "status": "finished", "config": flat_config(cfg),
            "metrics": last_eval[k], "baseline": baselines[k],
            "trainable_params": int(tree_size(s.state.trainable)),
            "base_params": int(weight_count(s.exp.pre.base)), "steps": int(c.steps),
            "wall_s": wall / n, "train_wall_s": train_wall / n,
            "compilations": compile_count(vstep), "resumed_from": None,
            "phases": clock.summary(),
            "vectorized": {"runs": n, "index": k, "wall_s": wall, "train_wall_s": train_wall},
        }
        if best[k].step is not None:
            row["selected_step"] = best[k].step
        if cfg.task.test_split:
            row["test"] = tests[k][0]
        mine = run_slice(selected, k)
        if main:
            save_outputs(cfg, s.exp, row, mine, s.frozen)
        own = run_slice(state, k)   # its own optimizer's state (without the lr scale)
        results.append(RunResult(row=row, state=own.replace(opt_state=own.opt_state[0]), frozen=s.frozen,
                                 selected=mine, session=s, test_scores=tests[k][1]))
    return results
