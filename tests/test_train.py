"""Training-system invariants: sharded == single device, multi-process == single process,
resume == uninterrupted (kill -9, SIGTERM), interrupted saves, base untouched, clear errors."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _train_fixtures import config_file, tiny_config, write_tiny_bert  # noqa: E402


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(_leaves(a), _leaves(b)))


def _run(cfg):
    from peft_jax.experiment import run_experiment
    return run_experiment(cfg)


@pytest.fixture(scope="module")
def reference(tiny):
    """Single-device runs (prompt tuning and LoRA) that sharded runs must reproduce."""
    model, task, root = tiny
    out = {}
    for method in ("lora", "prompt"):
        out[method] = _run(tiny_config(model, task, str(root / f"ref_{method}"), method))
    return out


MESHES = {"8x1x1": dict(data=8), "2x4x1": dict(data=2, fsdp=4), "2x2x2": dict(data=2, fsdp=2, tensor=2)}


@pytest.mark.parametrize("method,mesh", [
    ("lora", "2x2x2"),
    pytest.param("lora", "8x1x1", marks=pytest.mark.slow),
    pytest.param("lora", "2x4x1", marks=pytest.mark.slow),
    pytest.param("prompt", "8x1x1", marks=pytest.mark.slow),
    pytest.param("prompt", "2x4x1", marks=pytest.mark.slow),
    pytest.param("prompt", "2x2x2", marks=pytest.mark.slow),
])
def test_sharded_equals_single_device(tiny, reference, method, mesh):
    model, task, root = tiny
    over = {f"mesh.{k}": v for k, v in MESHES[mesh].items()}
    res = _run(tiny_config(model, task, str(root / f"{method}_{mesh}"), method, **over))
    ref = reference[method]
    d = _max_diff(res.state.trainable, ref.state.trainable)
    print(f"{method} mesh {mesh}: max |delta diff| = {d:.2e}")
    assert d <= 1e-5
    assert res.row["metrics"] == pytest.approx(ref.row["metrics"], abs=1e-6)


def test_base_bit_identical_and_no_optimizer_state_for_frozen(tiny, reference):
    from peft_jax.models.registry import load_pretrained
    from peft_jax.peft.partition import tree_size

    model, _, _ = tiny
    base = load_pretrained(model).base
    res = reference["lora"]
    assert res.frozen["peft"] == {}   # no method-owned frozen state with LoRA + head
    frozen_base = res.frozen["params"]
    assert jax.tree.structure(base) == jax.tree.structure(jax.device_get(frozen_base))
    for a, b in zip(_leaves(base), _leaves(frozen_base)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    trainable = res.state.trainable
    # AdamW keeps mu and nu: exactly 2x the trainable leaves, nothing for the frozen base.
    opt_leaves = [x for x in jax.tree.leaves(res.state.opt_state) if np.ndim(x) > 0]
    assert sum(int(np.size(x)) for x in opt_leaves) == 2 * tree_size(trainable)
    assert tree_size(trainable) < 0.01 * tree_size(base)


def _cli(args, env_extra=None, check=True):
    env = dict(os.environ)
    env.update({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    env.pop("PEFT_JAX_FAULT", None)
    env.update(env_extra or {})
    p = subprocess.run([sys.executable, "-m", "peft_jax.cli", *args], env=env, capture_output=True,
                       text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _delta(workdir):
    from safetensors.numpy import load_file
    return load_file(os.path.join(workdir, "delta", "delta.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny):
    model, task, root = tiny
    wd = str(root / "cli_full")
    cfg = config_file(str(root / "cfg_full.py"), model, task, wd, "lora",
                      **{"train.steps": 6, "train.ckpt_every": 1})
    _cli(["train", "--config", cfg])
    return _delta(wd)


def _metric_rows(workdir):
    """(step, kind) of every metrics.jsonl row; kind = train / eval."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [(r["step"], "eval" if any(k.startswith("eval/") for k in r) else "train") for r in rows]


@pytest.mark.parametrize("fault", ["kill@3", "sigterm@3",
                                   pytest.param("sigint@3", marks=pytest.mark.slow)])
