"""Few-shot table: ``python benchmarks/fewshot_table.py [--workdir runs/fewshot] [--tasks ...]``.

Runs the table's methods over the 5 LM-BFF seeds on each task (skipping runs whose
result.json exists; SmolLM2-135M for the LM methods, all-MiniLM-L6-v2 for head / ProtoVerb)
and prints mean (std) of test accuracy and wall time per (task, method, model). Budget flags
are ``peft-jax fewshot``'s (``--steps``, ``--test-examples``, ...).
"""

from __future__ import annotations

import sys

from peft_jax.fewshot.cli import fewshot_main

TABLE = "zeroshot,incontext,head,prompt,prompt_demo,protoverb,pet"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith("--method") for a in argv):
        argv += ["--method", TABLE]
    if not any(a.startswith("--task") for a in argv):
        argv += ["--task", "lmbff/sst2,lmbff/cr"]
    rc = fewshot_main(argv)
    workdir = argv[argv.index("--workdir") + 1] if "--workdir" in argv else "runs/fewshot"
    print(markdown(workdir))
    return rc


def markdown(workdir: str) -> str:
    """Test accuracy x100 and wall seconds per run, mean (std) over seeds, as markdown."""
    from peft_jax import report
    from peft_jax.fewshot.cli import method_rows
    rows = method_rows(report.collect(workdir))
    keys = ["task.name", "fewshot.method", "model.name"]
    acc = report.to_markdown(report.aggregate(rows, keys, ["accuracy"], seed_key="seed"), keys,
                             ["accuracy"], digits=1, scale=100)
    wall = report.to_markdown(report.aggregate(rows, keys, ["wall_s"], seed_key="seed"), keys,
                              ["wall_s"], digits=0)
    return acc + "\n\n" + wall


if __name__ == "__main__":
    sys.exit(main())
