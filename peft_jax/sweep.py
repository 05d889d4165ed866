"""Sweeps: one config file + a grid -> named runs, every cell validated first, executed
locally and resumably.

The grid is the cartesian product of

- the config's declared sweep ``config.sweep`` (or ``--config.sweep=SPEC`` on the command
  line, which replaces it), either a (nested) mapping whose leaves are lists, e.g.
  ``{"peft": {"prompt": {"length": [1, 5, 20, 100]}}}`` (ml_collections sorts keys, so axes
  vary in sorted-key order, the last fastest), or a list of dicts with dotted keys, e.g.
  ``[{"peft.prompt.init": "uniform"}, {...}]``: each dict is one grid (its list values are
  axes; wrap a list-valued parameter as ``[[1, 2]]``), the runs are the grids'
  concatenation, in order;
- ``--grid KEY=V1,V2,...`` axes (repeatable; ``--config.sweep.KEY=[V1,V2]`` is the same);
  values are read like ``--config.KEY=V`` values; ``KEY=[[1,2],[3]]`` gives list values;
- ``--seeds 0,1,2``: the seed axis (``config.seed``), outermost, so all cells of the first
  seed run before the second seed's (a partial sweep still fills the table).

Each run is a list of ``--config.a.b=v`` overrides and a workdir ``<root>/<name>``. Names
are stable: a short readable part from the overrides plus 8 hex digits of a hash of them,
so the same point always gets the same folder. Before the first run starts every cell is
checked: unknown keys and wrong types (against the config), then, for experiment configs,
everything the runner checks before training (``peft_jax.runner.check_experiment``: enums,
combinations, the methods against the task and the model, e.g. a class-label prompt init
shorter than the number of classes), with each base model loaded once. An invalid cell is
reported up front, gets a ``result.json`` with ``status: "invalid"`` and the reason (so the
report shows it), and is not run. A run that fails gets ``status: "failed"`` with the last
line of its log. ``--vectorize`` trains the cells that differ only in seed, learning rate or
the methods' init options as one vmapped program over one frozen base
(:mod:`peft_jax.runner.vectorized`; the same rows as one by one), each cell still in its own
folder. A run whose ``result.json`` says ``finished`` is skipped (after checking
that it was made with the same overrides); failed or missing runs are (re)executed.
``<root>/sweep.json`` lists every cell, so the report can show the missing ones.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
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
import traceback
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TextIO

import ml_collections

from peft_jax.config import (ConfigError, apply_overrides, load_config_file, parse_value,
                             split_config_args)
from peft_jax import compile_cache
from peft_jax.errors import print_error

RESULT_FILE = "result.json"
SWEEP_FIELD = "sweep"
SWEEP_FILE = "sweep.json"
SEED_KEYS = ("seed", "train.seed")

Checker = Callable[[ml_collections.ConfigDict], None]


class SweepError(ValueError):
    """A bad sweep declaration, or a workdir holding another run; the message names it."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One point of a sweep: ``overrides`` are (dotted key, value) pairs in declaration order;
    ``invalid`` is the reason the cell cannot run (None: valid)."""

    name: str
    overrides: tuple[tuple[str, Any], ...]
    workdir: str
    expected: tuple[tuple[str, Any], ...] = ()  # overridden keys' final (coerced) config values
    invalid: Optional[str] = None

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
        raise SweepError("the config declares no sweep (set config.sweep, or pass --grid / --seeds)")
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


def parse_grid(items: Sequence[str]) -> list[tuple[str, list]]:
    """``["peft.prompt.length=1,5,20", "k=[[1,2],[3]]"]`` -> ``[(key, values), ...]``."""
    out = []
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if key.startswith("config."):
            key = key[len("config."):]
        if not eq or not key or not text.strip():
            raise SweepError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. peft.prompt.length=1,5,20)")
        text = text.strip()
        if text.startswith("["):
            try:
                vals = ast.literal_eval(text)
            except (ValueError, SyntaxError) as e:
                raise SweepError(f"--grid {item!r}: cannot read the list {text!r} ({e})") from None
            vals = list(vals) if _is_axis(vals) else [vals]
        else:
            vals = [parse_value(v.strip()) for v in text.split(",")]
        if not vals or any(v == "" for v in vals):
            raise SweepError(f"--grid {item!r}: an empty value")
        out.append((key, vals))
    return out


def parse_seeds(text: Optional[str]) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ``"0-4"`` -> ``[0, 1, 2, 3, 4]``."""
    if not text:
        return []
    seeds = []
    for part in text.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if dash and lo else [int(part)]
        except ValueError:
            raise SweepError(f"--seeds {text!r}: {part!r} is not an integer (e.g. --seeds 0,1,2)") from None
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds {text!r}: a seed is given twice")
    return seeds


