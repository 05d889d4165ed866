"""Trustworthy runs (issue 13) through ``peft-jax train`` on a tiny random BERT: one-line
errors with their exit codes, the workdir lock, a damaged checkpoint falling back, and a
chaos test (kill -9 at random moments, inside saves too, resumed == uninterrupted)."""

import json
import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _train_fixtures import config_file  # noqa: E402


def _cli(args, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    for k in ("PEFT_JAX_FAULT", "PEFT_JAX_DEBUG"):
        env.pop(k, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "peft_jax.cli", *args], env=env,
                          capture_output=True, text=True, timeout=900)


def _error_line(p):
    """The single ``error: ...`` line of a failed command (and no traceback)."""
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


def _delta(workdir):
    from safetensors.numpy import load_file
    return load_file(os.path.join(workdir, "delta", "delta.safetensors"))


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.mark.slow  # > 40 s on 2 busy cores; runs in CI (PEFT_JAX_SLOW=1)
def test_lr_1e30_stops_at_step_1_with_one_line_and_takes_over_a_stale_lock(tiny):
    """lr=1e30: the first update is refused inside the step; exit 6 with one line naming
    the step; nothing checkpointed. The workdir held a stale lock (a killed trainer): taken
    over with a message, and released at the end."""
    from peft_jax.train.workdir_lock import LOCK_NAME

    model, task, root = tiny
    wd = str(root / "lr1e30")
    cfg = config_file(str(root / "cfg_lr.py"), model, task, wd, "lora",
                      **{"train.steps": 6, "train.ckpt_every": 1})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(wd)
    pathlib.Path(wd, LOCK_NAME).write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
         "command": "peft-jax train (killed)"}))
    p = _cli(["train", "--config", cfg, "--config.optim.lr=1e30"])
    assert f"took over the stale lock {wd}/{LOCK_NAME} (pid {dead.pid}" in p.stderr
    assert p.returncode == 6, p.stderr[-3000:]
    line = _error_line(p)
    assert line.startswith("error: exploding update at step 1: its largest element is ")
    assert ("the update was not applied and training stopped (no checkpoint was written). Lower "
            "config.optim.lr") in line
    assert _steps(wd) == []
    assert not os.path.exists(os.path.join(wd, LOCK_NAME))


def test_one_line_errors_before_the_model_loads(tiny, tmp_path):
    """keep=0 and a locked workdir: refused before anything loads, one line, exit 2 / 7."""
    from peft_jax.train.workdir_lock import LOCK_NAME

    model, task, root = tiny
    wd = str(tmp_path / "wd")
    cfg = config_file(str(tmp_path / "cfg.py"), model, task, wd, "lora")
    # keep=0 with checkpointing: ConfigError naming the key (before the model loads)
    p = _cli(["train", "--config", cfg, "--config.train.keep=0"])
    assert p.returncode == 2 and _error_line(p).startswith("error: config.train.keep=0: at least 1")
    assert not os.path.exists(wd)  # refused before anything was written
    # a live trainer holds the workdir: exit 7 at once, naming it
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        from peft_jax.train.workdir_lock import _proc_start
        os.makedirs(wd)
        pathlib.Path(wd, LOCK_NAME).write_text(json.dumps(
            {"pid": holder.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
             "proc_start": _proc_start(holder.pid), "command": "peft-jax train --config other.py"}))
        p = _cli(["train", "--config", cfg])
        assert p.returncode == 7
        assert _error_line(p) == (
            f"error: {wd} is in use by another trainer (pid {holder.pid} on host "
            f"{socket.gethostname()}, started 2026-01-01T00:00:00+00:00: peft-jax train --config "
            "other.py); wait for it to finish or use another --workdir")
        assert "[peft_jax]" not in p.stdout  # nothing loaded
    finally:
        holder.kill()
        holder.wait()
        os.remove(os.path.join(wd, LOCK_NAME))