def test_resume_is_bit_identical(tiny, uninterrupted, fault):
    """kill -9 / SIGTERM / Ctrl-C after step 3, rerun: the same delta bit for bit, and one
    metrics.jsonl row per logged step (the resumed run does not append duplicates)."""
    model, task, root = tiny
    wd = str(root / f"cli_{fault.replace('@', '_')}")
    cfg = config_file(str(root / f"cfg_{fault[:4]}.py"), model, task, wd, "lora",
                      **{"train.steps": 6, "train.ckpt_every": 1})
    p = _cli(["train", "--config", cfg], {"PEFT_JAX_FAULT": fault}, check=False)
    if fault.startswith("kill"):
        assert p.returncode == -signal.SIGKILL
        assert not os.path.exists(os.path.join(wd, "result.json"))
    else:  # SIGTERM / SIGINT: finish the step, checkpoint, say so, exit 143 (retry)
        assert p.returncode == 143, p.stderr[-2000:]
        assert ("interrupted (or preempted) at step 3; a checkpoint was written; rerun the same "
                "command to resume") in p.stderr
        assert "Traceback" not in p.stderr
        assert json.load(open(os.path.join(wd, "result.json")))["status"] == "preempted"
        assert os.path.isdir(os.path.join(wd, "checkpoints", "3"))
    p2 = _cli(["train", "--config", cfg])
    assert "resumed from step" in p2.stdout
    res = json.load(open(os.path.join(wd, "result.json")))
    assert res["status"] == "finished" and res["steps"] == 6
    got = _delta(wd)
    assert sorted(got) == sorted(uninterrupted)
    for k in got:
        assert np.array_equal(got[k], uninterrupted[k]), k
    rows = _metric_rows(wd)
    assert sorted(rows) == sorted(_metric_rows(str(root / "cli_full"))), rows
    assert len(rows) == len(set(rows))


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(f"""
import os, signal, sys, jax, jax.numpy as jnp, optax
sys.path.insert(0, {str(HERE.parent)!r})
from peft_jax.train.step import TrainState
from peft_jax.train.checkpoint import DeltaCheckpointer
st = TrainState.create({{"peft": {{"w": jnp.ones((256, 256))}}}}, optax.adamw(1e-3), jax.random.PRNGKey(0))
c = DeltaCheckpointer({str(tmp_path / 'ck')!r}, keep=3)
c.save(1, st, {{"base_id": "b"}}); c.wait()
big = TrainState.create({{"peft": {{"w": jnp.ones((4096, 4096))}}}}, optax.adamw(1e-3), jax.random.PRNGKey(0))
c.save(2, big, {{"base_id": "b"}})   # asynchronous: killed while writing
os.kill(os.getpid(), signal.SIGKILL)
""")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == -signal.SIGKILL
    import optax
    from peft_jax.train.checkpoint import DeltaCheckpointer, abstract_with_shardings
    from peft_jax.train.step import TrainState
    import jax.numpy as jnp
    c = DeltaCheckpointer(str(tmp_path / "ck"), keep=3)
    assert c.latest_step() == 1
    st = TrainState.create({"peft": {"w": jnp.zeros((256, 256))}}, optax.adamw(1e-3), jax.random.PRNGKey(0))
    sh = jax.tree.map(lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[0]), st)
    restored, meta = c.restore(abstract_with_shardings(jax.eval_shape(lambda: st), sh), {"base_id": "b"})
    assert np.array_equal(np.asarray(restored.trainable["peft"]["w"]), np.ones((256, 256)))
    c.close()


def test_checkpoint_of_other_method_or_base_is_refused(tiny):
    from peft_jax.models.registry import load_pretrained
    from peft_jax.train.checkpoint import CheckpointMismatch

    model, task, root = tiny
    wd = str(root / "mismatch")
    _run(tiny_config(model, task, wd, "lora", **{"train.steps": 2}))
    with pytest.raises(CheckpointMismatch, match="methods"):
        _run(tiny_config(model, task, wd, "lora", **{"train.steps": 4, "peft.lora.rank": 2}))
    other = str(root / "model_other")
    write_tiny_bert(other, model, seed=1)
    with pytest.raises(CheckpointMismatch, match="base_id|base_hash"):
        _run(tiny_config(other, task, wd, "lora", **{"train.steps": 4}))