def split_sweep_overrides(common: Sequence[str]) -> tuple[Any, list[tuple[str, list]], list[str]]:
    """Take ``sweep=SPEC`` and ``sweep.KEY=[...]`` out of the ``--config.`` overrides:
    (replacement sweep spec or None, extra grid axes, the remaining overrides)."""
    spec, axes, rest = None, [], []
    for item in common:
        key, _, text = item.partition("=")
        if key == SWEEP_FIELD:
            try:
                spec = ast.literal_eval(text)
            except (ValueError, SyntaxError) as e:
                raise SweepError(f"--config.sweep={text!r}: not a Python literal dict or list of "
                                 f"dicts ({e})") from None
        elif key.startswith(SWEEP_FIELD + "."):
            axes += parse_grid([f"{key[len(SWEEP_FIELD) + 1:]}={text}"])
        else:
            rest.append(item)
    return spec, axes, rest


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


def flat_values(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{"a.b": value}`` of a config without its sweep (non-scalars as strings), the way
    the runner records ``config`` in ``result.json``."""
    out = {}
    for k, v in _flatten(cfg):
        if k == SWEEP_FIELD or k.startswith(SWEEP_FIELD + "."):
            continue
        out[k] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def seed_key(cfg: ml_collections.ConfigDict) -> str:
    """The config's seed key: ``seed`` (the runner's), else ``train.seed``."""
    for k in SEED_KEYS:
        try:
            _config_value(cfg, k)
            return k
        except (KeyError, AttributeError):
            continue
    raise SweepError(f"--seeds: the config has none of the seed keys {list(SEED_KEYS)}")


def grid_points(cfg: ml_collections.ConfigDict, spec: Any = None, grid: Sequence[tuple[str, list]] = (),
                seeds: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Every point: (declared sweep or ``spec``) x ``grid`` axes x ``seeds`` (outermost)."""
    spec = spec if spec is not None else (cfg[SWEEP_FIELD] if SWEEP_FIELD in cfg else None)
    base = sweep_points(spec) if spec is not None else [{}]
    if spec is None and not grid and not seeds:
        sweep_points(None)  # raises: nothing to sweep
    axes = _grid(list(grid), "--grid") if grid else [{}]
    skey = seed_key(cfg) if seeds else None
    points = []
    for seed in (seeds or [None]):
        for p in base:
            for g in axes:
                both = sorted(set(p) & set(g))
                if both:
                    raise SweepError(f"{both} is both in config.sweep and a --grid axis; give it once")
                point = {**p, **g}
                if skey is not None:
                    if skey in point:
                        raise SweepError(f"{skey!r} is both a sweep axis and --seeds; give it once")
                    point[skey] = seed
                points.append(point)
    return points