@pytest.mark.slow
def test_one_line_errors_after_the_model_loads(tiny, tmp_path):
    """Data, checkpoint and prompt-file errors through the CLI: one line, exit 3 / 4."""
    model, task, root = tiny
    cfg = config_file(str(tmp_path / "cfg.py"), model, task, str(tmp_path / "wd"), "lora")
    # a non-UTF-8 training file: DataError naming file:line
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes("good film\tpositive\n".encode() + "caf\xe9 bad\tnegative\n".encode("latin-1"))
    p = _cli(["train", "--config", cfg, f"--config.task.file.train={bad}"])
    assert p.returncode == 3
    assert _error_line(p) == (f"error: {bad}:2: byte 0xe9 at column 4 is not valid utf-8 text; set "
                              "config.task.file.encoding (task key 'encoding') to the file's "
                              "encoding, e.g. latin-1")
    # an empty split names its file
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    p = _cli(["train", "--config", cfg, f"--config.task.file.dev={empty}"])
    assert p.returncode == 3
    assert _error_line(p) == f"error: {empty}: no examples (split 'dev' of task 'file')"
    # eval of a workdir without checkpoints
    p = _cli(["eval", "--config", cfg, "--workdir", str(tmp_path / "never_trained")])
    assert p.returncode == 4 and "no checkpoint in" in _error_line(p)
    # a NaN in the prompt init file is named as the cause
    prompt = np.ones((4, 32), np.float32)
    prompt[1, 3] = np.nan
    np.save(tmp_path / "nan_prompt.npy", prompt)
    p = _cli(["train", "--config", cfg, "--config.peft.methods=prompt", "--config.peft.prompt.init=file",
              f"--config.peft.prompt.file={tmp_path / 'nan_prompt.npy'}"])
    assert p.returncode == 4
    assert _error_line(p) == (
        f"error: config.peft.prompt.file='{tmp_path / 'nan_prompt.npy'}': holds 1 NaN/Inf "
        "value(s) (first at row 1, column 3: nan); a prompt initialized from it would make "
        "every loss NaN")


@pytest.mark.slow
def test_resume_with_another_task_label_count_or_optimizer_names_the_field(tiny, tmp_path):
    model, task, root = tiny
    wd = str(tmp_path / "wd")
    cfg = config_file(str(tmp_path / "cfg.py"), model, task, wd, "lora", **{"train.steps": 2})
    assert _cli(["train", "--config", cfg]).returncode == 0
    p = _cli(["train", "--config", cfg, "--config.train.steps=4", "--config.optim.optimizer=sgd"])
    assert p.returncode == 5
    assert _error_line(p) == (f"error: {wd}/checkpoints/2: checkpoint field 'optimizer' is 'adamw' "
                              "but this run has 'sgd': the checkpoint belongs to another run "
                              "configuration (use another workdir, or rerun with the checkpoint's "
                              "settings)")
    p = _cli(["train", "--config", cfg, "--config.train.steps=4",
              "--config.task.file.label_names=negative,positive,neutral"])
    line = _error_line(p)   # the class count is named before the (longer) methods' configuration
    assert p.returncode == 5 and "checkpoint field 'num_labels' is 2 but this run has 3" in line, line
    assert _steps(wd) == [1, 2] or _steps(wd) == [2]   # nothing moved or deleted


@pytest.fixture(scope="module")
def reference(tiny):
    """An uninterrupted CLI run (10 steps, a checkpoint every step)."""
    model, task, root = tiny
    wd = str(root / "reference")
    cfg = config_file(str(root / "cfg_ref.py"), model, task, wd, "lora",
                      **{"train.steps": 10, "train.ckpt_every": 1})
    p = _cli(["train", "--config", cfg])
    assert p.returncode == 0, p.stderr[-3000:]
    return _delta(wd)


def _same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_and_matches_uninterrupted(tiny, reference):
    """Every data file of the newest step damaged: the rerun warns naming the step, moves it
    aside, resumes from the previous step and ends bit-identical to the uninterrupted run."""
    model, task, root = tiny
    wd = str(root / "damaged")
    cfg = config_file(str(root / "cfg_dmg.py"), model, task, wd, "lora",
                      **{"train.steps": 10, "train.ckpt_every": 1})
    p = _cli(["train", "--config", cfg], {"PEFT_JAX_FAULT": "kill@6"})
    assert p.returncode == -signal.SIGKILL
    newest = _steps(wd)[-1]
    for f in pathlib.Path(wd, "checkpoints", str(newest), "state").rglob("*"):
        if f.is_file() and "/d/" in str(f):
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0x01
            f.write_bytes(bytes(data))
    p = _cli(["train", "--config", cfg])
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"checkpoint step {newest} is damaged: {wd}/checkpoints/{newest}/state" in p.stderr
    assert f"falling back to step {newest - 1}" in p.stderr
    assert f"resumed from step {newest - 1}" in p.stdout
    assert os.path.isdir(os.path.join(wd, "checkpoints.damaged", str(newest), "state"))
    _same(_delta(wd), reference)


