"""Automatic label-word search (LM-BFF) vs the manual verbalizer, zero-shot, one seed per task.

``python benchmarks/label_search.py --tasks lmbff/sst2 --seeds 13 [--model smollm2]``: for each
(task, seed) the search runs on ``train-<seed>`` / ``dev-<seed>`` (16 + 16 per class) and both
verbalizers are scored zero-shot on the fixed test subset used by ``peft-jax fewshot``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default="lmbff/sst2")
    p.add_argument("--seeds", default="13")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--test-examples", type=int, default=200)
    a = p.parse_args(argv)
    from peft_jax.data import get_task
    from peft_jax.fewshot.answer_states import answer_logprobs
    from peft_jax.fewshot.label_search import assignment_accuracy, search_for_task
    from peft_jax.fewshot.methods import PVP_SETS, PVPS
    from peft_jax.fewshot.protoverb_frozen import fixed_subset
    from peft_jax.models.registry import load_pretrained

    pre = load_pretrained(a.model)
    print("| task | seed | template | manual words | manual test acc | found words | found dev acc | found test acc |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.tasks.split(","):
        task = get_task(name)
        template, manual = PVPS[PVP_SETS[name]][0] if name in PVP_SETS else (None, None)
        test = fixed_subset(task.load("test"), a.test_examples)
        y = np.array([e["label"] for e in test])
        test_lp = answer_logprobs(pre, task, test, template)
        man_ids = [pre.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]
                   for w in manual.split(",")] if manual else None
        for seed in (int(s) for s in a.seeds.split(",")):
            res = search_for_task(pre, task, task.load(f"train-{seed}"), task.load(f"dev-{seed}"),
                                  template, k=a.k)
            man = assignment_accuracy(test_lp, y, man_ids) if man_ids else float("nan")
            print(f"| {name} | {seed} | {template!r} | {manual} | {100 * man:.1f} | "
                  f"{res['word_strings']} | {100 * res['dev_accuracy']:.1f} | "
                  f"{100 * assignment_accuracy(test_lp, y, res['words']):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