def expand(config_spec: str, root: str, common: Sequence[str] = (),
           cfg: Optional[ml_collections.ConfigDict] = None, *, grid: Sequence[tuple[str, list]] = (),
           seeds: Sequence[int] = (), spec: Any = None, check: Optional[Checker] = None) -> list[Run]:
    """Config file (``path.py[:arg]``) + its sweep / ``spec`` x ``grid`` x ``seeds`` -> runs
    under ``root``.

    ``common``: ``a.b=v`` overrides applied to every run (not part of the names). Every
    run's overrides are applied to a copy of the config, so an unknown key or a wrong type
    fails here, naming the run, before anything executes. ``check(final_config)``: deeper
    validation; a cell it rejects is returned with ``invalid`` set to the reason.
    """
    cfg = cfg if cfg is not None else load_config_file(config_spec)
    spec_in, axes, common = split_sweep_overrides(common)
    spec = spec if spec is not None else spec_in
    grid = list(grid) + axes
    base = copy.deepcopy(cfg)
    apply_overrides(base, common)
    swept = {k for k, _ in grid}
    clash = sorted(swept & {c.partition("=")[0] for c in common})
    if clash:
        raise SweepError(f"--config.{clash[0]} is also a sweep axis; give it once")
    runs, seen = [], {}
    for point in grid_points(cfg, spec, grid, seeds):
        if any(k == SWEEP_FIELD or k.startswith(SWEEP_FIELD + ".") for k in point):
            raise SweepError(f"sweep point {point}: cannot override the sweep itself")
        name = run_name(point)
        if name in seen:
            raise SweepError(f"sweep point {point} is declared twice (also {seen[name]})")
        seen[name] = point
        run = Run(name=name, overrides=tuple(point.items()), workdir=os.path.join(os.path.abspath(root), name))
        final = run_config(cfg, run, common, where=f"sweep run {name}")
        keys = [c.partition("=")[0] for c in common] + [k for k, _ in run.overrides]
        expected = tuple((k, _config_value(final, k)) for k in dict.fromkeys(keys))
        invalid = None
        if check is not None:
            try:
                check(final)
            except (ValueError, KeyError, OSError) as e:   # every project error is a ValueError
                invalid = _one_line(e)
        runs.append(dataclasses.replace(run, expected=expected, invalid=invalid))
    return runs


def _one_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split()) or type(e).__name__


def run_config(cfg: ml_collections.ConfigDict, run: Run, common: Sequence[str] = (),
               where: str = "") -> ml_collections.ConfigDict:
    """The run's final config: ``cfg`` + ``common`` + the run's overrides, workdir set."""
    final = copy.deepcopy(cfg)
    try:
        apply_overrides(final, [c for c in split_sweep_overrides(common)[2]]
                        + [a[len("--config."):] for a in run.override_args()])
    except ConfigError as e:
        raise SweepError(f"{where or run.name}: {e}") from e
    if "workdir" in final:
        with final.unlocked():
            final.workdir = run.workdir
    return final


# ----------------------------------------------------------------------------- checking cells


def experiment_checker(cfg: ml_collections.ConfigDict,
                       cache: Optional[dict] = None) -> Optional[Checker]:
    """The runner's pre-training checks for every cell of an experiment config (one with
    ``model``, ``task`` and ``peft`` groups; None otherwise), each base model loaded once
    into ``cache`` (model name -> loaded base, shared with in-process runs)."""
    if not all(k in cfg for k in ("model", "task", "peft")):
        return None
    cache = {} if cache is None else cache

    def check(final: ml_collections.ConfigDict) -> None:
        from peft_jax.defaults import validate
        from peft_jax.runner.experiment import check_experiment
        validate(final)    # cheap checks first: no model is loaded for a cell they reject
        check_experiment(final, pretrained_for(final, cache))

    return check


def pretrained_for(cfg: ml_collections.ConfigDict, cache: dict) -> Any:
    """The loaded base of ``config.model.name`` (from ``cache``, loaded once)."""
    from peft_jax.models.registry import load_pretrained
    name = cfg.model.name
    if name not in cache:
        cache[name] = load_pretrained(name)
    return cache[name]


# ----------------------------------------------------------------------------- results on disk


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


def run_status(run: Run) -> tuple[str, str]:
    """``(status, reason)``: finished | invalid | failed | preempted | pending."""
    if run.invalid:
        return "invalid", run.invalid
    if is_finished(run):
        return "finished", ""
    row = read_result(run.workdir) or {}
    return row.get("status", "pending"), row.get("error", "")


