"""``benchmarks/e2e_fewshot.py``: the few-shot protocol with torch + HF PEFT and with peft_jax.

The smoke test runs the real script on a tiny budget (1 seed, 2 steps, 16 test sentences of
LM-BFF SST-2, all-MiniLM-L6-v2) and checks its table (both stacks, accuracies in [0, 1],
"same data" for both) and, from its raw JSON, that both stacks' workers fed exactly the
same examples and tokens per step, dev set and test subset. Not a timing test.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
import e2e_fewshot  # noqa: E402


def _rows(markdown: str) -> dict:
    """The main table's rows: stack -> cells."""
    lines = markdown.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("| stack | seeds |"))
    cols = [c.strip() for c in lines[head].strip("|").split("|")]
    out = {}
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = dict(zip(cols, cells))
    return out


def test_example_id_is_content_and_label():
    a = common.example_id(1, [101, 2204, 102])
    assert a == common.example_id(1, (101, 2204, 102))   # list / tuple / array alike
    assert a != common.example_id(0, [101, 2204, 102])
    assert a != common.example_id(1, [101, 2205, 102])


def test_same_ids_detects_a_changed_example():
    ids = {"train": [["a", "b"], ["c", "d"]], "dev": ["e"], "test": ["f", "g"]}
    expected = {13: ids}
    assert e2e_fewshot.same_ids({"seeds": [{"seed": 13, "ids": ids}]}, expected) == \
        {"train": True, "dev": True, "test": True}
    moved = {**ids, "train": [["a", "c"], ["b", "d"]]}   # same examples, other batches
    got = e2e_fewshot.same_ids({"seeds": [{"seed": 13, "ids": moved}]}, expected)
    assert got == {"train": False, "dev": True, "test": True}


@pytest.mark.slow
def test_e2e_fewshot_tiny_budget(tmp_path, shared_data, minilm_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the test session's fake devices are not needed here
    out, raw = tmp_path / "e2e.md", tmp_path / "e2e.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "e2e_fewshot.py"), "--seeds", "13,21",
           "--steps", "2", "--eval-every", "1", "--test-examples", "16", "--torch-threads", "1",
           "--stacks", "torch,jax,jax_vectorized",
           "--workdir", str(tmp_path / "work"), "--out", str(out), "--json", str(raw)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = _rows(out.read_text())
    assert set(rows) == {e2e_fewshot.TORCH, e2e_fewshot.JAX, e2e_fewshot.JAX_VEC}
    for r in rows.values():
        assert r["seeds"] == "2"
        acc = float(re.match(r"([\d.]+) \(", r["test accuracy, mean (std)"]).group(1)) / 100
        assert 0.0 <= acc <= 1.0
        assert float(r["wall s"]) > 0
        assert r["same data (train/dev/test)"] == "yes/yes/yes", r
    res = json.loads(raw.read_text())["results"]
    (t, _), (j, _) = res[e2e_fewshot.TORCH]["seeds"], res[e2e_fewshot.JAX]["seeds"]
    assert t["ids"] == j["ids"]
    for v, q in zip(res[e2e_fewshot.JAX_VEC]["seeds"], res[e2e_fewshot.JAX]["seeds"]):
        # the vectorized seeds: the same data and the sequential seeds' results
        assert v["ids"] == q["ids"]
        assert (v["selected_step"], v["test_accuracy"], v["dev_accuracy"]) == \
            (q["selected_step"], q["test_accuracy"], q["dev_accuracy"])
    assert [len(b) for b in t["ids"]["train"]] == [8, 8]   # 2 steps of batch 8
    assert len(t["ids"]["dev"]) == 32 and len(t["ids"]["test"]) == 16
    for r in (t, j):   # the selected step is one of the evaluated steps
        assert r["selected_step"] in (1, 2)
        assert 0.0 <= r["test_accuracy"] <= 1.0
