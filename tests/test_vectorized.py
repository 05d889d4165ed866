"""Many runs in one program (``peft_jax.runner.vectorized``): K vmapped runs over one frozen
base equal K sequential ``run_experiment`` runs (trained and selected deltas, metrics,
selected step, test metrics); runs that differ in anything but seed / init / data /
learning rate are refused naming the key. Tiny random BERT (dropout 0.1: conftest's ``tiny``)
on a synthetic task."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _train_fixtures import tiny_config  # noqa: E402

from peft_jax.config import ConfigError  # noqa: E402
from peft_jax.peft.delta_io import flatten_delta, load_delta  # noqa: E402


def _cfgs(tiny, root, seeds=(0, 1, 2), lrs=(1e-2, 3e-2, 5e-3), **over):
    model, task, _ = tiny
    base = {"train.steps": 4, "train.eval_every": 2, "train.best_metric": "accuracy",
            "task.test_split": "dev", "train.buckets": (12, 32), "train.batch_size": 4,
            "task.max_train_examples": 24}
    base.update(over)
    return [tiny_config(model, task, os.path.join(root, f"run{k}"), methods="head,lora",
                        **{**base, "seed": seed, "optim.lr": lr})
            for k, (seed, lr) in enumerate(zip(seeds, lrs))]


def _max_diff(a, b) -> float:
    fa, fb = flatten_delta(jax.device_get(a)), flatten_delta(jax.device_get(b))
    assert sorted(fa) == sorted(fb)
    return max(float(np.max(np.abs(np.asarray(fa[k], np.float64) - np.asarray(fb[k], np.float64))))
               for k in fa)


@pytest.mark.slow
def test_vectorized_runs_equal_their_sequential_runs(tiny, tmp_path):
    from peft_jax.experiment import run_experiment
    from peft_jax.runner.vectorized import run_vectorized

    vec = run_vectorized(_cfgs(tiny, str(tmp_path / "vec")))
    seq = [run_experiment(c) for c in _cfgs(tiny, str(tmp_path / "seq"))]
    assert len(vec) == 3
    for v, s in zip(vec, seq):
        assert _max_diff(v.state.trainable, s.state.trainable) <= 1e-5     # the last step
        assert _max_diff(v.selected, s.selected) <= 1e-5                   # the dev-selected step
        assert v.row["selected_step"] == s.row["selected_step"]
        assert v.row["metrics"] == s.row["metrics"]                        # last dev evaluation
        assert v.row["test"] == s.row["test"]
        assert v.row["steps"] == s.row["steps"] == 4
        assert v.row["vectorized"]["runs"] == 3
        # its own files: the selected delta and the dev evaluations of steps 2 and 4
        saved, _ = load_delta(os.path.join(v.row["config"]["workdir"], "delta"))
        assert _max_diff(saved, v.selected) == 0.0
        evals = [json.loads(x) for x in open(os.path.join(v.row["config"]["workdir"], "metrics.jsonl"))]
        assert [r["step"] for r in evals if "eval/accuracy" in r] == [2, 4]
        stored = json.load(open(os.path.join(v.row["config"]["workdir"], "result.json")))
        assert stored["selected_step"] == v.row["selected_step"]
    # the runs really differ (seed, data order, learning rate): the equality is not vacuous
    assert _max_diff(vec[0].selected, vec[1].selected) > 1e-3
    assert _max_diff(vec[0].state.trainable, vec[2].state.trainable) > 1e-3


def test_runs_that_differ_in_shape_or_method_config_are_refused(tiny, tmp_path):
    from peft_jax.runner.vectorized import check_runs, run_vectorized

    cfgs = _cfgs(tiny, str(tmp_path), seeds=(0, 1), lrs=(1e-2, 1e-2))
    cfgs[1].peft.lora.rank = 8
    with pytest.raises(ConfigError, match=r"config\.peft\.lora\.rank: run 1 .* has 8, run 0 has 4"):
        run_vectorized(cfgs)
    cfgs = _cfgs(tiny, str(tmp_path), seeds=(0, 1), lrs=(1e-2, 2e-2))
    cfgs[0].optim.head_lr = cfgs[1].optim.head_lr = 1e-3
    with pytest.raises(ConfigError, match=r"config\.optim\.lr differs .* config\.optim\.head_lr"):
        check_runs(cfgs)
    check_runs(_cfgs(tiny, str(tmp_path)))   # seeds and learning rates alone are fine


def test_stacked_batches_pad_token_features_with_their_pad_value():
    from peft_jax.runner.vectorized import stack_batches

    a = {"input_ids": np.ones((2, 3), np.int32), "attention_mask": np.ones((2, 3), np.int32),
         "label": np.array([0, 1])}
    b = {"input_ids": np.full((2, 5), 2, np.int32), "attention_mask": np.ones((2, 5), np.int32),
         "label": np.array([1, 1])}
    out = stack_batches([a, b], {"input_ids": 7, "attention_mask": 0})
    assert out["input_ids"].shape == (2, 2, 5) and out["label"].shape == (2, 2)
    np.testing.assert_array_equal(out["input_ids"][0], [[1, 1, 1, 7, 7]] * 2)
    np.testing.assert_array_equal(out["attention_mask"][0], [[1, 1, 1, 0, 0]] * 2)
    np.testing.assert_array_equal(out["input_ids"][1], b["input_ids"])


def test_shared_splits_are_bucketed_and_different_ones_are_not(tiny, tmp_path):
    """Evaluation buckets apply only when every run has the same rows (the fixed test
    subset): then the K batches of a call share one length."""
    from peft_jax.data.tokenize import Encoded
    from peft_jax.runner.vectorized import same_rows

    def enc(rows, labels):
        return Encoded(features={"input_ids": [np.array(r, np.int32) for r in rows]},
                       scalars={"label": np.array(labels)})

    a = enc([[1, 2], [3, 4, 5]], [0, 1])
    assert same_rows([a, enc([[1, 2], [3, 4, 5]], [0, 1]), a])
    assert not same_rows([a, enc([[1, 2], [3, 4, 6]], [0, 1])])
    assert not same_rows([a, enc([[1, 2], [3, 4, 5]], [1, 1])])
    assert not same_rows([a, enc([[1, 2]], [0])])


def test_hash_dropout_masks_stay_put_when_a_tensor_is_padded():
    from peft_jax.models.layers import dropout_keep_mask

    k = jax.random.PRNGKey(3)
    small = np.asarray(dropout_keep_mask(k, 0.3, (3, 5, 7), "hash"))
    padded = np.asarray(dropout_keep_mask(k, 0.3, (3, 9, 7), "hash"))   # a longer sequence
    np.testing.assert_array_equal(padded[:, :5], small)
    assert 0.5 < small.mean() < 0.9


# ----------------------------------------------------------------------------- peft-jax fewshot


def test_fewshot_vectorize_refuses_methods_without_one_run_per_seed(capsys):
    from peft_jax.fewshot.cli import fewshot_main

    with pytest.raises(SystemExit):
        fewshot_main(["--method", "head,pet", "--vectorize"])
    assert "--vectorize: pet do not train one runner per seed" in capsys.readouterr().err


@pytest.mark.slow
def test_fewshot_vectorized_seeds_give_the_sequential_rows(shared_data, tiny, tmp_path):
    from peft_jax.fewshot.cli import run_methods
    from peft_jax.fewshot.methods import Budget

    model, _, _ = tiny
    b = Budget(steps=4, eval_every=2, test_examples=40)
    args = (["head"], ["lmbff/sst2"], [13, 21], model, b)
    seq = run_methods(*args, str(tmp_path / "seq"))
    vec = run_methods(*args, str(tmp_path / "vec"), vectorize=True)
    assert [r["config"]["seed"] for r in vec] == [13, 21]
    for v, s in zip(vec, seq):
        assert v["vectorized"]["runs"] == 2 and "vectorized" not in s
        assert v["selected_step"] == s["selected_step"]
        assert v["dev"] == s["dev"]
        assert v["metrics"]["accuracy"] == s["metrics"]["accuracy"]
        assert v["metrics"]["ece"] == pytest.approx(s["metrics"]["ece"], abs=1e-5)
        assert os.path.exists(os.path.join(v["config"]["workdir"], "result.json"))
    assert vec[0]["dev"] != vec[1]["dev"] or vec[0]["metrics"] != vec[1]["metrics"]


@pytest.mark.slow
def test_vectorized_runs_benchmark_prints_its_table(shared_data, tiny, tmp_path):
    import subprocess

    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)   # one device, as a user runs it
    cmd = [sys.executable, str(HERE.parent / "benchmarks" / "vectorized_runs.py"), "--quick",
           "--method", "head", "--model", tiny[0], "--seeds", "13,21", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("mode "))
    rows = {line.split()[0]: line.split() for line in lines[head + 2:]}
    assert sorted(rows) == ["sequential", "vectorized"]
    assert rows["vectorized"][-2] == "yes"              # same rows as the sequential seeds
    assert float(rows["sequential"][-1]) == 1.0 and float(rows["vectorized"][-1]) > 0
    for mode in rows:                                   # each mode wrote its seeds' rows
        assert len(list((tmp_path / mode).rglob("result.json"))) == 2


# ----------------------------------------------------------------------------- peft-jax sweep


def test_sweep_cells_group_by_everything_but_vectorizable_values(tiny, tmp_path):
    from peft_jax.runner.vectorized import varying_keys, vector_groups

    keys = varying_keys()
    assert {"seed", "optim.lr", "peft.lora.init_a", "peft.prompt.init"} <= set(keys)
    assert "peft.prompt.length" not in keys and "peft.lora.rank" not in keys
    cells = [(0, 1e-2, "kaiming", 4), (1, 3e-2, "gaussian", 4), (0, 1e-2, "kaiming", 2),
             (2, 1e-2, "gaussian", 4), (1, 1e-2, "kaiming", 2)]
    cfgs = [_cfgs(tiny, str(tmp_path / str(i)), seeds=(s,), lrs=(lr,),
                  **{"peft.lora.init_a": init, "peft.lora.rank": r})[0]
            for i, (s, lr, init, r) in enumerate(cells)]
    assert vector_groups(cfgs) == [[0, 1, 3], [2, 4]]           # one program per LoRA rank
    assert vector_groups(cfgs, max_runs=2) == [[0, 1], [3], [2, 4]]
    for c in cfgs:   # a group learning rate fixes optim.lr: runs with other rates split
        c.optim.head_lr = 1e-3
    assert vector_groups(cfgs) == [[0, 3], [1], [2, 4]]


@pytest.mark.slow
def test_vectorized_sweep_cells_equal_sequential_cells(tiny, tmp_path, capsys):
    """`peft-jax sweep --vectorize` (seed x lr x LoRA init, two programs of 4) writes the
    rows and deltas of `peft-jax sweep --in-process` (one run at a time)."""
    from _train_fixtures import config_file
    from peft_jax.sweep import sweep_main

    model, task, _ = tiny
    spec = config_file(str(tmp_path / "exp.py"), model, task, str(tmp_path / "unused"), "head,lora",
                       **{"train.steps": 4, "train.eval_every": 2, "train.best_metric": "accuracy",
                          "task.test_split": "dev", "train.buckets": (12, 32),
                          "train.batch_size": 4, "task.max_train_examples": 24})
    grid = ["--seeds", "0,1", "--grid", "optim.lr=0.01,0.03", "--grid",
            "peft.lora.init_a=kaiming,gaussian"]
    roots = {m: str(tmp_path / m) for m in ("seq", "vec")}
    assert sweep_main(["--config", spec, "--workdir", roots["seq"], "--in-process", *grid]) == 0
    assert sweep_main(["--config", spec, "--workdir", roots["vec"], "--vectorize",
                       "--vectorize-max", "4", *grid]) == 0
    out = capsys.readouterr().out
    assert out.count("# vectorized: 4 cells as one program") == 2
    names = sorted(d for d in os.listdir(roots["seq"]) if os.path.isdir(os.path.join(roots["seq"], d)))
    assert len(names) == 8 and names == sorted(
        d for d in os.listdir(roots["vec"]) if os.path.isdir(os.path.join(roots["vec"], d)))
    rows = {m: {n: json.load(open(os.path.join(r, n, "result.json"))) for n in names}
            for m, r in roots.items()}
    for n in names:
        s, v = rows["seq"][n], rows["vec"][n]
        assert v["status"] == s["status"] == "finished" and v["vectorized"]["runs"] == 4
        assert v["selected_step"] == s["selected_step"]
        assert v["metrics"] == s["metrics"] and v["test"] == s["test"]
        same = {k: x for k, x in s["config"].items() if k != "workdir"}
        assert {k: x for k, x in v["config"].items() if k != "workdir"} == same
        ds, _ = load_delta(os.path.join(roots["seq"], n, "delta"))
        dv, _ = load_delta(os.path.join(roots["vec"], n, "delta"))
        assert _max_diff(ds, dv) <= 1e-5
        assert "runs vectorized" in open(os.path.join(roots["vec"], n, "train.log")).read()
    # the cells really differ (seed, lr, init): the equality is not vacuous
    deltas = [load_delta(os.path.join(roots["vec"], n, "delta"))[0] for n in names[:2]]
    assert _max_diff(*deltas) > 1e-3
    # a rerun skips the finished cells
    assert sweep_main(["--config", spec, "--workdir", roots["vec"], "--vectorize", *grid]) == 0
    assert "0 finished, 8 skipped" in capsys.readouterr().out
