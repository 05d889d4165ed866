"""XLA:CPU compiler options vs the peft_jax training step: one table, variants side by side.

Each variant is a set of ``XLA_FLAGS`` (``VARIANTS``). For every method, every variant runs
back to back (interleaved, so that background load hits all variants alike), each in its
own ``jax_worker.py --mode step`` process with ``XLA_FLAGS`` set to the variant's flags
only (an ``XLA_FLAGS`` of the calling shell is not passed on). Same prepared folder
(``prepare.py``), batch, seed and steps as ``step_bench.py``. Columns: median step time
after warm-up, compile time (first step minus a median step), speed-up over the
``default`` variant (default step s / variant step s), the worker's final training loss
(``metrics['loss']`` of the last timed step) and its absolute difference from the default
variant's loss: a numerics change shows up there. A variant whose worker fails (e.g. XLA
aborts on a flag) gets a row with its error.

The flags were checked against jaxlib 0.10.2 (each accepted alone on a jitted matmul;
``XLA_FLAGS`` with an unknown flag or an illegal enum value aborts the process). On this
build the default XLA:CPU pipeline already hands dots and reductions to YNNPACK
(``__ynn_fusion``, default ``xla_cpu_experimental_ynn_fusion_type`` = individual_dot +
reduce); ``xla_cpu_use_xnnpack`` / ``xla_cpu_experimental_xnn_fusion_type`` are accepted
but produce no XNNPACK fusion (so the "xnnpack off" variant is ``ynn_off``); oneDNN
fusions need ``xla_cpu_use_onednn=true`` *and* a fusion type list;
``xla_cpu_disable_new_fusion_emitters`` is not a flag of this build (it aborts). With
oneDNN fusions on, MiniLM full fine-tuning compiles and runs, but LoRA / prompt / adapter
steps die with SIGILL after oneDNN's "partition compile failed" (any one fusion type alone
too; AVX2 AMD EPYC): the ``onednn`` rows carry that error.

Real run (~1 min per variant x method on 2 busy cores)::

    python benchmarks/xla_cpu_options.py --model minilm --methods full,lora,prompt,adapter \\
        --steps 5 --warmup 2 --out benchmarks/results/xla_cpu_options_minilm.txt

``--quick``: tiny random configs (as ``step_bench.py --quick``), a smoke test.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from step_bench import ensure_prepared  # noqa: E402

# name -> XLA_FLAGS (each checked to parse and run on jaxlib 0.10.2)
VARIANTS = {
    "default": "",
    # no YNNPACK fusions: dots / reductions go to XLA's own emitters (Eigen for dots)
    "ynn_off": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_xnnpack=false",
    # more YNNPACK: also general dot fusions and element-wise ops
    "ynn_more": "--xla_cpu_experimental_ynn_fusion_type=+dot,+eltwise",
    # oneDNN fusions (take precedence; YNN keeps what oneDNN does not take)
    "onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "eigen_1thread": "--xla_cpu_multi_thread_eigen=false",
    # the concurrency-optimized scheduler, set explicitly (XLA's default is on), and its opposite
    "sched_concurrency": ("--xla_cpu_enable_concurrency_optimized_scheduler=true "
                          "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"),
    "sched_memory": ("--xla_cpu_enable_concurrency_optimized_scheduler=false "
                     "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"),
    "fast_runtime": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
    "no_fusion_emitters": "--xla_cpu_use_fusion_emitters=false",
    # not in the default list (compile-side or no-op on this AVX2 machine):
    "codegen_split1": "--xla_cpu_parallel_codegen_split_count=1",
    "vec128": "--xla_cpu_prefer_vector_width=128",
}
DEFAULT_VARIANTS = ("default", "ynn_off", "ynn_more", "onednn", "fast_math", "eigen_1thread",
                    "sched_concurrency", "sched_memory", "fast_runtime", "no_fusion_emitters")
DEFAULT_METHODS = ("full", "lora", "prompt", "adapter")
COLUMNS = [
    ("variant", "variant", ""), ("method", "method", ""), ("step_s", "step s", ".3f"),
    ("step_min_s", "min s", ".3f"), ("compile_s", "compile s", ".1f"),
    ("ratio", "x default", ".2f"), ("loss", "loss", ".6f"), ("dloss", "|dloss|", ".1e"),
    ("note", "note", ""),
]


def _error_line(stderr: str) -> str:
    """The XLA fatal / error log line of a crashed worker, else its last stderr line."""
    lines = stderr.strip().splitlines()
    for ln in lines:
        if re.match(r"^[FE]\d{4} ", ln):
            return ln.split("] ", 1)[-1]
    return lines[-1] if lines else "(no output)"


def run_variant(flags: str, args: list, timeout: float) -> dict:
    """``jax_worker.py args`` in its own process with ``XLA_FLAGS=flags``; its RESULT dict,
    or ``{"error": ...}``."""
    env = common.worker_env()
    env["XLA_FLAGS"] = flags
    cmd = [sys.executable, os.path.join(common.HERE, "jax_worker.py")] + list(args)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    res = common.parse_result(proc.stdout)
    if res is None:
        rc = proc.returncode
        how = f"exit {rc}" if rc >= 0 else f"killed by {_signal_name(-rc)}"
        return {"error": f"{how}: {_error_line(proc.stderr)[:160]}"}
    return res


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def derive(rows: list[dict]) -> None:
    """Speed-up over the default variant and loss difference to it, per method."""
    base = {r["method"]: r for r in rows if r["variant"] == "default" and not r.get("error")}
    for r in rows:
        if r.get("error"):
            r["note"] = r["error"]
            continue
        b = base.get(r["method"])
        if b is None:
            continue
        r["ratio"] = b["step_s"] / r["step_s"]
        if r.get("loss") is not None and b.get("loss") is not None:
            r["dloss"] = abs(r["loss"] - b["loss"])


def load_line(tag: str) -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {tag}: {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma list of {list(VARIANTS)} ('all' = every one)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--model", default="minilm", choices=common.MODELS)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5; quick 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="steps before timing, incl. the compiling first (default 2; quick 1)")
    p.add_argument("--batch", type=int, default=None, help="default 16; quick 4")
    p.add_argument("--seq", type=int, default=None, help="default 128; quick 32")
    p.add_argument("--out", default="", help="also write the table (with its header) here")
    p.add_argument("--quick", action="store_true", help="tiny random configs (smoke test)")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "peft_jax_bench"))
    p.add_argument("--data-dir", default=common.DEFAULT_DATA)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker run")
    a = p.parse_args(argv)
    dflt = dict(steps=2, warmup=1, batch=4, seq=32) if a.quick else \
        dict(steps=5, warmup=2, batch=16, seq=128)
    for k, v in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.quick:
        a.cache_dir = os.path.join(a.cache_dir, "quick")
    variants = list(VARIANTS) if a.variants == "all" else [v for v in a.variants.split(",") if v]
    methods = [m for m in a.methods.split(",") if m]
    for name, got, known in (("--variants", variants, tuple(VARIANTS)),
                             ("--methods", methods, common.METHODS)):
        bad = [x for x in got if x not in known]
        if bad:
            p.error(f"{name}: unknown {bad}; known: {list(known)}")
    if "default" not in variants:
        variants.insert(0, "default")  # the reference of the ratio and loss columns

    load_start = load_line("at start")
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    t_start = time.time()
    folder = os.path.join(a.cache_dir, a.model)
    ensure_prepared(a.model, folder, max(a.batch, 64), a.quick, a.data_dir)
    rows = []
    for method in methods:
        for variant in variants:  # interleaved: all variants of a method back to back
            args = ["--folder", folder, "--method", method, "--mode", "step",
                    "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps),
                    "--warmup", str(a.warmup)]
            r = run_variant(VARIANTS[variant], args, a.timeout)
            r["variant"], r["method"] = variant, method
            rows.append(r)
            print(f"[{time.time() - t_start:6.0f}s] {method} {variant}: "
                  + (f"{r['step_s']:.3f} s/step, loss {r.get('loss')}" if "step_s" in r
                     else r.get("error", "")), file=sys.stderr, flush=True)
    derive(rows)
    rows.sort(key=lambda r: (methods.index(r["method"]), variants.index(r["variant"])))
    header = [
        f"# python benchmarks/xla_cpu_options.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        f"# {started}, jaxlib {_jaxlib_version()}, {a.model}, batch {a.batch} x seq {a.seq}, fp32, "
        f"median of {a.steps} steps after {a.warmup} warm-up, one process per variant x method, "
        f"variants interleaved per method" + (" | QUICK (tiny random configs)" if a.quick else ""),
        f"# {load_start}; {load_line('at end')}",
        "# x default = default step s / variant step s (> 1: faster); |dloss| = |loss - default loss| "
        "(final training loss of the worker, last timed step)",
    ]
    if os.environ.get("XLA_FLAGS"):
        header.append(f"# (the caller's XLA_FLAGS={os.environ['XLA_FLAGS']!r} was NOT passed on)")
    legend = ["", "variants (XLA_FLAGS):"] + [f"  {v:<20s} {VARIANTS[v] or '(none)'}" for v in variants]
    text = "\n".join(header + [common.format_table(rows, COLUMNS)] + legend)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def _jaxlib_version() -> str:
    try:
        from importlib.metadata import version
        return version("jaxlib")
    except Exception:  # informational only
        return "?"


if __name__ == "__main__":
    main()
