"""``peft-jax fewshot``: few-shot methods over the LM-BFF seeds, one ``result.json`` per run.

Rows land in ``<workdir>/<task>/<method>_<model>/seed<k>/result.json``; ``peft-jax report
--root <workdir> --group-by task.name,fewshot.method,model.name --metrics accuracy,wall_s``
(or this command's own closing table) aggregates them into mean (std) over the seeds.
Methods and the protocol: :mod:`peft_jax.fewshot.methods`.

Example (the README's few-shot table, one task)::

    peft-jax fewshot --task lmbff/sst2 --method zeroshot,incontext,prompt,prompt_demo,pet
    peft-jax fewshot --task lmbff/sst2 --method head,protoverb
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

from peft_jax import compile_cache
from peft_jax.data.builtin import LMBFF_SEEDS
from peft_jax.fewshot.methods import (DEFAULT_MODEL, METHODS, VECTORIZABLE, Budget, Interrupted,
                                      check_template, method_config, run_one, run_seeds_vectorized)
from peft_jax.phases import PhaseClock
from peft_jax.programs import ProgramCache


def result_path(method: str, task: str, seed: int, model: str, budget: Budget, workdir: str) -> str:
    return os.path.join(method_config(method, task, seed, model, budget, workdir).workdir,
                        "result.json")


def run_methods(methods: Sequence[str], tasks: Sequence[str], seeds: Sequence[int],
                model: str, budget: Budget, workdir: str, skip_existing: bool = True,
                vectorize: bool = False, clock: Optional[PhaseClock] = None) -> list[dict]:
    """Every (task, method, seed) run not done yet; the model is loaded once per method.
    ``vectorize``: the seeds of each method train as one program
    (:func:`~peft_jax.fewshot.methods.run_seeds_vectorized`; ``VECTORIZABLE`` methods only).
    ``clock`` (the process's phases): its ``model_load`` phase, then the first training
    run's phases (later runs time themselves). Runs one by one share their compiled
    programs while the model stays loaded (:class:`~peft_jax.programs.ProgramCache`: the
    seeds of a method compile once)."""
    from peft_jax.models.registry import load_pretrained

    rows, loaded, programs = [], {}, ProgramCache()
    for task in tasks:
        for m in methods:
            name = model or DEFAULT_MODEL[m]
            todo = [s for s in seeds if not (skip_existing and os.path.exists(
                result_path(m, task, s, name, budget, workdir)))]
            if todo and name not in loaded:
                loaded.clear()   # one model in memory at a time (and its programs)
                loaded[name], programs = load_pretrained(name), ProgramCache()
                if clock is not None:
                    clock.mark("model_load")
            if vectorize and todo:
                done = run_seeds_vectorized(m, task, todo, name, budget, workdir, pre=loaded[name],
                                            clock=clock)
                clock = None
            else:
                done = []
                for seed in todo:
                    done.append(run_one(m, task, seed, name, budget, workdir, pre=loaded[name],
                                        clock=clock, programs=programs))
                    clock = None
            for seed, row in zip(todo, done):
                rows.append(row)
                print(json.dumps({"task": task, "method": m, "model": name, "seed": seed,
                                  "test": row["metrics"], "dev": row.get("dev"),
                                  "wall_s": round(row["wall_s"], 1)}), flush=True)
    return rows


def method_rows(rows: list) -> list:
    """The methods' rows only (PET's per-PVP runs, self-training rounds and intermediate-task
    source runs write their own ``result.json`` under the method's folder)."""
    return [r for r in rows if r.get("config", {}).get("fewshot.method")]


def summary(workdir: str) -> str:
    from peft_jax import report
    rows = method_rows(report.collect(workdir))
    keys, metrics = ["task.name", "fewshot.method", "model.name"], ["accuracy", "wall_s"]
    agg = report.aggregate(rows, keys, metrics, seed_key="seed")
    return report.format_table(agg, keys, metrics)


def fewshot_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="peft-jax fewshot", description=__doc__.split("\n")[0])
    p.add_argument("--method", required=True,
                   help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--task", default="lmbff/sst2", help="comma list of lmbff/<task>")
    p.add_argument("--model", default="", help="default: smollm2 for LM methods, minilm otherwise")
    p.add_argument("--seeds", default=",".join(str(s) for s in LMBFF_SEEDS))
    p.add_argument("--workdir", default="runs/fewshot")
    p.add_argument("--rerun", action="store_true", help="also rerun seeds with a result.json")
    p.add_argument("--vectorize", action="store_true",
                   help=f"train the seeds of a method as one vmapped program over one frozen "
                        f"base ({', '.join(VECTORIZABLE)}; same results as one by one)")
    p.add_argument("--compile-cache", default=None, metavar="DIR|off",
                   help="persistent XLA compilation cache (peft_jax.compile_cache; default: "
                        "$PEFT_JAX_COMPILE_CACHE, else ~/.cache/peft_jax/jax_cache)")
    for f in dataclasses.fields(Budget):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    compile_cache.enable(a.compile_cache)
    methods = [m.strip() for m in a.method.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"--method {','.join(bad)}: choose from {', '.join(METHODS)}")
    if a.vectorize and [m for m in methods if m not in VECTORIZABLE]:
        p.error(f"--vectorize: {','.join(m for m in methods if m not in VECTORIZABLE)} "
                f"do not train one runner per seed; vectorizable: {', '.join(VECTORIZABLE)}")
    budget = Budget(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Budget)})
    try:
        check_template(methods, budget)
    except ValueError as e:
        p.error(str(e))
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    tasks = [t.strip() for t in a.task.split(",") if t.strip()]
    try:
        clock = PhaseClock()
        clock.mark("imports")
        with clock:
            run_methods(methods, tasks, seeds, a.model, budget, a.workdir,
                        skip_existing=not a.rerun, vectorize=a.vectorize, clock=clock)
    except Interrupted as e:
        print(f"[peft_jax] fewshot stopped: {e}", file=sys.stderr, flush=True)
        return 143
    print(summary(a.workdir))
    return 0


if __name__ == "__main__":
    sys.exit(fewshot_main())
