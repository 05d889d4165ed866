"""Train-step compile time against depth, ``scan_layers`` on and off.

Issue 16's target: with ``model.scan_layers`` the train step of 16 layers compiles in at
most 1.3x the time of 2 layers. For each family (a random Llama with Llama-3.2-1B widths,
a random T5 with T5 v1.1-base widths), method (LoRA r=8 on query / value; prompt tuning,
20 tokens), scan on / off and depth (2, 4, 8, 16 layers; T5: that many encoder and decoder
layers), the runner's train step is built from abstract shapes (no weights, no data): the
train state from ``train.builder.build_train_state`` (stacked under scan), the optimizer of
``config.optim`` (AdamW, warmup, clipping), ``train.step`` with its health checks, sharded
on a mesh of fake CPU devices (default ``fsdp=8``). ``jit(...).lower(...).compile()`` is
timed: wall seconds and process CPU seconds (the machine may be shared; CPU time is the
steadier). One discarded compile first warms up XLA. ::

    python benchmarks/scan_compile.py                               # all (~10-20 min, 2 cores)
    python benchmarks/scan_compile.py --families llama --methods lora --devices 1

Prints one ``RESULT {json}`` line per compile, then the table (ratios to 2 layers of the
same family, method and scan setting).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

FAMILIES = ("llama", "t5")
METHODS = ("lora", "prompt")


def model_config(family: str, layers: int, scan: bool):
    """A random model's config: Llama-3.2-1B widths / T5 v1.1-base widths, ``layers`` deep."""
    if family == "llama":
        import sys
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from gpu_llama1b import llama_config
        return dataclasses.replace(llama_config(False), num_layers=layers, scan_layers=scan)
    from peft_jax.models.t5 import T5Config
    return T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_heads=12,
                    num_layers=layers, num_decoder_layers=layers, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, scale_decoder_outputs=False, scan_layers=scan)


def method_of(name: str):
    from peft_jax.peft import LoRA, PromptTuning
    return (LoRA(targets=r".*/(query|value)$", rank=8, alpha=16.0) if name == "lora"
            else PromptTuning(length=20))


def build_step(family: str, method: str, layers: int, scan: bool, mesh, batch: int, seq: int):
    """(jitted step, abstract state, abstract frozen tree, abstract batch)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from peft_jax.defaults import base_config
    from peft_jax.models import streaming
    from peft_jax.models.llama import LLAMA
    from peft_jax.models.t5 import T5
    from peft_jax.models.slots import Slots
    from peft_jax.parallel.mesh import batch_sharding
    from peft_jax.peft.optim import optimizer_from_config
    from peft_jax.train.builder import build_train_state
    from peft_jax.train.step import jit_train_step, make_train_step

    fam = {"llama": LLAMA, "t5": T5}[family]
    config = model_config(family, layers, scan)
    methods = (method_of(method),)
    model = fam.build(config, Slots(methods), dtype=jnp.bfloat16)   # bf16 compute, fp32 delta
    base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
                        nn.meta.unbox(streaming.abstract_base(fam, config)))
    shapes = {"input_ids": (batch, seq), "attention_mask": (batch, seq)}
    if fam.kind == "encoder_decoder":
        shapes["decoder_input_ids"] = (batch, 8)
    abstract_batch = {k: jax.ShapeDtypeStruct(v, jnp.int32) for k, v in shapes.items()}
    optim = base_config().optim
    ts = build_train_state(model, base, methods,
                           fam.init_inputs({k: jnp.ones((1, 4), jnp.int32) for k in shapes}),
                           jax.random.PRNGKey(0),
                           lambda tr: optimizer_from_config(optim, tr, methods, 1000),
                           mesh=mesh, abstract=True)

    def loss_fn(variables, b, rng, deterministic):
        logits = fam.apply(model, variables, b, deterministic=deterministic,
                           rngs={"dropout": rng})["logits"]
        labels = jnp.full(logits.shape[:-1], 7, jnp.int32)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels).mean(), {}

    step = jit_train_step(make_train_step(loss_fn, ts.variables, ts.tx), ts.state_sh,
                          ts.frozen_sh, batch_sharding(mesh))
    return step, ts.state, ts.frozen, abstract_batch


def compile_time(family: str, method: str, layers: int, scan: bool, mesh, batch: int,
                 seq: int) -> dict:
    step, state, frozen, b = build_step(family, method, layers, scan, mesh, batch, seq)
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = step.lower(state, frozen, b)
    t1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    return dict(family=family, method=method, layers=layers, scan=scan,
                lower_s=t1 - t0, compile_s=t2 - t1, compile_cpu_s=c2 - c1,
                total_s=t2 - t0, total_cpu_s=c2 - c0, hlo_lines=compiled.as_text().count("\n"))


def table(rows: list[dict]) -> str:
    head = (f"{'family':<6} {'method':<6} {'scan':<4} {'layers':>6} {'compile s':>9} "
            f"{'ratio':>6} {'CPU s':>7} {'ratio':>6} {'HLO lines':>9}")
    out = [head, "-" * len(head)]
    first = {}
    for r in rows:
        k = (r["family"], r["method"], r["scan"])
        first.setdefault(k, r)
        f = first[k]
        out.append(f"{r['family']:<6} {r['method']:<6} {'on' if r['scan'] else 'off':<4} "
                   f"{r['layers']:>6} {r['total_s']:>9.1f} {r['total_s'] / f['total_s']:>6.2f} "
                   f"{r['total_cpu_s']:>7.1f} {r['total_cpu_s'] / f['total_cpu_s']:>6.2f} "
                   f"{r['hlo_lines']:>9}")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--layers", default="2,4,8,16")
    p.add_argument("--scan", default="on,off", help="on, off or both (comma list)")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices, mesh fsdp=N")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    a = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={a.devices}")
    from peft_jax.parallel.mesh import make_mesh

    mesh = make_mesh({"fsdp": a.devices})
    families = [f for f in a.families.split(",") if f]
    methods = [m for m in a.methods.split(",") if m]
    depths = [int(x) for x in a.layers.split(",") if x]
    scans = [s == "on" for s in a.scan.split(",") if s]
    compile_time(families[0], methods[0], depths[0], scans[0], mesh, a.batch, a.seq)  # warm-up
    rows = []
    for family in families:
        for method in methods:
            for scan in scans:
                for layers in depths:
                    r = compile_time(family, method, layers, scan, mesh, a.batch, a.seq)
                    r["devices"] = a.devices
                    rows.append(r)
                    print("RESULT " + json.dumps(r), flush=True)
    print(table(rows), flush=True)


if __name__ == "__main__":
    main()
