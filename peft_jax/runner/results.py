"""A run's result row (``result.json``): written atomically, printed as a small table."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temp file + fsync + rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def flat_config(cfg) -> dict:
    """``{"a.b": value}`` of a ConfigDict (non-scalar values as strings)."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if hasattr(v, "items"):
                walk(v, prefix + k + ".")
            else:
                out[prefix + k] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    walk(cfg, "")
    return out


def results_table(result: dict) -> str:
    """The small table the main job prints: baseline vs trained, params, time."""
    rows = []
    keys = sorted(set(result.get("metrics", {})) | set(result.get("baseline", {})))
    width = max([len(k) for k in keys] + [10])
    rows.append(f"{'metric':<{width}}  {'untrained':>10}  {'trained':>10}")
    fmt = lambda v: f"{v:10.4f}" if isinstance(v, (int, float)) else f"{'-':>10}"
    for k in keys:
        rows.append(f"{k:<{width}}  {fmt(result.get('baseline', {}).get(k))}  "
                    f"{fmt(result.get('metrics', {}).get(k))}")
    for k, v in result.get("test", {}).items():
        rows.append(f"{'test ' + k:<{width}}  {'':>10}  {v:10.4f}")
    tp, bp = result["trainable_params"], result["base_params"]
    rows.append(f"trainable params: {tp:,} ({100.0 * tp / max(bp, 1):.3f}% of {bp:,} base)")
    rows.append(f"steps: {result['steps']}  train time: {result['train_wall_s']:.1f}s  "
                f"total time: {result['wall_s']:.1f}s  compilations: {result['compilations']}")
    return "\n".join(rows)


def read_result(workdir: str) -> dict:
    """The ``result.json`` row of the run in ``workdir`` ({} when absent or unreadable: a
    torn write never happens -- :func:`write_json` -- but a user may have edited it)."""
    try:
        with open(os.path.join(workdir, "result.json")) as f:
            row = json.load(f)
    except (OSError, ValueError):
        return {}
    return row if isinstance(row, dict) else {}
