"""Results tables and plots from finished runs' ``result.json`` rows.

A row (written by the training runner into each workdir) is
``{"name", "status", "config": {dotted key: value}, "metrics": {...}, "best": {...},
"wall_s", "trainable_params"}``. Value lookup (:func:`row_value`): ``"accuracy"`` or
``"metrics.accuracy"`` -> final eval metric, ``"best.accuracy"`` -> best eval,
``"baseline.accuracy"`` -> the untrained delta's eval (written with train.baseline), ``"wall_s"``,
``"trainable_params"``, ``"name"``, anything else -> a config key (``"peft.prompt.length"``).

- :func:`collect` finds rows under a folder; :func:`collect_all` also the cells that did
  not finish: failed / invalid rows (written by ``peft-jax sweep``) and, from each
  ``sweep.json``, the cells with no row at all (``status: "missing"``);
  :func:`aggregate` groups rows by config keys and gives mean and sample std (ddof=1) over
  the finished runs of each group (usually seeds), ``n``, and how many of the group's cells
  failed / were invalid / are missing, with their reasons;
- :func:`late_move`: how much the last 20% of a run's steps moved its eval metric (from
  ``metrics.jsonl``), the convergence check; :func:`plot_curves` draws training curves;
- :func:`format_table` / :func:`to_markdown` / :func:`write_csv` render a table;
- :func:`plot_ablation` draws metric vs a numeric key (prompt length, log x) with one line
  per value of another key (init), as in Lester et al.'s ablation figure, each point
  labelled with its n and cells without a finished run marked;
- :func:`transfer_matrix` / :func:`plot_transfer_heatmap` draw a source x target grid of
  SPoT transfer results (optionally as gains over each target's random-init baseline).

``report_main(argv)`` is ``peft-jax report``. Matplotlib is imported lazily, Agg backend.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from peft_jax.errors import print_error

RESULT_FILE = "result.json"
SWEEP_FILE = "sweep.json"      # peft_jax.sweep: every cell of a sweep
NOT_RUN = ("failed", "invalid", "missing", "preempted")   # statuses counted per group
LATE_FRACTION = 0.2             # late_move: the last 20% of a run's steps
CONVERGED_BELOW = 0.01          # ... moving the eval metric by less than 1 point
TOP_LEVEL = ("name", "status", "wall_s", "trainable_params")
NO_SOURCE = (None, "", "none", "None", "random")
SEED_KEYS = ("seed", "train.seed")  # the runner's key (peft_jax.defaults: config.seed), then legacy


class ReportError(ValueError):
    """Bad report input (no rows, unknown key); the message names it."""


def load_row(path: str) -> dict:
    try:
        with open(path) as f:
            row = json.load(f)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(row, dict) or "config" not in row:
        raise ReportError(f"{path}: not a result row (no 'config')")
    row = dict(row)
    row["_dir"] = os.path.dirname(os.path.abspath(path))
    return row


def collect(root: str, include_failed: bool = False) -> list[dict]:
    """All ``result.json`` rows under ``root`` (recursive), finished only unless asked; by path."""
    if not os.path.isdir(root):
        raise ReportError(f"results folder {root!r} does not exist")
    paths = sorted(glob.glob(os.path.join(root, "**", RESULT_FILE), recursive=True))
    rows = [load_row(p) for p in paths]
    return [r for r in rows if include_failed or r.get("status") == "finished"]


def collect_all(root: str) -> list[dict]:
    """Every row under ``root`` whatever its status, plus a row for each cell a
    ``sweep.json`` under ``root`` lists that has no ``result.json``: ``status: "invalid"``
    with the reason when the sweep found it invalid, else ``"missing"`` (its ``config`` is
    the cell's overridden keys)."""
    rows = collect(root, include_failed=True)
    have = {os.path.realpath(r["_dir"]) for r in rows}
    for path in sorted(glob.glob(os.path.join(root, "**", SWEEP_FILE), recursive=True)):
        try:
            with open(path) as f:
                cells = json.load(f).get("runs", [])
        except (OSError, json.JSONDecodeError) as e:
            raise ReportError(f"{path}: invalid sweep file ({e})") from None
        for cell in cells:
            wd = cell.get("workdir") or os.path.join(os.path.dirname(path), cell["name"])
            if os.path.realpath(wd) in have:
                continue
            have.add(os.path.realpath(wd))
            rows.append({"name": cell["name"], "status": "invalid" if cell.get("invalid") else "missing",
                         "_dir": wd, "metrics": {},
                         "error": cell.get("invalid") or "",
                         "config": dict(cell.get("expected") or cell.get("overrides") or {})})
    return rows


def finished(rows: Sequence[Mapping[str, Any]]) -> list:
    return [r for r in rows if r.get("status") == "finished"]


def row_value(row: Mapping[str, Any], key: str) -> Any:
    """See the module docstring; missing -> None."""
    if key in TOP_LEVEL:
        return row.get(key)
    if key.startswith(("metrics.", "best.", "baseline.")):
        part, _, name = key.partition(".")
        return (row.get(part) or {}).get(name)
    cfg = row.get("config") or {}
    if key in cfg:
        return cfg[key]
    return (row.get("metrics") or {}).get(key)


def _sort_key(v: Any):
    if v is None:
        return (2, "")
    if isinstance(v, (bool, int, float)) and not (isinstance(v, float) and math.isnan(v)):
        return (0, float(v))
    return (1, str(v))


def varying_keys(rows: Sequence[Mapping[str, Any]], exclude: Iterable[str] = ()) -> list[str]:
    """Config keys whose values differ across rows (minus ``exclude`` and workdir/name keys)."""
    exclude = set(exclude)
    keys = sorted({k for r in rows for k in (r.get("config") or {})})
    out = []
    for k in keys:
        if k in exclude or _is_location_key(k):
            continue
        vals = {json.dumps(row_value(r, k), sort_keys=True, default=repr) for r in rows
                if k in (r.get("config") or {})}
        if len(vals) > 1:
            out.append(k)
    return out


def _is_location_key(k: str) -> bool:
    return k in ("workdir", "name") or k.endswith(".workdir")


def seed_key_of(rows: Sequence[Mapping[str, Any]]) -> str:
    """The seed's config key in these rows: the first of SEED_KEYS any row has ("seed" if none)."""
    for k in SEED_KEYS:
        if any(k in (r.get("config") or {}) for r in rows):
            return k
    return SEED_KEYS[0]


def _run_signature(row: Mapping[str, Any]) -> str:
    cfg = {k: v for k, v in (row.get("config") or {}).items() if not _is_location_key(k)}
    return json.dumps(cfg, sort_keys=True, default=repr)


def metric_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({k for r in rows for k in (r.get("metrics") or {})})


def aggregate(rows: Sequence[Mapping[str, Any]], group_by: Sequence[str], metrics: Sequence[str],
              seed_key: str = "train.seed", ddof: int = 1, late_metric: Optional[str] = None
              ) -> list[dict]:
    """Group rows by ``group_by`` values; per metric the mean and std over the group's rows.

    Returns one dict per group, sorted by group values (numbers numerically): the group
    keys, ``n`` (finished rows), ``seeds`` (sorted values of ``seed_key`` of those),
    ``<metric>_mean``, ``<metric>_std`` (std with ``ddof``; NaN when fewer than ddof+1
    values) and ``<metric>_n``; ``cells`` (all rows of the group), the count of each
    status of :data:`NOT_RUN` and ``errors`` (their distinct reasons); with
    ``late_metric``, ``late_max`` (the largest :func:`late_move` of the finished runs) and
    ``converged`` (how many moved less than ``CONVERGED_BELOW``). Rows without a status
    count as finished. Two finished rows with identical configs (apart from workdir/name)
    in one group, i.e. the same run collected twice, trigger a warning naming them.
    """
    if not rows:
        raise ReportError("no result rows to aggregate")
    groups: dict[str, list] = {}
    keyvals: dict[str, tuple] = {}
    for r in rows:
        vals = tuple(row_value(r, k) for k in group_by)
        gk = json.dumps(vals, default=repr)
        groups.setdefault(gk, []).append(r)
        keyvals[gk] = vals
    table = []
    for gk in sorted(groups, key=lambda g: tuple(_sort_key(v) for v in keyvals[g])):
        cells = groups[gk]
        members = [r for r in cells if r.get("status", "finished") == "finished"]
        known = [v for v in (row_value(r, seed_key) for r in members) if v is not None]
        sigs = [_run_signature(r) for r in members]
        if len(set(sigs)) < len(sigs):
            dups = [r.get("_dir") or r.get("name") for r, sg in zip(members, sigs) if sigs.count(sg) > 1]
            warnings.warn(f"group {dict(zip(group_by, keyvals[gk]))}: the same run (identical config) "
                          f"is counted more than once: {dups}")
        entry: dict[str, Any] = dict(zip(group_by, keyvals[gk]))
        entry["n"] = len(members)
        entry["seeds"] = sorted(known, key=_sort_key)
        entry["cells"] = len(cells)
        for status in NOT_RUN:
            entry[status] = sum(r.get("status") == status for r in cells)
        entry["errors"] = sorted({r.get("error") or "" for r in cells
                                  if r.get("status", "finished") != "finished"} - {""})
        if late_metric:
            moves = [late_move(r, late_metric) for r in members]
            moves = [m for m in moves if not math.isnan(m)]
            entry["late_max"] = max(moves) if moves else math.nan
            entry["converged"] = sum(m < CONVERGED_BELOW for m in moves)
            entry["late_n"] = len(moves)
        for m in metrics:
            xs = np.array([float(v) for v in (row_value(r, m) for r in members) if v is not None], np.float64)
            entry[f"{m}_n"] = int(xs.size)
            entry[f"{m}_mean"] = float(xs.mean()) if xs.size else math.nan
            entry[f"{m}_std"] = float(xs.std(ddof=ddof)) if xs.size > ddof else math.nan
        table.append(entry)
    return table


def history(row: Mapping[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of ``key`` (e.g. ``"eval/accuracy"``, ``"train/loss"``) from the
    row's ``history`` (rows written by :func:`export_rows`) or the run's ``metrics.jsonl``
    (a resumed run's repeated steps: the last value wins); for ``eval/<m>`` the untrained
    eval (``baseline``) is step 0."""
    if key in (row.get("history") or {}):
        pts = row["history"][key]
        return (np.array([int(s) for s, _ in pts], np.int64),
                np.array([float(v) for _, v in pts], np.float64))
    path = os.path.join(row.get("_dir") or "", "metrics.jsonl")
    points: dict[int, float] = {}
    if key.startswith("eval/"):
        base = (row.get("baseline") or {}).get(key[len("eval/"):])
        if base is not None:
            points[0] = float(base)
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue   # a line cut by a kill
                if key in rec:
                    points[int(rec["step"])] = float(rec[key])
    steps = np.array(sorted(points), np.int64)
    return steps, np.array([points[s] for s in steps], np.float64)


def late_move(row: Mapping[str, Any], metric: str, fraction: float = LATE_FRACTION) -> float:
    """How far the eval ``metric`` moved over the last ``fraction`` of the run's steps:
    max - min of the evals at steps >= (1 - fraction) * steps (NaN with fewer than two
    such evals: the run did not evaluate often enough to tell)."""
    steps, vals = history(row, f"eval/{metric}")
    total = row.get("steps") or (int(steps.max()) if steps.size else 0)
    late = vals[steps >= (1.0 - fraction) * total - 1e-9] if steps.size else vals
    return float(late.max() - late.min()) if late.size >= 2 else math.nan


def _cell(mean: float, std: float, digits: int, scale: float) -> str:
    if math.isnan(mean):
        return "-"
    s = f"{mean * scale:.{digits}f}"
    return s + (f" ({std * scale:.{digits}f})" if not math.isnan(std) else "")


def _header(key: str) -> str:
    return key


def not_run_text(e: Mapping[str, Any], width: int = 90) -> str:
    """``"1 failed, 2 missing: <reason>"`` for a group with cells that did not finish."""
    counts = [f"{e[s]} {s}" for s in NOT_RUN if e.get(s)]
    if not counts:
        return ""
    why = "; ".join(e.get("errors") or [])
    text = ", ".join(counts) + (f": {why}" if why else "")
    return text if len(text) <= width else text[: width - 3] + "..."


def table_cells(table: Sequence[Mapping[str, Any]], group_by: Sequence[str], metrics: Sequence[str],
                digits: int = 4, scale: float = 1.0) -> list[list[str]]:
    """Header row + one row per group: group values, n, ``mean (std)`` per metric; with
    convergence data (``aggregate(late_metric=)``) the largest late move and how many runs
    converged; when some cell did not finish, a ``not run`` column saying why."""
    late = any("late_max" in e for e in table)
    not_run = any(not_run_text(e) for e in table)
    rows = [[_header(k) for k in group_by] + ["n"] + list(metrics)
            + (["late move", "converged"] if late else []) + (["not run"] if not_run else [])]
    for e in table:
        row = [str(e[k]) for k in group_by] + [str(e["n"])]
        row += [_cell(e[f"{m}_mean"], e[f"{m}_std"], digits, scale) for m in metrics]
        if late:
            row += [_cell(e.get("late_max", math.nan), math.nan, digits, scale),
                    f"{e.get('converged', 0)}/{e.get('late_n', 0)}"]
        if not_run:
            row.append(not_run_text(e))
        rows.append(row)
    return rows


def format_table(table, group_by, metrics, digits: int = 4, scale: float = 1.0) -> str:
    """Aligned plain text (numbers right-aligned)."""
    cells = table_cells(table, group_by, metrics, digits, scale)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    n_group = len(group_by)
    text_col = len(cells[0]) - 1 if cells[0][-1] == "not run" else len(cells[0])
    lines = []
    for j, r in enumerate(cells):
        parts = [c.ljust(w) if (i < n_group or j == 0 or i >= text_col) else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(parts).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_markdown(table, group_by, metrics, digits: int = 4, scale: float = 1.0) -> str:
    cells = table_cells(table, group_by, metrics, digits, scale)
    align = ["---"] * len(group_by) + ["---:"] * (len(cells[0]) - len(group_by))
    lines = ["| " + " | ".join(cells[0]) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in cells[1:]]
    return "\n".join(lines) + "\n"


def write_csv(table, group_by, metrics, path: str) -> None:
    """Numeric CSV: group keys, n, and per metric ``_mean``, ``_std``, ``_n`` columns; then
    ``cells`` and the count of each status that did not finish, and ``errors``."""
    cols = list(group_by) + ["n"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")]
    extra = [c for c in ("late_max", "converged", "cells") + NOT_RUN if any(c in e for e in table)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols + extra + ["errors"])
        for e in table:
            w.writerow([e[c] for c in cols] + [e.get(c, "") for c in extra]
                       + ["; ".join(e.get("errors") or [])])


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_lines(curves: Sequence[tuple], path: str, xlabel: str, ylabel: str, title: str = "",
               unit_square: bool = False, figsize: tuple = (6, 4.5)) -> str:
    """Line plot of ``(label, xs, ys)`` curves saved to ``path``; ``unit_square``: axes on
    [0, 1] with the diagonal (reliability diagrams)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    if unit_square:
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    for label, xs, ys in curves:
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ablation(table: Sequence[Mapping[str, Any]], x: str, hue: Optional[str], metric: str, path: str,
                  logx: bool = True, scale: float = 1.0, title: Optional[str] = None) -> str:
    """Metric mean +- std vs ``x`` (numeric), one line per ``hue`` value; saved to ``path``.

    Each point is labelled with its ``n`` (``n/cells`` when some of the cell's runs did not
    finish); a cell with no finished run (failed, invalid or missing) is a gap in its line,
    marked by an ``x`` on the bottom axis in the line's colour."""
    if not table:
        raise ReportError("empty table: nothing to plot")
    for k in [x] + ([hue] if hue else []):
        if k not in table[0]:
            raise ReportError(f"plot key {k!r} is not a grouping key of the table ({sorted(table[0])})")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    lines = ablation_lines(table, x, hue, metric, scale)
    gaps = any(ln["gaps"] for ln in lines)
    for ln in lines:
        line = ax.errorbar(ln["x"], ln["y"], yerr=ln["err"], marker="o", capsize=3,
                           label=str(ln["hue"]) if hue else None)
        color = line.lines[0].get_color()
        for xv, yv, label in zip(ln["x"], ln["y"], ln["labels"]):
            if label:
                ax.annotate(label, (xv, yv), textcoords="offset points", xytext=(4, 5), fontsize=7,
                            color=color)
        for xv in ln["gaps"]:
            ax.plot([xv], [0.0], marker="x", ms=9, mew=2, color=color, clip_on=False,
                    transform=ax.get_xaxis_transform())
    if gaps:
        ax.plot([], [], "kx", ms=8, mew=2, ls="none", label="no finished run")
    if logx:
        ax.set_xscale("log")
        xt = sorted({float(e[x]) for e in table})
        ax.set_xticks(xt)
        ax.set_xticklabels([f"{v:g}" for v in xt])
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    if hue or gaps:
        ax.legend(title=hue, fontsize=8)
    ax.set_title(title or f"{metric} vs {x} (mean, std over seeds; n = finished runs)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ablation_lines(table: Sequence[Mapping[str, Any]], x: str, hue: Optional[str], metric: str,
                   scale: float = 1.0) -> list[dict]:
    """What :func:`plot_ablation` draws, per ``hue`` value: ``x``, ``y`` (mean, NaN at a
    gap), ``err`` (std, 0 when unknown), ``labels`` (``"n=3"``, ``"n=2/3"`` when some of
    the cell's runs did not finish, ``""`` at a gap) and ``gaps`` (x of the cells with no
    finished run)."""
    hues = sorted({e[hue] for e in table}, key=_sort_key) if hue else [None]
    out = []
    for h in hues:
        pts = sorted((e for e in table if hue is None or e[hue] == h), key=lambda e: _sort_key(e[x]))
        xs = np.array([float(e[x]) for e in pts])
        ys = np.array([e[f"{metric}_mean"] for e in pts], np.float64) * scale
        err = np.nan_to_num(np.array([e[f"{metric}_std"] for e in pts], np.float64) * scale)
        labels, gaps = [], []
        for e, xv, yv in zip(pts, xs, ys):
            cells = e.get("cells", e["n"])
            if e["n"] and not math.isnan(yv):
                labels.append(f"n={e['n']}" + (f"/{cells}" if cells > e["n"] else ""))
            else:
                labels.append("")
                gaps.append(float(xv))
        out.append({"hue": h, "x": xs, "y": ys, "err": err, "labels": labels, "gaps": gaps})
    return out


def plot_curves(rows: Sequence[Mapping[str, Any]], group_by: Sequence[str], keys: Sequence[str],
                path: str, smooth: int = 5, scale: Optional[Mapping[str, float]] = None,
                title: str = "") -> str:
    """Training curves: one panel per ``keys`` entry (``"train/loss"``, ``"eval/accuracy"``),
    one line per group of ``group_by`` values: the mean over the group's finished runs at
    each step they all logged (train curves smoothed by a ``smooth``-point moving average).
    """
    plt = _pyplot()
    rows = finished(rows)
    if not rows:
        raise ReportError("no finished runs: no curves to plot")
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault(tuple(row_value(r, k) for k in group_by), []).append(r)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for gv in sorted(groups, key=lambda g: tuple(_sort_key(v) for v in g)):
            hist = [history(r, key) for r in groups[gv]]
            hist = [(s, v) for s, v in hist if s.size]
            if not hist:
                continue
            common = sorted(set.intersection(*[set(s.tolist()) for s, _ in hist]))
            ys = np.mean([[dict(zip(s.tolist(), v))[t] for t in common] for s, v in hist], axis=0)
            ys = ys * (scale or {}).get(key, 1.0)
            if key.startswith("train/") and smooth > 1 and len(ys) > smooth:
                ys = np.convolve(ys, np.ones(smooth) / smooth, mode="valid")
                common = common[smooth - 1:]
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(group_by, gv))
            ax.plot(common, ys, lw=1.2, label=f"{label} (n={len(hist)})")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def transfer_matrix(rows: Sequence[Mapping[str, Any]], metric: str, source_key: str = "transfer.source",
                    target_key: str = "task.name", relative: bool = False
                    ) -> tuple[list[str], list[str], np.ndarray]:
    """Source x target mean metric ([n_sources, n_targets], NaN where not run).

    Rows whose source is empty/None/"none"/"random" are each target's random-init baseline;
    with ``relative`` the matrix holds mean(transfer) - mean(baseline) for that target.
    """
    cells: dict[tuple[str, str], list[float]] = {}
    base: dict[str, list[float]] = {}
    for r in rows:
        s, t, v = row_value(r, source_key), row_value(r, target_key), row_value(r, metric)
        if t is None or v is None:
            continue
        if s in NO_SOURCE:
            base.setdefault(str(t), []).append(float(v))
        else:
            cells.setdefault((str(s), str(t)), []).append(float(v))
    if not cells:
        raise ReportError(f"no transfer rows: none has both {source_key!r} and {target_key!r} with {metric!r}")
    sources = sorted({s for s, _ in cells})
    targets = sorted({t for _, t in cells})
    m = np.full((len(sources), len(targets)), np.nan)
    for (s, t), vs in cells.items():
        m[sources.index(s), targets.index(t)] = np.mean(vs)
    if relative:
        missing = [t for t in targets if t not in base]
        if missing:
            raise ReportError(f"relative=True needs random-init baseline rows (empty {source_key}) for "
                              f"targets {missing}")
        m = m - np.array([np.mean(base[t]) for t in targets])[None, :]
    return sources, targets, m


def plot_transfer_heatmap(sources: Sequence[str], targets: Sequence[str], matrix: np.ndarray, path: str,
                          title: str = "SPoT transfer", relative: bool = False, scale: float = 1.0) -> str:
    """Heat map (rows = sources, columns = targets), values annotated; diverging colors if relative."""
    plt = _pyplot()
    m = np.asarray(matrix, np.float64) * scale
    fig, ax = plt.subplots(figsize=heatmap_size(sources, targets))
    if relative:
        lim = np.nanmax(np.abs(m)) if np.isfinite(m).any() else 1.0
        im = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim)
    else:
        im = ax.imshow(m, cmap="viridis")
    ax.set_xticks(range(len(targets)))
    ax.set_xticklabels(targets, rotation=45, ha="right")
    ax.set_yticks(range(len(sources)))
    ax.set_yticklabels(sources)
    ax.set_xlabel("target task")
    ax.set_ylabel("source prompt")
    norm = im.norm
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                level = float(norm(m[i, j]))  # 0..1 position in the color map
                dark = abs(level - 0.5) > 0.3 if relative else level < 0.35
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def heatmap_size(rows: Sequence[str], cols: Sequence[str], cell: float = 0.6,
                 fontsize: float = 10.0) -> tuple[float, float]:
    """Figure size (inches) that fits ``rows`` x ``cols`` cells and their tick labels
    (row labels horizontal, column labels at 45 degrees), the colour bar and a title."""
    char = 0.6 * fontsize / 72.0                       # average glyph width, inches
    row_labels = max((len(str(r)) for r in rows), default=1) * char + 0.6
    col_labels = max((len(str(c)) for c in cols), default=1) * char * 0.72 + 0.6
    width = row_labels + cell * max(len(cols), 1) + 1.3
    height = col_labels + cell * max(len(rows), 1) + 0.7
    return max(width, 4.0), max(height, 3.0)


def write_result(workdir: str, row: Mapping[str, Any]) -> str:
    """Write a result row atomically as ``<workdir>/result.json`` (for runners and tests)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RESULT_FILE)
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(dict(row), f, indent=2, sort_keys=True, default=repr)
    os.replace(tmp, path)
    return path


ROW_FIELDS = ("name", "status", "error", "metrics", "baseline", "test", "steps", "wall_s",
              "train_wall_s", "trainable_params")


def export_rows(rows: Sequence[Mapping[str, Any]], path: str, keys: Optional[Sequence[str]] = None,
                curves: Sequence[str] = ("train/loss", "eval/accuracy")) -> str:
    """Write rows as a small JSONL file (one row a line, sorted by name) for committing
    next to a README table: the row fields of :data:`ROW_FIELDS`, ``config`` (only
    ``keys`` when given) and ``history`` ({curve key: [[step, value], ...]} from the run's
    ``metrics.jsonl``), so tables, plots and convergence checks (:func:`late_move`) can be
    redone from the file alone (:func:`load_rows`)."""
    lines = []
    for r in sorted(rows, key=lambda r: str(r.get("name"))):
        out = {k: r[k] for k in ROW_FIELDS if k in r and r[k] not in (None, {}, "")}
        cfg = r.get("config") or {}
        out["config"] = {k: cfg[k] for k in (keys if keys is not None else sorted(cfg)) if k in cfg}
        hist = {}
        for key in curves:
            steps, vals = history(r, key)
            if steps.size:
                hist[key] = [[int(a), round(float(b), 6)] for a, b in zip(steps, vals)]
        if hist:
            out["history"] = hist
        lines.append(json.dumps(out, sort_keys=True))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + ("\n" if lines else ""))
    os.replace(tmp, path)
    return path


def load_rows(path: str) -> list[dict]:
    """Rows of a file written by :func:`export_rows` (a missing file is an error)."""
    if not os.path.isfile(path):
        raise ReportError(f"result file {path!r} does not exist (it is written by the benchmark "
                          "script that produces these results; see its docstring)")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReportError(f"{path}:{i}: invalid JSON ({e})") from None
            if not isinstance(row, dict) or "config" not in row:
                raise ReportError(f"{path}:{i}: not a result row (no 'config')")
            rows.append(row)
    return rows


def _split(items: Sequence[str]) -> list[str]:
    return [k for it in items for k in it.split(",") if k]


def report_main(argv: Optional[Sequence[str]] = None) -> int:
    """``peft-jax report ROOT [--group-by k1,k2] [--metric m ...] [--csv F] [--md F]
    [--plot-ablation F.png --x KEY --hue KEY] [--curves F.png [--curve-keys K1,K2]]
    [--convergence] [--heatmap F.png --source-key K --target-key K [--relative]]
    [--seed-key seed] [--scale 100] [--digits 2] [--finished-only]``.

    The table has one row per group with n (finished runs) and, for cells that failed,
    were invalid or never ran (``sweep.json``), how many and why."""
    p = argparse.ArgumentParser(prog="peft-jax report")
    p.add_argument("root")
    p.add_argument("--group-by", action="append", default=[],
                   help="config keys (comma separated); default: keys that vary, minus the seed")
    p.add_argument("--metric", action="append", default=[], help="default: all final metrics")
    p.add_argument("--seed-key", default="", help="default: 'seed' (or 'train.seed' in older rows)")
    p.add_argument("--finished-only", action="store_true",
                   help="leave failed / invalid / missing cells out of the table")
    p.add_argument("--include-failed", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--csv")
    p.add_argument("--md")
    p.add_argument("--digits", type=int, default=4)
    p.add_argument("--scale", type=float, default=1.0, help="e.g. 100 for percentages")
    p.add_argument("--plot-ablation")
    p.add_argument("--x", default="peft.prompt.length")
    p.add_argument("--hue", default="peft.prompt.init")
    p.add_argument("--no-logx", action="store_true")
    p.add_argument("--curves", help="training curves (mean over seeds per group) to this PNG")
    p.add_argument("--curve-keys", default="train/loss,eval/accuracy")
    p.add_argument("--convergence", action="store_true",
                   help="columns: the largest move of the first metric over the last 20%% of "
                        "the steps, and how many runs moved it by less than 1 point")
    p.add_argument("--heatmap")
    p.add_argument("--source-key", default="transfer.source")
    p.add_argument("--target-key", default="task.name")
    p.add_argument("--relative", action="store_true")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        every = collect(a.root) if a.finished_only else collect_all(a.root)
        rows = finished(every)
        if not rows:
            raise ReportError(f"no finished runs (result.json with status 'finished') under {a.root}")
        metrics = _split(a.metric) or metric_names(rows)
        a.seed_key = a.seed_key or seed_key_of(rows)
        group_by = _split(a.group_by) or varying_keys(rows, exclude=[a.seed_key])
        late = metrics[0].rpartition(".")[2] if a.convergence else None
        table = aggregate(every, group_by, metrics, seed_key=a.seed_key, late_metric=late)
        print(format_table(table, group_by, metrics, a.digits, a.scale))
        counts = ", ".join(f"{sum(e[s] for e in table)} {s}" for s in NOT_RUN if any(e[s] for e in table))
        print(f"\n{len(rows)} run(s) in {len(table)} group(s)" + (f"; not finished: {counts}" if counts else ""))
        if a.csv:
            write_csv(table, group_by, metrics, a.csv)
            print(f"wrote {a.csv}")
        if a.md:
            with open(a.md, "w") as f:
                f.write(to_markdown(table, group_by, metrics, a.digits, a.scale))
            print(f"wrote {a.md}")
        if a.plot_ablation:
            keys = [a.x] + ([a.hue] if a.hue else [])
            abl = aggregate(every, keys, metrics[:1], seed_key=a.seed_key)
            plot_ablation(abl, a.x, a.hue or None, metrics[0], a.plot_ablation, logx=not a.no_logx,
                          scale=a.scale)
            print(f"wrote {a.plot_ablation}")
        if a.curves:
            plot_curves(rows, group_by, _split([a.curve_keys]), a.curves)
            print(f"wrote {a.curves}")
        if a.heatmap:
            s, t, m = transfer_matrix(rows, metrics[0], a.source_key, a.target_key, a.relative)
            plot_transfer_heatmap(s, t, m, a.heatmap, relative=a.relative, scale=a.scale)
            print(f"wrote {a.heatmap}")
    except ReportError as e:
        print_error(e, "report: ")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(report_main())
