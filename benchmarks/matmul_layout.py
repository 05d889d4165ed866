"""Dense matmuls as 2-D (``[rows, in] @ [in, out]``) vs 3-D (``[b, l, in] @ [in, out]``) on
XLA:CPU: the same train step compiled both ways in one process, timed alternately.

``peft_jax.models.layers.matmul`` (used by every Dense layer, LoRA, DoRA, VeRA, adapters and
heads) flattens the leading axes before the dot. This script swaps it for the plain 3-D
``jnp.dot`` while one copy of the step is traced and compiled, then times the two compiled
steps in turns (A B A B ...), so both see the same machine load, and checks they compute the
same loss. Prints s/step per form and the ratio 3-D / 2-D per method::

    python benchmarks/matmul_layout.py [--model minilm] [--methods full,lora,adapter,prompt]
                                       [--steps 6] [--batch 16] [--seq 128]

The model folder and batch are the ones ``step_bench.py`` prepares (real SST-2 sentences).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import jax_worker  # noqa: E402
import prepare as prep  # noqa: E402
from step_bench import ensure_prepared  # noqa: E402

# every module that binds ``matmul`` by name
MODULES = ("peft_jax.models.layers", "peft_jax.peft.lora", "peft_jax.peft.dora",
           "peft_jax.peft.vera", "peft_jax.peft.adapters", "peft_jax.peft.heads")


@contextlib.contextmanager
def matmul_3d():
    """Inside: every ``matmul`` is the plain ``jnp.dot`` of the 3-D operands."""
    import importlib

    import jax.numpy as jnp

    mods = [importlib.import_module(m) for m in MODULES]
    saved = [m.matmul for m in mods]
    for m in mods:
        m.matmul = jnp.dot
    try:
        yield
    finally:
        for m, f in zip(mods, saved):
            m.matmul = f


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--methods", default="full,lora,adapter,prompt")
    p.add_argument("--steps", type=int, default=6, help="timed steps per form (after 1 warm-up)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "peft_jax_bench"))
    p.add_argument("--data-dir", default=common.DEFAULT_DATA)
    a = p.parse_args(argv)
    folder = os.path.join(a.cache_dir, a.model)
    ensure_prepared(a.model, folder, max(a.batch, 64), False, a.data_dir)
    spec = prep.load_spec(folder)
    host = jax_worker.fixed_batch(folder, a.batch, a.seq, spec["pad_id"])
    rows = []
    for method in a.methods.split(","):
        runs = {form: jax_worker.compiled_step(folder, method, host,
                                               matmul_3d() if form == "3d" else None)
                for form in ("2d", "3d")}
        med, all_losses = jax_worker.time_in_turns(runs, a.steps)
        losses = {form: ls[0] for form, ls in all_losses.items()}
        rows.append((method, med["2d"], med["3d"], med["3d"] / med["2d"], losses["2d"], losses["3d"]))
        print(f"[{method}] 2d {med['2d']:.3f} s  3d {med['3d']:.3f} s", flush=True)
    print(f"{a.model}, batch {a.batch} x {a.seq}, fp32, median of {a.steps} alternating steps "
          f"per form; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'method':<8} {'2-D s/step':>10} {'3-D s/step':>10} {'3-D / 2-D':>9} "
          f"{'first loss 2-D':>14} {'3-D':>10}")
    for m, t2, t3, r, l2, l3 in rows:
        print(f"{m:<8} {t2:>10.3f} {t3:>10.3f} {r:>8.2f}x {l2:>14.6f} {l3:>10.6f}")
    common.emit(dict(model=a.model, batch=a.batch, seq=a.seq, rows=[
        dict(method=m, s_2d=t2, s_3d=t3, ratio=r, loss_2d=l2, loss_3d=l3) for m, t2, t3, r, l2, l3 in rows]))


if __name__ == "__main__":
    main()