def test_corrupted_checkpoint_is_a_clear_error(tiny):
    """The only checkpoint damaged: a CheckpointError naming it; the step folder is moved
    aside (not deleted), so a rerun starts from step 0."""
    from peft_jax.models.hf_io import CheckpointError

    model, task, root = tiny
    wd = str(root / "corrupt")
    _run(tiny_config(model, task, wd, "lora", **{"train.steps": 2}))
    state_dir = pathlib.Path(wd, "checkpoints", "2", "state")
    files = [p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 0]
    for p in files:  # damage every data file of the latest step
        p.write_bytes(b"\x00garbage" * 3)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*checkpoints \(step 2: "
                                              r".*checkpoints/2/state.*moved to .*checkpoints.damaged"):
        _run(tiny_config(model, task, wd, "lora", **{"train.steps": 4}))
    assert sorted(os.listdir(os.path.join(wd, "checkpoints.damaged", "2", "state")))
    res = _run(tiny_config(model, task, wd, "lora", **{"train.steps": 4}))
    assert res.row["resumed_from"] is None and res.row["steps"] == 4


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tiny):
    """Two good steps, then a resumed run with lr=1e30 (no clipping): the first update is
    refused inside the step, training stops naming step 3 and the last good checkpoint (2),
    and no checkpoint after it exists; checkpoint 2 restores finite and moderate."""
    from peft_jax.train.loop import NonFiniteLoss

    model, task, root = tiny
    wd = str(root / "nan")
    sgd = {"optim.optimizer": "sgd", "optim.clip_norm": 0.0, "train.ckpt_every": 1}
    _run(tiny_config(model, task, wd, "lora", **{"train.steps": 2, **sgd}))
    with pytest.raises(NonFiniteLoss, match=r"(exploding update|non-finite .*) at step 3.*the "
                                            r"update was not applied.*last good checkpoint is step 2"):
        _run(tiny_config(model, task, wd, "lora", **{"train.steps": 6, "optim.lr": 1e30, **sgd}))
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1", "2"]
    res = _run(tiny_config(model, task, wd, "lora", **{"train.steps": 3, **sgd}))
    assert res.row["resumed_from"] == 2
    assert max(float(np.max(np.abs(x))) for x in _leaves(res.state.trainable)) < 10


def test_config_typo_fails_before_compiling(tiny):
    model, task, root = tiny
    cfg = config_file(str(root / "cfg_typo.py"), model, task, str(root / "typo"), "lora")
    p = _cli(["train", "--config", cfg, "--config.peft.lora.rnak=4"], check=False)
    assert p.returncode == 2
    assert "unknown key 'rnak'" in p.stderr and "did you mean rank" in p.stderr
    p = _cli(["train", "--config", cfg, "--config.peft.methods=lora,prompts"], check=False)
    assert p.returncode == 2 and "unknown method 'prompts'" in p.stderr


