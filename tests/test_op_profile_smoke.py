"""Smoke test of ``benchmarks/op_profile.py --quick``: one method profiled in a JAX and a
torch worker process lands in one table with numeric ms/step for both frameworks (not a
timing test)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _table(text: str) -> list[dict]:
    lines = text.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("method "))
    cols = re.split(r"\s{2,}", lines[head].strip())
    rows = []
    for line in lines[head + 2:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(cols), f"ragged table row: {line!r}"
        rows.append(dict(zip(cols, cells)))
    return rows


@pytest.mark.slow  # two worker processes (a JAX compile and a torch run), ~40-80 s on 2 cores
def test_op_profile_quick(tmp_path):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the test session's fake devices are not wanted here
    out = tmp_path / "profile.txt"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "op_profile.py"), "--quick",
           "--methods", "lora", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table(out.read_text())
    assert {"method", "category", "jax ms/step", "torch ms/step", "jax/torch"} <= set(rows[0])
    by_cat = {r["category"]: r for r in rows}
    for cat in ("matmul", "sum of ops", "step wall"):
        assert cat in by_cat, f"no {cat} row: {sorted(by_cat)}"
        for col in ("jax ms/step", "torch ms/step"):
            assert float(by_cat[cat][col]) > 0, (cat, col, by_cat[cat])
    for r in rows:
        float(r["jax ms/step"]), float(r["torch ms/step"])  # numeric, no '-' / error rows
    text = out.read_text()
    assert "top 10 ops: lora / jax" in text and "top 10 ops: lora / torch" in text
    assert "ERROR" not in text
