"""STS table of the contrastive family at equal budgets (Spearman x100, mean (std) over seeds).

Rows, per model (mean pooling unless said otherwise):

- ``raw``: the pretrained model; ``whitening`` (BERT-whitening) and ``flow`` (BERT-flow, a
  Glow-style flow fitted by maximum likelihood) post-processors fitted on the (unlabelled)
  evaluation sentences; ``prompt``: PromptBERT / PromptEOL template embeddings of the
  untrained model (template denoising on);
- trained with LoRA (rank 8) through the one contrastive loop, same steps / batch / learning
  rate / data for every objective: ``simcse`` (dropout), ``consert`` (token shuffle + feature
  cutoff), ``consert_adv`` (dropout view + adversarial view), ``declutr`` (span pairs from
  AG News descriptions: DeCLUTR needs documents longer than STS-B's sentences),
  ``byol`` (EMA target, no negatives), ``promptbert`` (two templates, denoised),
  ``rankencoder`` (SimCSE + rank-vector agreement; rank vectors from the untrained model
  over 256 training sentences).

Training text: the unique sentences of STS-B *train* (no labels). Evaluation: STS12-16 (all),
STS-B test, SICK-R test, a fixed random subset of ``max_pairs`` pairs per task (the same for
every row). Each cell is one JSON file under ``--out`` and is skipped when present.

    python benchmarks/sts_family.py --models minilm --seeds 1,2,3
    python benchmarks/sts_family.py --models smollm2 --seeds 1,2,3
    python benchmarks/sts_family.py --report

The cells behind the README table are kept in ``benchmarks/results/sts_family/``
(``--report --out benchmarks/results/sts_family`` prints that table again).
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

from peft_jax.contrastive import objectives, simcse, sts_eval  # noqa: E402
from peft_jax.contrastive.embed import Embedder, make_tokenizer  # noqa: E402
from peft_jax.contrastive.flow import fit_flow  # noqa: E402
from peft_jax.contrastive.prompt_embed import PromptEmbedder, default_templates  # noqa: E402
from peft_jax.contrastive.whitening import apply_whitening, fit_whitening  # noqa: E402

OUT = os.path.join("runs", "sts_family")
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
SETTINGS = {
    "minilm": dict(max_pairs=100, eval_length=64, train=dict(steps=20, batch_size=32, max_length=32,
                                                             learning_rate=1e-3, dropout=None)),
    "smollm2": dict(max_pairs=40, eval_length=48, train=dict(steps=8, batch_size=8, max_length=32,
                                                             learning_rate=5e-4, dropout=0.1)),
}
FIXED = ("raw", "whitening", "prompt")                 # deterministic: one run
SEEDED = ("flow", "simcse", "consert", "consert_adv", "declutr", "byol", "promptbert",
          "rankencoder")
ROWS = FIXED + SEEDED


def agnews_documents(n: int = 2000) -> list[str]:
    path = os.path.join(DATA, "ag_news", "test.tsv")
    with open(path, encoding="utf8") as f:
        docs = [" ".join(line.split("\t")[0].replace("\\", " ").split()) for line in f]
    return [d for d in docs if len(d.split()) >= 20][:n]


def objective_for(row: str, pre, embed_untrained) -> objectives.Objective:
    if row == "simcse":
        return objectives.Dropout()
    if row == "consert":
        return objectives.ConSERT(views=("shuffle", "feature_cutoff"))
    if row == "consert_adv":
        return objectives.ConSERT(views=("none", "adversarial"))
    if row == "declutr":
        return objectives.DeCLUTR(min_span=8, max_span=24)
    if row == "byol":
        return objectives.BYOL(tau=0.99)
    if row == "promptbert":
        return objectives.PromptBERT(templates=default_templates(pre.kind))
    if row == "rankencoder":
        return objectives.RankEncoder(teacher=embed_untrained, weight=1.0, corpus_size=256)
    raise ValueError(row)


def run_cell(name: str, row: str, seed: int, ctx: dict) -> dict:
    s, pre, tok = ctx["s"], ctx["pre"], ctx["tok"]
    sents, pairs = ctx["sents"], ctx["pairs"]
    t0 = time.time()
    info: dict = {}
    if row in ("raw", "whitening", "flow"):
        x = ctx["raw"]
        if row == "whitening":
            x = apply_whitening(fit_whitening(x), x)
        elif row == "flow":
            post = fit_flow(x, steps=300, depth=4, hidden=256, seed=seed)
            x = post(x)
            info["flow_nll_per_dim"] = post.nll(ctx["raw"])
    elif row == "prompt":
        t = default_templates(pre.kind)[0]
        x = PromptEmbedder(pre.build(), {"params": pre.base}, tok, template=t,
                           max_length=s["eval_length"], batch_size=32)(sents)
        info["template"] = t
    else:
        from peft_jax.peft import LoRA
        cfg = simcse.SimCSEConfig(pooling="mean", log_every=5, seed=seed, **s["train"])
        obj = objective_for(row, pre, ctx["untrained"])
        texts = ctx["docs"] if row == "declutr" else ctx["train_sents"]
        res = simcse.train_contrastive(pre, texts, obj, cfg, methods=(LoRA(rank=8, alpha=16.0),))
        info["train_s"] = time.time() - t0
        info["history"] = [{k: float(v) for k, v in h.items() if isinstance(v, (int, float))}
                           for h in res.loop.history]
        x = res.embedder(tok, batch_size=32)(sents)
    scores = sts_eval.spearman_from_lookup(dict(zip(sents, x)), pairs)
    return {"model": name, "row": row, "seed": seed, "scores": scores,
            "anisotropy": sts_eval.anisotropy(x, n_pairs=5000, seed=0), "wall_s": time.time() - t0,
            "settings": s, **info}


def run_model(name: str, rows, seeds, out: str) -> None:
    from peft_jax.models.registry import load_pretrained
    s = SETTINGS[name]
    todo = [(r, sd) for r in rows for sd in ((0,) if r in FIXED else seeds)
            if not os.path.exists(cell_path(out, name, r, sd))]
    if not todo:
        return
    pre = load_pretrained(name)
    tok = make_tokenizer(pre.tokenizer, s["eval_length"])
    pairs = sts_eval.load_sts_tasks(max_pairs=s["max_pairs"], seed=0)
    sents = sts_eval.task_sentences([p for ps in pairs.values() for p in ps])
    untrained = Embedder(pre.build(), {"params": pre.base}, tok, pooling="mean", batch_size=32)
    t = time.time()
    raw = untrained.raw(sents)
    print(f"[{name}] {len(sents)} evaluation sentences embedded in {time.time() - t:.0f}s", flush=True)
    (train_pairs,) = sts_eval.load_sts_task("STSBenchmark", split="train")
    ctx = dict(s=s, pre=pre, tok=tok, pairs=pairs, sents=sents, raw=raw, untrained=untrained,
               train_sents=sts_eval.task_sentences([train_pairs]), docs=agnews_documents())
    for row, seed in todo:
        r = run_cell(name, row, seed, ctx)
        os.makedirs(os.path.dirname(cell_path(out, name, row, seed)), exist_ok=True)
        with open(cell_path(out, name, row, seed), "w") as f:
            json.dump(r, f, indent=1)
        print(f"[{name}] {row} seed {seed}: {sts_eval.format_results(r['scores'])} "
              f"({r['wall_s']:.0f}s)", flush=True)


def cell_path(out: str, name: str, row: str, seed: int) -> str:
    return os.path.join(out, name, f"{row}_seed{seed}.json")


def report(out: str) -> str:
    tasks = list(sts_eval.STS_TASKS)
    head = ("| model | method | " + " | ".join(sts_eval.SHORT_NAMES.get(t, t) for t in tasks)
            + " | avg | seeds | anisotropy |")
    lines = [head, "|" + "---|" * (len(tasks) + 5)]
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        for row in ROWS:
            cells = []
            for fn in sorted(os.listdir(os.path.join(out, name))):
                if fn.startswith(row + "_seed"):
                    with open(os.path.join(out, name, fn)) as f:
                        cells.append(json.load(f))
            if not cells:
                continue

            def ms(key):
                v = np.array([c["scores"][key] for c in cells])
                return f"{v.mean():.1f}" + (f" ({v.std():.1f})" if len(v) > 1 else "")
            aniso = np.mean([c["anisotropy"] for c in cells])
            lines.append(f"| {name} | {row} | " + " | ".join(ms(t) for t in tasks)
                         + f" | {ms('avg')} | {len(cells)} | {aniso:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="", help="comma list of " + ",".join(SETTINGS))
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--out", default=OUT)
    p.add_argument("--report", action="store_true")
    a = p.parse_args(argv)
    rows = [r for r in a.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"--rows {bad}: choose from {ROWS}")
    for name in [m for m in a.models.split(",") if m]:
        run_model(name, rows, [int(x) for x in a.seeds.split(",")], a.out)
    print(report(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
