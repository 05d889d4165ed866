"""Vectorized vs sequential seeds: ``python benchmarks/vectorized_runs.py [--steps 16 ...]``.

Runs the LM-BFF protocol of one few-shot method (default: prompt-based fine-tuning,
``prompt``, on SmolLM2-135M, ``lmbff/sst2``, the 5 seeds: 16-shot train, dev-selected step,
fixed test subset) twice, in one invocation: the seeds one after the other (``peft-jax
fewshot``) and as one vectorized program (``peft-jax fewshot --vectorize``). Each mode runs
in its own fresh process with its own empty persistent compilation cache (the sequential
seeds reuse each other's compiled programs through it, as the command does by default),
timed from before the model load to the last row written. Prints one table: wall time,
seconds per seed, mean test / dev accuracy, whether each seed's selected step and
accuracies equal the sequential run's, and the speed ratio.

Budget flags are ``peft-jax fewshot``'s (``--steps``, ``--eval-every``, ``--test-examples``,
``--batch-size``, ...); ``--quick`` is a tiny budget for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import format_table, parse_result  # noqa: E402

from peft_jax import compile_cache  # noqa: E402
from peft_jax.fewshot.cli import run_methods  # noqa: E402
from peft_jax.fewshot.methods import Budget  # noqa: E402

MODES = ("sequential", "vectorized")


def worker(a: argparse.Namespace, budget_args: list[str]) -> None:
    """One mode in this process: run the seeds, print ``RESULT {json}``."""
    t0 = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    compile_cache.enable(a.cache_dir)
    p = argparse.ArgumentParser()
    for f in Budget.__dataclass_fields__.values():
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    budget = Budget(**vars(p.parse_args(budget_args)))
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = run_methods([a.method], [a.task], seeds, a.model, budget, a.workdir,
                       skip_existing=False, vectorize=a.worker == "vectorized")
    wall = time.perf_counter() - t0
    print("RESULT " + json.dumps({
        "mode": a.worker, "wall_s": wall, "seeds": seeds,
        "test": [r["metrics"]["accuracy"] for r in rows], "dev": [r["dev"]["accuracy"] for r in rows],
        "selected": [r.get("selected_step") for r in rows]}), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="prompt")
    p.add_argument("--task", default="lmbff/sst2")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--seeds", default="13,21,42,87,100")
    p.add_argument("--workdir", default="")
    p.add_argument("--quick", action="store_true", help="tiny budget (smoke run)")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    a, budget_args = p.parse_known_args(argv)
    if a.quick:
        budget_args = ["--steps", "2", "--eval-every", "1", "--test-examples", "16"] + budget_args
    if a.worker:
        worker(a, budget_args)
        return 0
    root = a.workdir or tempfile.mkdtemp(prefix="vectorized_runs_")
    results = {}
    for mode in MODES:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--method", a.method,
               "--task", a.task, "--model", a.model, "--seeds", a.seeds,
               "--workdir", os.path.join(root, mode), "--cache-dir", os.path.join(root, f"xla_{mode}"),
               *budget_args]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        res = parse_result(proc.stdout)
        if proc.returncode != 0 or res is None:
            print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
            print(f"error: the {mode} run failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results[mode] = res
    seq = results["sequential"]
    rows = []
    for mode in MODES:
        r = results[mode]
        same = all(r[k] == seq[k] for k in ("test", "dev", "selected"))
        rows.append({"mode": mode, "seeds": len(r["seeds"]), "wall": r["wall_s"],
                     "per_seed": r["wall_s"] / len(r["seeds"]),
                     "test": f"{100 * np.mean(r['test']):.1f} ({100 * np.std(r['test']):.1f})",
                     "dev": f"{100 * np.mean(r['dev']):.1f}", "same": "yes" if same else "NO",
                     "ratio": seq["wall_s"] / r["wall_s"]})
    print(f"{a.method} on {a.model}, {a.task}, seeds {a.seeds}; budget {' '.join(budget_args) or 'default'}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(format_table(rows, [("mode", "mode", ""), ("seeds", "seeds", ""), ("wall", "wall s", ".1f"),
                              ("per_seed", "s/seed", ".1f"), ("test", "test acc", ""),
                              ("dev", "dev acc", ""), ("same", "same rows", ""),
                              ("ratio", "x sequential", ".2f")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
