"""Probing vs prompting vs prompt fine-tuning, on the same LM-BFF splits.

For each model and seed of ``lmbff/<task>`` (train-<seed> / dev-<seed>, 16 per class; the
fixed 200-sentence test subset of ``peft-jax fewshot``):

- **linear probe** on the frozen model: every layer's mean-pooled state and its state at the
  prompt's answer position; the layer (and L2) chosen on dev-<seed>;
- **zero-shot prompting**: SmolLM2: the verbalizer ("Review: ... Sentiment:" negative /
  positive, the ``zeroshot`` method); all-MiniLM-L6-v2 has no LM head, so its zero-shot
  prompt is the nearest label description by cosine ("It was terrible." / "It was great.");
- **fine-tuning**: SmolLM2 prompt-based fine-tuning with LoRA (``prompt``), MiniLM LoRA +
  classification head (``head``), from ``peft-jax fewshot`` rows (run here when missing).

    python benchmarks/probe_vs_prompt.py --seeds 13,21,42 [--workdir runs/tutorial_fewshot]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

ANSWER_TEMPLATES = {"minilm": "{sentence} It was {mask} .",
                    "smollm2": "Review: {sentence} Sentiment:"}   # = the zero-shot PVP's answer slot
LABEL_PROMPTS = ("It was terrible.", "It was great.")
FINETUNE = {"minilm": "head", "smollm2": "prompt"}


def probe_cells(pre, name: str, task: str, seed: int, test_n: int) -> dict:
    from peft_jax.probing import cli
    from peft_jax.probing.probes import ProbeConfig, run_probes
    from peft_jax.probing.features import layer_features

    pt = cli.downstream_task(f"{task}@{seed}", {"train": 0, "dev": 0, "test": test_n})
    out = {}
    for readout in ("mean", "answer"):
        f = {s: layer_features(pre, texts, readout, ANSWER_TEMPLATES[name], 128, 32)
             for s, (texts, _) in pt.splits.items()}
        r = run_probes((f["train"], pt.splits["train"][1]), (f["test"], pt.splits["test"][1]),
                       pt.num_classes, ProbeConfig(kind="linear"),
                       dev=(f["dev"], pt.splits["dev"][1]))
        out[f"probe_{readout}"] = {"accuracy": r["best_test_accuracy"], "layer": r["best_layer"]}
    if name == "minilm":   # zero-shot by label descriptions (no LM head)
        from peft_jax.contrastive.embed import Embedder, make_tokenizer
        emb = Embedder(pre.build(), {"params": pre.base}, make_tokenizer(pre.tokenizer, 128),
                       pooling="mean", batch_size=32, normalize=True)
        texts, y = pt.splits["test"]
        pred = (emb(texts) @ emb(list(LABEL_PROMPTS)).T).argmax(-1)
        out["zeroshot"] = {"accuracy": float(np.mean(pred == y))}
    return out


def fewshot_row(workdir: str, task: str, method: str, model: str, seed: int) -> dict:
    path = os.path.join(workdir, task.replace("/", "_"), f"{method}_{model}", f"seed{seed}",
                        "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        row = json.load(f)
    return row["metrics"] if row.get("config", {}).get("fewshot.method") else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--task", default="lmbff/sst2")
    p.add_argument("--seeds", default="13,21,42")
    p.add_argument("--workdir", default=os.path.join("runs", "tutorial_fewshot"))
    p.add_argument("--out", default=os.path.join("runs", "probe_vs_prompt"))
    p.add_argument("--test-examples", type=int, default=200, help="fixed test subset size")
    p.add_argument("--no-run", action="store_true",
                   help="do not run missing fewshot rows (report the seeds that have them)")
    a = p.parse_args(argv)
    from peft_jax.fewshot.cli import run_methods
    from peft_jax.fewshot.methods import Budget
    from peft_jax.models.registry import load_pretrained

    seeds = [int(s) for s in a.seeds.split(",")]
    table = {}
    for name in a.models.split(","):
        methods = [FINETUNE[name]] + (["zeroshot"] if name == "smollm2" else [])
        budget = Budget(test_examples=a.test_examples)
        if not a.no_run:
            run_methods(methods, [a.task], seeds, name, budget, a.workdir)   # skips finished seeds
        pre = None
        for seed in seeds:
            path = os.path.join(a.out, name, f"seed{seed}.json")
            if not os.path.exists(path):
                pre = pre or load_pretrained(name)
                cells = probe_cells(pre, name, a.task, seed, a.test_examples)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    json.dump(cells, f, indent=1)
            with open(path) as f:
                cells = json.load(f)
            if name == "smollm2":
                cells["zeroshot"] = fewshot_row(a.workdir, a.task, "zeroshot", name, seed)
            cells["finetune"] = fewshot_row(a.workdir, a.task, FINETUNE[name], name, seed)
            for k, v in cells.items():
                if v is None:
                    continue
                table.setdefault((name, k), []).append(v)
    cols = [("probe_mean", "linear probe, mean-pooled (best layer)"),
            ("probe_answer", "linear probe, answer position (best layer)"),
            ("zeroshot", "zero-shot prompt"), ("finetune", "fine-tuning (LoRA)")]
    print(f"\n{a.task}, seeds {a.seeds}: test accuracy x100, mean (std); [layers chosen on dev]\n")
    print("| model | " + " | ".join(c[1] for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name in a.models.split(","):
        cells = []
        for key, _ in cols:
            vals = table.get((name, key), [])
            acc = np.array([100 * v["accuracy"] for v in vals])
            txt = f"{acc.mean():.1f} ({acc.std():.1f}, n={len(acc)})" if len(acc) else "-"
            if vals and "layer" in vals[0]:
                txt += " [" + ",".join(str(v["layer"]) for v in vals) + "]"
            cells.append(txt)
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
