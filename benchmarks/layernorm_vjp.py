"""LayerNorm (and GELU) backward: JAX autodiff vs a hand-written ``jax.custom_vjp`` on
XLA:CPU: the same train step compiled each way in one process, timed alternately.

``peft_jax.models.layers.LayerNorm`` (non-RMS) calls ``layers.layer_norm`` and the ``gelu``
activation calls ``layers.gelu_erf``. This script rebinds them (monkeypatching, here only),
while one copy of the step is traced and compiled, to

- ``autodiff``: ``layer_norm_autodiff`` + ``gelu_erf`` (the forms differentiated by JAX),
- ``vjp``, ``vjp_res``, ``vjp_dx``, ``vjp_both``: ``layer_norm`` with ``fence`` = none / res /
  dx / both (a ``lax.cond`` fusion fence on the saved ``xhat, rstd`` and/or on ``dx``; ``dx``
  is the default on CPU),
- ``vjp_dx+gelu``: ``vjp_dx`` + :func:`gelu_erf_vjp` below (closed-form GELU derivative),

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import jax_worker  # noqa: E402
import prepare as prep  # noqa: E402
from step_bench import ensure_prepared  # noqa: E402

def gelu_erf_vjp(x, plain):
    """``plain`` (``layers.gelu_erf``) with the closed-form derivative ``Phi(x) + x * phi(x)``
    as backward."""
    import math

    import jax

    @jax.custom_vjp
    def f(x):
        return plain(x)

    def bwd(x, dy):
        xf = x.astype("float32")
        cdf = 0.5 * (1.0 + jax.lax.erf(xf * (1.0 / math.sqrt(2.0))))
        pdf = jax.numpy.exp(-0.5 * xf * xf) * (1.0 / math.sqrt(2.0 * math.pi))
        return ((dy.astype("float32") * (cdf + xf * pdf)).astype(dy.dtype),)

    f.defvjp(lambda x: (f(x), x), bwd)
    return f(x)


VARIANTS = {  # name -> (LayerNorm core: "autodiff" or a fence, GELU: "autodiff" | "vjp")
    "autodiff": ("autodiff", "autodiff"),
    "vjp": ("none", "autodiff"),
    "vjp_res": ("res", "autodiff"),
    "vjp_dx": ("dx", "autodiff"),
    "vjp_both": ("both", "autodiff"),
    "vjp_dx+gelu": ("dx", "vjp"),
}


@contextlib.contextmanager
def variant(name: str):
    """Inside: ``layers.layer_norm`` / ``layers.gelu_erf`` are the variant's functions."""
    import functools

    from peft_jax.models import layers

    ln, gelu = VARIANTS[name]
    saved = layers.layer_norm, layers.gelu_erf
    layers.layer_norm = (layers.layer_norm_autodiff if ln == "autodiff"
                         else functools.partial(saved[0], fence=ln))
    if gelu == "vjp":
        layers.gelu_erf = functools.partial(gelu_erf_vjp, plain=saved[1])
    try:
        yield
    finally:
        layers.layer_norm, layers.gelu_erf = saved


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
    names = a.variants.split(",")
    base = names[0]
    folder = os.path.join(a.cache_dir, a.model)
    ensure_prepared(a.model, folder, max(a.batch, 64), False, a.data_dir)
    spec = prep.load_spec(folder)
    host = jax_worker.fixed_batch(folder, a.batch, a.seq, spec["pad_id"])
    load0 = os.getloadavg()[0]
    rows = []
    for method in a.methods.split(","):
        runs = {n: jax_worker.compiled_step(folder, method, host, variant(n)) for n in names}
        med, losses = jax_worker.time_in_turns(runs, a.steps)
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
