"""Prompt variance (``peft-jax prompts``): how much does the choice of prompt matter?

A grid of templates x label-word sets (hand-written ones, plus for each template the words
found by LM-BFF's automatic label-word search on ``train-<seed>`` / ``dev-<seed>``) is
evaluated under the few-shot protocol of :mod:`peft_jax.fewshot.methods` in three settings:

- ``zeroshot``: the prompt alone;
- ``incontext``: with one random demonstration per class (LM-BFF: demonstrations should
  reduce the variance);
- ``prompt``: after prompt-based fine-tuning (LoRA) with that prompt.

Each (setting, template, words, seed) run is one ``result.json`` row (with ``ece``) under
``<workdir>/<task>/prompts/<setting>/p<k>/seed<s>``; runs already done are skipped. The table
gives, per task and setting, the spread of test accuracy over the prompts: min / median /
max / std.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np

from peft_jax.fewshot.methods import Budget, _row, method_config, train, untrained, write_row

SETTINGS = ("zeroshot", "incontext", "prompt")
# causal-friendly templates (the answer slot ends the prompt) and label words per task group
TEMPLATES = {"sentiment": ("Review: {sentence} Sentiment: {mask}",
                           "{sentence} All in all, it was {mask}",
                           "{sentence} It was {mask}",
                           "{sentence} Overall, it was {mask}")}
WORDS = {"sentiment": ("negative,positive", "bad,good", "terrible,great")}
GROUPS = {"lmbff/sst2": "sentiment", "lmbff/cr": "sentiment", "lmbff/mr": "sentiment",
          "lmbff/mpqa": "sentiment"}


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    template: str
    words: str            # comma-separated, one per class
    source: str = "hand"  # hand | search


def searched_words(pre, task_name: str, seed: int, template: str, k: int = 10,
                   max_len: int = 64) -> str:
    """LM-BFF automatic label words for ``template`` on this seed's shots (comma-separated)."""
    from peft_jax.data import get_task
    from peft_jax.fewshot.label_search import search_for_task

    task = get_task(task_name)
    res = search_for_task(pre, task, task.load(f"train-{seed}"), task.load(f"dev-{seed}"),
                          template, k=k, max_len=max_len)
    return ",".join(w.strip() for w in res["word_strings"])


def prompt_grid(task_name: str, n_templates: int, search: bool, pre=None, seed: int = 13
                ) -> list[PromptSpec]:
    """Templates x (hand-written word sets + the searched set per template)."""
    group = GROUPS.get(task_name)
    if group is None:
        raise ValueError(f"no prompt set for {task_name}; known: {sorted(GROUPS)}")
    out = []
    for t in TEMPLATES[group][:n_templates]:
        out += [PromptSpec(t, w) for w in WORDS[group]]
        if search:
            found = searched_words(pre, task_name, seed, t)
            if found not in WORDS[group]:
                out.append(PromptSpec(t, found, "search"))
    return out


