"""Glue for launch/run_spot.sh (no training here).

    python launch/spot_tools.py export-prompts SWEEP_ROOT OUT_DIR
        each finished run's soft prompt (delta/ 'peft/prompt') -> OUT_DIR/<task>.npy
        (task '/' -> '_'), printing "<run dir> <npy>" per run
    python launch/spot_tools.py gains TARGET_ROOT OUT.csv [--metric accuracy]
        transfer gain per (source task, target task): mean metric of the runs initialised from
        PROMPTS/<source>.npy minus the mean of the random-init runs (source,target,gain CSV)
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys

import numpy as np

from peft_jax.peft import delta_io


def _results(root: str) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(glob.glob(os.path.join(root, "*", "result.json"))):
        with open(path) as f:
            row = json.load(f)
        if row.get("status") == "finished":
            out.append((os.path.dirname(path), row))
    return out


def export_prompts(root: str, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for wd, row in _results(root):
        delta, _ = delta_io.load_delta(os.path.join(wd, "delta"))
        prompts = delta_io.prompt_leaves(delta)
        if len(prompts) != 1:
            raise SystemExit(f"{wd}: expected one soft prompt in delta/, found {sorted(prompts)}")
        task = row["config"]["task.name"].replace("/", "_")
        path = os.path.join(out_dir, task + ".npy")
        np.save(path, next(iter(prompts.values())), allow_pickle=False)
        print(wd, path)


def gains(root: str, out_csv: str, metric: str) -> None:
    base: dict[str, list[float]] = {}
    cells: dict[tuple[str, str], list[float]] = {}
    for _, row in _results(root):
        cfg, v = row["config"], row["metrics"][metric]
        tgt = cfg["task.name"]
        if cfg.get("peft.prompt.init") == "file":
            src = os.path.splitext(os.path.basename(cfg["peft.prompt.file"]))[0]
            cells.setdefault((src, tgt), []).append(v)
        else:
            base.setdefault(tgt, []).append(v)
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "target", "gain"])
        for (s, t), vs in sorted(cells.items()):
            if t not in base:
                raise SystemExit(f"{root}: no random-init run for target {t}")
            g = float(np.mean(vs) - np.mean(base[t]))
            w.writerow([s, t, f"{g:.6f}"])
            print(f"{t:12s} <- {s:6s} {metric}={np.mean(vs):.4f}  random={np.mean(base[t]):.4f}  gain={g:+.4f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="spot_tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("export-prompts"); q.add_argument("root"); q.add_argument("out")
    q = sub.add_parser("gains"); q.add_argument("root"); q.add_argument("out")
    q.add_argument("--metric", default="accuracy")
    a = p.parse_args(argv)
    if a.cmd == "export-prompts":
        export_prompts(a.root, a.out)
    else:
        gains(a.root, a.out, a.metric)
    return 0


if __name__ == "__main__":
    sys.exit(main())
