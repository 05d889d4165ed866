"""Smoke test of ``benchmarks/xla_cpu_options.py --quick``: two XLA_FLAGS variants of one
method run in their own worker processes and land in one table with a numeric speed-up
over the default variant and a loss for each (not a timing test)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _table(text: str) -> list[dict]:
    lines = text.strip().splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("variant "))
    cols = re.split(r"\s{2,}", lines[head].strip())
    rows = []
    for line in lines[head + 2:]:
        if not line.strip():
            break  # the flags legend follows the table after a blank line
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(cols), f"ragged table row: {line!r}"
        rows.append(dict(zip(cols, cells)))
    return rows


@pytest.mark.slow  # two worker processes, ~30 s on 2 cores
def test_xla_cpu_options_quick_two_variants(tmp_path):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the test session's 8 fake devices are not wanted here
    out = tmp_path / "table.txt"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "xla_cpu_options.py"), "--quick",
           "--methods", "lora", "--variants", "default,ynn_off", "--steps", "1", "--warmup", "1",
           "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table(proc.stdout)
    assert [(r["variant"], r["method"]) for r in rows] == [("default", "lora"), ("ynn_off", "lora")]
    for r in rows:
        assert r["note"] == "-", f"variant failed: {r}"
        assert float(r["step s"]) > 0 and float(r["x default"]) > 0
        assert float(r["loss"]) > 0 and float(r["|dloss|"]) >= 0
    assert float(rows[0]["x default"]) == 1.0
    assert "--xla_cpu_experimental_ynn_fusion_type=" in proc.stdout  # the flags legend
    assert _table(out.read_text()) == rows
