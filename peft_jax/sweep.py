"""Sweeps: one config file + a declared grid -> named runs, executed locally and resumably.

A config declares its sweep in the field ``sweep``, either

- a (nested) mapping whose leaves are lists: the cartesian product, e.g.
  ``config.sweep = {"peft": {"prompt": {"length": [1, 5, 20, 100, 150]}}, "seed": [13, 21]}``
  (ml_collections sorts keys, so axes vary in sorted-key order, the last fastest), or
- a list of dicts with dotted keys, e.g. ``[{"peft.prompt.init": "uniform"}, {...}]``: each
  dict is one grid (its list values are axes; wrap a list-valued parameter as ``[[1, 2]]``);
  the runs are the grids' concatenation, in order.

Each run is a list of ``--config.a.b=v`` overrides (validated against the config before
anything runs) and a workdir ``<root>/<name>``. Names are stable: a short readable part from
the overrides plus 8 hex digits of a hash of them, so the same point always gets the same
folder. A run whose ``result.json`` says ``finished`` is skipped (after checking that it was
made with the same overrides); failed or missing runs are (re)executed.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import dataclasses
import fnmatch
import hashlib
import itertools
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Iterable, Mapping, Optional, Sequence, TextIO

import ml_collections

from peft_jax.config import ConfigError, apply_overrides, load_config_file, split_config_args
from peft_jax.errors import print_error

RESULT_FILE = "result.json"
SWEEP_FIELD = "sweep"


class SweepError(ValueError):
    """A bad sweep declaration, or a workdir holding another run; the message names it."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One point of a sweep: ``overrides`` are (dotted key, value) pairs in declaration order."""

    name: str
    overrides: tuple[tuple[str, Any], ...]
    workdir: str
    expected: tuple[tuple[str, Any], ...] = ()  # overridden keys' final (coerced) config values

    def override_args(self) -> list[str]:
        return [f"--config.{k}={format_value(v)}" for k, v in self.overrides]


def format_value(v: Any) -> str:
    """Value -> the text after ``--config.key=`` that the config parser reads back as ``v``."""
    if isinstance(v, str):
        try:
            ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return v
        return repr(v)  # a string like "1e-3" or "True" must stay a string
    return repr(v)


def _is_axis(v: Any) -> bool:
    return isinstance(v, (list, tuple))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k in tree.keys():
        v = tree[k]
        key = f"{prefix}{k}"
        if isinstance(v, (Mapping, ml_collections.ConfigDict)):
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def _grid(items: Sequence[tuple[str, Any]], where: str) -> list[dict[str, Any]]:
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        raise SweepError(f"{where}: key given twice: {sorted(k for k in keys if keys.count(k) > 1)}")
    axes = []
    for k, v in items:
        vals = list(v) if _is_axis(v) else [v]
        if not vals:
            raise SweepError(f"{where}: sweep axis {k!r} has no values")
        axes.append(vals)
    return [dict(zip(keys, combo)) for combo in itertools.product(*axes)]


def sweep_points(spec: Any) -> list[dict[str, Any]]:
    """Normalize a sweep declaration (see module docstring) to an ordered list of points."""
    if spec is None:
        raise SweepError("the config declares no sweep (set config.sweep)")
    if isinstance(spec, (Mapping, ml_collections.ConfigDict)):
        points = _grid(_flatten(spec), "config.sweep")
    elif isinstance(spec, (list, tuple)):
        points = []
        for i, d in enumerate(spec):
            if not isinstance(d, (Mapping, ml_collections.ConfigDict)):
                raise SweepError(f"config.sweep[{i}]: expected a dict of overrides, got {type(d).__name__}")
            points += _grid(_flatten(d), f"config.sweep[{i}]")
    else:
        raise SweepError(f"config.sweep: expected a dict or a list of dicts, got {type(spec).__name__}")
    if not points:
        raise SweepError("config.sweep expands to no runs")
    return points


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")


def run_name(point: Mapping[str, Any], max_readable: int = 60) -> str:
    """Stable folder name: readable ``length20_init-class_labels_seed13`` + ``-`` + 8 hex hash."""
    canon = json.dumps(sorted((k, v) for k, v in point.items()), default=repr, separators=(",", ":"))
    digest = hashlib.sha1(canon.encode()).hexdigest()[:8]
    parts = []
    for k, v in point.items():
        leaf = k.rsplit(".", 1)[-1]
        val = _slug(v if isinstance(v, str) else format_value(v))
        parts.append(f"{leaf}{val}" if not isinstance(v, str) else f"{leaf}-{val}")
    readable = "_".join(parts)[:max_readable].rstrip("_-")
    return f"{readable}-{digest}" if readable else digest


