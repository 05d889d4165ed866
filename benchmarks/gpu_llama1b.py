"""LoRA and prompt tuning of a ~1B Llama (random weights) on accelerators: step time and MFU.

Llama-3.2-1B shapes (d 2048, 16 layers, 32 heads / 8 kv heads of 64, d_ff 8192, vocab
128256, tied embeddings), random fp32 base initialized directly on the devices with the
shardings of :mod:`peft_jax.parallel.mesh` (FSDP/tensor rules; batch over ``data``),
bf16 compute, causal-LM loss on random tokens, AdamW on the delta only, state donated,
one compilation per shape. Prints one line per method and a ``RESULT {json}`` line.

On one H200 (the prepared device check; ~3 min incl. compiles)::

    python benchmarks/gpu_llama1b.py --methods lora,prompt --batch 16 --seq 1024 --steps 10

``--tiny``: a 2-layer toy config for a CPU smoke test. MFU = analytic matmul FLOPs per
step (``common.step_flops``: forward + backward-data + trainable weight gradients; the
frozen base has no weight gradients) / step time / (devices x ``--peak-tflops``; default
by device kind: H100/H200 989, A100 312 bf16 dense TFLOP/s; CPU: measured matmul peak).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PEAK_TFLOPS = {"h200": 989.0, "h100": 989.0, "a100": 312.0, "l4": 121.0, "v5e": 197.0,
               "v5p": 459.0, "v4": 275.0}


def llama_config(tiny: bool):
    from peft_jax.models.llama import LlamaConfig
    from peft_jax.models.rope import RopeConfig

    if tiny:
        return LlamaConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=16, d_ff=128, max_position_embeddings=256,
                           tie_word_embeddings=True, rope=RopeConfig(theta=500000.0))
    return LlamaConfig(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32,
                       num_kv_heads=8, head_dim=64, d_ff=8192, rms_norm_eps=1e-5,
                       max_position_embeddings=131072, tie_word_embeddings=True,
                       rope=RopeConfig(theta=500000.0))


def spec_of(config) -> dict:
    return dict(kind="decoder", d=config.d_model, layers=config.num_layers,
                heads=config.num_heads, kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                d_ff=config.d_ff, vocab=config.vocab_size, tied=True, num_labels=2)


def peak_tflops(arg: float) -> float:
    import jax

    if arg > 0:
        return arg
    kind = jax.devices()[0].device_kind.lower()
    for k, v in PEAK_TFLOPS.items():
        if k in kind:
            return v
    if jax.devices()[0].platform == "cpu":
        import matmul_peak
        return matmul_peak.measure("jax", 1024, 3) / 1e3
    return float("nan")


def init_base(model, config, mesh, seq: int):
    """Random base params created on the devices, sharded by the logical-axis rules."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from peft_jax.parallel.mesh import logical_axes_tree, shardings_for

    ids = jnp.ones((1, min(seq, 8)), jnp.int32)
    init = lambda k: nn.meta.unbox(model.init(k, ids)["params"])
    boxed = jax.eval_shape(lambda k: model.init(k, ids)["params"], jax.random.PRNGKey(0))
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    sh = shardings_for(abstract, mesh, logical_axes_tree(boxed))
    return jax.jit(init, out_shardings=sh)(jax.random.PRNGKey(0)), sh


