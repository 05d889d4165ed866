"""The analysis notebooks execute end to end (nbclient, python3 kernel of this venv) on their
tiny synthetic settings, and what they write agrees with the library computed directly."""

import csv
import json
import pathlib

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from peft_jax import report
from peft_jax.transfer import PromptLibrary, evaluate_retrieval, read_gains_csv
from peft_jax.transfer.cli import rankings_for_targets

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str, cwd: pathlib.Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=180,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _text(nb) -> str:
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_ablation_notebook(tmp_path, monkeypatch):
    data, out = tmp_path / "results", tmp_path / "out"
    monkeypatch.setenv("PEFT_JAX_ABLATION_DIR", str(data))
    monkeypatch.setenv("PEFT_JAX_NOTEBOOK_OUT", str(out))
    nb = _execute("ablation_analysis.ipynb", tmp_path)
    text = _text(nb)
    assert "wrote synthetic results to" in text and "45 finished runs" in text
    rows = report.collect(str(data))
    table = report.aggregate(rows, ["peft.prompt.init", "peft.prompt.length"], ["accuracy"])
    written = list(csv.DictReader(open(out / "ablation_table.csv")))
    assert [(r["peft.prompt.init"], int(r["peft.prompt.length"])) for r in written] == \
        [(e["peft.prompt.init"], e["peft.prompt.length"]) for e in table]
    np.testing.assert_allclose([float(r["accuracy_mean"]) for r in written], [e["accuracy_mean"] for e in table])
    np.testing.assert_allclose([float(r["accuracy_std"]) for r in written], [e["accuracy_std"] for e in table])
    assert (out / "ablation_length_init.png").read_bytes()[:4] == b"\x89PNG"
    # rerun on the now existing folder: reads it, writes nothing new
    nb = _execute("ablation_analysis.ipynb", tmp_path)
    assert "wrote synthetic" not in _text(nb) and len(report.collect(str(data))) == 45


def test_spot_notebook(tmp_path, monkeypatch):
    method = "mean_cosine"  # the notebook's METHOD
    data, out = tmp_path / "spot", tmp_path / "out"
    monkeypatch.setenv("PEFT_JAX_SPOT_DIR", str(data))
    monkeypatch.setenv("PEFT_JAX_NOTEBOOK_OUT", str(out))
    nb = _execute("spot.ipynb", tmp_path)
    assert "wrote synthetic SPoT data" in _text(nb)
    saved = json.loads((out / "spot_summary.json").read_text())
    lib, tgt = PromptLibrary(str(data / "library")), PromptLibrary(str(data / "targets"))
    rankings = rankings_for_targets(lib, tgt, method=method)
    expected = evaluate_retrieval(rankings, read_gains_csv(str(data / "gains.csv")))["summary"]
    assert saved["summary"]["n_targets"] == expected["n_targets"] == 8
    for k in ("top1_beats_random_rate", "top3_beats_random_rate", "mean_spearman", "mrr"):
        assert saved["summary"][k] == pytest.approx(expected[k])
    assert {t: [s for s, _ in r] for t, r in saved["rankings"].items()} == \
        {t: [s for s, _ in r] for t, r in rankings.items()}
    for name in ("spot_similarity.png", "spot_transfer.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