@pytest.mark.slow
def test_chaos_kill_at_random_moments_then_resume_is_bit_identical(tiny, reference):
    """kill -9 at 6 random moments (seeded): 3 at a random time after a random step, 3
    while orbax writes a checkpoint; each rerun resumes; the final delta equals the
    uninterrupted run's bit for bit, and metrics.jsonl has one row per logged step."""
    model, task, root = tiny
    wd = str(root / "chaos")
    cfg = config_file(str(root / "cfg_chaos.py"), model, task, wd, "lora",
                      **{"train.steps": 10, "train.ckpt_every": 1})
    rng = random.Random(13)
    faults = [f"kill@{{}}+{rng.uniform(0.0, 0.4):.3f}" for _ in range(3)] + ["killsave@{}"] * 3
    rng.shuffle(faults)
    inside_saves = 0
    for fault in faults:
        done = _steps(wd)[-1] if _steps(wd) else 0
        spec = fault.format(rng.randint(min(done + 1, 9), 9))
        p = _cli(["train", "--config", cfg], {"PEFT_JAX_FAULT": spec})
        assert p.returncode == -signal.SIGKILL, (spec, p.stderr[-3000:])
        tmp = [n for n in os.listdir(os.path.join(wd, "checkpoints")) if "tmp" in n]
        inside_saves += bool(tmp)
        print(f"{spec}: killed; checkpoints {_steps(wd)}; unfinished save {tmp}")
    assert inside_saves >= 3
    p = _cli(["train", "--config", cfg])
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.load(open(os.path.join(wd, "result.json")))["steps"] == 10
    _same(_delta(wd), reference)
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    keys = [(r["step"], any(k.startswith("eval/") for k in r)) for r in rows]
    assert len(keys) == len(set(keys)) and sorted(k for k, e in keys if not e) == list(range(1, 11))