def run_prompt(setting: str, spec: PromptSpec, k: int, task: str, seed: int, model: str,
               budget: Budget, workdir: str, pre=None) -> dict:
    """One (setting, prompt, seed) row (skipped when its ``result.json`` exists)."""
    import time

    root = os.path.join(workdir, task.replace("/", "_"), "prompts", setting, f"p{k}")
    cfg = method_config(setting, task, seed, model, budget, root)
    cfg.workdir = os.path.join(root, f"seed{seed}")
    path = os.path.join(cfg.workdir, "result.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    cfg.task.template, cfg.task.label_words = spec.template, spec.words
    t0 = time.perf_counter()
    res = untrained(cfg, pre) if setting in ("zeroshot", "incontext") else train(cfg, pre).row
    row = _row(cfg, setting, res, t0, prompt={**dataclasses.asdict(spec), "index": k})
    row["config"]["fewshot.prompt"] = f"p{k}"
    return write_row(cfg, row)


def label_word_ids(pre, task, template: str, words: str) -> Optional[list[int]]:
    """Token ids of the label words as the runner encodes them for ``template`` (one per
    class), or None when a word has several tokens (then the runner's teacher-forced scoring
    is needed)."""
    from peft_jax.data.tokenize import encode_prompt

    enc = encode_prompt([{f: "x" for f in task.text_fields} | {"label": 0}], template,
                        [[w] for w in words.split(",")], pre.tokenizer, kind=pre.kind,
                        max_len=64, task=task)
    lw = np.asarray(enc.constants["label_word_ids"])            # [C, 1, T]
    if lw.shape[-1] > 1 and (lw[..., 1:] >= 0).any():
        return None
    return [int(t) for t in lw[:, 0, 0]]


def zeroshot_grid(pre, task_name: str, grid: Sequence[PromptSpec], test_examples: int,
                  workdir: str, model: str, max_len: int = 64) -> list[dict]:
    """Zero-shot rows of every single-token prompt of ``grid`` with one forward pass per
    template: the answer position's log-probabilities over the vocabulary (test subset and
    the content-free inputs) score every label-word set of that template. Same test subset,
    scores and metrics (``accuracy``, ``ece``, ``accuracy_cc``, ``ece_cc``) as the
    ``zeroshot`` method; rows are cached like :func:`run_prompt`'s."""
    from peft_jax.data import get_task
    from peft_jax.fewshot.answer_states import answer_logprobs
    from peft_jax.fewshot.calibration import calibration_metrics
    from peft_jax.fewshot.methods import content_free_examples
    from peft_jax.fewshot.protoverb_frozen import fixed_subset

    task = get_task(task_name)
    test = fixed_subset(task.load("test"), test_examples)
    y = np.asarray([ex["label"] for ex in test])
    rows, cache = [], {}
    for k, spec in enumerate(grid):
        cell = os.path.join(workdir, task_name.replace("/", "_"), "prompts", "zeroshot", f"p{k}",
                            "all_seeds", "result.json")
        if os.path.exists(cell):
            with open(cell) as f:
                rows.append(json.load(f))
            continue
        ids = label_word_ids(pre, task, spec.template, spec.words)
        if ids is None:
            continue
        if spec.template not in cache:
            cache[spec.template] = (answer_logprobs(pre, task, test, spec.template, max_len),
                                    answer_logprobs(pre, task, content_free_examples(task),
                                                    spec.template, max_len))
        lp, lp_cf = cache[spec.template]
        scores = lp[:, ids]
        m = calibration_metrics(scores, y, lp_cf[:, ids])
        m.pop("p_cf")
        m["accuracy"] = float(np.mean(scores.argmax(-1) == y))
        row = {"status": "finished", "metrics": m, "prompt": {**dataclasses.asdict(spec), "index": k},
               "config": {"task.name": task_name, "fewshot.method": "zeroshot",
                          "fewshot.prompt": f"p{k}", "model.name": model,
                          "task.max_test_examples": test_examples}}
        os.makedirs(os.path.dirname(cell), exist_ok=True)
        with open(cell, "w") as f:
            json.dump(row, f, indent=1)
        rows.append(row)
    return rows


def spread(values: Sequence[float]) -> dict:
    v = np.asarray(values, np.float64)
    return {"n": int(len(v)), "min": float(v.min()), "median": float(np.median(v)),
            "max": float(v.max()), "std": float(v.std())}


def spread_table(rows: Sequence[dict], metric: str = "accuracy") -> str:
    """Markdown: per (task, setting) the spread of ``metric`` x100 over prompts (a prompt's
    value is its mean over seeds) and the mean ECE."""
    groups: dict = {}
    for r in rows:
        c = r["config"]
        key = (c["task.name"], c["fewshot.method"])
        groups.setdefault(key, {}).setdefault(c["fewshot.prompt"], []).append(r["metrics"])
    lines = ["| task | setting | prompts | min | median | max | std | mean ECE |",
             "|---|---|---|---|---|---|---|---|"]
    for (task, setting), by_prompt in sorted(groups.items(), key=lambda kv: (
            kv[0][0], SETTINGS.index(kv[0][1]) if kv[0][1] in SETTINGS else 9)):
        vals = [100 * np.mean([m[metric] for m in ms]) for ms in by_prompt.values()]
        eces = [m.get("ece") for ms in by_prompt.values() for m in ms if m.get("ece") is not None]
        s = spread(vals)
        ece_s = f"{np.mean(eces):.3f}" if eces else "-"
        lines.append(f"| {task} | {setting} | {s['n']} | {s['min']:.1f} | {s['median']:.1f} | "
                     f"{s['max']:.1f} | {s['std']:.1f} | {ece_s} |")
    return "\n".join(lines)


def prompts_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="peft-jax prompts", description=__doc__.split("\n")[0])
    p.add_argument("--task", default="lmbff/sst2")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--seeds", default="13")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--templates", type=int, default=4, help="first N templates of the set")
    p.add_argument("--no-search", action="store_true", help="hand-written label words only")
    p.add_argument("--max-prompts", default="", help="per-setting cap, e.g. prompt=6,incontext=8 "
                   "(the grid's first N prompts: fine-tuning every prompt is costly)")
    p.add_argument("--workdir", default="runs/prompts")
    for f in dataclasses.fields(Budget):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    a = p.parse_args(argv)
    settings = [s for s in a.settings.split(",") if s]
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        p.error(f"--settings {','.join(bad)}: choose from {', '.join(SETTINGS)}")
    caps = {}
    for item in (x for x in a.max_prompts.split(",") if x):
        k, _, v = item.partition("=")
        if k not in SETTINGS or not v.isdigit():
            p.error(f"--max-prompts {item!r}: expected <setting>=<N>")
        caps[k] = int(v)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft_jax.models.registry import load_pretrained
    budget = Budget(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Budget)})
    pre = load_pretrained(a.model)
    seeds = [int(s) for s in a.seeds.split(",") if s]
    rows = []
    for task in (t for t in a.task.split(",") if t):
        grid = prompt_grid(task, a.templates, not a.no_search, pre, seeds[0])
        print(f"[prompts] {task}: {len(grid)} prompts: "
              + "; ".join(f"{g.template!r} {g.words}" for g in grid), flush=True)
        for setting in settings:
            specs = grid[:caps.get(setting, len(grid))]
            done: set = set()
            if setting == "zeroshot":   # zero-shot needs no seed: one forward per template
                zs = zeroshot_grid(pre, task, specs, budget.test_examples, a.workdir, a.model,
                                   budget.max_length)
                rows += zs
                done = {r["prompt"]["index"] for r in zs}
            for k, spec in enumerate(specs):
                if k in done:
                    continue
                for seed in seeds:
                    r = run_prompt(setting, spec, k, task, seed, a.model, budget, a.workdir, pre)
                    rows.append(r)
                    print(json.dumps({"task": task, "setting": setting, "prompt": k,
                                      "seed": seed, "template": spec.template, "words": spec.words,
                                      "test": r["metrics"]}), flush=True)
    print(spread_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(prompts_main())
