"""Few-shot table: ``python benchmarks/fewshot_table.py [--workdir runs/fewshot] [--tasks ...]``.

Runs every method of ``peft-jax fewshot`` over the 5 LM-BFF seeds on each task (skipping
runs whose result.json exists) and prints mean (std) of test accuracy and wall time per
(task, method, model) via ``peft_jax.report``.
"""

from __future__ import annotations

import argparse
import os
import sys

from peft_jax.fewshot.cli import DEFAULT_MODEL, METHODS, method_config, run_method
from peft_jax.data.builtin import LMBFF_SEEDS


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="runs/fewshot")
    p.add_argument("--tasks", default="lmbff/sst2,lmbff/cr")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--eval-examples", type=int, default=100)
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not a.report_only:
        for task in a.tasks.split(","):
            for m in a.methods.split(","):
                model = DEFAULT_MODEL[m]
                todo = [s for s in LMBFF_SEEDS if not os.path.exists(os.path.join(
                    method_config(m, task, s, model, a.steps, a.eval_examples, a.workdir,
                                  1e-3).workdir, "result.json"))]
                if todo:
                    run_method(m, task, todo, model, a.steps, a.eval_examples, a.workdir, 1e-3)
    from peft_jax import report
    rows = report.collect(a.workdir)
    keys, metrics = ["task.name", "fewshot.method", "model.name"], ["accuracy", "wall_s"]
    agg = report.aggregate(rows, keys, metrics, seed_key="seed")
    print(report.format_table(agg, keys, metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
