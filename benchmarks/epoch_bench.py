"""End to end: one epoch over real SST-2 training sentences with their real length
distribution. peft_jax groups examples into length buckets (``--buckets``; one compiled
step per non-empty bucket, the last partial batch of a bucket filled with weight-0 rows)
and prefetches batches to the device; the PyTorch + HF PEFT baseline pads each batch to its
longest sentence (dynamic padding, as ``DataCollatorWithPadding``). Same examples, same
order of magnitude of work, wall time (compilation included) and real tokens/s::

    python benchmarks/epoch_bench.py --models minilm --methods lora,prompt --max-examples 4000

``--max-examples`` defaults to 4000 (of 67,349; a few minutes per run on 2 cores); pass
67349 for the full epoch. The examples are a fixed random sample (seed 0) of the train split.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from step_bench import WORKERS, ensure_prepared, run_worker  # noqa: E402

COLUMNS = [
    ("model", "model", ""), ("method", "method", ""), ("framework", "framework", ""),
    ("examples", "examples", ""), ("batches", "batches", ""), ("wall_s", "wall s", ".1f"),
    ("tokens_per_s", "tokens/s", ".0f"), ("pad_eff", "real/padded", ".0%"),
    ("first_step_of_buckets_s", "1st steps s", ".1f"), ("compiles", "#comp", ""),
    ("peak_rss_mb", "RSS MB", ".0f"), ("speedup", "x torch", ".2f"), ("note", "note", ""),
]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="minilm")
    p.add_argument("--methods", default="lora")
    p.add_argument("--frameworks", default="jax,torch")
    p.add_argument("--max-examples", type=int, default=4000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--buckets", default="16,32,64,128", help="peft_jax length buckets")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--prng", default="threefry2x32", choices=["threefry2x32", "rbg", "unsafe_rbg"],
                   help="peft_jax: PRNG implementation of the dropout keys")
    p.add_argument("--dropout-impl", default="hash", choices=["hash", "jax"],
                   help="peft_jax: dropout masks from a fused index hash (default) or from "
                        "jax.random.bernoulli with the --prng keys (flax.linen.Dropout's masks)")
    p.add_argument("--compile-cache", default="",
                   help="peft_jax: persistent compilation cache dir (compile s then = cache load)")
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    p.add_argument("--quick", action="store_true", help="tiny random configs, 64 examples")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "peft_jax_bench"))
    p.add_argument("--data-dir", default=common.DEFAULT_DATA)
    p.add_argument("--timeout", type=float, default=3600)
    a = p.parse_args(argv)
    if a.quick:
        a.max_examples, a.batch, a.buckets = 64, 8, "16,32,64"
        a.cache_dir = os.path.join(a.cache_dir, "quick")
    rows = []
    t0 = time.time()
    for model in [m for m in a.models.split(",") if m]:
        folder = os.path.join(a.cache_dir, model)
        spec = ensure_prepared(model, folder, a.max_examples, a.quick, a.data_dir)
        for method in [m for m in a.methods.split(",") if m]:
            for fw in [f for f in a.frameworks.split(",") if f]:
                if fw not in WORKERS:
                    p.error(f"--frameworks: unknown {fw!r}; known: {list(WORKERS)}")
                args = ["--folder", folder, "--method", method, "--mode", "epoch",
                        "--batch", str(a.batch), "--max-examples", str(a.max_examples),
                        "--buckets", a.buckets, "--remat", a.remat]
                if a.bf16:
                    args.append("--bf16")
                if fw == "jax":
                    args += ["--prng", a.prng, "--dropout-impl", a.dropout_impl]
                    args += ["--compile-cache", a.compile_cache] if a.compile_cache else []
                else:
                    args += ["--threads", str(a.threads)]
                r = run_worker(fw, args, a.timeout)
                r.setdefault("model", model)
                r.setdefault("method", method)
                r["framework"] = "peft_jax" if fw == "jax" else "torch+hf_peft"
                rows.append(r)
                print(f"[{time.time() - t0:6.0f}s] {model} {method} {r['framework']}: "
                      + (f"{r['wall_s']:.1f} s" if "wall_s" in r else r.get("error", "")),
                      file=sys.stderr, flush=True)
    by = {(r["model"], r["method"], r["framework"]): r for r in rows}
    for r in rows:
        if r.get("error"):
            r["note"] = r["error"]
            continue
        r["pad_eff"] = r["tokens"] / r["padded_tokens"]
        t = by.get((r["model"], r["method"], "torch+hf_peft"))
        if r["framework"] == "peft_jax" and t and not t.get("error"):
            r["speedup"] = r["tokens_per_s"] / t["tokens_per_s"]
    print(f"one epoch over {a.max_examples} SST-2 train sentences | batch {a.batch} | peft_jax "
          f"buckets {a.buckets} (+prefetch) vs torch dynamic padding | "
          f"{'bf16' if a.bf16 else 'fp32'} | torch threads {a.threads}"
          + (" | QUICK (tiny random configs)" if a.quick else ""))
    print(common.format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
