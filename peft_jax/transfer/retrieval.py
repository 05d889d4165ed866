"""Evaluating source-prompt retrieval (SPoT): do the predicted sources transfer well?

Inputs: ``rankings`` {target: [(source, score), ...] best first} (e.g. from
:func:`peft_jax.transfer.similarity.rank`) and measured ``gains`` {(source, target): g},
``g`` = target metric after transfer from ``source`` minus the target metric from random
(non-transfer) init. Per target, only sources with a measured gain are considered.

Per-target measures: gain of the top-k retrieved sources (best of the k, as when one tries
the k retrieved sources and keeps the best), whether that beats random init (g > 0), the
oracle (best measured) source and its predicted rank, the mean gain over all sources (the
expected gain of a randomly picked source) and the Spearman / Kendall rank correlation
between predicted scores and gains. The summary averages them over targets.
"""

from __future__ import annotations

import csv
import math
from typing import Mapping, Sequence

import numpy as np


def gains_from_scores(transfer: Mapping[tuple[str, str], float], baseline: Mapping[str, float]
                      ) -> dict[tuple[str, str], float]:
    """{(source, target): transfer score} and {target: random-init score} -> gains."""
    out = {}
    for (s, t), v in transfer.items():
        if t not in baseline:
            raise ValueError(f"no random-init baseline score for target {t!r} (needed by source {s!r})")
        out[(s, t)] = float(v) - float(baseline[t])
    return out


def read_gains_csv(path: str) -> dict[tuple[str, str], float]:
    """CSV with header ``source,target,gain`` or ``source,target,transfer,baseline``."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        if not {"source", "target"} <= cols or not ({"gain"} <= cols or {"transfer", "baseline"} <= cols):
            raise ValueError(f"{path}: need columns source,target,gain or source,target,transfer,baseline; "
                             f"found {sorted(cols)}")
        out = {}
        for i, r in enumerate(reader, start=2):
            try:
                g = float(r["gain"]) if "gain" in cols else float(r["transfer"]) - float(r["baseline"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}:{i}: not a number ({e})") from e
            out[(r["source"], r["target"])] = g
    return out


def _corr(fn, x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(fn(x, y)[0])


def evaluate_target(ranking: Sequence[tuple[str, float]], gains: Mapping[str, float],
                    ks: Sequence[int] = (1, 3)) -> dict:
    """One target: ``ranking`` [(source, score)] best first, ``gains`` {source: gain}."""
    from scipy import stats   # here: importing scipy.stats costs every command's start-up ~1 s
    ranked = [(s, float(sc)) for s, sc in ranking if s in gains]
    if not ranked:
        raise ValueError("no ranked source has a measured gain")
    order = [s for s, _ in ranked]
    g = np.array([gains[s] for s in order], dtype=np.float64)
    scores = [sc for _, sc in ranked]
    oracle_i = int(np.argmax(g))
    out = dict(n_sources=len(order), top_source=order[0], oracle_source=order[oracle_i],
               oracle_gain=float(g[oracle_i]), random_gain=float(g.mean()),
               oracle_rank=oracle_i + 1,
               spearman=_corr(stats.spearmanr, scores, g), kendall=_corr(stats.kendalltau, scores, g))
    for k in ks:
        best = float(g[: min(k, len(g))].max())
        out[f"top{k}_gain"] = best
        out[f"top{k}_beats_random"] = bool(best > 0)
    out["regret"] = out["oracle_gain"] - out[f"top{ks[0]}_gain"]
    return out


def evaluate_retrieval(rankings: Mapping[str, Sequence[tuple[str, float]]],
                       gains: Mapping[tuple[str, str], float], ks: Sequence[int] = (1, 3)) -> dict:
    """All targets with at least one measured source -> {"per_target": {...}, "summary": {...}}."""
    by_target: dict[str, dict[str, float]] = {}
    for (s, t), v in gains.items():
        by_target.setdefault(t, {})[s] = float(v)
    per = {}
    skipped = []
    for t in sorted(rankings):
        if t not in by_target or not any(s in by_target[t] for s, _ in rankings[t]):
            skipped.append(t)
            continue
        per[t] = evaluate_target(rankings[t], by_target[t], ks)
    if not per:
        raise ValueError(f"no target has both a ranking and measured gains (rankings for "
                         f"{sorted(rankings)[:10]}, gains for {sorted(by_target)[:10]})")

    def mean(key):
        vals = [r[key] for r in per.values() if not (isinstance(r[key], float) and math.isnan(r[key]))]
        return float(np.mean(vals)) if vals else math.nan

    summary = dict(n_targets=len(per), skipped_targets=skipped,
                   mean_oracle_gain=mean("oracle_gain"), mean_random_gain=mean("random_gain"),
                   mean_regret=mean("regret"), mean_oracle_rank=mean("oracle_rank"),
                   mrr=float(np.mean([1.0 / r["oracle_rank"] for r in per.values()])),
                   mean_spearman=mean("spearman"), mean_kendall=mean("kendall"))
    for k in ks:
        summary[f"top{k}_beats_random_rate"] = float(np.mean([r[f"top{k}_beats_random"] for r in per.values()]))
        summary[f"mean_top{k}_gain"] = mean(f"top{k}_gain")
    return {"per_target": per, "summary": summary}
