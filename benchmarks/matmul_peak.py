"""This machine's fp32 (or bf16) matmul peak, in JAX (jitted) and in PyTorch.

Each framework runs in its own subprocess (so thread pools do not compete); the peak is
the median GFLOP/s of ``n`` timed ``[m, k] @ [k, n]`` products after warm-up
(``2 * m * k * n`` FLOPs each)::

    python benchmarks/matmul_peak.py --size 2048 --repeats 10
    python benchmarks/matmul_peak.py --framework jax --json   # one number, for step_bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def jax_peak(size: int, repeats: int, dtype: str = "float32") -> float:
    """Median GFLOP/s of a jitted ``[size, size] @ [size, size]`` in JAX."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (size, size), jnp.float32).astype(dt)
    b = jax.random.normal(kb, (size, size), jnp.float32).astype(dt)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dt))
    f(a, b).block_until_ready()
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * size ** 3 / _median(times) / 1e9


def torch_peak(size: int, repeats: int, threads: int, dtype: str = "float32") -> float:
    """Median GFLOP/s of ``torch.mm`` on ``[size, size]`` operands with ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dt)
    b = torch.randn(size, size, generator=g).to(dt)
    with torch.no_grad():
        torch.mm(a, b)
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
    return 2.0 * size ** 3 / _median(times) / 1e9


def measure(framework: str, size: int = 2048, repeats: int = 10, threads: int = 2,
            dtype: str = "float32") -> float:
    """GFLOP/s of ``framework`` ('jax' | 'torch'), measured in a fresh subprocess."""
    cmd = [sys.executable, os.path.join(HERE, "matmul_peak.py"), "--framework", framework,
           "--size", str(size), "--repeats", str(repeats), "--threads", str(threads),
           "--dtype", dtype, "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["gflops"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--framework", choices=["jax", "torch", "both"], default="both")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", action="store_true", help="print one JSON line (this framework)")
    a = p.parse_args(argv)
    if a.framework == "both":
        for fw in ("jax", "torch"):
            g = measure(fw, a.size, a.repeats, a.threads, a.dtype)
            print(f"{fw:6s} {a.dtype} matmul {a.size}^3: {g:8.1f} GFLOP/s (median of {a.repeats})")
        return
    fn = jax_peak if a.framework == "jax" else (
        lambda s, r, d: torch_peak(s, r, a.threads, d))
    g = fn(a.size, a.repeats, a.dtype)
    if a.json:
        print(json.dumps({"framework": a.framework, "gflops": g, "size": a.size, "dtype": a.dtype}))
    else:
        print(f"{a.framework} {a.dtype} matmul {a.size}^3: {g:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
