"""The analysis notebooks execute end to end (nbclient, python3 kernel of this venv) on the
real result files committed under ``benchmarks/results/`` (a missing file is an error, never
replaced by made-up data), and what they write agrees with the library computed directly."""

import csv
import json
import pathlib

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from peft_jax import report
from peft_jax.transfer import evaluate_retrieval

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ABLATION_ROWS = ROOT / "benchmarks" / "results" / "lester_smollm2.jsonl"
SPOT_RESULTS = ROOT / "benchmarks" / "results" / "spot_minilm.json"


def _execute(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def _text(nb) -> str:
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_ablation_notebook_on_committed_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_JAX_NOTEBOOK_OUT", str(tmp_path))
    nb = _execute("ablation_analysis.ipynb")
    rows = report.load_rows(str(ABLATION_ROWS))
    assert f"{len(rows)} rows from" in _text(nb) and f"({len(report.finished(rows))} finished" in _text(nb)
    keys = ["peft.methods", "peft.prompt.length", "peft.prompt.init"]
    for r in rows:
        if r["config"].get("peft.methods") != "prompt":
            r["config"]["peft.prompt.length"] = r["config"]["peft.prompt.init"] = "-"
    table = report.aggregate(rows, keys, ["accuracy"], seed_key="seed")
    written = list(csv.DictReader(open(tmp_path / "ablation_table.csv")))
    assert [tuple(r[k] for k in keys) for r in written] == [tuple(str(e[k]) for k in keys) for e in table]
    np.testing.assert_allclose([float(r["accuracy_mean"]) for r in written],
                               [e["accuracy_mean"] for e in table])
    for name in ("ablation_length_init.png", "ablation_curves.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_spot_notebook_on_committed_results(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_JAX_NOTEBOOK_OUT", str(tmp_path))
    _execute("spot.ipynb")
    res = json.loads(SPOT_RESULTS.read_text())
    saved = json.loads((tmp_path / "spot_summary.json").read_text())
    flat = {(s, t): g for t, gs in res["gains"].items() for s, g in gs.items()}
    assert sorted(saved) == sorted(res["rankings"]) == ["mean_cosine", "token_cosine"]
    for method, rk in res["rankings"].items():
        expected = evaluate_retrieval(rk, flat, ks=(1,))["summary"]
        assert saved[method]["mrr"] == pytest.approx(expected["mrr"])
        assert saved[method]["mean_top1_gain"] == pytest.approx(expected["mean_top1_gain"])
    assert (tmp_path / "spot_transfer.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("name,env,message", [
    ("ablation_analysis.ipynb", "PEFT_JAX_ABLATION_ROWS", "does not exist"),
    ("spot.ipynb", "PEFT_JAX_SPOT_RESULTS", "no SPoT results"),
])
def test_notebooks_refuse_a_missing_results_file(name, env, message, tmp_path, monkeypatch):
    monkeypatch.setenv(env, str(tmp_path / "missing"))
    monkeypatch.setenv("PEFT_JAX_NOTEBOOK_OUT", str(tmp_path / "out"))
    with pytest.raises(CellExecutionError, match=message):
        _execute(name)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