def run_method(method: str, a, config, mesh) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from peft_jax import peft as pj
    from peft_jax.models.llama import LlamaModel
    from peft_jax.models.slots import Slots
    from peft_jax.parallel.mesh import shard_batch
    from peft_jax.peft import partition
    from peft_jax.peft.optim import GroupConfig, make_optimizer
    from peft_jax.train.builder import build_train_state
    from peft_jax.train.losses import causal_lm_loss
    from peft_jax.train.loop import compile_count
    from peft_jax.train.step import jit_train_step, make_train_step
    from jax_worker import remat_wrap

    hp = common.MethodHParams()
    m = (pj.LoRA(targets=r".*/attention/(query|value)", rank=hp.lora_r, alpha=hp.lora_alpha)
         if method == "lora" else pj.PromptTuning(length=hp.num_virtual_tokens))
    dtype = jnp.bfloat16 if a.dtype == "bf16" else jnp.float32
    plain = LlamaModel(config=config, dtype=dtype)
    model = LlamaModel(config=config, slots=Slots((m,)), dtype=dtype)
    base, _ = init_base(plain, config, mesh, a.seq)
    rng = np.random.default_rng(0)
    host = {"input_ids": rng.integers(3, config.vocab_size, (a.batch, a.seq)).astype(np.int32),
            "attention_mask": np.ones((a.batch, a.seq), np.int32)}
    make_tx = lambda tr: make_optimizer({"all": GroupConfig("adamw", hp.learning_rate)},
                                        partition.label_tree(tr, [(r".*", "all")]))
    ts = build_train_state(model, base, (m,), {k: jnp.asarray(v[:1]) for k, v in host.items()},
                           jax.random.PRNGKey(1), make_tx, mesh=mesh)
    state, frozen = ts.state, ts.frozen

    def loss_fn(variables, batch, rng_, deterministic):
        fwd = remat_wrap(lambda v, i, msk: model.apply(v, i, msk, deterministic=deterministic,
                                                       rngs={"dropout": rng_})["logits"], a.remat)
        logits = fwd(variables, batch["input_ids"], batch["attention_mask"])
        n_ins = logits.shape[1] - batch["input_ids"].shape[1]
        return causal_lm_loss(logits[:, n_ins:], batch["input_ids"], batch["attention_mask"]), {}

    step = jit_train_step(make_train_step(loss_fn, ts.variables, ts.tx), ts.state_sh, ts.frozen_sh,
                          None)
    batch = shard_batch(host, mesh)
    state, metrics, (first,) = common.timed_steps(step, state, frozen, batch, 1)
    after_first = compile_count(step)
    state, metrics, times = common.timed_steps(step, state, frozen, batch, a.warmup - 1 + a.steps)
    times = times[a.warmup - 1:]
    med = common.median(times)
    flops = common.step_flops(spec_of(config), method, hp, a.batch, a.seq)
    n_dev = mesh.devices.size
    peak = a.peak_tflops
    return dict(method=method, step_s=med, tokens_per_s=a.batch * a.seq / med,
                tflops=flops / med / 1e12, mfu=flops / med / 1e12 / (peak * n_dev),
                compile_s=max(first - med, 0.0), recompiles_after_first=compile_count(step) - after_first,
                loss=float(metrics["loss"]), trainable_params=partition.tree_size(ts.state.trainable),
                base_params=partition.tree_size(base), devices=n_dev,
                device_kind=jax.devices()[0].device_kind, peak_tflops_per_device=peak)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="lora,prompt")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    p.add_argument("--mesh", default="data=-1",
                   help="mesh axis sizes, e.g. 'data=-1' or 'data=2,fsdp=4' (peft_jax.parallel.mesh)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="per device; 0: by device kind")
    p.add_argument("--tiny", action="store_true", help="2-layer toy config (CPU smoke test)")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    a = p.parse_args(argv)
    a.warmup = max(a.warmup, 1)
    if a.tiny:
        a.batch, a.seq, a.steps = min(a.batch, 4), min(a.seq, 32), min(a.steps, 2)

    import jax
    from peft_jax.parallel.mesh import make_mesh

    shape = {k: int(v) for k, v in (kv.split("=") for kv in a.mesh.split(",") if kv)}
    mesh = make_mesh(shape)
    config = llama_config(a.tiny)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; mesh {dict(mesh.shape)}; "
          f"batch {a.batch} x seq {a.seq}; {a.dtype}; remat {a.remat}", flush=True)
    a.peak_tflops = peak_tflops(a.peak_tflops)
    results = []
    for method in [x for x in a.methods.split(",") if x]:
        if method not in ("lora", "prompt"):
            p.error(f"--methods: unknown {method!r}; known: ['lora', 'prompt']")
        r = run_method(method, a, config, mesh)
        results.append(r)
        print(f"{method:7s} {r['step_s']:.4f} s/step  {r['tokens_per_s']:.0f} tok/s  "
              f"{r['tflops']:.1f} TFLOP/s  MFU {r['mfu']:.1%}  compile {r['compile_s']:.1f}s  "
              f"recompiles {r['recompiles_after_first']}  loss {r['loss']:.3f}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    common.emit({"results": results})


if __name__ == "__main__":
    main()
