"""Lester et al.'s prompt-length x initialization ablation at convergence, SmolLM2-135M on SST-2.

    python benchmarks/lester_ablation.py [--workdir runs/lester] [--seeds 0,1,2]
        [--methods prompt,lora,full] [--stop-after-hours H] [--report-only]

Pure prompt tuning (``configs/lester_smollm2.py``: label-word scoring, only the prompt
trains) over lengths {1, 5, 20, 100} x inits {uniform, sampled_vocab, class_labels}, with
LoRA and full fine-tuning at the same budget beside it, 3 seeds. Cells run seed-major (every
cell of seed 0 first), in this process (the base model loaded once), and are skipped when
finished, so the script resumes where it stopped; ``--stop-after-hours`` stops starting new
cells after that long. Every cell is checked before the first run (length 1 x class_labels
is invalid: 2 classes need 2 prompt vectors).

At the end (and with ``--report-only``) it prints the table: dev accuracy x100, mean (std)
over the finished seeds, n, the largest move of dev accuracy over the last 20% of the steps
(the convergence check: converged = moved less than 1 point) and the cells that did not
finish; writes ``benchmarks/results/lester_smollm2.jsonl`` (the rows, with their dev-accuracy
and loss curves: what the README table and ``notebooks/ablation_analysis.ipynb`` read) and
``.md``, and the plots ``<workdir>/ablation.png`` and ``<workdir>/curves.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = os.path.join(ROOT, "configs", "lester_smollm2.py")
RESULTS = os.path.join(HERE, "results", "lester_smollm2")
KEYS = ["peft.methods", "peft.prompt.length", "peft.prompt.init"]
ROW_KEYS = KEYS + ["seed", "model.name", "task.name", "task.format", "task.template",
                   "task.max_train_examples", "task.max_eval_examples", "train.steps",
                   "train.batch_size", "train.eval_every", "optim.optimizer", "optim.lr",
                   "optim.prompt_lr"]


def cell_rows(rows: list) -> list:
    """Rows with the prompt keys blanked for the methods that have no prompt (one table)."""
    out = []
    for r in rows:
        cfg = dict(r.get("config") or {})
        if cfg.get("peft.methods") is None and r.get("_dir"):   # a cell not run: <workdir>/<method>/<cell>
            cfg["peft.methods"] = os.path.basename(os.path.dirname(os.path.abspath(r["_dir"])))
        if cfg.get("peft.methods") not in (None, "prompt"):
            cfg["peft.prompt.length"], cfg["peft.prompt.init"] = "-", "-"
        out.append({**r, "config": cfg})
    return out


def table(rows: list) -> tuple[str, list]:
    """Markdown table of the grid (mean (std) x100, n, convergence, cells not finished)."""
    from peft_jax import report
    rows = cell_rows(rows)
    agg = report.aggregate(rows, KEYS, ["accuracy", "baseline.accuracy"], seed_key="seed",
                           late_metric="accuracy")
    return report.to_markdown(agg, KEYS, ["accuracy", "baseline.accuracy"], digits=1, scale=100), agg


def write_report(workdir: str, out: str = RESULTS) -> str:
    from peft_jax import report
    if not os.path.isdir(workdir):
        return f"no runs under {workdir} yet"
    rows = cell_rows(report.collect_all(workdir))
    report.export_rows(rows, out + ".jsonl", keys=ROW_KEYS)
    md, agg = table(rows)
    with open(out + ".md", "w") as f:
        f.write(md)
    done = report.finished(rows)
    prompt = [r for r in cell_rows(report.collect_all(workdir)) if r["config"].get("peft.methods") == "prompt"]
    if any(r.get("status") == "finished" for r in prompt):
        abl = report.aggregate(prompt, ["peft.prompt.length", "peft.prompt.init"], ["accuracy"], seed_key="seed")
        report.plot_ablation(abl, "peft.prompt.length", "peft.prompt.init", "accuracy",
                             os.path.join(workdir, "ablation.png"), scale=100,
                             title="SmolLM2-135M, SST-2 dev: prompt length x init")
    if done:
        report.plot_curves(cell_rows(done), KEYS, ["train/loss", "eval/accuracy"],
                           os.path.join(workdir, "curves.png"), smooth=5)
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lester_ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "lester"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="prompt,lora,full")
    p.add_argument("--stop-after-hours", type=float, default=0.0, help="0 = run every cell")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--out", default=RESULTS, help="results file prefix (.jsonl, .md)")
    p.add_argument("--only", action="append", default=[],
                   help="glob on cell names, e.g. '*length20_*' (names: init-uniform_length20_seed0-<hash>; repeatable)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=V",
                   help="config override for every cell (e.g. train.steps=4 for a smoke run)")
    a = p.parse_args(argv)
    from peft_jax import sweep
    from peft_jax.config import load_config_file
    if not a.report_only:
        cache: dict = {}
        seeds = sweep.parse_seeds(a.seeds)
        plan = {}
        for method in a.methods.split(","):
            spec = f"{CONFIG}:{method}"
            cfg = load_config_file(spec)
            runs = sweep.expand(spec, os.path.join(a.workdir, method), a.override, cfg, seeds=seeds,
                                check=sweep.experiment_checker(cfg, cache))
            plan[method] = (spec, cfg, runs)
            for r in runs:
                if r.invalid:
                    print(f"invalid cell (not run): {method} {r.name}: {r.invalid}", flush=True)
        t0, stop = time.time(), False
        for seed in seeds:
            for method, (spec, cfg, runs) in plan.items():
                for r in sweep.select([r for r in runs if dict(r.overrides).get("seed") == seed], a.only):
                    if a.stop_after_hours and time.time() - t0 > 3600 * a.stop_after_hours:
                        stop = True
                        break
                    sweep.run_sweep([r], spec, common=a.override, in_process=True, cache=cache,
                                    all_runs=runs, cfg=cfg)
                if stop:
                    break
            if stop:
                print(f"stopped: --stop-after-hours {a.stop_after_hours} reached", flush=True)
                break
            print(write_report(a.workdir, a.out), flush=True)
    print(write_report(a.workdir, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