def write_status_row(run: Run, status: str, error: str, config: Mapping[str, Any],
                     **extra: Any) -> str:
    """A ``result.json`` for a cell that produced none: ``status`` invalid | failed, the
    reason, and the cell's config (so the report groups it with its cell)."""
    from peft_jax.report import write_result
    return write_result(run.workdir, {"name": run.name, "status": status, "error": error,
                                      "config": dict(config), "metrics": {}, **extra})


def _last_error_line(log_path: str) -> str:
    """The last line of a log that looks like an error (else its last non-empty line)."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines()[-200:] if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if re.search(r"(^|\s)(error|Error|Exception)\b|^\w+Error", ln):
            return ln[:500]
    return lines[-1][:500] if lines else ""


def write_sweep_file(root: str, runs: Sequence[Run], config_spec: str, common: Sequence[str]) -> str:
    """``<root>/sweep.json``: every cell (name, overrides, expected values, validity)."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, SWEEP_FILE)
    doc = {"config": config_spec, "common": list(common),
           "runs": [{"name": r.name, "overrides": dict(r.overrides), "expected": dict(r.expected),
                     "workdir": r.workdir, "invalid": r.invalid} for r in runs]}
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=repr)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- executing


def train_command(run: Run, config_spec: str, common: Sequence[str] = (),
                  train_cmd: Optional[Sequence[str]] = None) -> list[str]:
    """argv of ``peft-jax train --config FILE [common] [run overrides] --workdir DIR``."""
    cmd = list(train_cmd) if train_cmd else [sys.executable, "-m", "peft_jax.cli", "train"]
    common = split_sweep_overrides(common)[2]
    return cmd + ["--config", config_spec] + [f"--config.{c}" for c in common] + run.override_args() \
        + ["--workdir", run.workdir]


def _execute(run: Run, cmd: list[str], env: Optional[Mapping[str, str]],
             slots: Optional["queue.Queue[int]"] = None, devices_per_run: int = 0) -> tuple[Run, int, float]:
    os.makedirs(run.workdir, exist_ok=True)
    with open(os.path.join(run.workdir, "sweep_run.json"), "w") as f:
        json.dump({"name": run.name, "overrides": dict(run.overrides), "command": cmd}, f, indent=2,
                  default=repr)
    child_env = dict(env if env is not None else compile_cache.child_environ())
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


class _Tee:
    """A text stream writing to several files (a vectorized group's log goes to each cell's)."""

    def __init__(self, files: Sequence[TextIO]):
        self.files = files

    def write(self, text: str) -> int:
        for f in self.files:
            f.write(text)
        return len(text)

    def flush(self) -> None:
        for f in self.files:
            f.flush()


def _execute_in_process(runs: Sequence[Run], train: Callable[[], list]) -> list[tuple[Run, int, float]]:
    """Run ``train()`` (-> the cells' result rows, in order) in this process with its output
    in every cell's ``<workdir>/train.log``; an exception fails every cell of ``runs``."""
    for run in runs:
        os.makedirs(run.workdir, exist_ok=True)
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        tee = _Tee([stack.enter_context(open(os.path.join(r.workdir, "train.log"), "a")) for r in runs])
        stack.enter_context(contextlib.redirect_stdout(tee))
        stack.enter_context(contextlib.redirect_stderr(tee))
        try:
            rcs = [0 if row.get("status") == "finished" else 1 for row in train()]
        except Exception as e:  # noqa: BLE001 (the error is the cells' result)
            traceback.print_exc(file=tee)
            print(f"error: {type(e).__name__}: {_one_line(e)}", file=tee)
            rcs = [1] * len(runs)
    return [(run, rc, time.time() - t0) for run, rc in zip(runs, rcs)]


def _train_one(cfg: ml_collections.ConfigDict, cache: dict, programs: Any = None
               ) -> Callable[[], list]:
    """One cell with ``run_experiment`` (the base model from ``cache``, loaded once; the
    compiled programs shared with earlier cells through ``programs``, a
    :class:`~peft_jax.programs.ProgramCache`)."""
    from peft_jax.runner import run_experiment
    return lambda: [run_experiment(cfg, pretrained=pretrained_for(cfg, cache),
                                   programs=programs).row]


