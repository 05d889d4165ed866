"""``peft-jax spot``: manage a prompt library, rank sources, evaluate retrieval.

    peft-jax spot add LIB NAME --prompt P.npy --task T --base-id ID [--base-hash H]
                      [--init I] [--steps N] [--metric accuracy=0.93] [--overwrite]
    peft-jax spot add LIB [NAME] --from-run WORKDIR [--prompt P.npy] [--metric accuracy]
    peft-jax spot list LIB [--task T] [--base-hash H] [--json]
    peft-jax spot inspect LIB NAME
    peft-jax spot rank LIB --target P.npy|NAME [--target-library TLIB] [--method mean_cosine|token_cosine]
                       [--top K] [--base-hash H] [--exclude-task T] [--json]
    peft-jax spot run --config F --sources a,b --targets x,y --workdir W [--source-steps N]
                      [--embed-steps M] [--transfer-steps K] [--baselines ...]
                      [--splits TASK=TRAIN:EVAL ...] [--config.KEY=V ...]
    peft-jax spot eval-retrieval --gains G.csv (--rankings R.json | --library LIB --targets TLIB)
                       [--method M] [--k 1 --k 3] [--by task|name] [--out S.json]

``eval-retrieval`` with ``--targets``: every entry of TLIB (briefly trained target prompts)
is ranked against LIB (entries of the same task excluded); with ``--by task`` (default)
sources and targets are identified by task name (best-scoring entry per source task), which
is what the gains CSV (``source,target,gain``) refers to. ``run`` is the whole pipeline
(:mod:`peft_jax.transfer.pipeline`): train sources -> library -> target embeddings -> rank ->
transfer vs baseline inits -> one table with MRR and gains.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import numpy as np

from peft_jax.config import ConfigError
from peft_jax.errors import print_error
from peft_jax.transfer.library import LibraryError, PromptLibrary, add_from_run, shared_init_warnings
from peft_jax.transfer.pipeline import (BASELINES, SpotPipeline, markdown, parse_splits,
                                        rankings_for_targets)
from peft_jax.transfer.retrieval import evaluate_retrieval, read_gains_csv
from peft_jax.transfer.similarity import SIMILARITIES, rank


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _parse_metric(text: Optional[str]) -> tuple[Optional[str], Optional[float]]:
    if not text:
        return None, None
    if "=" in text:
        k, _, v = text.partition("=")
        try:
            return k, float(v)
        except ValueError:
            raise LibraryError(f"--metric {text!r}: value {v!r} is not a number") from None
    return text, None


def cmd_add(a) -> int:
    lib = PromptLibrary(a.library, create=True)
    name, value = _parse_metric(a.metric)
    if a.from_run:
        meta = add_from_run(lib, a.from_run, name=a.name, prompt_file=a.prompt, metric=name or "accuracy",
                            base_id=a.base_id, base_hash=a.base_hash, overwrite=a.overwrite)
    else:
        missing = [f for f, v in (("NAME", a.name), ("--prompt", a.prompt), ("--task", a.task),
                                  ("--base-id", a.base_id)) if not v]
        if missing:
            raise LibraryError(f"spot add: missing {', '.join(missing)} (or use --from-run WORKDIR)")
        arr = np.load(a.prompt, allow_pickle=False)
        meta = lib.add(a.name, arr, task=a.task, base_id=a.base_id, base_hash=a.base_hash, init=a.init,
                       seed=a.seed, steps=a.steps, metric=name, metric_value=value, source=a.prompt,
                       overwrite=a.overwrite)
    print(f"added {meta.name}: task={meta.task} [{meta.length}, {meta.d_model}] {meta.dtype} -> {lib.root}")
    return 0


def cmd_list(a) -> int:
    metas = PromptLibrary(a.library).list(task=a.task, base_hash=a.base_hash)
    if a.json:
        print(json.dumps([m.to_json() for m in metas], indent=2))
        return 0
    rows = [["name", "task", "base_id", "length", "d_model", "init", "steps", "metric", "value"]]
    rows += [[m.name, m.task, m.base_id, str(m.length), str(m.d_model), _fmt(m.init), _fmt(m.steps),
              _fmt(m.metric), _fmt(m.metric_value)] for m in metas]
    print(_table(rows))
    print(f"{len(metas)} prompt(s)")
    return 0


def cmd_inspect(a) -> int:
    print(json.dumps(PromptLibrary(a.library).inspect(a.name), indent=2))
    return 0


def _target_prompt(spec: str, lib: PromptLibrary, target_library: Optional[str]) -> np.ndarray:
    if spec.endswith(".npy"):
        return np.load(spec, allow_pickle=False)
    return (PromptLibrary(target_library) if target_library else lib).load(spec)


def cmd_rank(a) -> int:
    lib = PromptLibrary(a.library)
    target = _target_prompt(a.target, lib, a.target_library)
    exclude = tuple(m.name for m in lib.list() if a.exclude_task and m.task == a.exclude_task)
    ranked = rank(target, lib, method=a.method, exclude=exclude, base_hash=a.base_hash)[: a.top or None]
    compared = [m for m in lib.list() if m.name in dict(ranked)]
    if not a.target.endswith(".npy"):
        compared.append((PromptLibrary(a.target_library) if a.target_library else lib).meta(a.target))
    for w in shared_init_warnings(compared):
        print(w, file=sys.stderr)
    if a.json:
        print(json.dumps(ranked))
        return 0
    tasks = {m.name: m.task for m in lib.list()}
    rows = [["rank", "source", "task", a.method]]
    rows += [[str(i + 1), s, tasks[s], f"{sc:.4f}"] for i, (s, sc) in enumerate(ranked)]
    print(_table(rows))
    return 0


def cmd_eval_retrieval(a) -> int:
    gains = read_gains_csv(a.gains)
    if a.rankings:
        with open(a.rankings) as f:
            rankings = {t: [tuple(x) for x in r] for t, r in json.load(f).items()}
    elif a.library and a.targets:
        lib, tlib = PromptLibrary(a.library), PromptLibrary(a.targets)
        for w in shared_init_warnings(lib.list() + tlib.list()):
            print(w, file=sys.stderr)
        rankings = rankings_for_targets(lib, tlib, a.method, a.by)
    else:
        raise LibraryError("spot eval-retrieval: pass --rankings R.json, or --library LIB and --targets TLIB")
    res = evaluate_retrieval(rankings, gains, ks=tuple(a.k or (1, 3)))
    text = json.dumps(res, indent=2, sort_keys=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    s = res["summary"]
    print(_table([[k, _fmt(v)] for k, v in s.items()]))
    return 0


def _tasks(text: str, flag: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise LibraryError(f"spot run: {flag} {text!r} names no task")
    return tasks


def cmd_run(a) -> int:
    bad = [x for x in a.extra if not (x.startswith("--config.") and "=" in x)]
    if bad:
        raise LibraryError(f"spot run: unrecognized arguments {bad} (config overrides are --config.KEY=VALUE)")
    pipe = SpotPipeline(a.config, _tasks(a.sources, "--sources"), _tasks(a.targets, "--targets"), a.workdir,
                        source_steps=a.source_steps, embed_steps=a.embed_steps,
                        transfer_steps=a.transfer_steps, baselines=_tasks(a.baselines, "--baselines"),
                        overrides=[x[len("--config."):] for x in a.extra], splits=parse_splits(a.splits))
    res = pipe(ks=tuple(a.k or (1, 3)))
    print(markdown(res), end="")
    print(f"wrote {pipe.root}/spot.md, spot.json, gains.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-jax spot", description="SPoT prompt library and retrieval")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("add", help="add a prompt (.npy) or a finished run's exported prompt")
    q.add_argument("library")
    q.add_argument("name", nargs="?")
    q.add_argument("--prompt")
    q.add_argument("--from-run")
    q.add_argument("--task")
    q.add_argument("--base-id")
    q.add_argument("--base-hash")
    q.add_argument("--init")
    q.add_argument("--seed", type=int)
    q.add_argument("--steps", type=int)
    q.add_argument("--metric", help="NAME=VALUE (or NAME with --from-run)")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(fn=cmd_add)
    q = sub.add_parser("list", help="list the library")
    q.add_argument("library")
    q.add_argument("--task")
    q.add_argument("--base-hash")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_list)
    q = sub.add_parser("inspect", help="metadata and statistics of one prompt")
    q.add_argument("library")
    q.add_argument("name")
    q.set_defaults(fn=cmd_inspect)
    q = sub.add_parser("rank", help="rank library prompts by similarity to a target prompt")
    q.add_argument("library")
    q.add_argument("--target", required=True, help="a .npy file or an entry name")
    q.add_argument("--target-library")
    q.add_argument("--method", default="mean_cosine", choices=sorted(SIMILARITIES))
    q.add_argument("--top", type=int, default=0)
    q.add_argument("--base-hash")
    q.add_argument("--exclude-task")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_rank)
    q = sub.add_parser("run", help="the SPoT pipeline: sources -> library -> target embeddings -> "
                       "rank -> transfer vs baseline inits -> table (MRR, gains)")
    q.add_argument("--config", required=True, help="a prompt-tuning config file[:arg]")
    q.add_argument("--sources", required=True, help="source task names, comma-separated")
    q.add_argument("--targets", required=True, help="target task names, comma-separated")
    q.add_argument("--workdir", required=True)
    q.add_argument("--source-steps", type=int, default=1000)
    q.add_argument("--embed-steps", type=int, default=100,
                   help="steps of the short target run whose prompt is the task embedding")
    q.add_argument("--transfer-steps", type=int, default=1000)
    q.add_argument("--baselines", default=",".join(BASELINES))
    q.add_argument("--splits", action="append", default=[], metavar="TASK=TRAIN:EVAL",
                   help="a task's train / eval splits (default: the config's task.train_split / eval_split)")
    q.add_argument("--k", type=int, action="append", help="top-k of the retrieval table (1, 3)")
    q.set_defaults(fn=cmd_run, extra=[])
    q = sub.add_parser("eval-retrieval", help="retrieval quality against measured transfer gains")
    q.add_argument("--gains", required=True)
    q.add_argument("--rankings")
    q.add_argument("--library")
    q.add_argument("--targets")
    q.add_argument("--method", default="mean_cosine", choices=sorted(SIMILARITIES))
    q.add_argument("--by", default="task", choices=["task", "name"])
    q.add_argument("--k", type=int, action="append")
    q.add_argument("--out")
    q.set_defaults(fn=cmd_eval_retrieval)
    return p


def spot_main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = build_parser().parse_known_args(argv)
    if extra and args.cmd != "run":
        build_parser().parse_args(argv)    # the usual "unrecognized arguments" error
    args.extra = extra
    try:
        return args.fn(args)
    except (LibraryError, ConfigError, ValueError, FileNotFoundError) as e:
        print_error(e, f"spot {args.cmd}: ")
        return 2


if __name__ == "__main__":
    sys.exit(spot_main())
