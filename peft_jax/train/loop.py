"""The training loop: steps, progress bar, eval, checkpoints, interrupts, health stop.

Everything model- and task-specific is passed in (a jitted train step, a batch iterator
with ``get_state``/``set_state``, an eval function); the loop only orchestrates, so the
same loop serves classification, seq2seq, causal LM, SimCSE and few-shot training.

Checkpoints are written every ``ckpt_every`` steps, whenever ``ckpt_every_s`` seconds have
passed since the last one, at the end, and on SIGINT/SIGTERM (:mod:`.interrupts`); each
only after the health flags of every step so far were read (:mod:`.health`), so no saved
state holds a refused (non-finite or exploded) update. With several processes the
time-based save and the stop on a signal are agreed at logging steps (one small
all-gather): process 0's clock decides the save, a signal on any process stops all.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from peft_jax.phases import PhaseClock
from peft_jax.train.checkpoint import DeltaCheckpointer
from peft_jax.train.health import HealthLog, NonFiniteLoss, check_initial
from peft_jax.train.interrupts import StopSignals
from peft_jax.train.writers import MetricWriter

__all__ = ["LoopConfig", "LoopResult", "NonFiniteLoss", "run_loop", "compile_count"]


@dataclasses.dataclass
class LoopConfig:
    total_steps: int
    log_every: int = 10
    eval_every: int = 0          # 0: only at the end
    ckpt_every: int = 0          # 0: only at the end, on ckpt_every_s and on SIGINT/SIGTERM
    progress: bool = True
    ckpt_every_s: float = 0.0    # also save when this many seconds passed since the last save
    max_update_ratio: float = 100.0  # as given to make_train_step (named in the error)


@dataclasses.dataclass
class LoopResult:
    state: Any
    status: str                  # "finished" | "preempted" (SIGINT / SIGTERM)
    last_eval: dict
    history: list
    steps_run: int
    compilations: int            # train step variants compiled during this loop (-1: unknown)
    wall_s: float
    stop_signal: str = ""        # "SIGINT" | "SIGTERM" when preempted


def compile_count(jitted: Callable) -> int:
    """Number of compiled variants of a jitted function (one per input shape/bucket)."""
    size = getattr(jitted, "_cache_size", None)
    return int(size()) if callable(size) else -1


def _compiled_since(jitted: Callable, before: int) -> int:
    """Variants of ``jitted`` compiled since it had ``before`` (-1: not countable)."""
    now = compile_count(jitted)
    return now - before if now >= 0 and before >= 0 else -1


def _agree(save_due: bool, stop: bool, at_sync_point: bool) -> tuple[bool, bool]:
    """(save now, stop now), the same on every process (a save is collective). One process:
    as given. Several: only at sync points (logging steps), from one small all-gather --
    save when process 0's clock says so, stop when any process got SIGINT/SIGTERM."""
    if jax.process_count() == 1:
        return save_due, stop
    if not at_sync_point:
        return False, False
    from jax.experimental import multihost_utils
    flags = np.asarray(multihost_utils.process_allgather(np.array([save_due, stop], np.int32)))
    flags = flags.reshape(-1, 2)
    return bool(flags[0, 0]), bool(flags[:, 1].any())


