"""One peft_jax run (model x method) in its own process; prints a ``RESULT {json}`` line.

``--mode step``: the same fixed batch every step (padded/truncated to ``--seq``), jitted
train step from :mod:`peft_jax.train.step` with the state donated, the batch and the
frozen base placed on the device once. ``--mode epoch``: one pass over the prepared
examples in length buckets (one compilation per bucket shape), batches prefetched to the
device by a background thread. Called by ``step_bench.py`` / ``epoch_bench.py``.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import prepare as prep  # noqa: E402


# ----------------------------------------------------------------------------- methods


def build_methods(method: str, kind: str, hp: common.MethodHParams) -> tuple:
    """The peft_jax methods of a benchmark method name (+ a classification head on encoders)."""
    from peft_jax import peft as pj

    make = {
        "full": lambda: pj.FullFinetuning(),
        "lora": lambda: pj.LoRA(targets=r".*/attention/(query|value)", rank=hp.lora_r,
                                alpha=hp.lora_alpha),
        "prompt": lambda: pj.PromptTuning(length=hp.num_virtual_tokens),
        "prefix": lambda: pj.PrefixTuning(length=hp.num_virtual_tokens),
        "adapter": lambda: pj.Adapter(placement="houlsby", bottleneck=hp.adapter_dim),
        "ia3": lambda: pj.IA3(),   # keys, values, FFN down projection (scaled at its input)
    }
    if method not in make:
        raise ValueError(f"unknown method {method!r}; known: {list(common.METHODS)}")
    head = (pj.Head(num_labels=2),) if kind == "encoder" else ()
    return (make[method](),) + head


def remat_wrap(fn: Callable, remat: str) -> Callable:
    """Rematerialize the model forward in the backward pass: 'none' | 'full' | 'dots'
    (keep matmul outputs, recompute element-wise ops)."""
    import jax

    if remat == "none":
        return fn
    if remat == "full":
        return jax.checkpoint(fn)
    if remat == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"--remat={remat!r}; allowed: none, full, dots")


def make_loss(model, kind: str, remat: str):
    """loss_fn(variables, batch, rng, deterministic) -> (loss, {}) (see peft_jax.train.step).

    encoder: cross-entropy of a classification head (delta['head']) on the pooled output;
    decoder: next-token cross-entropy over the real tokens.
    """
    import jax
    from peft_jax.peft.heads import Head
    from peft_jax.train.losses import causal_lm_loss, classification_loss

    head_method = Head(num_labels=2)

    def forward(variables, ids, mask, rng, deterministic):
        return model.apply(variables, ids, mask, deterministic=deterministic,
                           rngs={"dropout": rng})

    def loss_fn(variables, batch, rng, deterministic):
        r1, r2 = jax.random.split(rng)
        delta = dict(variables["peft"])
        head = delta.pop("head", None)
        mv = {"params": variables["params"], "peft": delta}
        fwd = remat_wrap(lambda v, i, m, r: forward(v, i, m, r, deterministic), remat)
        out = fwd(mv, batch["input_ids"], batch["attention_mask"], r1)
        if kind == "encoder":
            logits = head_method.apply(head, out["pooled"], deterministic, r2)
            return classification_loss(logits, batch["labels"], batch.get("weights")), {}
        logits = out["logits"]
        n_ins = logits.shape[1] - batch["input_ids"].shape[1]  # soft prompts, prepended
        return causal_lm_loss(logits[:, n_ins:], batch["input_ids"], batch["attention_mask"]), {}

    return loss_fn


def load_model(folder: str, dropout_impl: str = "hash"):
    """A :class:`peft_jax.models.registry.Pretrained` from a prepared HF folder (no tokenizer:
    the workers get token ids from ``tokens.npz``); ``dropout_impl``: the config's dropout
    mask generator (``peft_jax.models.layers.dropout_keep_mask``)."""
    import dataclasses

    from peft_jax.models import registry

    family = registry.family_of(folder)
    config, base = family.load(folder)
    if hasattr(config, "dropout_impl"):
        config = dataclasses.replace(config, dropout_impl=dropout_impl)
    return registry.Pretrained(name=folder, family=family, config=config, base=base, tokenizer=None)


def setup(folder: str, method: str, hp: common.MethodHParams, bf16: bool, remat: str,
          example: dict, seed: int = 0, dropout_impl: str = "hash"):
    """Model, state, frozen base (on device), jitted step, optimizer-state bytes."""
    import jax
    import jax.numpy as jnp
    from peft_jax.models.slots import Slots
    from peft_jax.peft import partition
    from peft_jax.peft.optim import GroupConfig, make_optimizer
    from peft_jax.train.builder import build_train_state
    from peft_jax.train.step import jit_train_step, make_train_step

    pre = load_model(folder, dropout_impl)
    methods = build_methods(method, pre.kind, hp)
    model = pre.build(Slots(methods, dropout_impl=dropout_impl),
                      dtype=jnp.bfloat16 if bf16 else jnp.float32)
    make_tx = lambda tr: make_optimizer({"all": GroupConfig("adamw", hp.learning_rate)},
                                        partition.label_tree(tr, [(r".*", "all")]))
    inputs = {k: jnp.asarray(v) for k, v in example.items() if k in ("input_ids", "attention_mask")}
    ts = build_train_state(model, pre.base, methods, inputs, jax.random.PRNGKey(seed), make_tx)
    step = jit_train_step(make_train_step(make_loss(model, pre.kind, remat), ts.variables, ts.tx))
    trainable = ts.state.trainable
    info = dict(opt_state_bytes=partition.optimizer_state_bytes(ts.tx, trainable),
                trainable_params=partition.tree_size(trainable))
    return pre, ts.state, ts.frozen, step, info


def fixed_batch(folder: str, batch: int, seq: int, pad_id: int) -> dict:
    rows, labels = prep.load_tokens(folder)
    if len(rows) < batch:
        raise ValueError(f"{folder}: {len(rows)} prepared examples < --batch {batch}")
    ids, mask = common.pad_batch(rows[:batch], seq, pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels[:batch].astype(np.int32)}


def compiled_step(folder: str, method: str, host: dict, context: Any = None) -> list:
    """``[compiled step, state, frozen, batch]`` of one method, traced and compiled inside
    ``context`` (a context manager that swaps an implementation; ``None``: as is)."""
    import contextlib

    import jax

    with context if context is not None else contextlib.nullcontext():
        _, state, frozen, step, _ = setup(folder, method, common.MethodHParams(), False, "none",
                                          host)
        batch, frozen, state = jax.device_put(host), jax.device_put(frozen), jax.device_put(state)
        compiled = step.lower(state, frozen, batch).compile()
    return [compiled, state, frozen, batch]


def time_in_turns(runs: dict, steps: int) -> tuple[dict, dict]:
    """Steps the compiled runs (name -> :func:`compiled_step` list) in turns, A B C A B C ...,
    ``steps + 1`` rounds, the first untimed, so all see the same machine load. Returns
    (median s/step, the loss of every step) per name."""
    import jax

    times = {n: [] for n in runs}
    losses = {n: [] for n in runs}
    for i in range(steps + 1):
        for n, r in runs.items():
            step, state, frozen, batch = r
            t0 = time.perf_counter()
            state, metrics = step(state, frozen, batch)
            jax.block_until_ready((state, metrics))
            if i:
                times[n].append(time.perf_counter() - t0)
            r[1] = state
            losses[n].append(float(metrics["loss"]))
    return {n: common.median(t) for n, t in times.items()}, losses


def xla_flops(step, *args) -> float:
    """FLOPs of the step's (unoptimized) HLO from XLA's cost analysis, or NaN."""
    try:
        ca = step.lower(*args).cost_analysis()
        if isinstance(ca, (list, tuple)):
            ca = ca[0]
        return float(ca.get("flops", float("nan")))
    except Exception:  # cost analysis is optional information
        return float("nan")


def run_steps(a) -> dict:
    import jax

    from peft_jax.train.loop import compile_count

    hp = common.MethodHParams()
    spec = prep.load_spec(a.folder)
    host = fixed_batch(a.folder, a.batch, a.seq, spec["pad_id"])
    pre, state, frozen, step, info = setup(a.folder, a.method, hp, a.bf16, a.remat, host,
                                           dropout_impl=a.dropout_impl)
    batch = jax.device_put(host)
    frozen = jax.device_put(frozen)
    state = jax.device_put(state)   # on device, as the runner's state (host numpy leaves would retrace)
    state, metrics, (first,) = common.timed_steps(step, state, frozen, batch, 1)
    after_first = compile_count(step)
    state, metrics, times = common.timed_steps(step, state, frozen, batch, a.warmup - 1 + a.steps)
    times = times[a.warmup - 1:]
    loss = float(metrics["loss"])
    med = common.median(times)
    res = dict(framework="peft_jax", model=spec["model"], method=a.method, step_s=med,
               step_min_s=min(times), examples_per_s=a.batch / med,
               compile_s=max(first - med, 0.0), compiles=compile_count(step),
               recompiles_after_first=compile_count(step) - after_first,
               flops=common.step_flops(spec, a.method, hp, a.batch, a.seq),
               loss=loss, peak_rss_mb=common.peak_rss_mb(), **info)
    if a.xla_flops:
        res["xla_flops"] = xla_flops(step, state, frozen, batch)
    return res


# ----------------------------------------------------------------------------- epoch


def bucket_batches(rows: list, labels: np.ndarray, batch: int, buckets: list[int], pad_id: int,
                   seed: int) -> list[dict]:
    """Shuffle, group by the smallest bucket length that holds each example (longer ones
    are truncated to the last bucket), cut into batches of ``batch`` (the last batch of a
    bucket is filled with weight-0 padding rows), and shuffle the batch order."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    groups: dict[int, list[int]] = {b: [] for b in buckets}
    for i in order:
        n = len(rows[i])
        groups[next((b for b in buckets if b >= n), buckets[-1])].append(int(i))
    out = []
    for length, idx in groups.items():
        for s in range(0, len(idx), batch):
            chunk = idx[s: s + batch]
            real = len(chunk)
            ids, mask = common.pad_batch([rows[i] for i in chunk] + [[]] * (batch - real),
                                         length, pad_id)
            lab = np.zeros(batch, np.int32)
            lab[:real] = labels[chunk]
            w = np.zeros(batch, np.float32)
            w[:real] = 1.0
            out.append({"input_ids": ids, "attention_mask": mask, "labels": lab, "weights": w})
    rng.shuffle(out)
    return out


