"""The few-shot protocol with peft_jax, in its own process; prints ``RESULT {json}``. Run by
``e2e_fewshot.py``.

Exactly ``peft-jax fewshot --method <method> [--vectorize]``'s path: the persistent compilation cache on
(the CLI's default; here the folder ``--compile-cache`` names, so a cold cache is a fresh
folder), the base loaded once, then per seed :func:`peft_jax.fewshot.methods.train` on
:func:`~peft_jax.fewshot.methods.method_config` (runner: encode, train with dev selection
and checkpoints, test of the selected step, calibration, delta + ``result.json``), the seeds
sharing their compiled programs (one :class:`~peft_jax.programs.ProgramCache`).

Afterwards (outside the timed part) it reads the content ids (``common.example_id``) of
what each seed's run used: the training batches of the run's own iterator (batch ``k`` of
its plan is what step ``k + 1`` consumed), its encoded dev split and the test subset.
Compilation time comes from ``jax.monitoring`` (tracing, lowering, XLA compile, cache
reads), summed over the process.
"""

from __future__ import annotations

import time

T_START = time.time()   # the interpreter is up (the parent measures from the launch)

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
                  "/jax/core/compile/backend_compile_duration": "xla_compile_s",
                  "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read_s"}


def watch_compilation() -> dict:
    """Seconds per compile phase (``COMPILE_EVENTS``) and cache hits, filled as jax runs."""
    import jax
    acc = collections.defaultdict(float)

    def on_duration(event: str, seconds: float, **_) -> None:
        if event in COMPILE_EVENTS:
            acc[COMPILE_EVENTS[event]] += seconds

    def on_event(event: str, **_) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            acc["cache_hits"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    return acc


def encoded_ids(enc) -> list[str]:
    return [common.example_id(y, t) for t, y in zip(enc.features["input_ids"], enc.scalars["label"])]


def batch_ids(batch: dict) -> list[str]:
    keep = batch["example_mask"] > 0
    return [common.example_id(y, ids[m > 0]) for ids, m, y in
            zip(batch["input_ids"][keep], batch["attention_mask"][keep], batch["label"][keep])]


def used_ids(s, cfg) -> dict:
    """Content ids of the examples a run's session ``s`` used (see the module docstring)."""
    from peft_jax.runner.data import encode_split, load_examples
    test = encode_split(s.exp, load_examples(s.exp, cfg.task.test_split,
                                             cfg.task.max_test_examples, cfg.seed))
    return {"train": [batch_ids(s.batches._batch(k)) for k in range(cfg.train.steps)],
            "dev": encoded_ids(s.eval_enc), "test": encoded_ids(test)}


def dev_history(workdir: str) -> list:
    """``[step, dev accuracy]`` of every evaluation (the run's ``metrics.jsonl``)."""
    out = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "eval/accuracy" in row:
                out.append([row["step"], row["eval/accuracy"]])
    return out


def run(a) -> dict:
    marks = {"start": T_START}
    from peft_jax import compile_cache
    from peft_jax.fewshot.methods import Budget, method_config, train, with_test_calibration
    from peft_jax.runner.vectorized import run_vectorized
    from peft_jax.models.registry import load_pretrained
    from peft_jax.programs import ProgramCache
    marks["imports"] = time.time()
    compile_s = watch_compilation()
    compile_cache.enable(a.compile_cache or "off")
    budget = Budget(**json.loads(a.budget))
    pre = load_pretrained(a.model)
    marks["load"] = time.time()
    runs, seeds, programs = [], [], ProgramCache()   # as run_methods: seeds share programs
    seed_list = [int(s) for s in a.seeds.split(",")]
    cfgs = [method_config(a.method, a.task, seed, a.model, budget, a.workdir) for seed in seed_list]
    # --vectorize: as `fewshot --vectorize`, the seeds as one vmapped program (trained here;
    # the per-seed rows below then take no time and show no compilation)
    vectorized = ([with_test_calibration(cfg, res) for cfg, res in zip(cfgs, run_vectorized(cfgs, pre))]
                  if a.vectorize else None)
    for k, (seed, cfg) in enumerate(zip(seed_list, cfgs)):
        before = dict(compile_s)
        res = vectorized[k] if vectorized else train(cfg, pre, programs=programs)
        runs.append((cfg, res))
        r = res.row
        seeds.append(dict(seed=seed, test_accuracy=r["test"]["accuracy"],
                          dev_accuracy=r["metrics"].get("accuracy"),
                          selected_step=r.get("selected_step"), wall_s=r["wall_s"],
                          train_loop_s=r["train_wall_s"], compilations=r["compilations"],
                          trainable_params=r["trainable_params"],
                          compile={k: round(v - before.get(k, 0.0), 3) for k, v in compile_s.items()}))
    marks["end"] = time.time()
    for (cfg, res), row in zip(runs, seeds):   # not timed
        row["ids"] = used_ids(res.session, cfg)
        row["dev_history"] = dev_history(cfg.workdir)
    import jax
    return dict(stack="peft_jax", seeds=seeds, marks=marks,
                phases={k: round(v, 3) for k, v in compile_s.items()},
                versions={"jax": jax.__version__}, compile_cache=a.compile_cache,
                peak_rss_mb=common.peak_rss_mb())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--method", default="head")
    p.add_argument("--model", default="minilm")
    p.add_argument("--seeds", required=True)
    p.add_argument("--budget", required=True, help="JSON of peft_jax.fewshot.methods.Budget fields")
    p.add_argument("--workdir", required=True)
    p.add_argument("--compile-cache", default="", help="'' disables the persistent cache")
    p.add_argument("--vectorize", action="store_true",
                   help="the seeds as one vectorized program (`peft-jax fewshot --vectorize`)")
    a = p.parse_args(argv)
    common.run_guarded(lambda: run(a), stack="peft_jax")


if __name__ == "__main__":
    main()
