"""The training loop: steps, progress bar, eval, best/last checkpoints, preemption, NaN stop.

Everything model- and task-specific is passed in (a jitted train step, a batch iterator
with ``get_state``/``set_state``, an eval function); the loop only orchestrates, so the
same loop serves classification, seq2seq, causal LM, SimCSE and few-shot training.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from peft_jax.train.checkpoint import DeltaCheckpointer
from peft_jax.train.writers import MetricWriter


class NonFiniteLoss(FloatingPointError):
    """Loss or gradients became NaN/Inf; the message gives the step."""


@dataclasses.dataclass
class LoopConfig:
    total_steps: int
    log_every: int = 10
    eval_every: int = 0          # 0: only at the end
    ckpt_every: int = 0          # 0: only at the end (and on SIGTERM)
    progress: bool = True


@dataclasses.dataclass
class LoopResult:
    state: Any
    status: str                  # "finished" | "preempted"
    last_eval: dict
    history: list
    steps_run: int
    compilations: int
    wall_s: float


class _Preemption:
    """Sets a flag on SIGTERM (TPU preemption notice); the loop checkpoints and exits."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def compile_count(jitted: Callable) -> int:
    """Number of compiled variants of a jitted function (one per input shape/bucket)."""
    size = getattr(jitted, "_cache_size", None)
    return int(size()) if callable(size) else -1


def run_loop(*, state: Any, frozen: Any, train_step: Callable, batches: Iterator[dict],
             shard: Callable[[dict], dict], cfg: LoopConfig,
             eval_fn: Optional[Callable[[Any], dict]] = None,
             checkpointer: Optional[DeltaCheckpointer] = None,
             meta_fn: Optional[Callable[[int], dict]] = None,
             writer: Optional[MetricWriter] = None,
             examples_per_step: int = 0, best_metric: Optional[str] = None,
             best_checkpointer: Optional[DeltaCheckpointer] = None,
             on_step: Optional[Callable[[int], None]] = None) -> LoopResult:
    """Run from ``state.step`` to ``cfg.total_steps``.

    ``shard``: host batch -> device arrays. ``meta_fn(step)``: checkpoint metadata (must
    include the data iterator position, read *after* the batches consumed so far). ``on_step(step)``
    is a test hook called after each completed step (e.g. to kill the process).
    """
    start = int(jax.device_get(state.step))
    history: list = []
    last_eval: dict = {}
    t0 = time.perf_counter()
    bar = None
    if cfg.progress and jax.process_index() == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.total_steps, initial=start, desc="train", dynamic_ncols=True)

    saved = [None]

    def save(step: int, force: bool = False):
        if checkpointer is not None and saved[0] != step:
            checkpointer.save(step, state, meta_fn(step) if meta_fn else {"step": step}, force=force)
            saved[0] = step

    status = "finished"
    steps_run = 0
    window_t, window_n = time.perf_counter(), 0
    with _Preemption() as pre:
        step = start
        while step < cfg.total_steps:
            batch = shard(next(batches))
            state, metrics = train_step(state, frozen, batch)
            step += 1
            steps_run += 1
            window_n += 1
            if on_step is not None:
                on_step(step)
            last = step == cfg.total_steps
            if step % max(cfg.log_every, 1) == 0 or last or step == start + 1:
                m = jax.device_get(metrics)
                if float(m.get("finite", 1.0)) < 1.0:
                    if bar:
                        bar.close()
                    for c in (checkpointer, best_checkpointer):
                        if c is not None:
                            c.wait()  # finish the last good (asynchronous) save
                    last_good = checkpointer.latest_step() if checkpointer else None
                    raise NonFiniteLoss(
                        f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}); "
                        f"the update was skipped and training stopped. Last good checkpoint: "
                        f"{last_good}. Lower the learning rate, enable gradient clipping "
                        "(config.optim.clip_norm) or check the data.")
                dt = time.perf_counter() - window_t
                row = {k: float(np.asarray(v)) for k, v in m.items()}
                row["steps_per_s"] = window_n / max(dt, 1e-9)
                if examples_per_step:
                    row["examples_per_s"] = row["steps_per_s"] * examples_per_step
                window_t, window_n = time.perf_counter(), 0
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
                best_checkpointer.save(step, state, meta_fn(step) if meta_fn else {"step": step},
                                       metrics={best_metric: float(last_eval[best_metric])})
            if checkpointer is not None and (last or (cfg.ckpt_every and step % cfg.ckpt_every == 0)):
                save(step)
            if pre.flag and not last:
                save(step, force=True)
                status = "preempted"
                break
    for c in (checkpointer, best_checkpointer):
        if c is not None:
            c.wait()
    if bar:
        bar.close()
    return LoopResult(state=state, status=status, last_eval=last_eval, history=history,
                      steps_run=steps_run, compilations=compile_count(train_step),
                      wall_s=time.perf_counter() - t0)
