"""Results tables and plots from finished runs' ``result.json`` rows.

A row (written by the training runner into each workdir) is
``{"name", "status", "config": {dotted key: value}, "metrics": {...}, "best": {...},
"wall_s", "trainable_params"}``. Value lookup (:func:`row_value`): ``"accuracy"`` or
``"metrics.accuracy"`` -> final eval metric, ``"best.accuracy"`` -> best eval,
``"baseline.accuracy"`` -> the untrained delta's eval (written with train.baseline), ``"wall_s"``,
``"trainable_params"``, ``"name"``, anything else -> a config key (``"peft.prompt.length"``).

- :func:`collect` finds rows under a folder; :func:`aggregate` groups them by config keys
  and gives mean and sample std (ddof=1) over the remaining runs (usually seeds);
- :func:`format_table` / :func:`to_markdown` / :func:`write_csv` render a table;
- :func:`plot_ablation` draws metric vs a numeric key (prompt length, log x) with one line
  per value of another key (init), as in Lester et al.'s ablation figure;
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
        vals = {json.dumps(row_value(r, k), sort_keys=True, default=repr) for r in rows}
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
              seed_key: str = "train.seed", ddof: int = 1) -> list[dict]:
    """Group rows by ``group_by`` values; per metric the mean and std over the group's rows.

    Returns one dict per group, sorted by group values (numbers numerically): the group
    keys, ``n`` (rows), ``seeds`` (sorted values of ``seed_key``), ``<metric>_mean``,
    ``<metric>_std`` (std with ``ddof``; NaN when fewer than ddof+1 values) and
    ``<metric>_n``. Two rows with identical configs (apart from workdir/name) in one group,
    i.e. the same run collected twice, trigger a warning naming them.
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
        members = groups[gk]
        known = [v for v in (row_value(r, seed_key) for r in members) if v is not None]
        sigs = [_run_signature(r) for r in members]
        if len(set(sigs)) < len(sigs):
            dups = [r.get("_dir") or r.get("name") for r, sg in zip(members, sigs) if sigs.count(sg) > 1]
            warnings.warn(f"group {dict(zip(group_by, keyvals[gk]))}: the same run (identical config) "
                          f"is counted more than once: {dups}")
        entry: dict[str, Any] = dict(zip(group_by, keyvals[gk]))
        entry["n"] = len(members)
        entry["seeds"] = sorted(known, key=_sort_key)
        for m in metrics:
            xs = np.array([float(v) for v in (row_value(r, m) for r in members) if v is not None], np.float64)
            entry[f"{m}_n"] = int(xs.size)
            entry[f"{m}_mean"] = float(xs.mean()) if xs.size else math.nan
            entry[f"{m}_std"] = float(xs.std(ddof=ddof)) if xs.size > ddof else math.nan
        table.append(entry)
    return table


def _cell(mean: float, std: float, digits: int, scale: float) -> str:
    if math.isnan(mean):
        return "-"
    s = f"{mean * scale:.{digits}f}"
    return s + (f" ({std * scale:.{digits}f})" if not math.isnan(std) else "")


def _header(key: str) -> str:
    return key


def table_cells(table: Sequence[Mapping[str, Any]], group_by: Sequence[str], metrics: Sequence[str],
                digits: int = 4, scale: float = 1.0) -> list[list[str]]:
    """Header row + one row per group: group values, n, ``mean (std)`` per metric."""
    rows = [[_header(k) for k in group_by] + ["n"] + list(metrics)]
    for e in table:
        rows.append([str(e[k]) for k in group_by] + [str(e["n"])]
                    + [_cell(e[f"{m}_mean"], e[f"{m}_std"], digits, scale) for m in metrics])
    return rows