def _train_vectorized(cfgs: Sequence[ml_collections.ConfigDict], cache: dict) -> Callable[[], list]:
    """Cells as one vectorized program (:func:`peft_jax.runner.vectorized.run_vectorized`)."""
    from peft_jax.runner.vectorized import run_vectorized
    return lambda: [r.row for r in run_vectorized(cfgs, pretrained=pretrained_for(cfgs[0], cache))]


def vectorized_plan(runs: Sequence[Run], cfgs: Sequence[ml_collections.ConfigDict],
                    max_runs: int = 0) -> list[list[int]]:
    """Indices of ``runs`` in execution groups for ``--vectorize``: cells that differ only in
    vectorizable values (:func:`peft_jax.runner.vectorized.vector_groups`: seed, learning
    rate, the methods' init options) form one group; a cell whose workdir already holds a
    run (checkpoints of an interrupted run: it resumes) runs alone."""
    from peft_jax.runner.vectorized import vector_groups
    from peft_jax.runner.workdir import CONFIG_NAME, run_files
    fresh = [i for i, r in enumerate(runs) if not [f for f in run_files(r.workdir) if f != CONFIG_NAME]]
    groups = [[fresh[j] for j in g] for g in vector_groups([cfgs[i] for i in fresh], max_runs)]
    alone = [[i] for i in sorted(set(range(len(runs))) - set(fresh))]
    return sorted(groups + alone, key=lambda g: g[0])


