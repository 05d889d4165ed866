"""LayerNorm (and GELU) backward: JAX autodiff vs a hand-written ``jax.custom_vjp`` on
XLA:CPU: the same train step compiled each way in one process, timed alternately.

``peft_jax.models.layers.LayerNorm`` (non-RMS) calls the module-level ``layers.layer_norm``
core and the ``gelu`` activation calls ``layers.gelu_erf``. This script binds them, while one
copy of the step is traced and compiled, to

- ``autodiff``: ``layer_norm_autodiff`` + ``gelu_erf`` (the forms differentiated by JAX),
- ``vjp``, ``vjp_res``, ``vjp_dx``, ``vjp_both``: ``layer_norm_custom_vjp`` with
  ``layers.LN_FENCE`` = none / res / dx / both (a ``lax.cond`` fusion fence on the saved
  ``xhat, rstd`` and/or on ``dx``; ``dx`` is the default),
- ``vjp_dx+gelu``: ``vjp_dx`` + ``gelu_erf_vjp`` (closed-form GELU derivative),

then times the compiled steps in turns (A B C A B C ...), so all see the same machine load,
and checks they compute the same loss. Prints median s/step per variant and the ratio to
``autodiff`` per method::

    python benchmarks/layernorm_vjp.py [--model minilm] [--methods lora,adapter]
                                       [--steps 6] [--batch 16] [--seq 128]

The model folder and batch are the ones ``step_bench.py`` prepares (real SST-2 sentences).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import jax_worker  # noqa: E402
import prepare as prep  # noqa: E402
from step_bench import ensure_prepared  # noqa: E402

VARIANTS = {  # name -> (layers.layer_norm, layers.LN_FENCE, layers.gelu_erf)
    "autodiff": ("layer_norm_autodiff", "none", "gelu_erf"),
    "vjp": ("layer_norm_custom_vjp", "none", "gelu_erf"),
    "vjp_res": ("layer_norm_custom_vjp", "res", "gelu_erf"),
    "vjp_dx": ("layer_norm_custom_vjp", "dx", "gelu_erf"),
    "vjp_both": ("layer_norm_custom_vjp", "both", "gelu_erf"),
    "vjp_dx+gelu": ("layer_norm_custom_vjp", "dx", "gelu_erf_vjp"),
}


@contextlib.contextmanager
def variant(name: str):
    """Inside: ``layers.layer_norm`` / ``layers.gelu_erf`` are the variant's functions."""
    from peft_jax.models import layers

    ln, fence, gelu = VARIANTS[name]
    saved = layers.layer_norm, layers.LN_FENCE, layers.gelu_erf
    layers.layer_norm, layers.LN_FENCE = getattr(layers, ln), fence
    layers.gelu_erf = getattr(layers, gelu)
    try:
        yield
    finally:
        layers.layer_norm, layers.LN_FENCE, layers.gelu_erf = saved


def compiled_step(folder: str, method: str, host: dict, name: str):
    """(compiled step, state, frozen, batch) of one method under one variant."""
    import jax

    hp = common.MethodHParams()
    with variant(name):
        _, state, frozen, step, _ = jax_worker.setup(folder, method, hp, False, "none", host)
        batch, frozen, state = jax.device_put(host), jax.device_put(frozen), jax.device_put(state)
        compiled = step.lower(state, frozen, batch).compile()
    return compiled, state, frozen, batch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--methods", default="lora,adapter")
    p.add_argument("--variants", default="autodiff,vjp,vjp_dx")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 1 warm-up)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "peft_jax_bench"))
    p.add_argument("--data-dir", default=common.DEFAULT_DATA)
    a = p.parse_args(argv)

    import jax

    names = a.variants.split(",")
    base = names[0]
    folder = os.path.join(a.cache_dir, a.model)
    ensure_prepared(a.model, folder, max(a.batch, 64), False, a.data_dir)
    spec = prep.load_spec(folder)
    host = jax_worker.fixed_batch(folder, a.batch, a.seq, spec["pad_id"])
    load0 = os.getloadavg()[0]
    rows = []
    for method in a.methods.split(","):
        runs = {n: list(compiled_step(folder, method, host, n)) for n in names}
        times = {n: [] for n in runs}
        losses = {n: [] for n in runs}
        for i in range(a.steps + 1):
            for n, r in runs.items():
                step, state, frozen, batch = r
                t0 = time.perf_counter()
                state, metrics = step(state, frozen, batch)
                jax.block_until_ready((state, metrics))
                if i:
                    times[n].append(time.perf_counter() - t0)
                r[1] = state
                losses[n].append(float(metrics["loss"]))
        med = {n: common.median(t) for n, t in times.items()}
        for n in names:
            dl = max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(losses[n], losses[base]))
            rows.append((method, n, med[n], med[base] / med[n], losses[n][0], losses[n][-1], dl))
        print(f"[{method}] " + "  ".join(f"{n} {med[n]:.3f} s" for n in names), flush=True)
    print(f"{a.model}, batch {a.batch} x {a.seq}, fp32, median of {a.steps} alternating steps "
          f"per variant; {os.cpu_count()} CPUs, load average {load0:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at the end")
    print(f"{'method':<8} {'variant':<11} {'s/step':>7} {'speed-up':>8} {'first loss':>11} "
          f"{'last loss':>11} {'max rel dloss':>13}")
    for m, n, t, r, l0, l1, dl in rows:
        print(f"{m:<8} {n:<11} {t:>7.3f} {r:>7.2f}x {l0:>11.7f} {l1:>11.7f} {dl:>13.1e}")
    common.emit(dict(model=a.model, batch=a.batch, seq=a.seq, rows=[
        dict(method=m, variant=n, s_step=t, speedup=r, loss_first=l0, loss_last=l1, max_rel_dloss=dl)
        for m, n, t, r, l0, l1, dl in rows]))


if __name__ == "__main__":
    main()
