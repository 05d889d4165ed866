"""Unsupervised STS evaluation (SentEval as used by SimCSE) and embedding-space geometry.

Score = Spearman correlation (x100) between the cosine similarity of the two sentences'
embeddings and the gold score:

- STS12-STS16: SimCSE's ``all`` setting: the pairs of all subsets of a year are
  concatenated and one Spearman is computed (pairs with an empty gold line are skipped,
  the STS13 SMT subset has no input file, as in SentEval).
- STSBenchmark: the test split. SICKRelatedness: the test split (relatedness score).

Sentences are whitespace-normalized (``" ".join(s.split())``), as SentEval's tokenized
batches are joined back by SimCSE. Pairs come from the ``peft_jax.data`` task registry
(``sts12``..``sts16``, ``stsb``, ``sick-r``: SentEval's files in ``../shared/data``); an
``embed_fn(list[str]) -> np.ndarray [n, d]`` gives the embeddings.

Geometry: :func:`anisotropy` (mean cosine of random sentence pairs), :func:`alignment` and
:func:`uniformity` (Wang & Isola 2020; SimCSE computes them on STS-B pairs with gold > 4).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from scipy.stats import spearmanr

EmbedFn = Callable[[list], np.ndarray]

STS_YEARS: dict[str, tuple[str, ...]] = {
    "STS12": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "STS13": ("FNWN", "headlines", "OnWN"),
    "STS14": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "STS15": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "STS16": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}
STS_TASKS: tuple[str, ...] = tuple(STS_YEARS) + ("STSBenchmark", "SICKRelatedness")
SHORT_NAMES = {"STSBenchmark": "STS-B", "SICKRelatedness": "SICK-R"}


@dataclasses.dataclass(frozen=True)
class StsPairs:
    """Sentence pairs with gold similarity scores (one subset or one split)."""

    name: str
    sent1: tuple[str, ...]
    sent2: tuple[str, ...]
    gold: np.ndarray  # [n] float

    def __len__(self) -> int:
        return len(self.gold)


# our task name -> peft_jax.data registry name
DATA_TASKS = {"STS12": "sts12", "STS13": "sts13", "STS14": "sts14", "STS15": "sts15",
              "STS16": "sts16", "STSBenchmark": "stsb", "SICKRelatedness": "sick-r"}


def _norm(s: str) -> str:
    return " ".join(s.split())


def load_sts_task(task: str, data_dir: Optional[str] = None, split: str = "test") -> list[StsPairs]:
    """The pairs of one task from the ``peft_jax.data`` registry: a list of subsets
    (STS12-16, grouped by each example's ``subset``) or one split (STS-B, SICK-R).

    ``data_dir``: the shared data root (default: $PEFT_JAX_DATA or ``../shared/data``).
    ``split`` (STS-B / SICK-R: train/dev/test) must be ``test`` for STS12-16.
    """
    if task not in DATA_TASKS:
        raise ValueError(f"unknown STS task {task!r}; supported: {list(STS_TASKS)}")
    from peft_jax.data import get_task
    examples = get_task(DATA_TASKS[task]).load(split, data_dir)
    groups: dict[str, list] = {}
    for ex in examples:
        groups.setdefault(ex.get("subset", split), []).append(ex)
    if task in STS_YEARS and list(groups) != list(STS_YEARS[task]):
        raise ValueError(f"{task}: subsets {list(groups)} differ from SentEval's {list(STS_YEARS[task])}")
    return [StsPairs(f"{task}/{name}", tuple(_norm(e["sentence1"]) for e in exs),
                     tuple(_norm(e["sentence2"]) for e in exs),
                     np.asarray([float(e["label"]) for e in exs]))
            for name, exs in groups.items()]


def task_sentences(subsets: Sequence[StsPairs]) -> list[str]:
    """Unique sentences of a task, in first-seen order."""
    return list(dict.fromkeys(s for p in subsets for s in p.sent1 + p.sent2))


def cosine_rows(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Row-wise cosine of ``[n, d]`` and ``[n, d]`` -> ``[n]`` (float64)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    num = np.sum(a * b, axis=-1)
    return num / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), eps)


def _embed_unique(embed_fn: EmbedFn, sentences: list[str]) -> dict[str, np.ndarray]:
    emb = np.asarray(embed_fn(list(sentences)))
    if emb.ndim != 2 or emb.shape[0] != len(sentences):
        raise ValueError(f"embed_fn returned shape {emb.shape} for {len(sentences)} sentences "
                         "(expected [n, d])")
    return dict(zip(sentences, emb))


def score_pairs(lookup: Mapping[str, np.ndarray], subsets: Sequence[StsPairs]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated (cosine predictions, gold) over all subsets."""
    sys_scores, gold = [], []
    for p in subsets:
        a = np.stack([lookup[s] for s in p.sent1])
        b = np.stack([lookup[s] for s in p.sent2])
        sys_scores.append(cosine_rows(a, b))
        gold.append(p.gold)
    return np.concatenate(sys_scores), np.concatenate(gold)


def subsample_pairs(subsets: Sequence[StsPairs], max_pairs: Optional[int], seed: int = 0
                    ) -> list[StsPairs]:
    """At most ``max_pairs`` pairs of a task, drawn uniformly over its concatenated subsets
    (fixed ``seed``; each subset keeps its chosen pairs in file order). None: all pairs."""
    total = sum(len(p) for p in subsets)
    if max_pairs is None or max_pairs >= total:
        return list(subsets)
    keep = np.zeros(total, bool)
    keep[np.random.default_rng(seed).choice(total, int(max_pairs), replace=False)] = True
    out, start = [], 0
    for p in subsets:
        k = np.flatnonzero(keep[start:start + len(p)])
        start += len(p)
        if len(k):
            out.append(StsPairs(p.name, tuple(p.sent1[i] for i in k), tuple(p.sent2[i] for i in k),
                                p.gold[k]))
    return out


def load_sts_tasks(tasks: Sequence[str] = STS_TASKS, data_dir: Optional[str] = None,
                   max_pairs: Optional[int] = None, seed: int = 0) -> dict[str, list[StsPairs]]:
    """Evaluation pairs of several tasks (test splits), optionally subsampled per task."""
    return {t: subsample_pairs(load_sts_task(t, data_dir), max_pairs, seed) for t in tasks}


def spearman_from_lookup(lookup: Mapping[str, np.ndarray], task_pairs: Mapping[str, Sequence[StsPairs]],
                         per_subset: bool = False) -> dict[str, float]:
    """Spearman x100 per task from precomputed embeddings (``sentence -> [d]``) and ``avg``."""
    out: dict[str, float] = {}
    for task, subsets in task_pairs.items():
        pred, gold = score_pairs(lookup, subsets)
        out[task] = 100.0 * float(spearmanr(pred, gold).correlation)
        if per_subset and len(subsets) > 1:
            for p in subsets:
                ps, gs = score_pairs(lookup, [p])
                out[p.name] = 100.0 * float(spearmanr(ps, gs).correlation)
    out["avg"] = float(np.mean([out[t] for t in task_pairs]))
    return out


def evaluate_sts(embed_fn: EmbedFn, tasks: Sequence[str] = STS_TASKS,
                 data_dir: Optional[str] = None, per_subset: bool = False,
                 max_pairs: Optional[int] = None, seed: int = 0) -> dict[str, float]:
    """Spearman x100 per task (SimCSE's "all" setting for STS12-16) and ``avg`` over tasks.

    ``embed_fn`` is called once, with the unique sentences of all tasks. With
    ``per_subset``, also ``"<task>/<subset>"`` entries (Spearman of each subset alone).
    ``max_pairs``: evaluate a fixed random subset of each task's pairs (faster, noisier).
    """
    task_pairs = load_sts_tasks(tasks, data_dir, max_pairs, seed)
    sents = task_sentences([p for subsets in task_pairs.values() for p in subsets])
    return spearman_from_lookup(_embed_unique(embed_fn, sents), task_pairs, per_subset)


def anisotropy(embeddings: np.ndarray, n_pairs: int = 10000, seed: int = 0) -> float:
    """Mean cosine similarity of ``n_pairs`` random pairs of distinct rows of ``[n, d]``."""
    x = np.asarray(embeddings, np.float64)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"anisotropy needs at least 2 embeddings, got {n}")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, n_pairs)
    j = (i + rng.integers(1, n, n_pairs)) % n  # j != i
    return float(np.mean(cosine_rows(x[i], x[j])))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def alignment(x: np.ndarray, y: np.ndarray, alpha: float = 2.0) -> float:
    """``E ||f(x) - f(y)||^alpha`` over positive pairs (rows), embeddings L2-normalized."""
    return float(np.mean(np.linalg.norm(_unit(x) - _unit(y), axis=-1) ** alpha))


