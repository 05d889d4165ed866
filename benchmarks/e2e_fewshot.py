"""End to end, one few-shot protocol, two stacks: transformers + HF PEFT (PyTorch) and
peft_jax, wall time and accuracy side by side in one table.

The protocol is ``peft-jax fewshot --method head`` on all-MiniLM-L6-v2 (LoRA r 8 on query
and value + a linear head on mean-pooled states; LM-BFF 16-shot ``train-<seed>``, dev
``dev-<seed>`` every ``--eval-every`` steps, the best dev step tested on the test subset)
over the 5 LM-BFF seeds, with the CLI's default budget (``fewshot.methods.Budget``)::

    python benchmarks/e2e_fewshot.py --out benchmarks/results/e2e_fewshot.md

1. This process builds the protocol with peft_jax's own data loading (``runner.session.setup``
   per seed: the training batches of every step, the dev set, the test subset) and writes
   the rows as ``[text, label]`` for the torch worker (not timed: neither stack pays it).
2. ``e2e_torch.py`` and ``e2e_jax.py`` run back to back, each in its own process; a stack's
   wall time runs from its launch (interpreter start, imports, model load, data encoding,
   compilation, training, evaluation) to its last result. Torch runs once per
   ``--torch-threads`` value (default: its own default and 1 thread; "x torch" is relative to
   the fastest torch row, so a badly oversubscribed default cannot flatter peft_jax).
   peft_jax's compilation cache is a fresh folder (a first run); ``--warm`` adds a second
   peft_jax run on the now-filled cache (what ``peft-jax fewshot`` costs the second time,
   cache in ``~/.cache``).
3. Both workers report the content ids (``common.example_id``: label + token ids) of every
   training batch, the dev set and the test subset; "same data" is checked against the
   protocol per seed, so equal ids mean equal examples, batches, order and tokens.

Hyper-parameters come from peft_jax's run config (``method_config``), so the torch side
trains the same thing: LoRA rank / alpha / dropout / targets, head dropout, AdamW (lr, betas,
eps, weight decay) with global clipping, batch size, steps, eval cadence, max length.
Other options of the config that the torch worker does not implement stop the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import e2e_jax  # noqa: E402

TORCH, JAX, JAX_WARM = "torch + HF PEFT", "peft_jax", "peft_jax, 2nd run (warm compile cache)"
JAX_VEC, JAX_VEC_WARM = "peft_jax --vectorize", "peft_jax --vectorize, 2nd run (warm compile cache)"
# what the torch worker implements (anything else in the run config stops the script)
SUPPORTED = {"peft.methods": "head,lora", "model.pooling": "mean", "peft.lora.init_a": "kaiming",
             "peft.lora.use_rslora": False, "peft.lora.targets": r".*/(query|value)$",
             "peft.head.hidden": False, "optim.optimizer": "adamw", "optim.schedule": "constant",
             "optim.warmup_steps": 0, "optim.head_lr": 0.0, "task.format": "classification",
             "train.grad_accum": 1}


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def hparams(cfg) -> dict:
    """What the torch worker needs of a peft_jax run config."""
    from peft_jax.peft.optim import GroupConfig
    bad = {k: _get(cfg, k) for k, v in SUPPORTED.items() if _get(cfg, k) != v}
    if bad:
        raise SystemExit(f"e2e_fewshot: the torch worker implements {SUPPORTED}; the run config "
                         f"has {bad}")
    g = GroupConfig()
    return dict(batch_size=cfg.train.batch_size, steps=cfg.train.steps,
                eval_every=cfg.train.eval_every, eval_batch_size=cfg.train.eval_batch_size,
                max_length=cfg.task.max_length, lr=cfg.optim.lr, b1=g.b1, b2=g.b2, eps=g.eps,
                weight_decay=cfg.optim.weight_decay, clip_norm=cfg.optim.clip_norm,
                lora_rank=cfg.peft.lora.rank, lora_alpha=cfg.peft.lora.alpha,
                lora_dropout=cfg.peft.lora.dropout, lora_targets=["query", "value"],
                head_dropout=cfg.peft.head.dropout, head_init_std=0.02)


def build_protocol(task: str, model: str, seeds: list, budget, workdir: str) -> tuple[dict, dict]:
    """(the torch worker's protocol file content, the expected content ids per seed), from
    peft_jax's own data path (``setup`` of each seed's ``fewshot --method head`` config)."""
    from peft_jax.fewshot.methods import method_config
    from peft_jax.models.registry import load_pretrained, resolve
    from peft_jax.runner.data import load_examples, training_examples
    from peft_jax.runner.session import setup

    pre = load_pretrained(model)
    proto = {"task": task, "model_folder": resolve(model), "seeds": []}
    expected = {}
    for seed in seeds:
        cfg = method_config("head", task, seed, model, budget, os.path.join(workdir, "protocol"))
        s = setup(cfg, pre)
        (field,) = s.exp.task.text_fields   # single-sentence tasks
        rows = lambda ex: [[e[field], int(e["label"])] for e in ex]
        train_ex = training_examples(s.exp)
        steps = []
        for k in range(cfg.train.steps):
            b = s.batches._batch(k)   # what step k + 1 consumes
            steps.append(rows([train_ex[r] for r in b["row"][b["example_mask"] > 0]]))
        proto["seeds"].append({
            "seed": seed, "train": steps,
            "dev": rows(load_examples(s.exp, cfg.task.eval_split, cfg.task.max_eval_examples, seed)),
            "test": rows(load_examples(s.exp, cfg.task.test_split, cfg.task.max_test_examples, seed))})
        expected[seed] = e2e_jax.used_ids(s, cfg)
        proto["hparams"], proto["num_labels"] = hparams(cfg), s.exp.task.num_labels
        proto["train_size"] = len(train_ex)
    return proto, expected


def protocol_notes(proto: dict) -> str:
    """What the protocol's data are: distinct training examples the steps use per seed, and
    how many test sentences each seed's subset shares with the first seed's."""
    first = {tuple(r) for r in proto["seeds"][0]["test"]}
    used = [len({tuple(r) for step in sp["train"] for r in step}) for sp in proto["seeds"]]
    shared = [len(first & {tuple(r) for r in sp["test"]}) for sp in proto["seeds"]]
    return (f"Data (peft_jax's): distinct training examples the steps use, per seed: "
            f"{', '.join(map(str, used))} (of {proto['train_size']} per seed); test sentences "
            f"shared with seed {proto['seeds'][0]['seed']}'s subset: {', '.join(map(str, shared))}.")


def run_worker(script: str, args: list, timeout: float) -> dict:
    """Launch a worker; its ``wall_s`` runs from the launch to its last result."""
    t0 = time.time()
    res = common.run_script(script, args, timeout)
    if "marks" in res:
        res["launch"] = t0
        res["wall_s"] = res["marks"]["end"] - t0
    return res


def same_ids(res: dict, expected: dict) -> dict:
    """Per part (train / dev / test): do all seeds' ids equal the protocol's?"""
    out = {}
    for part in ("train", "dev", "test"):
        out[part] = all(r["ids"][part] == expected[r["seed"]][part] for r in res["seeds"])
    return out


def summarize(name: str, res: dict, expected: dict) -> dict:
    if res.get("error"):
        return {"stack": name, "error": res["error"]}
    acc = np.asarray([r["test_accuracy"] for r in res["seeds"]], np.float64)
    m = res["marks"]
    row = {"stack": name, "seeds": len(acc), "acc_mean": float(acc.mean()),
           "acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else float("nan"),
           "wall_s": res["wall_s"], "startup_s": m["start"] - res["launch"],
           "imports_s": m["imports"] - m["start"], "load_s": m["load"] - m["imports"],
           "seeds_s": m["end"] - m["load"], "same": same_ids(res, expected),
           "per_seed": res["seeds"], "phases": res.get("phases", {}),
           "peak_rss_mb": res.get("peak_rss_mb"), "threads": res.get("threads")}
    return row


def add_speedups(rows: list) -> None:
    """``x_torch``: the fastest torch row's wall time over the row's."""
    torch_walls = [r["wall_s"] for r in rows if r["stack"].startswith(TORCH) and not r.get("error")]
    for r in rows:
        if torch_walls and not r.get("error"):
            r["x_torch"] = min(torch_walls) / r["wall_s"]


def _pct(x: float) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def table(rows: list) -> str:
    out = ["| stack | seeds | test accuracy, mean (std) | wall s | x torch | same data (train/dev/test) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['stack']} | - | - | - | - | error: {r['error']} |")
            continue
        same = "/".join("yes" if r["same"][p] else "NO" for p in ("train", "dev", "test"))
        out.append(f"| {r['stack']} | {r['seeds']} | {_pct(r['acc_mean'])} ({_pct(r['acc_std'])}) "
                   f"| {r['wall_s']:.1f} | {r.get('x_torch', float('nan')):.2f} | {same} |")
    return "\n".join(out)


def phase_table(rows: list) -> str:
    """Where each stack's wall time goes."""
    out = ["| stack | startup s | imports s | model load s | seeds s | of which |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            continue
        ph = r["phases"]
        if "train_s" in ph:   # torch
            detail = (f"encode {ph['encode_s']:.1f}, LoRA + head build {ph['build_s']:.1f}, "
                      f"train steps {ph['train_s']:.1f}, dev evals {ph['dev_s']:.1f}, "
                      f"test {ph['test_s']:.1f}")
        else:
            loop = sum(s["train_loop_s"] for s in r["per_seed"])
            comp = {k: ph.get(k, 0.0) for k in ("trace_s", "lower_s", "xla_compile_s", "cache_read_s")}
            per = [f"{s['wall_s']:.0f} ({sum(v for k, v in s['compile'].items() if k != 'cache_hits'):.0f})"
                   for s in r["per_seed"]]
            detail = (f"train loop (steps, dev evals, checkpoints) {loop:.1f}; rest of the runs "
                      f"(setup, encode, test, save) {r['seeds_s'] - loop:.1f}; compilation inside "
                      f"both: trace {comp['trace_s']:.1f} + lower {comp['lower_s']:.1f} + XLA "
                      f"{comp['xla_compile_s']:.1f} + cache reads {comp['cache_read_s']:.1f} "
                      f"({int(ph.get('cache_hits', 0))} hits); per seed: {', '.join(per)}")
        out.append(f"| {r['stack']} | {r['startup_s']:.1f} | {r['imports_s']:.1f} | {r['load_s']:.1f} "
                   f"| {r['seeds_s']:.1f} | {detail} |")
    return "\n".join(out)


def seed_table(rows: list) -> str:
    """Per seed and stack: selected step, dev and test accuracy."""
    ok = [r for r in rows if not r.get("error")]
    head = "| seed | " + " | ".join(f"{r['stack']}: step, dev, test" for r in ok) + " |"
    out = [head, "|---|" + "---|" * len(ok)]
    for i, s in enumerate(ok[0]["per_seed"] if ok else []):
        cells = []
        for r in ok:
            x = r["per_seed"][i]
            cells.append(f"{x['selected_step']}, {_pct(x['dev_accuracy'])}, {_pct(x['test_accuracy'])}")
        out.append(f"| {s['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "(uptime unavailable)"


def main(argv=None) -> int:
    from peft_jax.data.builtin import LMBFF_SEEDS
    from peft_jax.fewshot.methods import Budget

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="lmbff/sst2")
    p.add_argument("--model", default="minilm")
    p.add_argument("--seeds", default=",".join(str(s) for s in LMBFF_SEEDS))
    for f in ("steps", "lr", "batch_size", "eval_every", "test_examples", "max_length"):
        default = Budget.__dataclass_fields__[f].default
        p.add_argument("--" + f.replace("_", "-"), type=type(default), default=default)
    p.add_argument("--stacks", default="torch,jax",
                   help="comma list of torch, jax, jax_vectorized (the seeds as one program: "
                        "`fewshot --vectorize`, its own compile cache)")
    p.add_argument("--warm", action="store_true", help="add a 2nd peft_jax run (warm cache)")
    p.add_argument("--torch-threads", default="0,1",
                   help="comma list: one torch row per thread count (0: torch's default); "
                        "on a loaded machine torch's default threads can be far slower than 1")
    p.add_argument("--workdir", default="", help="default: a temporary folder")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default="", help="also write the tables (markdown) here")
    p.add_argument("--json", default="", help="also write the raw results (ids included) here")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    stacks = [s.strip() for s in a.stacks.split(",") if s.strip()]
    budget = Budget(**{f: getattr(a, f) for f in ("steps", "lr", "batch_size", "eval_every",
                                                   "test_examples", "max_length")})
    workdir = a.workdir or tempfile.mkdtemp(prefix="e2e_fewshot_")
    os.makedirs(workdir, exist_ok=True)
    load_before = uptime()
    t = time.time()
    proto, expected = build_protocol(a.task, a.model, seeds, budget, workdir)
    proto_path = os.path.join(workdir, "protocol.json")
    with open(proto_path, "w") as f:
        json.dump(proto, f)
    proto_s = time.time() - t
    print(f"protocol (peft_jax data loading, not timed): {proto_s:.1f}s -> {proto_path}", flush=True)

    results = {}
    threads = [int(x) for x in a.torch_threads.split(",") if x.strip()]
    for n in (threads if "torch" in stacks else []):
        res = run_worker("e2e_torch.py", ["--protocol", proto_path, "--threads", str(n)], a.timeout)
        got = res.get("threads", n)
        name = TORCH if len(threads) == 1 else f"{TORCH} ({got} thread{'s' * (got != 1)})"
        results[name] = res
    jax_args = ["--task", a.task, "--model", a.model, "--seeds", ",".join(map(str, seeds)),
                "--budget", json.dumps(dataclasses.asdict(budget))]
    # stack -> (row name, warm row name, folder prefix, extra flags); each its own compile cache
    variants = {"jax": (JAX, JAX_WARM, "jax", []),
                "jax_vectorized": (JAX_VEC, JAX_VEC_WARM, "jax_vec", ["--vectorize"])}
    for stack, (name, warm_name, prefix, flags) in variants.items():
        if stack not in stacks:
            continue
        args = jax_args + flags + ["--compile-cache", os.path.join(workdir, f"xla_cache_{prefix}")]
        for row, run in ((name, prefix), (warm_name, f"{prefix}_warm"))[:2 if a.warm else 1]:
            results[row] = run_worker("e2e_jax.py", args + ["--workdir", os.path.join(workdir, run)],
                                      a.timeout)
    load_after = uptime()

    rows = [summarize(name, res, expected) for name, res in results.items()]
    add_speedups(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": results, "expected": expected, "rows": rows}, f)
    hp = proto["hparams"]
    text = "\n".join([
        f"# End to end few-shot: {a.task}, {a.model}, LoRA r {hp['lora_rank']} + head "
        f"(`peft-jax fewshot --method head`)", "",
        f"Command: `python benchmarks/e2e_fewshot.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        f"Protocol: seeds {','.join(map(str, seeds))}; {hp['steps']} steps of batch "
        f"{hp['batch_size']}, dev every {hp['eval_every']}, best dev step tested on "
        f"{len(proto['seeds'][0]['test'])} test sentences; max length {hp['max_length']}; "
        f"AdamW lr {hp['lr']}, clip {hp['clip_norm']}; LoRA alpha {hp['lora_alpha']}.",
        protocol_notes(proto),
        f"Load before: `{load_before}`", f"Load after: `{load_after}`", "",
        table(rows), "",
        "x torch: the (fastest) torch row's wall time over the row's. Same data: every training "
        "batch, the dev set and the test subset have the protocol's content ids (label + token "
        "ids) in every seed.", "",
        "Where the time goes (seconds; peft_jax per seed: wall (compilation)):", "",
        phase_table(rows), "",
        "Per seed (selected step, dev accuracy, test accuracy, x100):", "", seed_table(rows), "",
    ])
    print(text, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0 if all(not r.get("error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