def _config_value(cfg: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = cfg
    for p in key.split("."):
        node = node[p]
    return node


def expand(config_spec: str, root: str, common: Sequence[str] = (),
           cfg: Optional[ml_collections.ConfigDict] = None) -> list[Run]:
    """Config file (``path.py[:arg]``) with a ``sweep`` field -> runs under ``root``.

    ``common``: ``a.b=v`` overrides applied to every run (not part of the names). Every
    run's overrides are applied to a copy of the config, so an unknown key or a wrong type
    fails here, naming the run, before anything executes.
    """
    cfg = cfg if cfg is not None else load_config_file(config_spec)
    if SWEEP_FIELD not in cfg:
        raise SweepError(f"{config_spec}: the config has no field 'sweep' to expand")
    base = copy.deepcopy(cfg)
    apply_overrides(base, common)
    runs, seen = [], {}
    for point in sweep_points(cfg[SWEEP_FIELD]):
        if any(k == SWEEP_FIELD or k.startswith(SWEEP_FIELD + ".") for k in point):
            raise SweepError(f"sweep point {point}: cannot override the sweep itself")
        name = run_name(point)
        if name in seen:
            raise SweepError(f"sweep point {point} is declared twice (also {seen[name]})")
        seen[name] = point
        run = Run(name=name, overrides=tuple(point.items()), workdir=os.path.join(os.path.abspath(root), name))
        try:
            final = apply_overrides(copy.deepcopy(base), [a[len("--config."):] for a in run.override_args()])
        except ConfigError as e:
            raise SweepError(f"sweep run {name}: {e}") from e
        keys = [c.partition("=")[0] for c in common] + [k for k, _ in run.overrides]
        expected = tuple((k, _config_value(final, k)) for k in dict.fromkeys(keys))
        runs.append(dataclasses.replace(run, expected=expected))
    return runs


def read_result(workdir: str) -> Optional[dict]:
    path = os.path.join(workdir, RESULT_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError:
        return None  # partially written: treat as not finished


def _same(a: Any, b: Any) -> bool:
    norm = lambda x: json.loads(json.dumps(x, default=repr))  # noqa: E731 (tuples -> lists)
    na, nb = norm(a), norm(b)
    if isinstance(na, (int, float)) and isinstance(nb, (int, float)) and not isinstance(na, bool):
        return float(na) == float(nb)
    return na == nb


def is_finished(run: Run) -> bool:
    """True when ``run.workdir`` holds a finished result made with this run's config values."""
    row = read_result(run.workdir)
    if not row or row.get("status") != "finished":
        return False
    found = row.get("config") or {}
    for k, v in run.expected or run.overrides:
        if k in found and not _same(found[k], v):
            raise SweepError(f"{run.workdir} holds a finished run with {k}={found[k]!r} but sweep run "
                             f"{run.name} wants {k}={v!r}; use another --workdir or remove that folder")
    return True


def train_command(run: Run, config_spec: str, common: Sequence[str] = (),
                  train_cmd: Optional[Sequence[str]] = None) -> list[str]:
    """argv of ``peft-jax train --config FILE [common] [run overrides] --workdir DIR``."""
    cmd = list(train_cmd) if train_cmd else [sys.executable, "-m", "peft_jax.cli", "train"]
    return cmd + ["--config", config_spec] + [f"--config.{c}" for c in common] + run.override_args() \
        + ["--workdir", run.workdir]


def _execute(run: Run, cmd: list[str], env: Optional[Mapping[str, str]],
             slots: Optional["queue.Queue[int]"] = None, devices_per_run: int = 0) -> tuple[Run, int, float]:
    os.makedirs(run.workdir, exist_ok=True)
    with open(os.path.join(run.workdir, "sweep_run.json"), "w") as f:
        json.dump({"name": run.name, "overrides": dict(run.overrides), "command": cmd}, f, indent=2,
                  default=repr)
    child_env = dict(env if env is not None else os.environ)
    slot = slots.get() if slots is not None else None
    try:
        if slot is not None and devices_per_run:
            ids = range(slot * devices_per_run, (slot + 1) * devices_per_run)
            child_env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, ids))
        t0 = time.time()
        with open(os.path.join(run.workdir, "train.log"), "ab") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env)
    finally:
        if slot is not None:
            slots.put(slot)
    return run, rc, time.time() - t0


