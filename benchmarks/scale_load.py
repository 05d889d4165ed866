"""The large-model path on CPU: a ~1B Llama streamed into its shards and trained with LoRA.

Writes a random Llama with Llama-3.2-1B shapes (d 2048, 16 layers, 32 / 8 heads of 64,
d_ff 8192, vocab 128256, tied embeddings; 1.24B parameters) as bf16 safetensors in >= 4
shard files, then runs, each in a fresh process so that its peak RSS is its own:

- ``1x8``: one process, 8 fake CPU devices, mesh fsdp=8: streaming load
  (``models/streaming.py``; bf16 storage, scanned layers), then LoRA (r=8 on q/v) steps;
- ``2x4``: two ``jax.distributed`` processes on localhost with 4 devices each, the same
  mesh over all 8: each process reads only the rows its devices need;
- ``int8`` / ``fp32``: the same load with int8 kernels / fp32 storage (bytes, RSS);
- ``compile``: train-step compile time with ``scan_layers`` for 16 vs 2 layers (and the
  unscanned steps for contrast), lowered from abstract shapes (``scan_compile.py`` has the
  full table: 2/4/8/16 layers, LoRA and prompt tuning, Llama and T5).

Per load: peak RSS of the process (ru_maxrss), its RSS before loading, the bytes of its own
shards, the largest checkpoint tensor, and the target ``1.2 x shard bytes + largest
tensor`` (the increase over the pre-load RSS is what is compared); load, compile and step
times. ::

    python benchmarks/scale_load.py                        # all of it (~15-25 min on 2 cores)
    python benchmarks/scale_load.py --layers 4 --steps 2   # a quicker, smaller model
    python benchmarks/scale_load.py --only compile

Prints a table and one ``RESULT {json}`` line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

RUNS = ("1x8", "2x4", "int8", "fp32", "compile")


def config_for(layers: int):
    import dataclasses

    from gpu_llama1b import llama_config
    return dataclasses.replace(llama_config(False), num_layers=layers)


def write_checkpoint(folder: str, layers: int, shard_bytes: int, seed: int = 0) -> list[str]:
    """Random bf16 weights (N(0, 0.02); norms 1) as HF safetensors shards, one tensor at a time."""
    import ml_dtypes
    import numpy as np

    from peft_jax.models.hf_io import hf_shape, save_safetensors
    from peft_jax.models.llama import LLAMA

    config = config_for(layers)
    rng = np.random.default_rng(seed)

    def tensors():
        for _, name, kind, shape in LLAMA.layout(config):
            shape = hf_shape(kind, shape)
            if name.endswith("norm.weight"):
                yield name, np.ones(shape, ml_dtypes.bfloat16)
            else:
                yield name, (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    return save_safetensors(folder, tensors(), config.to_hf(), max_shard_bytes=shard_bytes)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def worker(a) -> dict:
    """One process of a run (see the module docstring); returns its measurements."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if a.processes > 1:
        from peft_jax.parallel import distributed
        distributed.initialize(f"127.0.0.1:{a.port}", a.processes, a.pid)
    import jax
    import numpy as np

    from peft_jax.models.hf_io import SafetensorsFolder
    from peft_jax.models.registry import load_pretrained
    from peft_jax.parallel.mesh import make_mesh

    mesh = make_mesh({"fsdp": a.devices * a.processes})
    src = SafetensorsFolder(a.folder)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    pre = load_pretrained(a.folder, with_tokenizer=False, mesh=mesh, scan_layers=True,
                          param_dtype=None if a.dtype == "auto" else a.dtype, quantize=a.quantize)
    jax.block_until_ready(pre.base)
    load_s = time.perf_counter() - t0
    peak = common.peak_rss_mb()
    leaves = jax.tree.leaves(pre.base)
    own = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
    out = dict(run=a.name, process=jax.process_index(), processes=jax.process_count(),
               devices=len(jax.local_devices()), load_s=load_s, rss_before_mb=rss0,
               peak_rss_mb=peak, shard_mb=own / 2 ** 20,
               base_mb=sum(x.nbytes for x in leaves) / 2 ** 20,
               largest_tensor_mb=max(src.nbytes(n) for n in src.names()) / 2 ** 20,
               files=len({src.file_of(n) for n in src.names()}))
    out["target_mb"] = 1.2 * out["shard_mb"] + out["largest_tensor_mb"]
    out["ok"] = bool(peak - rss0 <= out["target_mb"])
    if a.steps:
        out.update(train(pre, mesh, a))
    return out


