"""STS table: raw / whitened / unsupervised-SimCSE sentence embeddings (mean pooling).

For each model: embed every evaluation sentence once, score the 7 STS tasks (STS12-16 in
SimCSE's "all" setting, STS-B test, SICK-R test; Spearman x100) and the anisotropy (mean
cosine of 10,000 random pairs of evaluation sentences); then BERT-whitening fitted on those
(unlabelled) evaluation sentences; then a short LoRA-SimCSE run (or full fine-tuning) on the
unlabelled sentences of the STS-B *train* split, and the same scores again.

    python benchmarks/sts_table.py --models minilm                   # one model per process
    python benchmarks/sts_table.py --models smollm2
    python benchmarks/sts_table.py --report                          # markdown of all results
    python benchmarks/sts_table.py --models minilm --supervised      # + supervised SimCSE row

``--supervised`` adds a row trained with supervised SimCSE (same PEFT method, steps, batch
and learning rate) on SICK-E *train* NLI triplets (premise, entailment, contradiction; a
premise without a contradiction gets its neutral hypothesis, else a random other one:
``--missing-negative``, see :mod:`peft_jax.contrastive.nli`).

Results: benchmarks/results/sts_<model>.json and sts_table.md. ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from peft_jax.contrastive import simcse, sts_eval  # noqa: E402
from peft_jax.contrastive.embed import Embedder, make_tokenizer  # noqa: E402
from peft_jax.contrastive.whitening import apply_whitening, fit_whitening  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Per-model settings, sized for a shared 2-core CPU (see the report for what was run).
SETTINGS = {
    "minilm": dict(max_pairs=None, max_length=256, batch_size=64,
                   simcse=dict(steps=60, batch_size=32, max_length=32, learning_rate=1e-3,
                               dropout=None), lora=dict(rank=8, alpha=16.0)),
    "smollm2": dict(max_pairs=200, max_length=64, batch_size=32,
                    simcse=dict(steps=30, batch_size=16, max_length=32, learning_rate=5e-4,
                                dropout=0.1), lora=dict(rank=8, alpha=16.0)),
}


def _scores(lookup, task_pairs, sents):
    res = sts_eval.spearman_from_lookup(lookup, task_pairs)
    emb = np.stack([lookup[s] for s in sents])
    res["anisotropy"] = sts_eval.anisotropy(emb, n_pairs=10000, seed=0)
    return res


def run_model(name: str, quick: bool = False, method: str = "lora", supervised: bool = False,
              missing_negative: str = "random") -> dict:
    from peft_jax.models.registry import load_pretrained
    s = json.loads(json.dumps(SETTINGS[name]))
    if quick:
        s["max_pairs"] = 40
        s["simcse"]["steps"] = 3
    t0 = time.time()
    pre = load_pretrained(name)
    tok = make_tokenizer(pre.tokenizer, s["max_length"])
    embedder = Embedder(pre.build(), {"params": pre.base}, tok, pooling="mean",
                        batch_size=s["batch_size"])
    task_pairs = sts_eval.load_sts_tasks(max_pairs=s["max_pairs"], seed=0)
    sents = sts_eval.task_sentences([p for ps in task_pairs.values() for p in ps])
    out = {"model": name, "settings": s, "method": method, "n_sentences": len(sents), "rows": {}}
    print(f"[{name}] {len(sents)} evaluation sentences", flush=True)

    t = time.time()
    raw = embedder.raw(sents)
    out["embed_s"] = time.time() - t
    out["rows"]["raw"] = _scores(dict(zip(sents, raw)), task_pairs, sents)
    print(f"[{name}] raw: {sts_eval.format_results(out['rows']['raw'])} "
          f"aniso={out['rows']['raw']['anisotropy']:.3f} ({out['embed_s']:.0f}s)", flush=True)

    w = fit_whitening(raw)
    white = apply_whitening(w, raw)
    out["rows"]["whitened"] = _scores(dict(zip(sents, white)), task_pairs, sents)
    print(f"[{name}] whitened: {sts_eval.format_results(out['rows']['whitened'])}", flush=True)

    (train_pairs,) = sts_eval.load_sts_task("STSBenchmark", split="train")
    train_sents = sts_eval.task_sentences([train_pairs])
    cfg = simcse.SimCSEConfig(pooling="mean", log_every=10, **s["simcse"])
    t = time.time()
    if method == "lora":
        from peft_jax.peft import LoRA
        res = simcse.train_simcse(pre, train_sents, cfg, methods=(LoRA(**s["lora"]),), progress=True)
    else:
        res = simcse.train_simcse(pre, train_sents, cfg, full_finetune=True, progress=True)
    out["simcse_train_s"] = time.time() - t
    out["simcse_history"] = res.loop.history
    trained = Embedder(res.model, res.variables, tok, pooling="mean", batch_size=s["batch_size"])
    out["rows"][f"simcse_{method}"] = _scores(dict(zip(sents, trained.raw(sents))), task_pairs, sents)
    print(f"[{name}] simcse-{method} ({cfg.steps} steps, {out['simcse_train_s']:.0f}s): "
          f"{sts_eval.format_results(out['rows'][f'simcse_{method}'])}", flush=True)
    if supervised:
        _supervised_row(out, pre, s, cfg, method, tok, task_pairs, sents, missing_negative)
    out["total_s"] = time.time() - t0
    return out


def _supervised_row(out, pre, s, cfg, method, tok, task_pairs, sents, missing_negative) -> None:
    from peft_jax.contrastive import nli
    name, row = out["model"], f"sup_simcse_{method}"
    triplets = nli.load_triplets("sick-e", "train", missing_negative=missing_negative)
    out["sup_triplets"] = {"source": "sick-e train", "missing_negative": missing_negative,
                           "n": len(triplets)}
    t = time.time()
    if method == "lora":
        from peft_jax.peft import LoRA
        res = simcse.train_simcse_supervised(pre, triplets, cfg, methods=(LoRA(**s["lora"]),),
                                             progress=True)
    else:
        res = simcse.train_simcse_supervised(pre, triplets, cfg, full_finetune=True, progress=True)
    out["sup_simcse_train_s"] = time.time() - t
    out["sup_simcse_history"] = res.loop.history
    trained = Embedder(res.model, res.variables, tok, pooling="mean", batch_size=s["batch_size"])
    out["rows"][row] = _scores(dict(zip(sents, trained.raw(sents))), task_pairs, sents)
    print(f"[{name}] sup-simcse-{method} ({cfg.steps} steps, {len(triplets)} SICK-E triplets, "
          f"{out['sup_simcse_train_s']:.0f}s): {sts_eval.format_results(out['rows'][row])}",
          flush=True)


def report() -> str:
    names = [t for t in sts_eval.STS_TASKS]
    head = "| model | embeddings | " + " | ".join(sts_eval.SHORT_NAMES.get(t, t) for t in names) \
        + " | avg | anisotropy |"
    lines = [head, "|" + "---|" * (len(names) + 4)]
    for fn in sorted(os.listdir(RESULTS)):
        if not (fn.startswith("sts_") and fn.endswith(".json")) or "_quick" in fn:
            continue
        with open(os.path.join(RESULTS, fn)) as f:
            r = json.load(f)
        for row, v in r["rows"].items():
            lines.append(f"| {r['model']} | {row} | " + " | ".join(f"{v[t]:.2f}" for t in names)
                         + f" | {v['avg']:.2f} | {v['anisotropy']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=[], choices=sorted(SETTINGS))
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--quick", action="store_true", help="smoke run: 40 pairs per task, 3 steps")
    p.add_argument("--report", action="store_true", help="print/write the markdown table")
    p.add_argument("--supervised", action="store_true",
                   help="add a supervised-SimCSE row (SICK-E train NLI triplets)")
    p.add_argument("--missing-negative", default="random", choices=["drop", "neutral", "random"],
                   help="hard negative for a premise without a contradiction (--supervised)")
    args = p.parse_args(argv)
    os.makedirs(RESULTS, exist_ok=True)
    for name in args.models:
        r = run_model(name, quick=args.quick, method=args.method, supervised=args.supervised,
                      missing_negative=args.missing_negative)
        suffix = "_quick" if args.quick else ""
        with open(os.path.join(RESULTS, f"sts_{name}{suffix}.json"), "w") as f:
            json.dump(r, f, indent=1)
    if args.report:
        md = report()
        with open(os.path.join(RESULTS, "sts_table.md"), "w") as f:
            f.write(md + "\n")
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
