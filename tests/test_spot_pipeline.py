"""``peft-jax spot run`` end to end on a tiny random Llama and real tasks (SST-2 / MRPC
sources, CoLA target; ../shared/data), and ``export --format npy`` writing library metadata sidecars.

Prompt tuning with the text-to-text format (only the prompt trains), a few steps per run:
the sources enter the library with their metadata, the target's short run is its task
embedding, both similarities rank the sources, the target trains from each source and from
each baseline init at one budget, and the table (spot.md / spot.json) holds the measured
scores, gains over uniform init and MRR. A second call finds every run finished and runs
nothing. Numbers from a random tiny model mean nothing; the test checks the bookkeeping
against the runs' own result files.
"""

import json
import os
import pathlib
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _seq2seq_fixtures as F  # noqa: E402

from peft_jax.cli import main as cli  # noqa: E402
from peft_jax.transfer import PromptLibrary  # noqa: E402
from peft_jax.transfer.cli import spot_main  # noqa: E402

CONFIG = str(HERE.parent / "configs" / "prompt_tuning_t5.py")
SMALL = ["--config.task.max_train_examples=16", "--config.task.max_eval_examples=8",
         "--config.task.max_length=48", "--config.train.buckets=(48,)",
         "--config.train.batch_size=4", "--config.train.eval_batch_size=8",
         "--config.peft.prompt.length=3", "--config.train.eval_every=0",
         "--config.train.progress=False", "--config.mesh.data=1", "--config.train.baseline=False",
         "--config.task.train_split=train", "--config.task.eval_split=dev"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory, shared_data):
    return F.tiny_llama_folder(str(tmp_path_factory.mktemp("spot_llama")))


@pytest.mark.slow
def test_spot_run_pipeline_and_npy_sidecars(llama, tmp_path, capsys):
    wd = str(tmp_path / "spot")
    argv = ["run", "--config", CONFIG, "--sources", "sst2,mrpc", "--targets", "cola", "--workdir", wd,
            "--source-steps", "3", "--embed-steps", "1", "--transfer-steps", "2", "--k", "1",
            "--splits", "mrpc=train:test",
            f"--config.model.name={llama}", *SMALL]
    # a task without the config's splits is refused before any run, naming its splits
    bad = [a for a in argv if a not in ("--splits", "mrpc=train:test")]
    assert spot_main(bad) == 2
    assert "task 'mrpc' has no split ['dev'] (splits: ['train', 'test']); pass --splits" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(wd, "sources"))
    assert spot_main(argv) == 0
    out = capsys.readouterr().out
    res = json.load(open(os.path.join(wd, "spot.json")))

    lib, tlib = PromptLibrary(os.path.join(wd, "library")), PromptLibrary(os.path.join(wd, "targets"))
    assert [m.name for m in lib.list()] == ["mrpc", "sst2"] and [m.name for m in tlib.list()] == ["cola"]
    for m in lib.list() + tlib.list():
        run = os.path.join(wd, "sources" if m.name != "cola" else "embed", m.name)
        row = json.load(open(os.path.join(run, "result.json")))
        assert (m.task, m.base_id, m.length, m.init, m.seed, m.steps, m.metric) == \
            (m.name, llama, 3, "class_labels", 0, 3 if m.name != "cola" else 1, "accuracy")
        assert m.metric_value == pytest.approx(row["metrics"]["accuracy"]) and m.base_hash
    # the table holds the runs' own numbers; gains are over uniform init
    scores = res["scores"]["cola"]
    for key, folder in (("uniform", "init-uniform"), ("class_labels", "init-class_labels"),
                        ("from:sst2", "from-sst2"), ("from:mrpc", "from-mrpc")):
        row = json.load(open(os.path.join(wd, "transfer", "cola", folder, "result.json")))
        assert row["steps"] == 2 and scores[key] == pytest.approx(row["metrics"]["accuracy"])
    for s in ("sst2", "mrpc"):
        assert res["gains"]["cola"][s] == pytest.approx(scores[f"from:{s}"] - scores["uniform"])
    # the transferred run started from the library prompt
    from peft_jax.config import load_config_file  # noqa: F401  (config of the run, as recorded)
    cfg = json.load(open(os.path.join(wd, "transfer", "cola", "from-sst2", "result.json")))["config"]
    assert cfg["peft.prompt.init"] == "file" and cfg["peft.prompt.file"].endswith("library/sst2.npy")
    for m in ("mean_cosine", "token_cosine"):
        per = res["retrieval"][m]["per_target"]["cola"]
        ranked = [s for s, _ in res["rankings"][m]["cola"]]
        assert sorted(ranked) == ["mrpc", "sst2"] and per["top_source"] == ranked[0]
        g = res["gains"]["cola"]
        first_best = next(i for i, s in enumerate(ranked) if g[s] == max(g.values()))  # ties: first ranked
        assert res["retrieval"][m]["summary"]["mrr"] == pytest.approx(1 / (first_best + 1))
    # every prompt started from class_labels with seed 0 and trained < 1000 steps: flagged
    assert any("share init='class_labels' seed=0" in w for w in res["warnings"])
    assert "| cola |" in out and "MRR" in out and os.path.isfile(os.path.join(wd, "gains.png"))

    # resumable: a second call runs nothing and gives the same table
    mtimes = {p: os.path.getmtime(p) for p in pathlib.Path(wd).rglob("result.json")}
    assert spot_main(argv) == 0
    assert {p: os.path.getmtime(p) for p in pathlib.Path(wd).rglob("result.json")} == mtimes
    assert json.load(open(os.path.join(wd, "spot.json")))["scores"] == res["scores"]

    # export --format npy: the prompt with its metadata sidecar (the folder is a library)
    src = os.path.join(wd, "sources", "sst2")
    exp = str(tmp_path / "npy")
    args = ["--config", CONFIG, f"--config.model.name={llama}", *SMALL, "--config.task.name=sst2",
            "--config.train.steps=3"]
    assert cli(["export", *args, "--format", "npy", "--out", exp, "--workdir", src]) == 0
    side = json.load(open(os.path.join(exp, "prompt.json")))
    assert (side["task"], side["length"], side["init"], side["seed"], side["steps"]) == \
        ("sst2", 3, "class_labels", 0, 3)
    assert side["base_hash"] == lib.meta("sst2").base_hash and side["metric_value"] == lib.meta("sst2").metric_value
    np.testing.assert_array_equal(np.load(os.path.join(exp, "prompt.npy")), lib.load("sst2"))
    capsys.readouterr()
    assert spot_main(["list", exp]) == 0 and "1 prompt(s)" in capsys.readouterr().out