def prefetch(batches: list[dict], depth: int = 2) -> Iterator[Any]:
    """Yield device copies of ``batches``, produced ``depth`` ahead by a background thread."""
    import jax

    q: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = object()

    def worker():
        for b in batches:
            q.put(jax.device_put(b))
        q.put(stop)

    threading.Thread(target=worker, daemon=True).start()
    while (item := q.get()) is not stop:
        yield item


def run_epoch(a) -> dict:
    import jax

    from peft_jax.train.loop import compile_count

    hp = common.MethodHParams()
    spec = prep.load_spec(a.folder)
    rows, labels = prep.load_tokens(a.folder)
    rows, labels = rows[: a.max_examples], labels[: a.max_examples]
    buckets = sorted(int(b) for b in a.buckets.split(","))
    batches = bucket_batches(rows, labels, a.batch, buckets, spec["pad_id"], seed=0)
    pre, state, frozen, step, info = setup(a.folder, a.method, hp, a.bf16, a.remat, batches[0],
                                           dropout_impl=a.dropout_impl)
    frozen = jax.device_put(frozen)
    t0 = time.perf_counter()
    seen_shapes, compile_s = set(), 0.0
    for b in prefetch(batches):
        shape = b["input_ids"].shape
        if shape not in seen_shapes:  # first step of a bucket: compile + run, timed apart
            seen_shapes.add(shape)
            jax.block_until_ready(state)
            tb = time.perf_counter()
            state, metrics = step(state, frozen, b)
            jax.block_until_ready(state)
            compile_s += time.perf_counter() - tb
        else:
            state, metrics = step(state, frozen, b)
    jax.block_until_ready((state, metrics))
    wall = time.perf_counter() - t0
    tokens = int(sum(len(r) for r in rows))
    padded = int(sum(b["input_ids"].size for b in batches))
    return dict(framework="peft_jax", model=spec["model"], method=a.method, examples=len(rows),
                batches=len(batches), wall_s=wall, tokens=tokens, padded_tokens=padded,
                tokens_per_s=tokens / wall, first_step_of_buckets_s=compile_s,
                compiles=compile_count(step), buckets=len(seen_shapes),
                loss=float(metrics["loss"]), peak_rss_mb=common.peak_rss_mb(), **info)


