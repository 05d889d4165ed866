"""Metric sinks: JSONL (always) and TensorBoard (if tensorboardX is importable); process 0 only.

A resumed run passes ``resume_step`` (the restored step; 0 for a run starting over): rows
of ``metrics.jsonl`` logged after that step by the interrupted run are dropped when the
file is reopened (they are logged again, with the same values, as training repeats those
steps), so the file keeps exactly one row per logged step and kind. A torn last line (a
kill during a write) is dropped too.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np


def truncate_jsonl(path: str, keep_through: int) -> int:
    """Rewrite ``path`` (atomically) without rows whose ``step`` > ``keep_through`` and
    without unparsable lines; returns the number of rows dropped."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
                ok = isinstance(row, dict) and int(row.get("step", 0)) <= keep_through
            except (ValueError, TypeError):
                ok = False
            if ok:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


class MetricWriter:
    def __init__(self, workdir: str, tensorboard: bool = True, resume_step: Optional[int] = None):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None:
            truncate_jsonl(path, resume_step)
        self._jsonl = open(path, "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:
                self._tb = None

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = np.asarray(v)
            if v.size == 1:
                row[prefix + k] = float(v)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