def _lora_step(pre_family, config):
    """(model, loss, tx, jitted step maker) of a LoRA r=8 (q, v) causal-LM step."""
    import jax.numpy as jnp

    from peft_jax.models.slots import Slots
    from peft_jax.peft import LoRA, partition
    from peft_jax.peft.optim import GroupConfig, make_optimizer
    from peft_jax.train.losses import causal_lm_loss

    hp = common.MethodHParams()
    model = pre_family.build(config, Slots((LoRA(targets=r".*/attention/(query|value)",
                                                 rank=hp.lora_r, alpha=hp.lora_alpha),)),
                             dtype=jnp.bfloat16)  # bf16 compute, fp32 delta and optimizer

    def loss_fn(variables, b, rng, deterministic):
        logits = pre_family.apply(model, variables, b, deterministic=deterministic)["logits"]
        return causal_lm_loss(logits.astype(jnp.float32), b["input_ids"], b["attention_mask"]), {}

    def make_tx(trainable):
        return make_optimizer({"all": GroupConfig("adamw", hp.learning_rate)},
                              partition.label_tree(trainable, [(r".*", "all")]))

    return model, loss_fn, make_tx


def train(pre, mesh, a) -> dict:
    """LoRA steps on random tokens (the train state from the one builder): compile time
    (first call) and median step time."""
    import jax
    import numpy as np

    from peft_jax.parallel.mesh import shard_batch
    from peft_jax.peft import partition
    from peft_jax.train.builder import build_train_state
    from peft_jax.train.step import jit_train_step, make_train_step

    model, loss_fn, make_tx = _lora_step(pre.family, pre.config)
    rows = a.batch // jax.process_count()
    rng = np.random.default_rng(jax.process_index())
    host = {"input_ids": rng.integers(3, pre.config.vocab_size, (rows, a.seq)).astype(np.int32),
            "attention_mask": np.ones((rows, a.seq), np.int32)}
    ts = build_train_state(model, pre.base, model.slots.methods,
                           pre.family.init_inputs({k: v[:1, :4] for k, v in host.items()}),
                           jax.random.PRNGKey(1), make_tx, mesh=mesh)
    step = jit_train_step(make_train_step(loss_fn, ts.variables, ts.tx), ts.state_sh, ts.frozen_sh,
                          None)
    batch = shard_batch(host, mesh)
    state, metrics, (first,) = common.timed_steps(step, ts.state, ts.frozen, batch, 1)
    state, metrics, times = common.timed_steps(step, state, ts.frozen, batch, a.steps)
    med = common.median(times)
    return dict(compile_s=max(first - med, 0.0), step_s=med, loss=float(metrics["loss"]),
                tokens_per_step=a.batch * a.seq, peak_rss_after_train_mb=common.peak_rss_mb(),
                lora_params=partition.tree_size(state.trainable))


def compile_times(a) -> dict:
    """Train-step compile time from abstract shapes (no weights, no data): the runner's step
    (``scan_compile.py``: the one train-state builder, stacked under scan) lowered and
    compiled for 2 and 16 layers, scanned and unscanned, LoRA r=8 on a mesh fsdp=8."""
    from scan_compile import compile_time

    from peft_jax.parallel.mesh import make_mesh

    mesh = make_mesh({"fsdp": 8})
    out = {}
    for layers, scan in ((2, True), (16, True), (2, False), (16, False)):
        r = compile_time("llama", "lora", layers, scan, mesh, a.batch, a.seq)
        key = f"{'scan' if scan else 'loop'}_{layers}_s"
        out[key], out[key.replace("_s", "_cpu_s")] = r["total_s"], r["total_cpu_s"]
        print(f"[compile] {layers} layers, scan={scan}: {out[key]:.1f} s wall, "
              f"{r['total_cpu_s']:.1f} s CPU", flush=True)
    for kind in ("scan", "loop"):
        for unit, tag in (("s", ""), ("cpu_s", "_cpu")):
            out[f"{kind}_16_over_2{tag}"] = out[f"{kind}_16_{unit}"] / out[f"{kind}_2_{unit}"]
    return dict(run="compile", **out)


