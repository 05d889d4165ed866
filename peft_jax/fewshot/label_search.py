"""Automatic label-word search (LM-BFF, Gao et al. 2021, Sec. 5.1), for single-token words.

1. Candidates: for each class ``c``, the ``k`` vocabulary tokens with the highest mean
   log-probability at the answer position over class-``c`` training examples, minus their
   mean over all training examples (LM-BFF ranks by the class sum alone; subtracting the
   overall mean keeps one frequent token from topping every class).
2. Assignments: every combination of one candidate per class with distinct tokens (or, when
   there are more than ``max_assignments``, a greedy per-class choice) is scored by its
   zero-shot accuracy on the training examples; the ``top_n`` best are re-ranked by accuracy
   on the dev examples, and the best is returned.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import numpy as np


def candidate_tokens(logprobs: np.ndarray, labels: np.ndarray, num_classes: int, k: int = 10,
                     exclude: Sequence[int] = ()) -> np.ndarray:
    """``[C, k]`` token ids per class from answer-position log-probs ``[n, V]``."""
    lp = np.asarray(logprobs, np.float64)
    y = np.asarray(labels)
    overall = lp.mean(0)
    out = np.zeros((num_classes, k), np.int64)
    for c in range(num_classes):
        if not np.any(y == c):
            raise ValueError(f"label search: no training example of class {c}")
        score = lp[y == c].mean(0) - overall
        score[list(exclude)] = -np.inf
        out[c] = np.argsort(-score, kind="stable")[:k]
    return out


def assignment_accuracy(logprobs: np.ndarray, labels: np.ndarray, words: Sequence[int]) -> float:
    """Zero-shot accuracy of the verbalizer ``class c -> token words[c]``."""
    return float(np.mean(np.asarray(logprobs)[:, list(words)].argmax(-1) == np.asarray(labels)))


def search_label_words(train_lp: np.ndarray, train_y: np.ndarray, dev_lp: np.ndarray,
                       dev_y: np.ndarray, num_classes: int, k: int = 10, top_n: int = 10,
                       max_assignments: int = 100_000, exclude: Sequence[int] = ()
                       ) -> dict:
    """The best single-token verbalizer: ``{"words": [C] ids, "train_accuracy",
    "dev_accuracy", "candidates": [C, k]}``."""
    cand = candidate_tokens(train_lp, train_y, num_classes, k, exclude)
    if k ** num_classes <= max_assignments:
        combos = [c for c in itertools.product(*cand) if len(set(c)) == num_classes]
    else:   # greedy: each class's best candidate given the others at their first choice
        combos = [tuple(int(cand[c, 0]) for c in range(num_classes))]
        for c in range(num_classes):
            for t in cand[c, 1:]:
                trial = list(combos[-1])
                trial[c] = int(t)
                if len(set(trial)) == num_classes:
                    combos.append(tuple(trial))
    if not combos:
        raise ValueError("label search: no assignment of distinct tokens; raise k")
    train_acc = np.array([assignment_accuracy(train_lp, train_y, c) for c in combos])
    best = np.argsort(-train_acc, kind="stable")[:top_n]
    dev_acc = np.array([assignment_accuracy(dev_lp, dev_y, combos[i]) for i in best])
    j = int(best[int(np.argmax(dev_acc))])
    return {"words": [int(t) for t in combos[j]], "train_accuracy": float(train_acc[j]),
            "dev_accuracy": float(dev_acc.max()), "candidates": cand.tolist()}


def search_for_task(pre, task, train: Sequence[dict], dev: Sequence[dict],
                    template: Optional[str] = None, k: int = 10, max_len: int = 64) -> dict:
    """Run the search with a model's answer-position log-probs; adds decoded ``word_strings``."""
    from peft_jax.fewshot.answer_states import answer_logprobs

    tr = answer_logprobs(pre, task, train, template, max_len)
    dv = answer_logprobs(pre, task, dev, template, max_len)
    special = [t for t in (getattr(pre.tokenizer, "all_special_ids", None) or [])]
    res = search_label_words(tr, np.array([e["label"] for e in train]), dv,
                             np.array([e["label"] for e in dev]), task.num_labels, k,
                             exclude=special)
    res["word_strings"] = [pre.tokenizer.decode([t]) for t in res["words"]]
    return res