@pytest.mark.slow
def test_two_processes_equal_one(tiny, tmp_path):
    """jax.distributed over 2 local CPU processes (4 devices each) == 1 process with 8."""
    model, task, root = tiny
    worker = tmp_path / "worker.py"
    worker.write_text(f"""
import os, sys, numpy as np
pid = int(sys.argv[1]); n = int(sys.argv[2]); out = sys.argv[3]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + str(8 // n)
sys.path.insert(0, {str(HERE)!r})
from peft_jax.parallel import distributed
if n > 1:
    distributed.initialize("127.0.0.1:{12400 + os.getpid() % 500}", n, pid)
import jax
from _train_fixtures import tiny_config
from peft_jax.experiment import run_experiment
cfg = tiny_config({model!r}, {task!r}, out + "/wd", "lora", **{{"mesh.data": 8}})
r = run_experiment(cfg)
if jax.process_index() == 0:
    flat = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(r.state.trainable))]
    np.savez(out + "/delta.npz", *flat)
    import json; json.dump(r.row["metrics"], open(out + "/metrics.json", "w"))
""")
    def launch(n, out):
        os.makedirs(out, exist_ok=True)
        procs = [subprocess.Popen([sys.executable, str(worker), str(i), str(n), out],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(n)]
        logs = [p.communicate(timeout=600)[0] for p in procs]
        for p, log in zip(procs, logs):
            assert p.returncode == 0, log[-3000:]
        return np.load(out + "/delta.npz"), json.load(open(out + "/metrics.json"))

    one, m1 = launch(1, str(tmp_path / "one"))
    two, m2 = launch(2, str(tmp_path / "two"))
    for k in one.files:
        assert np.max(np.abs(one[k] - two[k])) <= 1e-5, k
    assert m1 == pytest.approx(m2, abs=1e-6)


@pytest.mark.slow  # > 40 s on 2 busy cores; runs in CI (PEFT_JAX_SLOW=1)
def test_cli_eval_export_params(tiny, uninterrupted):
    """eval restores the trained delta and reproduces the run's final metrics; exports load."""
    model, task, root = tiny
    cfg = str(root / "cfg_full.py")
    wd = root / "cli_full"
    res = json.load(open(wd / "result.json"))
    p = _cli(["eval", "--config", cfg])
    acc = float(p.stdout.strip().split("accuracy=")[1].split()[0])
    assert acc == pytest.approx(res["metrics"]["accuracy"], abs=1e-6)
    out = root / "exported"
    # the task head cannot go into an HF PEFT adapter or a merged base: refused, naming it
    p = _cli(["export", "--config", cfg, "--format", "hf-peft", "--out", str(out / "hf")], check=False)
    assert p.returncode == 2 and "['lora', 'head']" in p.stderr and not (out / "hf").exists()
    p = _cli(["export", "--config", cfg, "--format", "merged", "--out", str(out / "m")], check=False)
    assert p.returncode == 2 and "head cannot be folded" in p.stderr and not (out / "m").exists()
    _cli(["export", "--config", cfg, "--format", "delta", "--out", str(out / "delta")])
    from peft_jax.peft.delta_io import load_delta
    delta, meta = load_delta(str(out / "delta"))
    assert [m["type"].rsplit(".", 1)[-1] for m in meta["methods"]] == ["LoRA", "Head"]
    assert "head" in delta["peft"] and delta["peft"]["encoder"]["layer_0"]["attention"]["query"]["lora_b"].any()
    p = _cli(["params", "--config", cfg])
    assert "lora" in p.stdout.lower() and "head" in p.stdout and "%" in p.stdout


@pytest.mark.slow  # > 40 s on 2 busy cores; runs in CI (PEFT_JAX_SLOW=1)
def test_rerun_of_a_finished_run_keeps_its_results(tiny, uninterrupted):
    """Issue 13, item 1. Rerunning a finished run: "already finished at step 6", the stored
    table, result.json and metrics.jsonl untouched. Killed after the final checkpoint but
    before result.json (reproduced exactly: that run's files without result.json and delta/,
    the only things written after the final checkpoint): the rerun writes result.json with
    the same metrics and the same delta bit for bit, and adds no metrics.jsonl row."""
    model, task, root = tiny
    wd = root / "rerun_finished"
    shutil.copytree(root / "cli_full", wd)
    before = {n: (wd / n).read_bytes() for n in ("result.json", "metrics.jsonl")}
    stored = json.loads(before["result.json"])
    cmd = ["train", "--config", str(root / "cfg_full.py"), "--workdir", str(wd)]
    p = _cli(cmd)
    assert "already finished at step 6" in p.stdout
    from peft_jax.runner.results import results_table
    assert results_table(stored) in p.stdout
    for n, b in before.items():
        assert (wd / n).read_bytes() == b, n
    os.remove(wd / "result.json")
    shutil.rmtree(wd / "delta")
    p = _cli(cmd)
    assert "resumed from step 6" in p.stdout
    res = json.load(open(wd / "result.json"))
    assert res["status"] == "finished" and res["steps"] == 6 and res["resumed_from"] == 6
    assert res["metrics"] and res["metrics"] == pytest.approx(stored["metrics"], abs=1e-6)
    got = _delta(str(wd))
    assert sorted(got) == sorted(uninterrupted)
    assert all(np.array_equal(got[k], uninterrupted[k]) for k in got)
    assert (wd / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]


@pytest.mark.slow  # > 40 s on 2 busy cores; runs in CI (PEFT_JAX_SLOW=1)
def test_resume_false_on_a_run_is_refused_unless_overwrite_moves_it_aside(tiny, uninterrupted):
    """Issue 13, item 1: train.resume=false on a workdir holding a run is refused naming the
    workdir (before the model loads); with train.overwrite=true the old run's files move to
    <workdir>/replaced-<time>/ intact, and the new run trains from step 0."""
    model, task, root = tiny
    wd = root / "resume_false"
    shutil.copytree(root / "cli_full", wd)
    old = (wd / "result.json").read_bytes()
    cmd = ["train", "--config", str(root / "cfg_full.py"), "--workdir", str(wd),
           "--config.train.resume=False"]
    p = _cli(cmd, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and re.fullmatch(
        re.escape(f"error: config.train.resume=False but {wd} holds a run (checkpoints, delta, "
                  "result.json, metrics.jsonl") + "(, tb)?" + re.escape(
            "); rerun with config.train.resume=True to continue it, use another --workdir, or "
            f"set config.train.overwrite=True to move the old run aside (into {wd}/replaced-<time>/)"),
        line[0]), p.stderr[-2000:]
    assert "[peft_jax]" not in p.stdout and (wd / "result.json").read_bytes() == old
    p = _cli(cmd + ["--config.train.overwrite=True"])
    moved = [d for d in os.listdir(wd) if d.startswith("replaced-")]
    assert len(moved) == 1 and f"moved the previous run in {wd} to {wd / moved[0]}" in p.stdout
    assert (wd / moved[0] / "result.json").read_bytes() == old
    assert sorted(os.listdir(wd / moved[0] / "checkpoints")) == sorted(os.listdir(root / "cli_full" / "checkpoints"))
    res = json.load(open(wd / "result.json"))
    assert res["status"] == "finished" and res["resumed_from"] is None and "resumed from" not in p.stdout
    got = _delta(str(wd))
    assert all(np.array_equal(got[k], uninterrupted[k]) for k in uninterrupted)


def test_eval_export_params_read_the_runs_saved_config(tiny, uninterrupted):
    """Issue 13, item 9: the resolved config is saved as <workdir>/config.json; eval, export
    and params given only --workdir use it; an override contradicting the run is named."""
    from peft_jax.runner.workdir import load_config

    model, task, root = tiny
    wd = root / "cli_full"
    saved = load_config(str(wd))
    assert saved.train.steps == 6 and saved.model.name == model and saved.peft.methods == "lora"
    res = json.load(open(wd / "result.json"))
    p = _cli(["eval", "--workdir", str(wd)])
    acc = float(p.stdout.strip().split("accuracy=")[1].split()[0])
    assert acc == pytest.approx(res["metrics"]["accuracy"], abs=1e-6)
    p = _cli(["eval", "--workdir", str(wd), "--config.peft.methods=prompt"], check=False)
    assert p.returncode == 2
    assert [ln for ln in p.stderr.splitlines() if ln.startswith("error:")] == [
        f"error: --config.peft.methods='prompt' contradicts the run in {wd}, trained with "
        f"peft.methods='lora' ({wd}/config.json); drop the override"]
    _cli(["export", "--workdir", str(wd), "--format", "delta", "--out", str(root / "exp_wd")])
    from peft_jax.peft.delta_io import load_delta
    delta, _ = load_delta(str(root / "exp_wd"))
    assert np.array_equal(delta["peft"]["encoder"]["layer_0"]["attention"]["query"]["lora_b"],
                          uninterrupted["peft/encoder/layer_0/attention/query/lora_b"])
    p = _cli(["params", "--workdir", str(wd)])
    assert "lora" in p.stdout.lower() and "head" in p.stdout


def test_prompt_initializers_wired_from_config(tiny):
    """class_labels rows are the label words' embeddings; sampled_vocab rows come from the
    top-k ids of a corpus ranking (WordPiece ids are not frequency-ordered)."""
    from peft_jax.experiment import setup
    from peft_jax.peft.prompt import corpus_ranking

    model, task, root = tiny
    cfg = tiny_config(model, task, str(root / "pinit"), "prompt", **{
        "peft.prompt.init": "class_labels", "task.label_words": "bad,good"})
    s = setup(cfg)
    tok = s.exp.pre.tokenizer
    table = np.asarray(s.exp.pre.base["embeddings"]["word_embeddings"]["embedding"])
    prompt = np.asarray(s.state.trainable["peft"]["prompt"])
    for row, word in enumerate(["bad", "good"]):
        ids = tok(word, add_special_tokens=False)["input_ids"]
        np.testing.assert_allclose(prompt[row], table[ids].mean(0), rtol=0, atol=1e-7)

    cfg = tiny_config(model, task, str(root / "pinit2"), "prompt", **{
        "peft.prompt.init": "sampled_vocab", "peft.prompt.top_k": 20})
    s = setup(cfg)
    texts = [line.split("\t")[0] for line in open(task["train"]).read().splitlines()]
    top = corpus_ranking(tok, texts)[:20]
    prompt = np.asarray(s.state.trainable["peft"]["prompt"])
    rows = {tuple(np.round(table[i], 7)) for i in top}
    assert all(tuple(np.round(r, 7)) in rows for r in prompt)
    assert len({tuple(r) for r in prompt}) == prompt.shape[0]  # without replacement


def test_bf16_compute_keeps_fp32_delta_and_grad_accum_matches(tiny):
    """bf16 compute trains with fp32 deltas; grad_accum=2 equals one batch of the same size."""
    model, task, root = tiny
    res = _run(tiny_config(model, task, str(root / "bf16"), "lora", **{"model.dtype": "bfloat16"}))
    assert all(x.dtype == np.float32 for x in _leaves(res.state.trainable))
    assert np.isfinite(res.row["metrics"]["accuracy"])
    # without dropout (micro-batches draw other dropout masks than one big batch)
    nodrop = write_tiny_bert(str(root / "model_nodrop"), model, dropout=0.0)
    one = _run(tiny_config(nodrop, task, str(root / "acc1"), "lora", **{"optim.optimizer": "sgd"}))
    two = _run(tiny_config(nodrop, task, str(root / "acc2"), "lora", **{"optim.optimizer": "sgd",
                                                                        "train.grad_accum": 2}))
    assert _max_diff(one.state.trainable, two.state.trainable) <= 1e-5
