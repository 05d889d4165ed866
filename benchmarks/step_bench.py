"""peft_jax vs PyTorch + Hugging Face PEFT: one training step, side by side, one table.

For every model x method, each framework runs in its own subprocess (``jax_worker.py``,
``torch_worker.py``; peak RSS is per run) on the same fp32 weights (``prepare.py`` writes
one HF folder both load), the same batch of real SST-2 training sentences padded /
truncated to ``--seq``, the same method hyper-parameters (``common.MethodHParams``) and
AdamW (lr 1e-3, no weight decay). Loss: MiniLM, cross-entropy of a 2-way classifier on
the pooled output; SmolLM2, next-token cross-entropy on the sentence tokens.

Full table (the lead's command; ~10 min MiniLM, ~25 min SmolLM2 on 2 cores)::

    python benchmarks/step_bench.py --models minilm,smollm2 --steps 10 --warmup 2

``--quick`` runs tiny random configs for 2 steps (smoke test). Columns: median step time
after warm-up, examples/s, analytic GFLOP per step (``common.FLOP_FORMULA``), achieved
GFLOP/s and its fraction of the machine's measured fp32 matmul peak (the larger of the
jitted-JAX and torch peaks, ``matmul_peak.py``), peak RSS, optimizer-state bytes, compile
time (first step minus a median step), number of compilations (``jit._cache_size()``,
also after the first step: must stay 0), speed-up over torch (examples/s ratio) and the
step time relative to the same framework's full fine-tuning.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import matmul_peak  # noqa: E402
import prepare as prep  # noqa: E402

WORKERS = {"jax": "jax_worker.py", "torch": "torch_worker.py"}
COLUMNS = [
    ("model", "model", ""), ("method", "method", ""), ("framework", "framework", ""),
    ("step_s", "step s", ".3f"), ("examples_per_s", "ex/s", ".1f"), ("gflop", "GFLOP", ".1f"),
    ("gflops", "GFLOP/s", ".1f"), ("pct_peak", "%peak", ".0%"), ("peak_rss_mb", "RSS MB", ".0f"),
    ("opt_mb", "opt MB", ".3f"), ("compile_s", "compile s", ".1f"), ("compiles", "#comp", ""),
    ("recompiles_after_first", "#recomp", ""), ("speedup", "x torch", ".2f"),
    ("vs_full", "/full", ".2f"), ("note", "note", ""),
]


def run_worker(framework: str, args: list[str], timeout: float) -> dict:
    return common.run_script(WORKERS[framework], args, timeout)


def ensure_prepared(model: str, folder: str, examples: int, quick: bool, data_dir: str) -> dict:
    """Reuse ``folder`` when it holds a matching preparation, else run ``prepare.py``."""
    try:
        spec = prep.load_spec(folder)
        if spec.get("quick") == quick and spec.get("examples", 0) >= examples:
            return spec
    except FileNotFoundError:
        pass
    cmd = [sys.executable, os.path.join(common.HERE, "prepare.py"), "--model", model,
           "--out", folder, "--examples", str(examples), "--data-dir", data_dir]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=common.worker_env())
    if proc.returncode != 0:
        raise SystemExit(f"prepare.py failed for {model}:\n{proc.stderr[-2000:]}")
    return prep.load_spec(folder)


def derive(rows: list[dict], peak_gflops: float) -> None:
    """Add GFLOP, GFLOP/s, %peak, opt MB, speed-up over torch, ratio to full FT."""
    by = {(r["model"], r["method"], r["framework"]): r for r in rows}
    for r in rows:
        if r.get("error"):
            r["note"] = r["error"]
            continue
        r["gflop"] = r["flops"] / 1e9
        r["gflops"] = r["gflop"] / r["step_s"]
        r["pct_peak"] = r["gflops"] / peak_gflops
        r["opt_mb"] = r["opt_state_bytes"] / 2 ** 20
        full = by.get((r["model"], "full", r["framework"]))
        if full and not full.get("error") and r["method"] != "full":
            r["vs_full"] = r["step_s"] / full["step_s"]
        if r["framework"] == "peft_jax":
            t = by.get((r["model"], r["method"], "torch+hf_peft"))
            if t and not t.get("error"):
                r["speedup"] = r["examples_per_s"] / t["examples_per_s"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--methods", default=",".join(common.METHODS))
    p.add_argument("--frameworks", default="jax,torch")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (incl. compile)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--bf16", action="store_true", help="bf16 compute (fp32 params) in both")
    p.add_argument("--prng", default="threefry2x32", choices=["threefry2x32", "rbg", "unsafe_rbg"],
                   help="peft_jax: PRNG implementation of the dropout keys")
    p.add_argument("--dropout-impl", default="hash", choices=["hash", "jax"],
                   help="peft_jax: dropout masks from a fused index hash (default) or from "
                        "jax.random.bernoulli with the --prng keys (flax.linen.Dropout's masks)")
    p.add_argument("--compile-cache", default="",
                   help="peft_jax: persistent compilation cache dir (compile s then = cache load)")
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"],
                   help="peft_jax: rematerialize the forward in the backward pass")
    p.add_argument("--xla-flops", action="store_true", help="also report XLA's FLOP count")
    p.add_argument("--quick", action="store_true", help="tiny random configs, 2 steps (smoke test)")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "peft_jax_bench"))
    p.add_argument("--data-dir", default=common.DEFAULT_DATA)
    p.add_argument("--peak-size", type=int, default=2048, help="matmul size for the peak")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker run")
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.seq, a.steps, a.warmup, a.peak_size = 4, 32, 2, 1, 256
        a.cache_dir = os.path.join(a.cache_dir, "quick")
    models = [m for m in a.models.split(",") if m]
    methods = [m for m in a.methods.split(",") if m]
    frameworks = [f for f in a.frameworks.split(",") if f]
    for name, got, known in (("--models", models, common.MODELS),
                             ("--methods", methods, common.METHODS),
                             ("--frameworks", frameworks, tuple(WORKERS))):
        bad = [x for x in got if x not in known]
        if bad:
            p.error(f"{name}: unknown {bad}; known: {list(known)}")

    t_start = time.time()
    peaks = {fw: matmul_peak.measure(fw, a.peak_size, 3 if a.quick else 10, a.threads)
             for fw in frameworks}
    peak = max(peaks.values())
    rows = []
    for model in models:
        folder = os.path.join(a.cache_dir, model)
        ensure_prepared(model, folder, max(a.batch, 64), a.quick, a.data_dir)
        for method in methods:
            for fw in frameworks:
                args = ["--folder", folder, "--method", method, "--mode", "step",
                        "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps),
                        "--warmup", str(a.warmup), "--remat", a.remat]
                if fw == "torch":
                    args += ["--threads", str(a.threads)]
                if a.bf16:
                    args.append("--bf16")
                if fw == "jax":
                    args += ["--prng", a.prng, "--dropout-impl", a.dropout_impl]
                    args += ["--compile-cache", a.compile_cache] if a.compile_cache else []
                    if a.xla_flops:
                        args.append("--xla-flops")
                r = run_worker(fw, args, a.timeout)
                r.setdefault("model", model)
                r.setdefault("method", method)
                r["framework"] = "peft_jax" if fw == "jax" else "torch+hf_peft"
                rows.append(r)
                print(f"[{time.time() - t_start:6.0f}s] {model} {method} {r['framework']}: "
                      + (f"{r['step_s']:.3f} s/step" if "step_s" in r else r.get("error", "")),
                      file=sys.stderr, flush=True)
    derive(rows, peak)
    if a.xla_flops:
        COLUMNS.insert(6, ("xla_gflop", "XLA GFLOP", ".1f"))
        for r in rows:
            if r.get("xla_flops") is not None:
                r["xla_gflop"] = r["xla_flops"] / 1e9
    dtype = "bf16" if a.bf16 else "fp32"
    print(f"peft_jax vs torch+HF PEFT training step | batch {a.batch} x seq {a.seq} | {dtype} | "
          f"remat {a.remat} | prng {a.prng} | dropout {a.dropout_impl} | "
          f"median of {a.steps} steps after {a.warmup} warm-up | "
          f"torch threads {a.threads}" + (" | QUICK (tiny random configs)" if a.quick else ""))
    print("matmul peak (fp32, %d^3): " % a.peak_size
          + ", ".join(f"{fw} {g:.1f} GFLOP/s" for fw, g in peaks.items())
          + f"; %peak is relative to {peak:.1f}")
    print(common.FLOP_FORMULA)
    print(common.format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