def format_table(table, group_by, metrics, digits: int = 4, scale: float = 1.0) -> str:
    """Aligned plain text (numbers right-aligned)."""
    cells = table_cells(table, group_by, metrics, digits, scale)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    n_group = len(group_by)
    lines = []
    for j, r in enumerate(cells):
        parts = [c.ljust(w) if (i < n_group or j == 0) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
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
    """Numeric CSV: group keys, n, and per metric ``_mean``, ``_std``, ``_n`` columns."""
    cols = list(group_by) + ["n"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for e in table:
            w.writerow([e[c] for c in cols])


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
    """Metric mean +- std vs ``x`` (numeric), one line per ``hue`` value; saved to ``path``."""
    if not table:
        raise ReportError("empty table: nothing to plot")
    for k in [x] + ([hue] if hue else []):
        if k not in table[0]:
            raise ReportError(f"plot key {k!r} is not a grouping key of the table ({sorted(table[0])})")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    hues = sorted({e[hue] for e in table}, key=_sort_key) if hue else [None]
    for h in hues:
        pts = sorted((e for e in table if hue is None or e[hue] == h), key=lambda e: _sort_key(e[x]))
        xs = [float(e[x]) for e in pts]
        ys = np.array([e[f"{metric}_mean"] for e in pts]) * scale
        err = np.nan_to_num(np.array([e[f"{metric}_std"] for e in pts]) * scale)
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=str(h) if hue else None)
    if logx:
        ax.set_xscale("log")
        xt = sorted({float(e[x]) for e in table})
        ax.set_xticks(xt)
        ax.set_xticklabels([f"{v:g}" for v in xt])
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    if hue:
        ax.legend(title=hue)
    ax.set_title(title or f"{metric} vs {x}")
    ax.grid(alpha=0.3)
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
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(targets), 1.0 + 0.5 * len(sources)))
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
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_result(workdir: str, row: Mapping[str, Any]) -> str:
    """Write a result row atomically as ``<workdir>/result.json`` (for runners and tests)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RESULT_FILE)
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(dict(row), f, indent=2, sort_keys=True, default=repr)
    os.replace(tmp, path)
    return path


def _split(items: Sequence[str]) -> list[str]:
    return [k for it in items for k in it.split(",") if k]


def report_main(argv: Optional[Sequence[str]] = None) -> int:
    """``peft-jax report ROOT [--group-by k1,k2] [--metric m ...] [--csv F] [--md F]
    [--plot-ablation F.png --x KEY --hue KEY] [--heatmap F.png --source-key K --target-key K
    [--relative]] [--seed-key train.seed] [--scale 100] [--digits 2] [--include-failed]``."""
    p = argparse.ArgumentParser(prog="peft-jax report")
    p.add_argument("root")
    p.add_argument("--group-by", action="append", default=[],
                   help="config keys (comma separated); default: keys that vary, minus the seed")
    p.add_argument("--metric", action="append", default=[], help="default: all final metrics")
    p.add_argument("--seed-key", default="", help="default: 'seed' (or 'train.seed' in older rows)")
    p.add_argument("--include-failed", action="store_true")
    p.add_argument("--csv")
    p.add_argument("--md")
    p.add_argument("--digits", type=int, default=4)
    p.add_argument("--scale", type=float, default=1.0, help="e.g. 100 for percentages")
    p.add_argument("--plot-ablation")
    p.add_argument("--x", default="peft.prompt.length")
    p.add_argument("--hue", default="peft.prompt.init")
    p.add_argument("--no-logx", action="store_true")
    p.add_argument("--heatmap")
    p.add_argument("--source-key", default="transfer.source")
    p.add_argument("--target-key", default="task.name")
    p.add_argument("--relative", action="store_true")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        rows = collect(a.root, include_failed=a.include_failed)
        if not rows:
            raise ReportError(f"no finished runs (result.json with status 'finished') under {a.root}")
        metrics = _split(a.metric) or metric_names(rows)
        a.seed_key = a.seed_key or seed_key_of(rows)
        group_by = _split(a.group_by) or varying_keys(rows, exclude=[a.seed_key])
        table = aggregate(rows, group_by, metrics, seed_key=a.seed_key)
        print(format_table(table, group_by, metrics, a.digits, a.scale))
        print(f"\n{len(rows)} run(s) in {len(table)} group(s)")
        if a.csv:
            write_csv(table, group_by, metrics, a.csv)
            print(f"wrote {a.csv}")
        if a.md:
            with open(a.md, "w") as f:
                f.write(to_markdown(table, group_by, metrics, a.digits, a.scale))
            print(f"wrote {a.md}")
        if a.plot_ablation:
            keys = [a.x] + ([a.hue] if a.hue else [])
            abl = aggregate(rows, keys, metrics[:1], seed_key=a.seed_key)
            plot_ablation(abl, a.x, a.hue or None, metrics[0], a.plot_ablation, logx=not a.no_logx,
                          scale=a.scale)
            print(f"wrote {a.plot_ablation}")
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