def run_sweep(runs: Sequence[Run], config_spec: str, *, common: Sequence[str] = (), parallel: int = 1,
              dry_run: bool = False, train_cmd: Optional[Sequence[str]] = None,
              env: Optional[Mapping[str, str]] = None, fail_fast: bool = False,
              devices_per_run: int = 0, out: Optional[TextIO] = None) -> dict[str, list[str]]:
    """Execute unfinished runs, ``parallel`` processes at a time; returns names by outcome.

    ``devices_per_run`` > 0 gives each of the ``parallel`` slots its own GPUs
    (``CUDA_VISIBLE_DEVICES``: slot i gets ids ``i*k .. i*k+k-1``). Output of each run goes
    to ``<workdir>/train.log``.

    ``dry_run`` prints each command exactly (``shlex.join``), one per line, with skipped
    runs as ``# skip NAME (finished)`` comments, and executes nothing.
    """
    out = out or sys.stdout
    if parallel < 1:
        raise SweepError(f"parallel must be >= 1, got {parallel}")
    summary: dict[str, list[str]] = {"skipped": [], "finished": [], "failed": [], "pending": []}
    todo = []
    for run in runs:
        if is_finished(run):
            summary["skipped"].append(run.name)
            print(f"# skip {run.name} (finished)", file=out)
        else:
            todo.append((run, train_command(run, config_spec, common, train_cmd)))
    if dry_run:
        if devices_per_run and todo:
            print(f"# each run's environment also gets CUDA_VISIBLE_DEVICES = its slot's {devices_per_run} "
                  f"device(s) (slot i of {parallel}: i*{devices_per_run}..)", file=out)
        for _, cmd in todo:
            print(shlex.join(cmd), file=out)
        summary["pending"] = [r.name for r, _ in todo]
        return summary
    if todo:
        root = os.path.dirname(todo[0][0].workdir)
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, "sweep.json"), "w") as f:
            json.dump({"config": config_spec, "common": list(common),
                       "runs": [{"name": r.name, "overrides": dict(r.overrides), "workdir": r.workdir}
                                for r in runs]}, f, indent=2, default=repr)
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        slots: "queue.Queue[int]" = queue.Queue()
        for i in range(parallel):
            slots.put(i)
        futures = [pool.submit(_execute, run, cmd, env, slots, devices_per_run) for run, cmd in todo]
        for fut in concurrent.futures.as_completed(futures):
            run, rc, secs = fut.result()
            row = read_result(run.workdir)
            ok = rc == 0 and row is not None and row.get("status") == "finished"
            summary["finished" if ok else "failed"].append(run.name)
            print(f"{'done' if ok else 'FAILED'} {run.name} (exit {rc}, {secs:.1f}s; log "
                  f"{os.path.join(run.workdir, 'train.log')})", file=out, flush=True)
            if not ok and fail_fast:
                for f in futures:
                    f.cancel()
                break
    return summary


def select(runs: Iterable[Run], patterns: Sequence[str]) -> list[Run]:
    """Runs whose name matches any glob pattern (all runs when no pattern is given)."""
    runs = list(runs)
    if not patterns:
        return runs
    return [r for r in runs if any(fnmatch.fnmatch(r.name, p) for p in patterns)]


def sweep_main(argv: Optional[Sequence[str]] = None) -> int:
    """``peft-jax sweep --config FILE[:arg] --workdir ROOT [--parallel N] [--devices-per-run K]
    [--dry-run] [--list] [--only GLOB] [--train-cmd "peft-jax train"] [--fail-fast] [--config.k=v ...]``.

    ``--config.k=v`` overrides apply to every run (they are not part of run names)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    spec, common, rest = split_config_args(argv)
    p = argparse.ArgumentParser(prog="peft-jax sweep")
    p.add_argument("--workdir", required=True, help="root folder; each run gets <root>/<name>")
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--list", action="store_true", help="list runs and their status")
    p.add_argument("--only", action="append", default=[], help="glob on run names (repeatable)")
    p.add_argument("--train-cmd", default=None, help="command to run instead of python -m peft_jax.cli train")
    p.add_argument("--fail-fast", action="store_true")
    p.add_argument("--devices-per-run", type=int, default=0,
                   help="give each parallel slot its own GPUs via CUDA_VISIBLE_DEVICES")
    args = p.parse_args(rest)
    try:
        if spec is None:
            raise SweepError("--config FILE.py[:arg] is required")
        runs = select(expand(spec, args.workdir, common), args.only)
        if args.list:
            for r in runs:
                state = "finished" if is_finished(r) else (read_result(r.workdir) or {}).get("status", "pending")
                print(f"{state:9s} {r.name}  {' '.join(r.override_args())}")
            return 0
        s = run_sweep(runs, spec, common=common, parallel=args.parallel, dry_run=args.dry_run,
                      train_cmd=shlex.split(args.train_cmd) if args.train_cmd else None,
                      fail_fast=args.fail_fast, devices_per_run=args.devices_per_run)
    except (SweepError, ConfigError) as e:
        print_error(e, "sweep: ")
        return 2
    if not args.dry_run:
        print(f"sweep: {len(s['finished'])} finished, {len(s['skipped'])} skipped (already finished), "
              f"{len(s['failed'])} failed")
    return 1 if s["failed"] else 0


if __name__ == "__main__":
    sys.exit(sweep_main())