def run_sweep(runs: Sequence[Run], config_spec: str, *, common: Sequence[str] = (), parallel: int = 1,
              dry_run: bool = False, train_cmd: Optional[Sequence[str]] = None,
              env: Optional[Mapping[str, str]] = None, fail_fast: bool = False,
              devices_per_run: int = 0, out: Optional[TextIO] = None, in_process: bool = False,
              cache: Optional[dict] = None, all_runs: Optional[Sequence[Run]] = None,
              cfg: Optional[ml_collections.ConfigDict] = None, vectorize: bool = False,
              vectorize_max: int = 0) -> dict[str, list[str]]:
    """Execute unfinished valid runs, ``parallel`` processes at a time (or one after the
    other in this process with ``in_process``); returns names by outcome.

    ``vectorize`` (in this process): cells that differ only in vectorizable values (seed,
    learning rate, the methods' init options; :func:`vectorized_plan`) train as one
    vectorized program of at most ``vectorize_max`` runs (0: no limit), each cell still
    writing its own run folder (``result.json``, ``delta``, ``metrics.jsonl``,
    ``train.log``); a failure in a group fails its cells.

    Invalid cells are listed first and recorded (``status: "invalid"``), never executed.
    ``devices_per_run`` > 0 gives each of the ``parallel`` slots its own GPUs
    (``CUDA_VISIBLE_DEVICES``: slot i gets ids ``i*k .. i*k+k-1``). Output of each run goes
    to ``<workdir>/train.log``. ``all_runs``: every cell of the sweep (for ``sweep.json``;
    default ``runs``).

    ``dry_run`` prints each command exactly (``shlex.join``), one per line, with skipped
    runs as ``# skip NAME (finished)`` and invalid ones as ``# invalid NAME: reason``
    comments, and executes nothing.
    """
    out = out or sys.stdout
    if parallel < 1:
        raise SweepError(f"parallel must be >= 1, got {parallel}")
    in_process = in_process or vectorize
    summary: dict[str, list[str]] = {"skipped": [], "finished": [], "failed": [], "pending": [],
                                     "invalid": []}
    base_cfg = cfg if cfg is not None else (load_config_file(config_spec) if (in_process or not dry_run)
                                            else None)
    todo = []
    for run in runs:
        if run.invalid:
            summary["invalid"].append(run.name)
            print(f"# invalid {run.name}: {run.invalid}", file=out)
        elif is_finished(run):
            summary["skipped"].append(run.name)
            print(f"# skip {run.name} (finished)", file=out)
        else:
            todo.append((run, train_command(run, config_spec, common, train_cmd)))
    plan = [[i] for i in range(len(todo))]
    if vectorize and todo:
        cfgs = [run_config(base_cfg, run, common) for run, _ in todo]
        plan = vectorized_plan([r for r, _ in todo], cfgs, vectorize_max)
        for g in plan:
            if len(g) > 1:
                print(f"# vectorized: {len(g)} cells as one program: "
                      + " ".join(todo[i][0].name for i in g), file=out)
    if dry_run:
        if devices_per_run and todo:
            print(f"# each run's environment also gets CUDA_VISIBLE_DEVICES = its slot's {devices_per_run} "
                  f"device(s) (slot i of {parallel}: i*{devices_per_run}..)", file=out)
        for _, cmd in todo:
            print(shlex.join(cmd), file=out)
        summary["pending"] = [r.name for r, _ in todo]
        return summary
    every = list(all_runs if all_runs is not None else runs)
    if every:
        write_sweep_file(os.path.dirname(every[0].workdir), every, config_spec, common)
    for run in runs:
        if run.invalid:
            write_status_row(run, "invalid", run.invalid, flat_values(run_config(base_cfg, run, common)))
    out.flush()
    cache = {} if cache is None else cache

    def finish(run: Run, rc: int, secs: float) -> bool:
        row = read_result(run.workdir)
        ok = rc == 0 and row is not None and row.get("status") == "finished"
        summary["finished" if ok else "failed"].append(run.name)
        log = os.path.join(run.workdir, "train.log")
        error = "" if ok else _last_error_line(log)
        if not ok and (row is None or row.get("status") in (None, "finished")):
            write_status_row(run, "failed", error, flat_values(run_config(base_cfg, run, common)),
                             exit_code=rc)
        elif not ok and not row.get("error"):   # the run's own row (failed, preempted): add why
            from peft_jax.report import write_result
            write_result(run.workdir, {**row, "error": error, "exit_code": rc})
        print(f"{'done' if ok else 'FAILED'} {run.name} (exit {rc}, {secs:.1f}s; log {log})"
              + (f": {error}" if error else ""), file=out, flush=True)
        return ok

    if in_process:
        from peft_jax.programs import ProgramCache
        programs = ProgramCache()   # cells that differ only in values (seed, data) compile once
        for g in plan:
            runs_g = [todo[i][0] for i in g]
            cfgs_g = [run_config(base_cfg, run, common) for run in runs_g]
            train = (_train_vectorized(cfgs_g, cache) if len(g) > 1
                     else _train_one(cfgs_g[0], cache, programs))
            oks = [finish(*done) for done in _execute_in_process(runs_g, train)]
            if not all(oks) and fail_fast:
                break
        return summary
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        slots: "queue.Queue[int]" = queue.Queue()
        for i in range(parallel):
            slots.put(i)
        futures = [pool.submit(_execute, run, cmd, env, slots, devices_per_run) for run, cmd in todo]
        for fut in concurrent.futures.as_completed(futures):
            if not finish(*fut.result()) and fail_fast:
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


USAGE = """peft-jax sweep --config FILE[:arg] --workdir ROOT [--grid KEY=V1,V2,... ...]
                      [--seeds 0,1,2] [--config.KEY=V ...] [--config.sweep=SPEC]
                      [--parallel N | --in-process | --vectorize [--vectorize-max K]]
                      [--dry-run] [--list] [--only GLOB]
                      [--no-check] [--fail-fast] [--train-cmd CMD] [--devices-per-run K]"""

