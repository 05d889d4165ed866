"""Trustworthy runs (issue 13), without a model: checkpoint digests and fallback, the health
check inside the train step, interrupts, the workdir lock, metrics.jsonl after a resume,
the CLI's one-line errors, strict text decoding, and safetensors headers checked before
any tensor byte is read (a sparse 3.2 GB tensor refused with bounded memory)."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peft_jax.models.hf_io import CheckpointError
from peft_jax.train.checkpoint import (CheckpointMismatch, DeltaCheckpointer,
                                       abstract_with_shardings)
from peft_jax.train.step import TrainState, make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- checkpoints


def _state(seed=1, n=64, tx=None):
    w = jax.random.normal(jax.random.PRNGKey(seed), (n, n))
    return TrainState.create({"peft": {"w": w, "b": jnp.arange(n, dtype=jnp.float32)}},
                             tx or optax.adamw(1e-3), jax.random.PRNGKey(0))


def _abstract(st):
    sh = jax.tree.map(lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[0]), st)
    return abstract_with_shardings(jax.eval_shape(lambda: st), sh)


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


META = {"base_id": "b", "methods": [], "task": "sst2", "num_labels": 2, "optimizer": "adamw",
        "scan_layers": False}


def _two_steps(folder):
    states = {1: _state(1), 2: _state(2)}
    c = DeltaCheckpointer(folder, keep=5)
    for s, st in states.items():
        c.save(s, st, {**META, "step": s})
    c.close()
    return states


def test_flipped_bit_in_any_data_file_is_caught_and_falls_back(tmp_path, capfd):
    """One flipped bit in each data file of the newest step, one at a time: the restore is
    either exactly the saved state (an unread byte) or the previous step with a warning
    naming the damaged step -- never silently different values. Orbax alone returns
    different values for some of these flips (counted)."""
    import orbax.checkpoint as ocp

    src = str(tmp_path / "src")
    states = _two_steps(src)
    files = sorted(p for p in pathlib.Path(src, "2", "state").rglob("*")
                   if p.is_file() and "/d/" in str(p))
    assert files
    silent_in_orbax = caught = 0
    for i, f in enumerate(files):
        for frac in (0.3, 0.5, 0.8):
            work = str(tmp_path / f"w{i}_{frac}")
            shutil.copytree(src, work)
            target = pathlib.Path(work) / f.relative_to(src)
            data = bytearray(target.read_bytes())
            data[int(len(data) * frac)] ^= 0x10
            target.write_bytes(bytes(data))
            m = ocp.CheckpointManager(work, item_handlers={
                "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
            try:
                raw = m.restore(2, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_abstract(states[2]))))["state"]
                silent_in_orbax += any(not np.array_equal(a, b) for a, b in
                                       zip(_host(raw), _host(states[2])))
            except Exception:
                pass
            m.close()
            c = DeltaCheckpointer(work)
            st, meta = c.restore(_abstract(states[2]), META)
            c.close()
            err = capfd.readouterr().err
            if meta["step"] == 2:
                assert all(np.array_equal(a, b) for a, b in zip(_host(st), _host(states[2])))
                assert "damaged" not in err
            else:
                caught += 1
                assert meta["step"] == 1
                assert all(np.array_equal(a, b) for a, b in zip(_host(st), _host(states[1])))
                assert f"checkpoint step 2 is damaged: {work}/2" in err
                assert "falling back to step 1" in err
                assert os.path.isdir(os.path.join(work + ".damaged", "2", "state"))
    print(f"{len(files)} data files x 3 flips: orbax alone returned different values "
          f"{silent_in_orbax} times; caught and fell back {caught} times")
    assert silent_in_orbax >= 1 and caught >= silent_in_orbax


@pytest.mark.parametrize("damage,message", [
    ("empty", r"checkpoints/3: empty step folder"),
    ("no_meta", r"checkpoints/3/meta/metadata: missing"),
    ("bad_meta", r"checkpoints/3/meta/metadata: malformed checkpoint metadata"),
    ("list_meta", r"checkpoints/3/meta/metadata: malformed checkpoint metadata \(a JSON list"),
])
def test_damaged_step_folders_name_the_path_and_fall_back(tmp_path, capfd, damage, message):
    folder = str(tmp_path / "checkpoints")
    states = _two_steps(folder)
    step3 = pathlib.Path(folder, "3")
    if damage == "empty":
        step3.mkdir()
    else:
        shutil.copytree(pathlib.Path(folder, "2"), step3)
        meta = step3 / "meta" / "metadata"
        if damage == "no_meta":
            meta.unlink()
        else:
            meta.write_text('{"base_id": "b", ' if damage == "bad_meta" else "[1, 2]")
    c = DeltaCheckpointer(folder)
    assert c.latest_step() == 3
    st, meta = c.restore(_abstract(states[2]), META)
    err = capfd.readouterr().err
    assert meta["step"] == 2
    assert all(np.array_equal(a, b) for a, b in zip(_host(st), _host(states[2])))
    import re
    assert re.search(r"checkpoint step 3 is damaged: \S*" + message, err), err
    assert "falling back to step 2" in err and "nothing was deleted" in err
    moved = os.path.join(folder + ".damaged", "3")
    assert os.path.isdir(moved) and not step3.exists()
    # training can write step 3 again (orbax would silently skip steps <= a damaged latest)
    assert c.latest_step() == 2
    c.save(3, states[2], {**META, "step": 3})
    c.wait()
    assert c.latest_step() == 3
    c.close()


def test_no_intact_checkpoint_moves_aside_and_says_so(tmp_path):
    folder = str(tmp_path / "checkpoints")
    states = _two_steps(folder)
    for s in ("1", "2"):
        (pathlib.Path(folder, s, "meta", "metadata")).write_text("garbage")
    c = DeltaCheckpointer(folder)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*checkpoints \(step 2: .*"
                                              r"step 1: .*moved to .*checkpoints\.damaged; rerun"):
        c.restore(_abstract(states[2]), META)
    assert sorted(os.listdir(folder + ".damaged")) == ["1", "2"]
    assert c.latest_step() is None
    c.close()


@pytest.mark.parametrize("field,value", [("task", "sst5"), ("num_labels", 5),
                                         ("optimizer", "sgd"), ("base_id", "other"),
                                         ("scan_layers", True)])
def test_another_runs_checkpoint_is_a_mismatch_naming_the_field(tmp_path, field, value):
    folder = str(tmp_path / "checkpoints")
    states = _two_steps(folder)
    c = DeltaCheckpointer(folder)
    with pytest.raises(CheckpointMismatch, match=rf"checkpoints/2: checkpoint field '{field}' is "
                                                 rf"{META[field]!r} but this run has {value!r}"):
        c.restore(_abstract(states[2]), {**META, field: value})
    assert sorted(os.listdir(folder)) == ["1", "2"]  # nothing moved: the checkpoint is fine
    c.close()


def test_structure_mismatch_names_the_leaf(tmp_path):
    """Without a metadata field to compare (an older checkpoint), another optimizer or a
    head of another size is named by its leaf, not called corruption."""
    folder = str(tmp_path / "checkpoints")
    states = _two_steps(folder)
    c = DeltaCheckpointer(folder)
    old_meta = {k: v for k, v in META.items() if k not in ("optimizer", "num_labels")}
    with pytest.raises(CheckpointMismatch, match=r"state leaf 'opt_state/.*' is .* in the "
                                                 r"checkpoint but .* in this run"):
        c.restore(_abstract(_state(2, tx=optax.sgd(0.1, momentum=0.9))), old_meta)
    with pytest.raises(CheckpointMismatch, match=r"state leaf '.*peft/b' is float32\[64\] in "
                                                 r"the checkpoint but float32\[32\] in this run"):
        c.restore(_abstract(_state(2, n=32)), old_meta)
    c.close()


def test_async_save_digest_is_of_what_was_saved(tmp_path):
    """An asynchronous save followed at once by a donating update of the same buffers (as
    the train loop does): the checkpoint restores the saved values and its digest holds."""
    st = _state(3)
    saved = _host(st)
    step = jax.jit(lambda s: s.replace(trainable=jax.tree.map(lambda x: x * 2 + 1, s.trainable)),
                   donate_argnums=(0,))
    c = DeltaCheckpointer(str(tmp_path / "ck"), async_save=True)
    c.save(1, st, {**META, "step": 1})
    for _ in range(3):
        st = step(st)
    c.close()
    c = DeltaCheckpointer(str(tmp_path / "ck"))
    restored, meta = c.restore(_abstract(st), META)
    assert meta["digest"].startswith("sha256:") and meta["leaf_digests"]
    assert all(np.array_equal(a, b) for a, b in zip(_host(restored), saved))
    c.close()


# ----------------------------------------------------------------------------- the train step


def _quadratic_step(lr, optimizer=optax.sgd, max_update_ratio=100.0):
    def loss_fn(variables, batch, rng, deterministic):
        w = variables["peft"]["w"]
        loss = jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
        return loss, {}
    return jax.jit(make_train_step(loss_fn, lambda frozen, tr: {"params": frozen, **tr},
                                   optimizer(lr), max_update_ratio=max_update_ratio))


def _batch(scale=1.0):
    x = jnp.ones((4, 3)) * scale
    return {"x": x, "y": jnp.ones((4, 2))}


def test_step_refuses_exploding_and_nonfinite_updates():
    st0 = TrainState.create({"peft": {"w": jnp.full((3, 2), 0.1)}}, optax.sgd(0.1),
                            jax.random.PRNGKey(0))
    st, m = _quadratic_step(0.1)(st0, {}, _batch())
    assert float(m["applied"]) == 1 and float(m["finite"]) == 1
    assert not np.array_equal(np.asarray(st.trainable["peft"]["w"]), 0.1)
    # lr=1e30: finite, but the update is ~1e30 x the parameters -> refused, state kept
    st, m = _quadratic_step(1e30)(st0, {}, _batch())
    assert float(m["applied"]) == 0 and float(m["finite"]) == 1 and float(m["update_ratio"]) > 1e20
    assert np.array_equal(np.asarray(st.trainable["peft"]["w"]), np.full((3, 2), 0.1, np.float32))
    assert int(st.step) == 1
    # the guard can be turned off (then only non-finite values are refused)
    st, m = _quadratic_step(1e30, max_update_ratio=0)(st0, {}, _batch())
    assert float(m["applied"]) == 1 and float(np.max(np.abs(st.trainable["peft"]["w"]))) > 1e20
    # NaN input -> NaN loss and gradients: refused
    st, m = _quadratic_step(0.1)(st0, {}, _batch(float("nan")))
    assert float(m["applied"]) == 0 and float(m["finite"]) == 0
    assert np.array_equal(np.asarray(st.trainable["peft"]["w"]), np.full((3, 2), 0.1, np.float32))
    # finite loss and gradients whose square overflows Adam's second moment (inf): refused,
    # so no inf can reach the optimizer state that a checkpoint would hold
    st_adam = TrainState.create({"peft": {"w": jnp.full((3, 2), 0.1)}}, optax.adam(1e-3),
                                jax.random.PRNGKey(0))
    st, m = _quadratic_step(1e-3, optax.adam)(st_adam, {}, _batch(1e18))
    assert np.isfinite(float(m["loss"])) or float(m["finite"]) == 0
    assert float(m["applied"]) == 0
    assert all(np.all(np.isfinite(x)) for x in _host(st.opt_state))


def test_health_log_names_the_first_refused_step():
    from peft_jax.train.health import HealthLog, NonFiniteLoss, check_initial

    h = HealthLog(max_update_ratio=100.0)
    ok = {"applied": jnp.float32(1), "finite": jnp.float32(1), "update_ratio": jnp.float32(0.1),
          "loss": jnp.float32(0.5), "grad_norm": jnp.float32(1)}
    h.add(1, ok)
    h.check(lambda: 1)                      # nothing refused
    h.add(2, ok)
    h.add(3, {**ok, "applied": jnp.float32(0), "update_ratio": jnp.float32(3e29)})
    h.add(4, {**ok, "applied": jnp.float32(0), "finite": jnp.float32(0),
              "loss": jnp.float32(np.nan)})
    with pytest.raises(NonFiniteLoss, match=r"exploding update at step 3: its largest element is "
                                            r"3e\+29x the largest parameter \(limit "
                                            r"config.train.max_update_ratio="
                                            r"100\).*last good checkpoint is step 2"):
        h.check(lambda: 2)
    h.add(5, {**ok, "applied": jnp.float32(0), "finite": jnp.float32(0),
              "loss": jnp.float32(np.nan)})
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 5.*no checkpoint was written"):
        h.check(lambda: None)
    with pytest.raises(NonFiniteLoss, match=r"NaN/Inf before any step, in peft/prompt: the cause "
                                            r"is the prompt file, not the learning rate"):
        check_initial({"peft": {"prompt": jnp.array([1.0, np.nan]), "x": jnp.ones(2)}},
                      "the prompt file")


# ----------------------------------------------------------------------------- interrupts


def test_stop_signals_set_a_flag_then_a_second_ctrl_c_raises():
    from peft_jax.train.interrupts import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested and stop.signal == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------- workdir lock


def _holder_process():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _write_lock(workdir, pid, host=None, proc_start=None):
    import socket
    from peft_jax.train.workdir_lock import LOCK_NAME, _proc_start
    os.makedirs(workdir, exist_ok=True)
    info = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
            "proc_start": _proc_start(pid) if proc_start is None else proc_start,
            "command": "peft-jax train --config x.py"}
    pathlib.Path(workdir, LOCK_NAME).write_text(json.dumps(info))
    return info


def test_lock_refuses_a_second_writer_and_takes_over_stale_locks(tmp_path, capfd):
    import socket
    from peft_jax.train.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLocked

    wd = str(tmp_path / "run")
    with WorkdirLock(wd):
        with pytest.raises(WorkdirLocked, match=rf"{wd} is in use by another trainer \(pid "
                                                rf"{os.getpid()} on host {socket.gethostname()}"):
            WorkdirLock(wd).acquire()
    assert not os.path.exists(os.path.join(wd, LOCK_NAME))       # released
    holder = _holder_process()
    try:
        _write_lock(wd, holder.pid)
        with pytest.raises(WorkdirLocked, match=rf"pid {holder.pid} on host"):
            WorkdirLock(wd).acquire()
        # the same pid, but not the process that took the lock (pid reuse): stale
        _write_lock(wd, holder.pid, proc_start=1)
        with WorkdirLock(wd) as lock:
            assert json.loads(pathlib.Path(wd, LOCK_NAME).read_text())["pid"] == os.getpid()
        assert f"took over the stale lock {wd}/{LOCK_NAME} (pid {holder.pid}" in capfd.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    _write_lock(wd, holder.pid)           # now dead: stale
    with WorkdirLock(wd):
        pass
    assert "that process is no longer running" in capfd.readouterr().err
    _write_lock(wd, 12345, host="elsewhere")
    with pytest.raises(WorkdirLocked, match=r"host elsewhere.*cannot be checked from here: if that "
                                            r"process is gone, remove .*\.lock"):
        WorkdirLock(wd).acquire()


def test_stale_lock_is_taken_over_by_exactly_one_of_many(tmp_path):
    """8 processes start together on a workdir with a stale lock: one takes it, 7 are
    refused naming the winner."""
    wd = str(tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(wd, dead.pid)
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from peft_jax.train.workdir_lock import WorkdirLock, WorkdirLocked\n"
            "time.sleep(max(0.0, float(sys.argv[1]) - time.time()))\n"
            "try:\n"
            "    with WorkdirLock(%r):\n"
            "        print('WON', flush=True); time.sleep(3)\n"
            "except WorkdirLocked as e:\n"
            "    print('LOST', e, flush=True)\n") % (str(ROOT), wd)
    start = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", code, start], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    won = [o for o in outs if o.startswith("WON")]
    lost = [o for o in outs if o.startswith("LOST")]
    assert len(won) == 1 and len(lost) == 7, outs
    assert all("is in use by another trainer" in o for o in lost)


# ----------------------------------------------------------------------------- metrics.jsonl


def test_metrics_rows_after_the_restored_step_are_dropped_on_resume(tmp_path):
    from peft_jax.train.writers import MetricWriter

    w = MetricWriter(str(tmp_path), tensorboard=False, resume_step=0)
    for s in range(1, 6):
        w.write(s, {"loss": 1.0 / s}, prefix="train/")
    w.write(5, {"accuracy": 0.5}, prefix="eval/")
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')         # torn by a kill mid-write
    w = MetricWriter(str(tmp_path), tensorboard=False, resume_step=3)
    for s in range(4, 6):
        w.write(s, {"loss": 1.0 / s}, prefix="train/")
    w.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(set(r) == {"step", "train/loss"} for r in rows)


# ----------------------------------------------------------------------------- CLI errors


def _errors():
    from peft_jax.config import ConfigError
    from peft_jax.data.readers import DataError
    from peft_jax.peft.delta_io import DeltaMismatch
    from peft_jax.train.health import NonFiniteLoss
    from peft_jax.train.workdir_lock import WorkdirLocked
    from peft_jax.sweep import SweepError
    return [(ConfigError("config.x: bad"), 2), (SweepError("s"), 2), (DataError("f.tsv:3: bad"), 3),
            (CheckpointError("ck"), 4), (CheckpointMismatch("m"), 5), (DeltaMismatch("d"), 5),
            (NonFiniteLoss("nan"), 6), (WorkdirLocked("locked"), 7),
            (FileNotFoundError(2, "No such file or directory", "x.txt"), 74)]


@pytest.mark.parametrize("debug", ["", "--debug", "env"])
def test_every_project_error_is_one_line_with_its_exit_code(monkeypatch, capsys, debug):
    from peft_jax import cli

    monkeypatch.delenv("PEFT_JAX_DEBUG", raising=False)
    if debug == "env":
        monkeypatch.setenv("PEFT_JAX_DEBUG", "1")
    for exc, code in _errors():
        def boom(argv, exc=exc):
            raise type(exc)(*exc.args) if not isinstance(exc, OSError) else exc
        monkeypatch.setitem(cli.COMMANDS, "boom", boom)
        rc = cli.main(["boom"] + (["--debug"] if debug == "--debug" else []))
        err = capsys.readouterr().err
        assert rc == code, (exc, rc)
        lines = err.strip().splitlines()
        assert lines[-1].startswith("error: ")
        if debug:
            assert "Traceback (most recent call last)" in err
        else:
            assert len(lines) == 1, err
    # a bug (not a project error) keeps its traceback
    monkeypatch.setitem(cli.COMMANDS, "boom", lambda argv: {}["missing"])
    with pytest.raises(KeyError):
        cli.main(["boom"])
    # --debug after `--` belongs to the wrapped command
    assert cli._split_debug(["launch", "tpu", "--", "train", "--debug"]) == (
        ["launch", "tpu", "--", "train", "--debug"], debug == "env", None)


def _cli(args, env=None, timeout=300):
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    e.pop("PEFT_JAX_DEBUG", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "peft_jax.cli", *args], capture_output=True,
                          text=True, env=e, timeout=timeout, cwd=str(ROOT))


def _one_error_line(p):
    lines = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith(("WARNING", "I0000"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    return lines[0]


def test_cli_subcommands_print_one_line_errors(tmp_path):
    """A project error from subcommands without a model load: one line, its code."""
    p = _cli(["report", str(tmp_path / "nothing")])
    assert p.returncode == 2 and "report:" in _one_error_line(p)
    p = _cli(["sweep", "--workdir", str(tmp_path)])
    assert p.returncode == 2 and _one_error_line(p) == "error: sweep: --config FILE.py[:arg] is required"
    p = _cli(["train", "--config", str(tmp_path / "nope.py")])
    assert p.returncode == 2 and "nope.py" in _one_error_line(p)
    p = _cli(["spot", "inspect", str(tmp_path / "lib"), "missing"])
    assert p.returncode == 2 and _one_error_line(p).startswith("error: spot inspect: ")


# ----------------------------------------------------------------------------- text files


def test_non_utf8_file_is_an_error_naming_file_and_line(tmp_path):
    from peft_jax.data import task_from_config
    from peft_jax.data.readers import DataError

    path = tmp_path / "train.tsv"
    path.write_bytes("good film\tpositive\n".encode() + "caf\xe9 noir\tnegative\n".encode("latin-1"))
    spec = {"name": "t", "files": {"train": str(path)}, "columns": ["text", "label"],
            "text_fields": ["text"], "label_names": ["negative", "positive"]}
    with pytest.raises(DataError, match=rf"{path}:2: byte 0xe9 at column 4 is not valid utf-8 "
                                        r"text; set config.task.file.encoding"):
        task_from_config(spec).load("train")
    rows = task_from_config({**spec, "encoding": "latin-1"}).load("train")
    assert rows[1]["text"] == "café noir" and rows[1]["label"] == 0


def test_empty_split_names_its_file(tmp_path):
    from peft_jax.data import task_from_config
    from peft_jax.data.readers import DataError

    (tmp_path / "dev.tsv").write_text("\n\n")
    spec = {"name": "t", "files": {"dev": str(tmp_path / "dev.tsv")}, "columns": ["text", "label"],
            "text_fields": ["text"], "label_names": ["negative", "positive"]}
    with pytest.raises(DataError, match=rf"{tmp_path}/dev.tsv: no examples \(split 'dev' of task 't'\)"):
        task_from_config(spec).load("dev")


def test_messages_name_cli_keys_not_keyword_arguments():
    """No message tells a command-line user to 'pass' a Python keyword argument."""
    import re
    hits = []
    for f in (ROOT / "peft_jax").rglob("*.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"pass (data_dir|template=|allow_resize=|ranking=)|see task_from_config", line):
                hits.append(f"{f}:{i}: {line.strip()}")
    assert not hits, hits


def test_nan_prompt_file_is_named_as_the_cause(tmp_path):
    from peft_jax.peft.prompt import from_file

    arr = np.ones((4, 8), np.float32)
    arr[2, 5] = np.nan
    np.save(tmp_path / "p.npy", arr)
    with pytest.raises(CheckpointError, match=r"config.peft.prompt.file='.*p.npy': holds 1 NaN/Inf "
                                              r"value\(s\) \(first at row 2, column 5: nan\)"):
        from_file(str(tmp_path / "p.npy"), 4, d=8)
    np.save(tmp_path / "q.npy", np.ones((3, 8), np.float32))
    with pytest.raises(CheckpointError, match=r"length 3 but the target prompt has length 4; resize it: truncate .* config.peft.prompt.resize"):
        from_file(str(tmp_path / "q.npy"), 4, d=8)


# ----------------------------------------------------------------------------- sizes before bytes

GB32 = 800_000_000  # float32 elements: 3.2 GB


def _sparse_safetensors(path, tensors, extra_name, extra_elems):
    """A safetensors file holding ``tensors`` plus an extra float32 tensor of
    ``extra_elems`` elements whose bytes are a hole (a sparse file: a few KB on disk)."""
    header, blobs, off = {}, [], 0
    for k, v in tensors.items():
        v = np.ascontiguousarray(v)
        dt = {"float32": "F32"}[v.dtype.name]
        header[k] = {"dtype": dt, "shape": list(v.shape), "data_offsets": [off, off + v.nbytes]}
        blobs.append(v.tobytes())
        off += v.nbytes
    header[extra_name] = {"dtype": "F32", "shape": [extra_elems],
                          "data_offsets": [off, off + 4 * extra_elems]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
        f.truncate(8 + len(raw) + off + 4 * extra_elems)
    assert os.stat(path).st_blocks * 512 < 1 << 20  # sparse on disk


def _peak_extra_mb(code):
    """Run ``code`` in a fresh interpreter after the imports: (extra peak RSS in MB, output).
    The peak (VmHWM, what ru_maxrss reports) is reset to the current RSS first (Linux
    ``/proc/self/clear_refs``), so import-time peaks do not hide what ``code`` allocates."""
    script = ("import sys, time; sys.path.insert(0, %r)\n"
              "import numpy, safetensors.numpy, peft_jax.peft.delta_io, peft_jax.peft.hf_peft\n"
              "def kb(field):\n"
              "    return int(next(l for l in open('/proc/self/status') if l.startswith(field))"
              ".split()[1])\n"
              "open('/proc/self/clear_refs', 'w').write('5')\n"
              "before = kb('VmHWM:')\n"
              "%s\n"
              "print('EXTRA_KB', kb('VmHWM:') - before)\n") % (str(ROOT), code)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr[-3000:]
    kb = int(p.stdout.split("EXTRA_KB")[1].split()[0])
    return kb / 1024, p.stdout


def test_delta_with_a_huge_extra_tensor_fails_before_reading_it(tmp_path):
    from peft_jax.peft import delta_io as D

    delta = {"peft": {"prompt": np.ones((4, 8), np.float32)}}
    # 1) delta.json does not list the extra tensor; 2) it does (a consistent-looking file),
    # but the run does not expect it (config.train.init_from)
    folders = []
    for i in (1, 2):
        folder = str(tmp_path / f"delta{i}")
        D.save_delta(folder, delta, base_id="b", base_hash="h")
        _sparse_safetensors(os.path.join(folder, D.TENSORS_FILE),
                            {"peft/prompt": delta["peft"]["prompt"]}, "peft/evil", GB32)
        folders.append(folder)
    meta_path = os.path.join(folders[1], D.META_FILE)
    meta = json.load(open(meta_path))
    meta["tree"]["peft/evil"] = {"shape": [GB32], "dtype": "float32"}
    json.dump(meta, open(meta_path, "w"))
    code = ("from peft_jax.peft import delta_io as D\n"
            "for folder, kw in ((%r, {}), (%r, dict(expected={'peft/prompt': ((4, 8), 'float32')}, "
            "partial=True))):\n"
            "    t0 = time.perf_counter()\n"
            "    try:\n"
            "        D.load_delta(folder, **kw)\n"
            "        print('LOADED')\n"
            "    except D.CheckpointError as e:\n"
            "        print(type(e).__name__, e)\n"
            "    print('seconds', round(time.perf_counter() - t0, 4))\n") % tuple(folders)
    extra_mb, out = _peak_extra_mb(code)
    print(out, f"extra peak RSS {extra_mb:.1f} MB")
    assert "LOADED" not in out
    assert ("CheckpointError " + os.path.join(folders[0], D.TENSORS_FILE) + ": unexpected "
            "tensor(s) 'peft/evil' float32[800000000] (3.2 GB) that the tree recorded in "
            "delta.json does not have; nothing was read") in out
    assert ("DeltaMismatch " + os.path.join(folders[1], D.TENSORS_FILE) + ": unexpected tensor(s) "
            "'peft/evil' float32[800000000] (3.2 GB) that this run does not have") in out
    assert extra_mb < 200
    # control: the measurement sees a tensor that is read (100 MB of data, not a hole)
    from safetensors.numpy import save_file
    ctl = str(tmp_path / "control.safetensors")
    save_file({"big": np.full(25_000_000, 0.5, np.float32)}, ctl)
    ctl_mb, _ = _peak_extra_mb(f"x = safetensors.numpy.load_file({ctl!r}); print(float(x['big'].sum()))")
    os.remove(ctl)
    assert ctl_mb >= 90, ctl_mb


def test_hf_adapter_with_a_huge_extra_tensor_fails_before_reading_it(tmp_path):
    from peft_jax.peft import hf_peft as H

    folder = tmp_path / "adapter"
    folder.mkdir()
    json.dump({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "token_dim": 8,
               "num_transformer_submodules": 1, "task_type": "FEATURE_EXTRACTION"},
              open(folder / H.CONFIG_FILE, "w"))
    wpath = str(folder / H.WEIGHTS_FILE)
    _sparse_safetensors(wpath, {"prompt_embeddings": np.ones((4, 8), np.float32)},
                        "base_model.model.extra", GB32)
    code = ("from peft_jax.peft import hf_peft as H\n"
            "t0 = time.perf_counter()\n"
            "try:\n"
            "    H.import_hf_peft(%r)\n"
            "    print('LOADED')\n"
            "except H.CheckpointError as e:\n"
            "    print(type(e).__name__, e)\n"
            "print('seconds', round(time.perf_counter() - t0, 4))\n") % str(folder)
    extra_mb, out = _peak_extra_mb(code)
    print(out, f"extra peak RSS {extra_mb:.1f} MB")
    assert ("CheckpointError " + wpath + ": unexpected tensor(s) 'base_model.model.extra' "
            "float32[800000000] (3.2 GB) that a PROMPT_TUNING adapter for this model with its "
            "adapter_config.json does not have; nothing was read") in out
    assert extra_mb < 200
    # prompt embeddings of another shape than the config gives: refused, named
    from safetensors.numpy import save_file
    save_file({"prompt_embeddings": np.ones((4, 8), np.float32)}, wpath)
    json.dump({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 400000000, "token_dim": 8},
              open(folder / H.CONFIG_FILE, "w"))
    with pytest.raises(CheckpointError, match=r"'prompt_embeddings' is float32\[4, 8\] .* expects "
                                              r"float32\[400000000, 8\]"):
        H.import_hf_peft(str(folder))