@pytest.mark.slow
def test_sigterm_on_one_of_two_processes_stops_both_at_the_same_step(tiny, tmp_path):
    """jax.distributed over 2 local CPU processes; only process 1 gets SIGTERM (after step
    2): both agree at the next logging step, checkpoint together and stop preempted at the
    same step; rerunning both resumes from it and finishes."""
    model, task, root = tiny
    worker = tmp_path / "worker.py"
    worker.write_text(f"""
import os, signal, sys, json
pid, port, out, fault = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, {str(HERE)!r})
from peft_jax.parallel import distributed
distributed.initialize("127.0.0.1:" + port, 2, pid)
from _train_fixtures import tiny_config
from peft_jax.experiment import run_experiment
cfg = tiny_config({model!r}, {task!r}, out, "lora", **{{"mesh.data": 8, "train.steps": 8,
                                                        "train.log_every": 3}})
hook = (lambda s: os.kill(os.getpid(), signal.SIGTERM) if s == 2 else None) if fault and pid == 1 else None
r = run_experiment(cfg, on_step=hook).row
print("RESULT", json.dumps({{"status": r["status"], "steps": r["steps"],
                            "resumed_from": r["resumed_from"]}}), flush=True)
""")

    def launch(fault, port):
        procs = [subprocess.Popen([sys.executable, str(worker), str(i), str(port), str(tmp_path / "wd"),
                                   "1" if fault else "0"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
        logs = [p.communicate(timeout=900)[0] for p in procs]
        for p, log in zip(procs, logs):
            assert p.returncode == 0, log[-3000:]
        return [json.loads(log.split("RESULT ")[1].splitlines()[0]) for log in logs]

    port = 13400 + os.getpid() % 500
    first = launch(True, port)
    assert [r["status"] for r in first] == ["preempted", "preempted"], first
    assert first[0]["steps"] == first[1]["steps"] == 3   # the first logging step after the signal
    assert _steps(str(tmp_path / "wd"))[-1] == 3
    second = launch(False, port + 1)
    assert all(r["status"] == "finished" and r["steps"] == 8 and r["resumed_from"] == 3
               for r in second), second


# ----------------------------------------------------------------------------- config errors (item 6)

CONFIG_CASES = [
    ({"optim.lr": 0.0}, "config.optim.lr=0.0 must be positive"),
    ({"optim.lr": -1e-3}, "config.optim.lr=-0.001 must be positive"),
    ({"train.grad_accum": 0}, "config.train.grad_accum=0 must be positive"),
    ({"train.batch_size": 0}, "config.train.batch_size=0 must be positive"),
    ({"mesh.data": 0}, "config.mesh.data=0: a mesh size is a positive integer or -1"),
    ({"mesh.data": 16}, "needs 16 devices; there are 8"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "config.mesh: only one size may be -1"),
    ({"mesh.data": 3}, "config.train.batch_size=8 is not divisible by config.mesh.data x "
                       "config.mesh.fsdp = 3"),
    ({"task.max_length": 0}, "config.task.max_length=0 must be positive"),
    ({"task.format": "verbalizer", "peft.methods": "lora", "task.template": "{sentence} It was."},
     "config.task.template='{sentence} It was.': the verbalizer format needs exactly one {mask}"),
    ({"task.format": "verbalizer", "peft.methods": "lora", "task.label_words": "good,bad,ugly"},
     "config.task.label_words='good,bad,ugly' gives 3 label word(s); task 'file' has 2 classes"),
    ({"peft.methods": "prompt", "peft.prompt.length": 0}, "config.peft.prompt.length=0"),
    ({"peft.methods": "prompt,head", "peft.prompt.init": "class_labels", "peft.prompt.length": 1,
      "task.label_words": "good,bad"},
     "config.peft.prompt.length=1: init='class_labels' puts one vector per class"),
    ({"peft.lora.rank": 0}, "config.peft.lora.rank=0"),
    ({"peft.lora.dropout": 1.5}, "config.peft.lora.dropout=1.5"),
]


@pytest.mark.parametrize("over,message", CONFIG_CASES, ids=[",".join(c[0]) for c in CONFIG_CASES])
def test_config_errors_before_the_model_loads(tiny, tmp_path, monkeypatch, over, message):
    """Each bad value: a ConfigError naming the key as typed, raised before the model is
    loaded (loading it here fails the test) and before the workdir is created."""
    from peft_jax.config import ConfigError
    from peft_jax.runner import experiment as E
    from peft_jax.runner.run import run_experiment
    from _train_fixtures import tiny_config

    model, task, root = tiny

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the config error")

    monkeypatch.setattr(E, "load_pretrained", no_model)
    cfg = tiny_config(model, task, str(tmp_path / "wd"), "lora", **over)
    with pytest.raises(ConfigError) as e:
        E.preflight(cfg)
    assert message in str(e.value)
    # run_experiment: the same error, and nothing written yet
    with pytest.raises(ConfigError, match=re.escape(message)):
        with monkeypatch.context() as m:
            m.setattr(E, "load_pretrained", no_model)
            run_experiment(tiny_config(model, task, str(tmp_path / "wd2"), "lora", **over))
    assert not os.path.exists(tmp_path / "wd") and not os.path.exists(tmp_path / "wd2")


def test_config_error_through_the_cli_is_one_line_exit_2_before_loading(tiny, tmp_path):
    model, task, root = tiny
    wd = tmp_path / "wd"
    cfg = config_file(str(tmp_path / "cfg.py"), model, task, str(wd), "lora")
    p = _cli(["train", "--config", cfg, "--config.optim.lr=0"])
    assert p.returncode == 2
    assert _error_line(p) == "error: config.optim.lr=0.0 must be positive"
    assert "[peft_jax]" not in p.stdout and not wd.exists()


def test_verbalizer_without_an_lm_head_is_one_config_error(tiny, tmp_path):
    """The tiny BERT has no MLM head: the verbalizer format is refused naming the keys
    (after the weights load -- the head's presence is read from the checkpoint's tensor
    names -- but before anything is built or compiled)."""
    from peft_jax.config import ConfigError
    from peft_jax.runner.experiment import build_experiment
    from _train_fixtures import tiny_config

    model, task, root = tiny
    cfg = tiny_config(model, task, str(tmp_path / "wd"), "lora", **{"task.format": "verbalizer"})
    with pytest.raises(ConfigError, match=re.escape(
            f"config.task.format='verbalizer' scores label words with the model's LM head, and "
            f"config.model.name={model!r} has none")):
        build_experiment(cfg)