def run_loop(*, state: Any, frozen: Any, train_step: Callable, batches: Iterator[dict],
             shard: Callable[[dict], dict], cfg: LoopConfig,
             eval_fn: Optional[Callable[[Any], dict]] = None,
             checkpointer: Optional[DeltaCheckpointer] = None,
             meta_fn: Optional[Callable[[int], dict]] = None,
             writer: Optional[MetricWriter] = None,
             examples_per_step: int = 0, best_metric: Optional[str] = None,
             best_checkpointer: Optional[DeltaCheckpointer] = None,
             on_step: Optional[Callable[[int], None]] = None,
             clock: Optional[PhaseClock] = None) -> LoopResult:
    """Run from ``state.step`` to ``cfg.total_steps``.

    ``shard``: host batch -> device arrays. ``meta_fn(step)``: checkpoint metadata (must
    include the data iterator position, read *after* the batches consumed so far). ``on_step(step)``
    is a test hook called after each completed step (e.g. to kill the process). ``clock``:
    its ``first_step`` phase ends when the first step's metrics reach the host, and its
    line is printed (process 0).
    Raises :class:`NonFiniteLoss` at the first refused update (see :mod:`.health`).
    """
    start = int(jax.device_get(state.step))
    compiled_before = compile_count(train_step)   # a step shared with earlier runs has some
    check_initial(state.trainable, "the initial delta (config.peft.prompt.file, "
                  "config.train.init_from or another init option)" if start == 0
                  else f"the checkpoint of step {start} this run resumed from")
    history: list = []
    last_eval: dict = {}
    t0 = time.perf_counter()
    bar = None
    if cfg.progress and jax.process_index() == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.total_steps, initial=start, desc="train", dynamic_ncols=True)
    health = HealthLog(cfg.max_update_ratio)
    ckpts = [c for c in (checkpointer, best_checkpointer) if c is not None]

    def last_good() -> Optional[int]:
        for c in ckpts:
            c.wait()  # finish the last good (asynchronous) save
        return checkpointer.latest_step() if checkpointer else None

    def checked():
        try:
            health.check(last_good)
        except NonFiniteLoss:
            if bar:
                bar.close()
            raise

    saved = [None, time.monotonic()]

    def save(step: int, force: bool = False):
        if checkpointer is not None and saved[0] != step:
            checked()
            checkpointer.save(step, state, meta_fn(step) if meta_fn else {"step": step}, force=force)
            saved[0], saved[1] = step, time.monotonic()

    status, stop_signal = "finished", ""
    steps_run = 0
    window_t, window_n = time.perf_counter(), 0
    with StopSignals() as stop:
        step = start
        while step < cfg.total_steps:
            batch = shard(next(batches))
            state, metrics = train_step(state, frozen, batch)
            step += 1
            steps_run += 1
            window_n += 1
            health.add(step, metrics)
            if on_step is not None:
                on_step(step)
            last = step == cfg.total_steps
            log_now = step % max(cfg.log_every, 1) == 0 or last or step == start + 1
            if log_now:
                checked()
                m = jax.device_get(metrics)
                dt = time.perf_counter() - window_t
                row = {k: float(np.asarray(v)) for k, v in m.items()}
                row["steps_per_s"] = window_n / max(dt, 1e-9)
                if examples_per_step:
                    row["examples_per_s"] = row["steps_per_s"] * examples_per_step
                window_t, window_n = time.perf_counter(), 0
                if clock is not None and steps_run == 1:
                    clock.mark("first_step")
                    if bar:
                        bar.write(clock.line())
                    elif jax.process_index() == 0:
                        print(clock.line(), flush=True)
                history.append({"step": step, **row})
                if writer:
                    writer.write(step, row, prefix="train/")
                if bar:
                    bar.set_postfix(loss=f"{row['loss']:.4f}",
                                    ex_s=f"{row.get('examples_per_s', 0):.1f}")
            if bar:
                bar.update(1)
            do_eval = eval_fn is not None and (last or (cfg.eval_every and step % cfg.eval_every == 0))
            if do_eval:
                last_eval = dict(eval_fn(state))
                if writer:
                    writer.write(step, last_eval, prefix="eval/")
                if bar:
                    bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
            if (best_checkpointer is not None and do_eval and best_metric in last_eval):
                checked()
                best_checkpointer.save(step, state, meta_fn(step) if meta_fn else {"step": step},
                                       metrics={best_metric: float(last_eval[best_metric])})
            time_due = cfg.ckpt_every_s > 0 and time.monotonic() - saved[1] >= cfg.ckpt_every_s
            time_due, stop_now = _agree(time_due, stop.requested, log_now)
            if checkpointer is not None and (
                    last or (cfg.ckpt_every and step % cfg.ckpt_every == 0) or time_due):
                save(step)
            if stop_now and not last:
                save(step, force=True)
                status, stop_signal = "preempted", stop.signal
                break
    checked()
    for c in ckpts:
        c.wait()
    if bar:
        bar.close()
    return LoopResult(state=state, status=status, last_eval=last_eval, history=history,
                      steps_run=steps_run, compilations=_compiled_since(train_step, compiled_before),
                      wall_s=time.perf_counter() - t0, stop_signal=stop_signal)
