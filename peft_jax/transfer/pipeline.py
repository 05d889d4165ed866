"""SPoT as one pipeline (Vu et al. 2022): ``peft-jax spot run``.

    peft-jax spot run --config F --sources a,b,c --targets x,y --workdir W
                      [--source-steps N] [--embed-steps M] [--transfer-steps K]
                      [--baselines uniform,sampled_vocab,class_labels] [--k 1 --k 3]
                      [--splits TASK=TRAIN:EVAL ...]
                      [--config.KEY=V ...]

1. **Sources**: a prompt-tuning run of config ``F`` per source task (``W/sources/<task>``,
   ``N`` steps), stored in the library ``W/library`` with its metadata (task, base id and
   hash, length, init, seed, steps, dev metric).
2. **Target task embeddings**: SPoT's recipe, a short prompt-tuning run (``M`` steps) on
   each target (``W/embed/<task>``), stored in ``W/targets``.
3. **Ranking**: every target embedding against the sources, by mean-pooled cosine and by
   per-token cosine (:mod:`peft_jax.transfer.similarity`).
4. **Transfer**: per target, one run (``K`` steps) from each source prompt
   (``peft.prompt.init=file``) and one from each baseline init (``W/transfer/<target>/...``),
   at the same budget.
5. **Table**: per target the baselines, each source's gain over uniform init, and per
   similarity the retrieved source and its gain vs the best source's gain; MRR of the best
   source in each ranking (``W/spot.md``, ``W/spot.json``, ``W/gains.png``).

Runs are resumable: a finished run with the same config is not run again. Every run goes
in this process, the base model loaded once. The library warns when compared prompts
started from the same init and trained too little (:func:`shared_init_warnings`).
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from peft_jax.config import apply_overrides, load_config_file
from peft_jax.transfer.library import (LibraryError, PromptLibrary, add_from_run,
                                       shared_init_warnings)
from peft_jax.transfer.retrieval import evaluate_retrieval
from peft_jax.transfer.similarity import SIMILARITIES, rank

BASELINES = ("uniform", "sampled_vocab", "class_labels")
GAIN_BASELINE = "uniform"      # SPoT's gains are over a random (uniform) init


def rankings_for_targets(lib: PromptLibrary, targets: PromptLibrary, method: str = "mean_cosine",
                         by: str = "task") -> dict[str, list[tuple[str, float]]]:
    """Rank ``lib`` for every entry of ``targets`` (same-task sources excluded).

    ``by="task"``: keys and sources are task names (a source task's best entry counts).
    """
    if by not in ("task", "name"):
        raise ValueError(f"by={by!r}: choose 'task' or 'name'")
    src_task = {m.name: m.task for m in lib.list()}
    out = {}
    for tm in targets.list():
        excl = tuple(n for n, t in src_task.items() if t == tm.task)
        ranked = rank(targets.load(tm.name), lib, method=method, exclude=excl, base_hash=tm.base_hash)
        if by == "name":
            out[tm.name] = ranked
            continue
        seen, collapsed = set(), []
        for s, sc in ranked:
            if src_task[s] not in seen:
                seen.add(src_task[s])
                collapsed.append((src_task[s], sc))
        if tm.task in out:
            raise LibraryError(f"target library has several prompts for task {tm.task!r}; use --by name")
        out[tm.task] = collapsed
    return out


def entry_name(task: str) -> str:
    """Library entry / folder name of a task (``lmbff/cr`` -> ``lmbff_cr``)."""
    return task.replace("/", "_")


def check_splits(splits: Mapping[str, tuple[str, str]]) -> None:
    """Every task has its (train, eval) splits (before any run starts): an error naming the
    task, its splits and ``--splits TASK=TRAIN:EVAL`` otherwise."""
    from peft_jax.data import get_task
    for task, (train, dev) in splits.items():
        have = tuple(getattr(get_task(task), "splits", ()) or ())
        missing = [s for s in (train, dev) if have and s not in have]
        if missing:
            raise LibraryError(f"spot run: task {task!r} has no split {missing} (splits: {list(have)}); "
                               f"pass --splits {task}=TRAIN:EVAL")


def parse_splits(items: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``["trec=train:test", ...]`` -> {"trec": ("train", "test")}."""
    out = {}
    for it in items:
        task, _, rest = it.partition("=")
        train, _, dev = rest.partition(":")
        if not (task and train and dev):
            raise LibraryError(f"--splits {it!r}: expected TASK=TRAIN_SPLIT:EVAL_SPLIT")
        out[task] = (train, dev)
    return out


def _metric(row: Mapping[str, Any], metric: str) -> float:
    v = (row.get("metrics") or {}).get(metric) if row.get("status") == "finished" else None
    return math.nan if v is None else float(v)


class SpotPipeline:
    """The runs of one ``spot run`` (see the module docstring); ``overrides``: ``KEY=V``
    for every run (as ``--config.KEY=V``)."""

    def __init__(self, config_spec: str, sources: Sequence[str], targets: Sequence[str], workdir: str,
                 *, source_steps: int, embed_steps: int, transfer_steps: int,
                 baselines: Sequence[str] = BASELINES, overrides: Sequence[str] = (),
                 splits: Optional[Mapping[str, tuple[str, str]]] = None, log=print):
        self.cfg = load_config_file(config_spec)
        apply_overrides(self.cfg, list(overrides))
        if "prompt" not in str(self.cfg.peft.methods).split(","):
            raise LibraryError(f"spot run: config.peft.methods={self.cfg.peft.methods!r} has no "
                               "'prompt' (SPoT transfers soft prompts)")
        overlap = sorted(set(sources) & set(targets))
        if overlap:
            raise LibraryError(f"spot run: tasks {overlap} are both sources and targets")
        bad = [b for b in baselines if b not in BASELINES]
        if bad or GAIN_BASELINE not in baselines:
            raise LibraryError(f"spot run: --baselines {list(baselines)}: choose from {list(BASELINES)}, "
                               f"{GAIN_BASELINE!r} included (the gains are over it)")
        self.sources, self.targets, self.root = list(sources), list(targets), os.path.abspath(workdir)
        self.steps = {"sources": source_steps, "embed": embed_steps, "transfer": transfer_steps}
        self.baselines, self.log, self.cache = list(baselines), log, {}
        self.metric = self.cfg.train.best_metric or "accuracy"
        self.splits = {t: tuple((splits or {}).get(t) or (self.cfg.task.train_split, self.cfg.task.eval_split))
                       for t in self.sources + self.targets}
        check_splits(self.splits)
        self.library = PromptLibrary(os.path.join(self.root, "library"), create=True)
        self.target_library = PromptLibrary(os.path.join(self.root, "targets"), create=True)

    # ----------------------------------------------------------------------------- runs

    def config(self, workdir: str, **over: Any):
        """The config of one run: ``self.cfg`` with dotted-key overrides and ``workdir``."""
        cfg = copy.deepcopy(self.cfg)
        train, dev = self.splits[over["task.name"]]
        apply_overrides(cfg, [f"{k}={v}" for k, v in over.items()]
                        + [f"task.train_split={train}", f"task.eval_split={dev}", f"workdir={workdir}"])
        return cfg

    def run(self, workdir: str, **over: Any) -> dict:
        """Train one run (skipped when ``workdir`` holds a finished run of the same config);
        its result row (a failed run: status 'failed' and its error, not raised)."""
        from peft_jax.runner import run_experiment
        from peft_jax.sweep import pretrained_for, read_result
        cfg = self.config(workdir, **over)
        done = read_result(workdir)
        if done and done.get("status") == "finished" and done.get("steps") == cfg.train.steps:
            return done
        self.log(f"[spot] run {os.path.relpath(workdir, self.root)} ({', '.join(f'{k}={v}' for k, v in over.items())})")
        try:
            return run_experiment(cfg, pretrained=pretrained_for(cfg, self.cache)).row
        except Exception as e:  # noqa: BLE001 (a failed cell is a result; the table shows it)
            self.log(f"[spot] failed: {type(e).__name__}: {e}")
            return {"status": "failed", "error": f"{type(e).__name__}: {e}"}

    def train_prompts(self, tasks: Sequence[str], stage: str, library: PromptLibrary) -> None:
        for task in tasks:
            wd = os.path.join(self.root, stage, entry_name(task))
            row = self.run(wd, **{"task.name": task, "train.steps": self.steps[stage]})
            if row.get("status") != "finished":
                raise LibraryError(f"spot run: the {stage} run of {task!r} failed: {row.get('error')}")
            add_from_run(library, wd, name=entry_name(task), metric=self.metric, overwrite=True)

    def transfer(self) -> dict[str, dict[str, float]]:
        """{target: {"from:<source>" | "<init>": dev metric}} at the transfer budget."""
        out: dict[str, dict[str, float]] = {}
        steps = self.steps["transfer"]
        for t in self.targets:
            out[t] = {}
            for init in self.baselines:
                wd = os.path.join(self.root, "transfer", entry_name(t), f"init-{init}")
                out[t][init] = _metric(self.run(wd, **{"task.name": t, "train.steps": steps,
                                                       "peft.prompt.init": init}), self.metric)
            for s in self.sources:
                wd = os.path.join(self.root, "transfer", entry_name(t), f"from-{entry_name(s)}")
                out[t][f"from:{s}"] = _metric(self.run(wd, **{
                    "task.name": t, "train.steps": steps, "peft.prompt.init": "file",
                    "peft.prompt.file": os.path.join(self.library.root, f"{entry_name(s)}.npy")}), self.metric)
        return out

    # ----------------------------------------------------------------------------- all

    def __call__(self, ks: Sequence[int] = (1, 3)) -> dict:
        self.train_prompts(self.sources, "sources", self.library)
        self.train_prompts(self.targets, "embed", self.target_library)
        warnings = shared_init_warnings(self.library.list() + self.target_library.list())
        for w in warnings:
            self.log(w)
        rankings = {m: rankings_for_targets(self.library, self.target_library, m) for m in sorted(SIMILARITIES)}
        scores = self.transfer()
        res = spot_table(scores, rankings, self.sources, ks=ks)
        res["warnings"] = warnings
        res["steps"] = self.steps
        res["metric"] = self.metric
        write_outputs(self.root, res)
        return res


def spot_table(scores: Mapping[str, Mapping[str, float]], rankings: Mapping[str, Mapping[str, list]],
               sources: Sequence[str], ks: Sequence[int] = (1, 3)) -> dict:
    """Gains over uniform init and retrieval quality per similarity.

    ``scores``: {target: {"<init>": metric, "from:<source>": metric}}; ``rankings``:
    {similarity: {target: [(source, score), ...]}}. Returns ``gains`` {target: {source:
    gain}}, ``retrieval`` {similarity: evaluate_retrieval(...)} (MRR of the best source,
    top-k gain vs the best source's gain), ``scores``, ``rankings``; failed runs (NaN) are
    left out of the gains."""
    gains = {t: {s: row[f"from:{s}"] - row[GAIN_BASELINE] for s in sources
                 if np.isfinite(row.get(f"from:{s}", math.nan) - row.get(GAIN_BASELINE, math.nan))}
             for t, row in scores.items()}
    flat = {(s, t): g for t, gs in gains.items() for s, g in gs.items()}
    retrieval = {m: evaluate_retrieval(r, flat, ks=tuple(ks)) for m, r in rankings.items()} if flat else {}
    return {"scores": {t: dict(v) for t, v in scores.items()}, "gains": gains,
            "rankings": {m: {t: [list(x) for x in r] for t, r in rk.items()} for m, rk in rankings.items()},
            "retrieval": retrieval}


def _pct(v: Optional[float], sign: bool = False) -> str:
    if v is None or not np.isfinite(v):
        return "-"
    return f"{100 * v:+.1f}" if sign else f"{100 * v:.1f}"


def markdown(res: Mapping[str, Any]) -> str:
    """The pipeline's table: per target the baseline inits, the best source, and per
    similarity the retrieved top-1 with its gain; then MRR and mean gains per similarity."""
    sims = sorted(res["retrieval"])
    inits = [k for k in next(iter(res["scores"].values())) if not k.startswith("from:")]
    head = (["target"] + [f"{i} init" for i in inits] + ["best source (gain)"]
            + [f"{m}: top-1 (gain)" for m in sims])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t, row in res["scores"].items():
        g = res["gains"].get(t, {})
        best = max(g, key=g.get) if g else None
        cells = [t] + [_pct(row[i]) for i in inits]
        cells.append(f"{best} ({_pct(g[best], True)})" if best else "-")
        for m in sims:
            per = res["retrieval"][m]["per_target"].get(t)
            cells.append(f"{per['top_source']} ({_pct(g.get(per['top_source']), True)})" if per else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| similarity | MRR of the best source | mean top-1 gain | mean best-source gain | "
              "top-1 beats uniform |", "|---|---|---|---|---|"]
    for m in sims:
        s = res["retrieval"][m]["summary"]
        lines.append(f"| {m} | {s['mrr']:.3f} | {_pct(s['mean_top1_gain'], True)} | "
                     f"{_pct(s['mean_oracle_gain'], True)} | {s['top1_beats_random_rate']:.2f} |")
    lines.append("")
    lines.append(f"{res.get('metric', 'accuracy')} x100; gains over uniform init at the same budget; "
                 f"steps: {res.get('steps')}")
    return "\n".join(lines + list(res.get("warnings") or [])) + "\n"


def write_outputs(root: str, res: Mapping[str, Any]) -> None:
    """``spot.json`` (everything), ``spot.md`` (the table), ``gains.png`` (source x target)."""
    from peft_jax.report import plot_transfer_heatmap
    with open(os.path.join(root, "spot.json"), "w") as f:
        json.dump(res, f, indent=2, sort_keys=True, default=float)
    with open(os.path.join(root, "spot.md"), "w") as f:
        f.write(markdown(res))
    targets = list(res["scores"])
    sources = sorted({s for g in res["gains"].values() for s in g})
    if sources:
        m = np.array([[res["gains"][t].get(s, math.nan) for t in targets] for s in sources])
        plot_transfer_heatmap(sources, targets, m, os.path.join(root, "gains.png"),
                              title="SPoT: gain over uniform init", relative=True, scale=100)
