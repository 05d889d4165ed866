"""How XLA:CPU's persistent-cache load time grows with program size, next to compile time.

A stack of ``L`` dense layers (``value_and_grad`` of an MLP, unrolled like an unscanned
model) is compiled in a fresh process with an empty cache, then loaded from the cache in a
second process; ``jax.monitoring`` gives the backend compile time (first process) and the
cache read + executable load time (second). One row per ``L``::

    python benchmarks/cache_load_scaling.py --layers 100,200,400
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import format_table  # noqa: E402


def worker(layers: int, cache: str) -> None:
    """Compile (or load) the ``layers``-deep program once; print ``RESULT {json}``."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    seconds = {}

    def on_duration(event: str, duration: float, **_) -> None:
        key = event.rsplit("/", 1)[-1]
        seconds[key] = seconds.get(key, 0.0) + duration

    jax.monitoring.register_event_duration_secs_listener(on_duration)

    def loss(ws, x):
        for w in ws:
            x = jax.nn.gelu(x @ w) + 0.1 * jnp.tanh(x)
            x = x / (1e-3 + jnp.linalg.norm(x, axis=-1, keepdims=True))
        return (x ** 2).sum()

    ws = [jnp.full((256, 256), 0.01) for _ in range(layers)]
    jax.jit(jax.value_and_grad(loss))(ws, jnp.ones((32, 256)))[0].block_until_ready()
    print("RESULT " + json.dumps({k: seconds.get(k, 0.0) for k in (
        "jaxpr_trace_duration", "backend_compile_duration", "cache_retrieval_time_sec")}))


def run(layers: int, cache: str) -> dict:
    # the worker sets the cache folder itself; a caller's JAX cache settings (e.g.
    # JAX_ENABLE_COMPILATION_CACHE=false left by peft_jax.compile_cache) must not reach it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE",
           "JAX_ENABLE_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env["JAX_PLATFORMS"] = "cpu"
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(layers),
                        "--cache", cache], capture_output=True, text=True, env=env)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"worker failed (L={layers}):\n{p.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="100,200,400")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cache", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker, a.cache)
        return 0
    rows = []
    for layers in [int(x) for x in a.layers.split(",")]:
        cache = tempfile.mkdtemp(prefix=f"cache_L{layers}_")
        cold, warm = run(layers, cache), run(layers, cache)
        rows.append({"L": layers, "compile": cold["backend_compile_duration"],
                     "load": warm["cache_retrieval_time_sec"], "trace": warm["jaxpr_trace_duration"],
                     "ratio": warm["cache_retrieval_time_sec"] / cold["backend_compile_duration"]})
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(format_table(rows, [("L", "layers", ""), ("compile", "XLA compile s", ".2f"),
                              ("load", "cache load s", ".2f"), ("ratio", "load / compile", ".2f"),
                              ("trace", "tracing s", ".2f")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