EPILOG = """The grid: config.sweep (or --config.sweep=SPEC, which replaces it) x every --grid
axis (--config.sweep.KEY=[V1,V2] is the same as --grid KEY=V1,V2) x --seeds (outermost).
--config.KEY=V (not sweep) applies to every run. Every cell is validated before the first
run; invalid cells are listed, recorded as status "invalid" and not run. Runs go to
ROOT/<name>; rerunning skips finished runs. Then: peft-jax report ROOT.
Example:
  peft-jax sweep --config configs/ablation_prompt.py --workdir runs/abl \\
      --grid peft.prompt.length=1,5,20 --grid peft.prompt.init=uniform,class_labels --seeds 0,1,2"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-jax sweep", usage=USAGE, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE[:arg]", help="the experiment config file (required)")
    p.add_argument("--workdir", required=True, metavar="ROOT",
                   help="root folder; each run gets ROOT/<name>")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a sweep axis (repeatable); crossed with config.sweep")
    p.add_argument("--seeds", default="", help="seed axis (config.seed), e.g. 0,1,2 or 0-4")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (subprocesses)")
    p.add_argument("--in-process", action="store_true",
                   help="run the cells one after the other in this process, loading each base "
                        "model once (saves the model load of every run) and compiling once "
                        "for cells that differ only in seed or data splits")
    p.add_argument("--vectorize", action="store_true",
                   help="in this process, train cells that differ only in seed, learning rate or "
                        "the methods' init options as one vmapped program over one frozen base "
                        "(same results as one by one; each cell keeps its own run folder)")
    p.add_argument("--vectorize-max", type=int, default=0, metavar="K",
                   help="with --vectorize: at most K runs per program (0: no limit; memory "
                        "grows with K)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--list", action="store_true", help="list runs and their status")
    p.add_argument("--only", action="append", default=[], help="glob on run names (repeatable)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the runner's checks of every cell (they load each base model once)")
    p.add_argument("--train-cmd", default=None, help="command to run instead of python -m peft_jax.cli train")
    p.add_argument("--fail-fast", action="store_true")
    p.add_argument("--devices-per-run", type=int, default=0,
                   help="give each parallel slot its own GPUs via CUDA_VISIBLE_DEVICES")
    return p


def sweep_main(argv: Optional[Sequence[str]] = None) -> int:
    """``peft-jax sweep`` (see :data:`USAGE`); ``--config.k=v`` overrides apply to every run
    (they are not part of run names)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    if any(a in ("-h", "--help") for a in argv):
        p.print_help()
        return 0
    spec, common, rest = split_config_args(argv)
    args = p.parse_args(rest)
    try:
        if spec is None:
            raise SweepError("--config FILE.py[:arg] is required")
        if args.parallel > 1 and (args.in_process or args.vectorize):
            raise SweepError(f"--{'vectorize' if args.vectorize else 'in-process'} runs in this "
                             "process; drop --parallel")
        if args.vectorize and args.train_cmd:
            raise SweepError("--vectorize trains in this process; drop --train-cmd")
        cfg = load_config_file(spec)
        cache: dict = {}
        check = None if args.no_check or args.dry_run else experiment_checker(cfg, cache)
        every = expand(spec, args.workdir, common, cfg, grid=parse_grid(args.grid),
                       seeds=parse_seeds(args.seeds), check=check)
        runs = select(every, args.only)
        bad = [r for r in runs if r.invalid]
        if bad:
            print(f"sweep: {len(bad)} of {len(runs)} cell(s) are invalid and will not run:", file=sys.stderr)
            for r in bad:
                print(f"  {r.name}: {r.invalid}", file=sys.stderr)
        if args.list:
            for r in runs:
                state, why = run_status(r)
                print(f"{state:9s} {r.name}  {' '.join(r.override_args())}" + (f"  # {why}" if why else ""))
            return 0
        s = run_sweep(runs, spec, common=common, parallel=args.parallel, dry_run=args.dry_run,
                      train_cmd=shlex.split(args.train_cmd) if args.train_cmd else None,
                      fail_fast=args.fail_fast, devices_per_run=args.devices_per_run,
                      in_process=args.in_process, cache=cache, all_runs=every, cfg=cfg,
                      vectorize=args.vectorize, vectorize_max=args.vectorize_max)
    except (SweepError, ConfigError) as e:
        print_error(e, "sweep: ")
        return 2
    if not args.dry_run:
        print(f"sweep: {len(s['finished'])} finished, {len(s['skipped'])} skipped (already finished), "
              f"{len(s['failed'])} failed, {len(s['invalid'])} invalid")
    return 1 if s["failed"] else 0


if __name__ == "__main__":
    sys.exit(sweep_main())
