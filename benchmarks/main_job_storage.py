"""The main job with its frozen base stored fp32 / bf16 / int8, over several data seeds.

Runs ``peft-jax train --config configs/main_sst2.py`` (LoRA r=8 on SmolLM2-135M, SST-2
16-shot, 24 steps, accuracy on the 872 SST-2 validation sentences) once per storage and
seed (split ``train-<seed>``), each in ``<workdir>/<storage>_s<seed>``; a cell whose
``result.json`` is finished is read, not rerun. Prints per seed and mean (std) accuracy
and the difference to fp32 on the same seed::

    python benchmarks/main_job_storage.py [--seeds 13,21,42] [--storages fp32,bf16,int8]
                                          [--workdir runs/main_job_storage]

int8 is ``--config.model.quantize=int8`` (scales per group of 64 input rows, the default);
``int8-chan`` is one scale per output channel (``--config.model.quantize_group=0``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORAGES = {
    "fp32": [],
    "bf16": ["--config.model.param_dtype=bfloat16"],
    "int8": ["--config.model.quantize=int8"],
    "int8-chan": ["--config.model.quantize=int8", "--config.model.quantize_group=0"],
}


def run_cell(workdir: str, storage: str, seed: int, overrides: tuple = ()) -> dict:
    """The finished result row of one (storage, seed) cell, training it when needed."""
    cell = os.path.join(workdir, f"{storage}_s{seed}")
    path = os.path.join(cell, "result.json")
    if os.path.isfile(path):
        with open(path) as f:
            row = json.load(f)
        if row.get("status") == "finished":
            return row
    cmd = [sys.executable, "-m", "peft_jax.cli", "train", "--config",
           os.path.join(ROOT, "configs", "main_sst2.py"), f"--config.seed={seed}",
           f"--config.task.train_split=train-{seed}", *STORAGES[storage],
           *[f"--config.{o}" for o in overrides], "--workdir", cell]
    print("+", " ".join(cmd), flush=True)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, f"{storage}_s{seed}.log"), "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"error: {storage} seed {seed} failed (exit {rc}); see "
                         f"{os.path.join(workdir, f'{storage}_s{seed}.log')}")
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="13,21,42")
    p.add_argument("--storages", default="fp32,bf16,int8")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "main_job_storage"))
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every cell, e.g. model.scan_layers=False "
                        "(repeatable)")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    storages = a.storages.split(",")
    unknown = [s for s in storages if s not in STORAGES]
    if unknown:
        raise SystemExit(f"error: --storages: unknown {unknown}; choose from {list(STORAGES)}")
    acc = {(st, s): 100 * run_cell(a.workdir, st, s, tuple(a.override))["metrics"]["accuracy"]
           for st in storages for s in seeds}
    head = ["storage"] + [f"seed {s}" for s in seeds] + ["mean (std)", "vs fp32 (mean of per-seed diffs)"]
    print(" | ".join(head))
    for st in storages:
        v = np.array([acc[st, s] for s in seeds])
        cells = [f"{x:.1f}" for x in v] + [f"{v.mean():.1f} ({v.std(ddof=1) if len(v) > 1 else 0:.1f})"]
        if "fp32" in storages and st != "fp32":
            d = v - np.array([acc["fp32", s] for s in seeds])
            cells.append(f"{d.mean():+.1f} (per seed {', '.join(f'{x:+.1f}' for x in d)})")
        else:
            cells.append("")
        print(" | ".join([st] + cells))
    print("RESULT " + json.dumps({"seeds": seeds, "accuracy": {f"{k[0]}_s{k[1]}": v for k, v in acc.items()}}))


if __name__ == "__main__":
    main()