def _launch(a, name: str, processes: int, devices: int, dtype: str = "auto", quantize: str = "none",
            steps: int = 0) -> list[dict]:
    port = 12000 + os.getpid() % 3000
    cmds = [[sys.executable, os.path.abspath(__file__), "--worker", "--folder", a.folder,
             "--name", name, "--processes", str(processes), "--pid", str(i), "--port", str(port),
             "--devices", str(devices), "--dtype", dtype, "--quantize", quantize,
             "--steps", str(steps), "--seq", str(a.seq), "--batch", str(a.batch)]
            for i in range(processes)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    rows = []
    for p in procs:
        log = p.communicate(timeout=3600)[0]
        lines = [ln for ln in log.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise SystemExit(f"{name}: worker failed (exit {p.returncode})\n{log[-4000:]}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
    return rows


def table(rows: list[dict], compile_row: dict | None) -> str:
    head = (f"{'run':<6} {'proc':>4} {'dev':>3} {'load s':>7} {'RSS0 MB':>8} {'peak MB':>8} "
            f"{'shards MB':>9} {'largest MB':>10} {'target MB':>9} {'ok':>3} {'compile s':>9} "
            f"{'step s':>7} {'loss':>7}")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['run']:<6} {r['process']:>4} {r['devices']:>3} {r['load_s']:>7.1f} "
                   f"{r['rss_before_mb']:>8.0f} {r['peak_rss_mb']:>8.0f} {r['shard_mb']:>9.0f} "
                   f"{r['largest_tensor_mb']:>10.0f} {r['target_mb']:>9.0f} "
                   f"{'yes' if r['ok'] else 'NO':>3} {r.get('compile_s', float('nan')):>9.1f} "
                   f"{r.get('step_s', float('nan')):>7.1f} {r.get('loss', float('nan')):>7.3f}")
    by = {r["run"]: r["base_mb"] for r in rows if r["process"] == 0}
    if "fp32" in by:
        out.append("base bytes vs fp32: " + ", ".join(f"{k} {v / by['fp32']:.3f}x ({v:.0f} MB)"
                                                   for k, v in by.items()))
    if compile_row:
        c = compile_row
        for unit, tag, name in (("s", "", "wall"), ("cpu_s", "_cpu", "CPU (process time)")):
            out.append(f"train-step compile, {name}: scan 2 layers {c['scan_2_' + unit]:.1f} s, "
                       f"16 layers {c['scan_16_' + unit]:.1f} s ({c['scan_16_over_2' + tag]:.2f}x); "
                       f"unscanned 2 {c['loop_2_' + unit]:.1f} s, 16 {c['loop_16_' + unit]:.1f} s "
                       f"({c['loop_16_over_2' + tag]:.2f}x)")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--shard-mb", type=int, default=700, help="max bytes per safetensors file")
    p.add_argument("--folder", default="", help="checkpoint folder (default: a temp dir, removed)")
    p.add_argument("--only", default=",".join(RUNS), help=f"comma list of {RUNS}")
    # worker arguments
    p.add_argument("--worker", action="store_true")
    p.add_argument("--name", default="")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--pid", type=int, default=0)
    p.add_argument("--port", type=int, default=12345)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantize", default="none")
    a = p.parse_args(argv)
    # before JAX is imported: 8 fake CPU devices here, the workers set their own
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={a.devices} "
                               # 8 fake devices on a few busy cores: collectives can wait long
                               "--xla_cpu_collective_call_terminate_timeout_seconds=7200 "
                               "--xla_cpu_collective_timeout_seconds=7200 "
                               "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600")
    if a.worker:
        common.emit(worker(a))
        return
    only = [r.strip() for r in a.only.split(",") if r.strip()]
    rows, compile_row = [], None
    with tempfile.TemporaryDirectory(prefix="scale_load_") as tmp:
        a.folder = a.folder or os.path.join(tmp, "llama")
        if any(r != "compile" for r in only):
            if not os.path.isfile(os.path.join(a.folder, "config.json")):
                t0 = time.perf_counter()
                files = write_checkpoint(a.folder, a.layers, a.shard_mb * 2 ** 20)
                print(f"[write] {len(files)} files, {sum(os.path.getsize(f) for f in files) / 2 ** 30:.2f} "
                      f"GiB in {time.perf_counter() - t0:.0f} s", flush=True)
            plan = {"1x8": dict(processes=1, devices=8, steps=a.steps),
                    "2x4": dict(processes=2, devices=4, steps=a.steps),
                    "int8": dict(processes=1, devices=8, quantize="int8"),
                    "fp32": dict(processes=1, devices=8, dtype="float32")}
            for name in (r for r in RUNS if r in only and r != "compile"):
                got = _launch(a, name, **plan[name])
                rows += got
                for r in got:
                    print("RESULT " + json.dumps(r), flush=True)
        if "compile" in only:
            compile_row = compile_times(a)
            print("RESULT " + json.dumps(compile_row), flush=True)
    print(table(rows, compile_row), flush=True)


if __name__ == "__main__":
    main()
