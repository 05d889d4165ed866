"""Smoke test of the benchmark suite: ``benchmarks/step_bench.py --quick`` (tiny random
configs, 2 steps, both frameworks) runs to the end and prints one complete table.

Not a timing test: it checks that both frameworks produced a row for each method without
error, that the peft_jax step compiled exactly once and never again after its first step,
and that the FLOP and optimizer-state columns are consistent (LoRA trains fewer parameters
than full fine-tuning, so it has less optimizer state and fewer FLOPs per step).
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _table(stdout: str) -> list[dict]:
    lines = stdout.strip().splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("model "))
    cols = re.split(r"\s{2,}", lines[head].strip())
    rows = []
    for line in lines[head + 2:]:
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(cols), f"ragged table row: {line!r}"
        rows.append(dict(zip(cols, cells)))
    return rows


@pytest.mark.slow
def test_step_bench_quick_prints_table(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the test session's 8 fake devices are not needed here
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_bench.py"), "--quick",
           "--models", "minilm", "--methods", "full,lora,ia3", "--cache-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "matmul peak" in proc.stdout and "FLOPs/step" in proc.stdout
    rows = _table(proc.stdout)
    got = {(r["method"], r["framework"]) for r in rows}
    assert got == {(m, f) for m in ("full", "lora", "ia3") for f in ("peft_jax", "torch+hf_peft")}
    for r in rows:
        assert r["note"] == "-", f"row failed: {r}"
        assert float(r["step s"]) > 0 and float(r["ex/s"]) > 0
    jax_rows = {r["method"]: r for r in rows if r["framework"] == "peft_jax"}
    for r in jax_rows.values():
        assert r["#comp"] == "1" and r["#recomp"] == "0", r
        assert r["x torch"] != "-"
    assert float(jax_rows["lora"]["opt MB"]) < float(jax_rows["full"]["opt MB"])
    # same method -> same optimizer state in both frameworks (same trainable parameters)
    torch_rows = {r["method"]: r for r in rows if r["framework"] == "torch+hf_peft"}
    for m in ("full", "lora", "ia3"):
        assert jax_rows[m]["opt MB"] == torch_rows[m]["opt MB"], (jax_rows[m], torch_rows[m])


def test_cache_load_scaling_prints_a_row_per_depth():
    """benchmarks/cache_load_scaling.py: a cold process compiles, a warm one loads the
    executable from the cache (a positive load time means the cache was hit)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cache_load_scaling.py"),
                        "--layers", "2,4"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("layers "))
    rows = [ln.split() for ln in lines[head + 2:]]
    assert [r[0] for r in rows] == ["2", "4"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)


def test_main_job_storage_reads_finished_cells_and_compares_per_seed(tmp_path):
    """Finished cells are read, not retrained; the difference to fp32 is taken per seed.
    (The rows here are written by the test: this checks the table, not the model.)"""
    import json

    acc = {("fp32", 1): 0.80, ("fp32", 2): 0.70, ("int8", 1): 0.79, ("int8", 2): 0.72}
    for (st, seed), a in acc.items():
        cell = tmp_path / f"{st}_s{seed}"
        cell.mkdir()
        (cell / "result.json").write_text(json.dumps({"status": "finished", "metrics": {"accuracy": a}}))
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "main_job_storage.py"), "--seeds", "1,2",
                        "--storages", "fp32,int8", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    row = next(ln for ln in p.stdout.splitlines() if ln.startswith("int8 |"))
    assert row.startswith("int8 | 79.0 | 72.0 | 75.5 (4.9) | +0.5 (per seed -1.0, +2.0)"), row
    assert "+ " not in p.stdout                           # nothing was trained