def uniformity(x: np.ndarray, t: float = 2.0) -> float:
    """``log E exp(-t ||f(a) - f(b)||^2)`` over all pairs ``a != b`` of rows (normalized)."""
    u = _unit(x)
    sq = np.maximum(2.0 - 2.0 * (u @ u.T), 0.0)
    iu = np.triu_indices(u.shape[0], k=1)
    v = -t * sq[iu]
    m = v.max()
    return float(m + np.log(np.mean(np.exp(v - m))))


def geometry(embed_fn: EmbedFn, data_dir: Optional[str] = None, split: str = "test",
             positive_threshold: float = 4.0, max_sentences: int = 4000, seed: int = 0
             ) -> dict[str, float]:
    """Anisotropy, alignment (STS-B pairs with gold > ``positive_threshold``) and uniformity
    (all STS-B sentences of ``split``, at most ``max_sentences``)."""
    (pairs,) = load_sts_task("STSBenchmark", data_dir, split)
    sents = task_sentences([pairs])
    if len(sents) > max_sentences:
        idx = np.random.default_rng(seed).choice(len(sents), max_sentences, replace=False)
        sents_used = [sents[i] for i in sorted(idx)]
    else:
        sents_used = sents
    pos = np.flatnonzero(pairs.gold > positive_threshold)
    needed = list(dict.fromkeys(sents_used + [pairs.sent1[i] for i in pos]
                                + [pairs.sent2[i] for i in pos]))
    lookup = _embed_unique(embed_fn, needed)
    emb = np.stack([lookup[s] for s in sents_used])
    a = np.stack([lookup[pairs.sent1[i]] for i in pos])
    b = np.stack([lookup[pairs.sent2[i]] for i in pos])
    return {"anisotropy": anisotropy(emb, seed=seed), "alignment": alignment(a, b),
            "uniformity": uniformity(emb)}


def format_results(results: Mapping[str, float], tasks: Sequence[str] = STS_TASKS) -> str:
    """One line: ``STS12 .. SICK-R avg`` with two decimals."""
    names = [SHORT_NAMES.get(t, t) for t in tasks] + ["avg"]
    vals = [results[t] for t in tasks] + [results["avg"]]
    return " ".join(f"{n}={v:.2f}" for n, v in zip(names, vals))
