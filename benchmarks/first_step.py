"""Time to first step of the README main job, cold vs warm caches, side by side.

Runs ``peft-jax train --config configs/main_sst2.py`` (the main job, ``launch/main.sh``) twice
as subprocesses with a small step budget: first with empty caches (compiled programs,
converted models), then again with the caches the first run filled. Prints each run's
phases (``result.json`` ``phases``, :mod:`peft_jax.phases`): wall seconds, process CPU
seconds (all threads: the work apart from waiting for a busy machine) and the XLA
compilation inside each phase, plus the launch -> "time to first step" line seen from
outside and the cache hits::

    python benchmarks/first_step.py                       # stops each run after its first step
    python benchmarks/first_step.py --until end          # whole runs (eval included)
    python benchmarks/first_step.py -- --config.model.scan_layers=True   # overrides for both

``--until first_step`` (default) sends SIGTERM once the first step is done: the run saves
its checkpoint and exits 143, with its phases in ``result.json`` (status ``preempted``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import format_table  # noqa: E402

MARK = "[peft_jax] time to first step"
MODES = ("cold", "warm")


def child_cpu() -> float:
    """User + system CPU seconds of the finished children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_once(cmd: list[str], env: dict, until: str, log_path: str) -> dict:
    """One run: launch, watch stdout for the first-step line (stop it there with
    ``until='first_step'``), wait; returns timings seen from outside."""
    load0, cpu0 = os.getloadavg()[0], child_cpu()
    t0 = time.time()
    first = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=ROOT, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            if first is None and line.startswith(MARK):
                first = time.time() - t0
                if until == "first_step":
                    proc.send_signal(signal.SIGTERM)
        rc = proc.wait()
    return {"rc": rc, "launch_to_first_step": first, "wall": time.time() - t0,
            "cpu": child_cpu() - cpu0, "load": (load0 + os.getloadavg()[0]) / 2}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/main_sst2.py")
    p.add_argument("--steps", type=int, default=3, help="config.train.steps of both runs")
    p.add_argument("--until", choices=("first_step", "end"), default="first_step")
    p.add_argument("--workdir", default="", help="default: a new temporary folder")
    a, extra = p.parse_known_args(argv)
    extra = [x for x in extra if x != "--"]
    root = a.workdir or tempfile.mkdtemp(prefix="first_step_")
    os.makedirs(root, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PEFT_JAX_COMPILE_CACHE=os.path.join(root, "jax_cache"),
               PEFT_JAX_MODEL_CACHE=os.path.join(root, "models"))
    runs = {}
    for mode in MODES:
        wd = os.path.join(root, f"run_{mode}")
        cmd = [sys.executable, "-m", "peft_jax.cli", "train", "--config", a.config,
               f"--config.train.steps={a.steps}", "--config.train.progress=False",
               *extra, "--workdir", wd]
        if mode == "cold":
            print("command (twice):", " ".join(cmd[2:]), flush=True)
            print(f"caches (empty before the cold run): {root}/jax_cache, {root}/models", flush=True)
        out = run_once(cmd, env, a.until, os.path.join(root, f"{mode}.log"))
        try:
            with open(os.path.join(wd, "result.json")) as f:
                out["row"] = json.load(f)
        except (OSError, ValueError):
            out["row"] = {}
        if "phases" not in out["row"]:
            with open(os.path.join(root, f"{mode}.log")) as f:
                print(f.read()[-3000:], file=sys.stderr)
            print(f"error: the {mode} run wrote no phases (exit {out['rc']})", file=sys.stderr)
            return 1
        runs[mode] = out
    cold, warm = (runs[m]["row"]["phases"] for m in MODES)
    rows = []
    for name in cold["order"]:
        row = {"phase": name}
        for m, ph in zip(MODES, (cold, warm)):
            row[f"{m}_s"] = ph["seconds"].get(name)
            row[f"{m}_cpu"] = ph["cpu_s"].get(name)
            row[f"{m}_comp"] = ph["compile_s"].get(name)
        rows.append(row)
    rows.append({"phase": "to first step", **{f"{m}_s": runs[m]["row"]["phases"]["total_s"] for m in MODES},
                 **{f"{m}_cpu": sum(runs[m]["row"]["phases"]["cpu_s"].values()) for m in MODES},
                 **{f"{m}_comp": sum(runs[m]["row"]["phases"]["compile_s"].values()) for m in MODES}})
    rows.append({"phase": "launch -> line", **{f"{m}_s": runs[m]["launch_to_first_step"] for m in MODES}})
    rows.append({"phase": "whole process", **{f"{m}_s": runs[m]["wall"] for m in MODES},
                 **{f"{m}_cpu": runs[m]["cpu"] for m in MODES}})
    cols = [("phase", "phase", "")]
    for m in MODES:
        cols += [(f"{m}_s", f"{m} s", ".1f"), (f"{m}_cpu", "CPU s", ".1f"), (f"{m}_comp", "compile s", ".1f")]
    print(f"{a.config}, train.steps={a.steps}, until {a.until}; {os.cpu_count()} cores, load average "
          + ", ".join(f"{m} {runs[m]['load']:.1f}" for m in MODES))
    print(format_table(rows, cols))
    for m in MODES:
        c = runs[m]["row"]["phases"]["compile_cache"]
        parts = runs[m]["row"]["phases"]["compile_parts_s"]
        print(f"{m}: exit {runs[m]['rc']}, status {runs[m]['row'].get('status')}, compilation cache "
              f"{c['hits']} hits / {c['misses']} misses; compilation = tracing {parts['trace']:.1f} s "
              f"+ lowering {parts['lower']:.1f} s + backend {parts['backend']:.1f} s (XLA compile, "
              "or loading the cached executable)")
    t_cold, t_warm = cold["total_s"], warm["total_s"]
    print(f"warm / cold time to first step: {t_warm:.1f} / {t_cold:.1f} s = {t_warm / t_cold:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
