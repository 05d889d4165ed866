"""``peft-jax probe``: layer-wise probes on a frozen model, a per-layer table and a plot.

    peft-jax probe --model minilm --task sst2,trec,surface:length,surface:wc \\
        --readout mean,answer --probe linear,mlp --out runs/probe/minilm

Tasks: any ``peft_jax.data`` task name (text fields joined; ``train``/``dev``/``test`` splits
where the task has them, otherwise disjoint seeded draws), ``lmbff/<task>@<seed>`` (the
LM-BFF few-shot split of that seed: ``train-<seed>``, ``dev-<seed>``, a fixed test subset),
and the surface tasks ``surface:length`` / ``surface:wc`` built from ``--surface-text``.
Writes ``probe.json`` (every curve), ``probe.md`` (the table: one row per layer) and
``probe.png`` (accuracy per layer) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from peft_jax.probing.surface import SURFACE_TASKS, ProbeTask, surface_task

SIZES = {"train": 1000, "dev": 200, "test": 500}


def _texts(task, examples) -> list[str]:
    return [" ".join(str(ex[f]) for f in task.text_fields) for ex in examples]


def downstream_task(name: str, sizes: dict, seed: int = 0,
                    data_dir: Optional[str] = None) -> ProbeTask:
    """A registry task as a :class:`ProbeTask` (see the module docstring)."""
    from peft_jax.data import get_task
    from peft_jax.fewshot.protoverb_frozen import fixed_subset

    base, _, fs_seed = name.partition("@")
    task = get_task(base)
    rng = np.random.default_rng(seed)
    if fs_seed:
        parts = {"train": task.load(f"train-{fs_seed}", data_dir),
                 "dev": task.load(f"dev-{fs_seed}", data_dir),
                 "test": fixed_subset(task.load("test", data_dir), sizes["test"])}
    else:   # each split from itself, else carved disjointly out of train (or the only split)
        have = list(task.splits)
        source = {sp: sp if sp in have else ("train" if "train" in have else have[0])
                  for sp in ("train", "dev", "test")}
        parts = {}
        for src in dict.fromkeys(source.values()):
            exs = task.load(src, data_dir)
            order, start = rng.permutation(len(exs)), 0
            for sp in (x for x in ("train", "dev", "test") if source[x] == src):
                parts[sp] = [exs[i] for i in np.sort(order[start:start + sizes[sp]])]
                start += sizes[sp]
    splits = {k: (_texts(task, v), np.asarray([ex["label"] for ex in v])) for k, v in parts.items()}
    return ProbeTask(name, tuple(task.label_names), splits)


def load_probe_task(name: str, sizes: dict, surface_text: str, seed: int = 0) -> ProbeTask:
    if name.startswith("surface:"):
        kind = name.split(":", 1)[1]
        if kind not in SURFACE_TASKS:
            raise ValueError(f"--task {name}: surface tasks are {['surface:' + k for k in SURFACE_TASKS]}")
        from peft_jax.data import get_task
        src, _, split = surface_text.partition(":")
        t = get_task(src)
        texts = _texts(t, t.load(split or t.splits[0]))
        return surface_task(kind, texts, sizes, seed)
    return downstream_task(name, sizes, seed)


def probe_model(pre, tasks: Sequence[ProbeTask], readouts: Sequence[str], kinds: Sequence[str],
                template: Optional[str] = None, max_length: int = 64, batch_size: int = 32,
                seed: int = 0, log=print) -> list[dict]:
    """Every (task, readout, probe kind) curve on a loaded model: rows with
    ``test_accuracy [L + 1]`` etc. (:func:`peft_jax.probing.probes.run_probes`)."""
    from peft_jax.probing.features import layer_features
    from peft_jax.probing.probes import ProbeConfig, majority_baseline, run_probes

    out = []
    for task in tasks:
        for readout in readouts:
            t0 = time.time()
            feats = {s: layer_features(pre, texts, readout, template, max_length, batch_size)
                     for s, (texts, _) in task.splits.items()}
            embed_s = time.time() - t0
            for kind in kinds:
                t1 = time.time()
                res = run_probes((feats["train"], task.splits["train"][1]),
                                 (feats["test"], task.splits["test"][1]), task.num_classes,
                                 ProbeConfig(kind=kind, seed=seed),
                                 dev=(feats["dev"], task.splits["dev"][1]) if "dev" in feats else None)
                row = {"task": task.name, "readout": readout, "probe": kind, **res,
                       "majority": majority_baseline(task.splits["train"][1], task.splits["test"][1]),
                       "sizes": {s: len(v[1]) for s, v in task.splits.items()},
                       "features_s": embed_s, "probe_s": time.time() - t1}
                out.append(row)
                curve = " ".join(f"{100 * a:.0f}" for a in res["test_accuracy"])
                log(f"[probe] {task.name} {readout} {kind}: best layer {res['best_layer']} "
                    f"({100 * res['best_test_accuracy']:.1f}); per layer {curve}")
    return out


def table(rows: Sequence[dict]) -> str:
    """Markdown: one row per layer, one column per (task, readout, probe); test accuracy x100
    (the dev-selected best layer in bold)."""
    cols = [f"{r['task']} {r['readout']} {r['probe']}" for r in rows]
    n = max(len(r["test_accuracy"]) for r in rows)
    lines = ["| layer | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for layer in range(n):
        cells = []
        for r in rows:
            if layer >= len(r["test_accuracy"]):
                cells.append("")
                continue
            v = f"{100 * r['test_accuracy'][layer]:.1f}"
            cells.append(f"**{v}**" if layer == r["best_layer"] else v)
        lines.append(f"| {'emb' if layer == 0 else layer} | " + " | ".join(cells) + " |")
    lines.append("| majority | " + " | ".join(f"{100 * r['majority']:.1f}" for r in rows) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: str, title: str = "") -> str:
    """Test accuracy per layer, one line per (task, readout, probe)."""
    from peft_jax.report import plot_lines
    return plot_lines([(f"{r['task']} {r['readout']} {r['probe']}", range(len(r["test_accuracy"])),
                        r["test_accuracy"]) for r in rows], path, "layer (0 = embeddings)",
                      "test accuracy", title, figsize=(7, 4.5))


def probe_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="peft-jax probe", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="sst2,surface:length,surface:wc")
    p.add_argument("--readout", default="mean,answer")
    p.add_argument("--probe", default="linear", help="comma list of linear, mlp")
    p.add_argument("--template", default=None, help="answer-readout prompt ({sentence}, {mask})")
    p.add_argument("--surface-text", default="sst2:train", help="task:split the surface tasks read")
    for split, n in SIZES.items():
        p.add_argument(f"--{split}", type=int, default=n, help=f"{split} examples per task")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/probe")
    a = p.parse_args(argv)
    from peft_jax.probing.features import READOUTS
    from peft_jax.probing.probes import KINDS
    readouts = [r for r in a.readout.split(",") if r]
    kinds = [k for k in a.probe.split(",") if k]
    for flag, vals, allowed in (("--readout", readouts, READOUTS), ("--probe", kinds, KINDS)):
        bad = [v for v in vals if v not in allowed]
        if bad:
            p.error(f"{flag} {','.join(bad)}: choose from {', '.join(allowed)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sizes = {"train": a.train, "dev": a.dev, "test": a.test}
    tasks = [load_probe_task(t.strip(), sizes, a.surface_text, a.seed)
             for t in a.task.split(",") if t.strip()]
    from peft_jax.models.registry import load_pretrained
    pre = load_pretrained(a.model)
    rows = probe_model(pre, tasks, readouts, kinds, a.template, a.max_length, a.batch_size, a.seed)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "probe.json"), "w") as f:
        json.dump({"model": a.model, "rows": rows}, f, indent=1)
    md = table(rows)
    with open(os.path.join(a.out, "probe.md"), "w") as f:
        f.write(md + "\n")
    plot(rows, os.path.join(a.out, "probe.png"), title=a.model)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(probe_main())