def configure_jax(prng: str, compile_cache: str) -> None:
    """Process-wide JAX settings of this run (before any key or jit is made)."""
    import jax

    jax.config.update("jax_default_prng_impl", prng)
    if compile_cache:
        jax.config.update("jax_compilation_cache_dir", compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", required=True, help="written by prepare.py")
    p.add_argument("--method", choices=common.METHODS, required=True)
    p.add_argument("--mode", choices=["step", "epoch"], default="step")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="steps before timing (incl. the first)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    p.add_argument("--xla-flops", action="store_true")
    p.add_argument("--max-examples", type=int, default=4000)
    p.add_argument("--buckets", default="16,32,64,128")
    p.add_argument("--prng", default="threefry2x32", choices=["threefry2x32", "rbg", "unsafe_rbg"],
                   help="PRNG implementation of the dropout keys")
    p.add_argument("--compile-cache", default="", help="persistent XLA compilation cache dir")
    p.add_argument("--dropout-impl", default="hash", choices=["hash", "jax"],
                   help="dropout masks: fused index hash, or jax.random.bernoulli (flax's masks)")
    a = p.parse_args(argv)
    configure_jax(a.prng, a.compile_cache)
    a.warmup = max(a.warmup, 1)
    common.run_guarded(lambda: run_steps(a) if a.mode == "step" else run_epoch(a),
                       framework="peft_jax", method=a.method)


if __name__ == "__main__":
    main()
