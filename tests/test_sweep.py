"""Sweeps: deterministic expansion, stable names, validation, dry-run, resumable local runner."""

import json
import os
import shlex
import sys
import textwrap

import pytest

from peft_jax.config import load_config_file
from peft_jax.sweep import (SweepError, expand, experiment_checker, format_value, is_finished,
                            parse_grid, parse_seeds, run_name, run_sweep, sweep_main, sweep_points,
                            train_command)

CONFIG = '''
import ml_collections
def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = ml_collections.ConfigDict(dict(name="sst2"))
    c.peft = ml_collections.ConfigDict()
    c.peft.prompt = ml_collections.ConfigDict(dict(length=100, init="uniform", tag="x"))
    c.train = ml_collections.ConfigDict(dict(seed=0, lr=0.3, steps=10))
    c.workdir = ""
    if arg == "list":
        c.sweep = [{"peft.prompt.init": "uniform", "train.seed": [1, 2]},
                   {"peft.prompt.init": "class_labels", "peft.prompt.tag": "1e-3", "train.lr": 1}]
    elif arg == "bad":
        c.sweep = [{"peft.prompt.lenght": 5}]
    elif arg == "nosweep":
        pass
    else:
        c.sweep = {"peft": {"prompt": {"length": [1, 5, 20, 100, 150],
                                       "init": ["class_labels", "uniform"]}},
                   "train": {"seed": [13, 21]}}
    return c
'''

# Stand-in for `peft-jax train`: really loads the config with the overrides (so the override
# text is checked end to end) and writes a result row; fails for prompt length 5 when asked.
FAKE_TRAIN = '''
import json, os, sys
from peft_jax.config import apply_overrides, load_config_file, split_config_args
spec, overrides, rest = split_config_args(sys.argv[1:])
workdir = rest[rest.index("--workdir") + 1]
cfg = apply_overrides(load_config_file(spec), overrides)
flat = {}
def walk(node, prefix):
    for k in node.keys():
        v = node[k]
        if hasattr(v, "keys"):
            walk(v, prefix + k + ".")
        elif k != "sweep":
            flat[prefix + k] = v
walk(cfg, "")
with open(os.path.join(os.path.dirname(workdir), "calls.log"), "a") as f:
    f.write(os.path.basename(workdir) + "\\n")
failed = os.environ.get("FAKE_FAIL_LEN5") == "1" and cfg.peft.prompt.length == 5
row = {"name": os.path.basename(workdir), "status": "failed" if failed else "finished", "config": flat,
       "env": {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")},
       "metrics": {"accuracy": 0.5}, "best": {}, "wall_s": 0.0, "trainable_params": 1}
with open(os.path.join(workdir, "result.json"), "w") as f:
    json.dump(row, f)
sys.exit(1 if failed else 0)
'''


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "exp.py"
    p.write_text(textwrap.dedent(CONFIG))
    return str(p)


@pytest.fixture
def fake_train(tmp_path):
    p = tmp_path / "fake_train.py"
    p.write_text(FAKE_TRAIN)
    return [sys.executable, str(p)]


def test_expansion_is_deterministic_and_complete(cfg_file, tmp_path):
    runs = expand(cfg_file, str(tmp_path / "out"))
    again = expand(cfg_file, str(tmp_path / "out"))
    assert runs == again
    assert len(runs) == 5 * 2 * 2 and len({r.name for r in runs}) == 20
    points = [dict(r.overrides) for r in runs]
    # cartesian product, sorted keys, last axis fastest
    assert list(points[0]) == ["peft.prompt.init", "peft.prompt.length", "train.seed"]
    assert points[:3] == [{"peft.prompt.init": "class_labels", "peft.prompt.length": 1, "train.seed": 13},
                          {"peft.prompt.init": "class_labels", "peft.prompt.length": 1, "train.seed": 21},
                          {"peft.prompt.init": "class_labels", "peft.prompt.length": 5, "train.seed": 13}]
    assert {(p["peft.prompt.init"], p["peft.prompt.length"], p["train.seed"]) for p in points} == \
        {(i, l, s) for i in ("class_labels", "uniform") for l in (1, 5, 20, 100, 150) for s in (13, 21)}
    r = runs[0]
    assert r.name.startswith("init-class_labels_length1_seed13-") and len(r.name.rsplit("-", 1)[1]) == 8
    assert r.workdir == os.path.join(str(tmp_path / "out"), r.name)
    # the name depends on the point only, not on key order
    assert run_name({"a.x": 1, "b.y": "u"}).rsplit("-", 1)[1] == run_name({"b.y": "u", "a.x": 1}).rsplit("-", 1)[1]
    assert run_name({"a.x": 1}) != run_name({"a.x": 2})
    # Names are folder names of existing sweeps (resume finds runs by them): changing the
    # scheme orphans every finished run, so it is pinned here on purpose.
    assert run_name({"peft.prompt.length": 20, "peft.prompt.init": "class_labels", "train.seed": 13,
                     "train.lr": 0.3}) == "length20_init-class_labels_seed13_lr0.3-6e8e513c"


def test_list_form_and_value_formatting(cfg_file, tmp_path):
    runs = expand(cfg_file + ":list", str(tmp_path))
    assert [dict(r.overrides) for r in runs] == [
        {"peft.prompt.init": "uniform", "train.seed": 1}, {"peft.prompt.init": "uniform", "train.seed": 2},
        {"peft.prompt.init": "class_labels", "peft.prompt.tag": "1e-3", "train.lr": 1}]
    assert runs[2].override_args() == ["--config.peft.prompt.init=class_labels",
                                       "--config.peft.prompt.tag='1e-3'", "--config.train.lr=1"]
    # coerced values as the trainer will see them (lr is a float field)
    assert dict(runs[2].expected)["train.lr"] == 1.0 and dict(runs[2].expected)["peft.prompt.tag"] == "1e-3"
    assert format_value(True) == "True" and format_value("True") == "'True'" and format_value(0.3) == "0.3"


def test_bad_sweeps_fail_before_running(cfg_file, tmp_path):
    with pytest.raises(SweepError, match=r"sweep run lenght5-.*unknown key 'lenght'.*did you mean length"):
        expand(cfg_file + ":bad", str(tmp_path))
    with pytest.raises(SweepError, match="axis 'a' has no values"):
        sweep_points({"a": []})
    with pytest.raises(SweepError, match="expected a dict or a list"):
        sweep_points(3)


def test_duplicate_points_rejected(tmp_path):
    p = tmp_path / "dup.py"
    p.write_text(textwrap.dedent('''
        import ml_collections
        def get_config(arg=None):
            c = ml_collections.ConfigDict(dict(x=1))
            c.sweep = [{"x": 1}, {"x": [2, 1]}]
            return c
    '''))
    with pytest.raises(SweepError, match=r"\{'x': 1\} is declared twice"):
        expand(str(p), str(tmp_path))


def test_dry_run_prints_exact_commands(cfg_file, tmp_path, capsys):
    root = str(tmp_path / "out")
    assert sweep_main(["--config", cfg_file, "--workdir", root, "--dry-run", "--only", "*length20_seed13*",
                       "--config.train.steps=7"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    name = [r for r in expand(cfg_file, root)
            if dict(r.overrides) == {"peft.prompt.init": "class_labels", "peft.prompt.length": 20,
                                     "train.seed": 13}][0].name
    assert lines[0] == (f"{shlex.quote(sys.executable)} -m peft_jax.cli train --config {cfg_file} "
                        f"--config.train.steps=7 --config.peft.prompt.init=class_labels "
                        f"--config.peft.prompt.length=20 --config.train.seed=13 --workdir {root}/{name}")
    assert not os.path.exists(root)  # nothing executed or created


def test_runner_executes_and_resumes(cfg_file, tmp_path, fake_train, monkeypatch, capsys):
    root = tmp_path / "out"
    runs = [r for r in expand(cfg_file, str(root)) if dict(r.overrides)["train.seed"] == 13
            and dict(r.overrides)["peft.prompt.init"] == "uniform"]
    assert len(runs) == 5
    monkeypatch.setenv("FAKE_FAIL_LEN5", "1")
    s = run_sweep(runs, cfg_file, parallel=2, train_cmd=fake_train, devices_per_run=2)
    assert len(s["finished"]) == 4 and len(s["failed"]) == 1 and not s["skipped"]
    assert "length5" in s["failed"][0]
    row = json.loads((root / runs[2].name / "result.json").read_text())
    assert row["config"]["peft.prompt.length"] == 20 and row["config"]["peft.prompt.init"] == "uniform"
    assert json.loads((root / "sweep.json").read_text())["runs"][0]["name"] == runs[0].name
    gpus = {json.loads((root / r.name / "result.json").read_text())["env"]["CUDA_VISIBLE_DEVICES"] for r in runs}
    assert gpus <= {"0,1", "2,3"} and gpus
    assert (root / runs[0].name / "train.log").exists()
    # second pass: the finished runs are skipped, the failed one is retried
    monkeypatch.setenv("FAKE_FAIL_LEN5", "0")
    s2 = run_sweep(runs, cfg_file, parallel=1, train_cmd=fake_train)
    assert sorted(s2["skipped"]) == sorted(s["finished"]) and s2["finished"] == s["failed"]
    calls = (root / "calls.log").read_text().split()
    assert len(calls) == 6 and calls.count(s["failed"][0]) == 2
    # third pass: nothing to do; dry run prints only skip comments
    capsys.readouterr()
    s3 = run_sweep(runs, cfg_file, dry_run=True, train_cmd=fake_train)
    assert len(s3["skipped"]) == 5 and not s3["pending"]
    assert all(line.startswith("# skip ") for line in capsys.readouterr().out.strip().splitlines())
    # a workdir holding a run with other settings is refused, not silently skipped
    path = root / runs[0].name / "result.json"
    row = json.loads(path.read_text())
    row["config"]["peft.prompt.length"] = 999
    path.write_text(json.dumps(row))
    with pytest.raises(SweepError, match="peft.prompt.length=999 but sweep run"):
        is_finished(runs[0])


def test_sweep_main_runs_with_train_cmd(cfg_file, tmp_path, fake_train, capsys):
    root = str(tmp_path / "o")
    argv = ["--config", cfg_file + ":list", "--workdir", root, "--parallel", "2",
            "--train-cmd", shlex.join(fake_train)]
    assert sweep_main(argv) == 0
    assert "3 finished, 0 skipped" in capsys.readouterr().out
    assert sweep_main(argv) == 0
    assert "0 finished, 3 skipped" in capsys.readouterr().out
    assert sweep_main(argv[:4] + ["--list"]) == 0
    assert capsys.readouterr().out.count("finished ") == 3
    assert load_config_file(cfg_file + ":list").sweep[1]["train.lr"] == 1


def _points(runs):
    return [dict(r.overrides) for r in runs]


def test_grid_and_seeds_from_the_command_line(cfg_file, tmp_path):
    root = str(tmp_path / "g")
    grid = parse_grid(["peft.prompt.length=1,5", "config.peft.prompt.init=uniform,class_labels"])
    assert grid == [("peft.prompt.length", [1, 5]), ("peft.prompt.init", ["uniform", "class_labels"])]
    runs = expand(cfg_file + ":nosweep", root, grid=grid, seeds=parse_seeds("0-1"))
    # seeds outermost (the config's seed key is train.seed), the last --grid axis fastest
    assert _points(runs)[:4] == [{"peft.prompt.length": l, "peft.prompt.init": i, "train.seed": 0}
                                 for l in (1, 5) for i in ("uniform", "class_labels")]
    assert [p["train.seed"] for p in _points(runs)] == [0] * 4 + [1] * 4
    # --grid crosses the declared sweep; --config.sweep.KEY=[..] is the same as --grid KEY=..
    crossed = expand(cfg_file + ":list", root, grid=[("train.steps", [3, 4])])
    assert len(crossed) == 6 and _points(crossed)[:2] == [
        {"peft.prompt.init": "uniform", "train.seed": 1, "train.steps": s} for s in (3, 4)]
    same = expand(cfg_file + ":list", root, common=["sweep.train.steps=[3, 4]"])
    assert same == crossed
    # --config.sweep=SPEC replaces the declared sweep and never reaches the training command
    repl = expand(cfg_file, root, common=["sweep=[{'peft.prompt.length': [3, 4]}]", "train.lr=0.5"])
    assert _points(repl) == [{"peft.prompt.length": 3}, {"peft.prompt.length": 4}]
    cmd = train_command(repl[0], cfg_file, ["sweep=[{'peft.prompt.length': [3, 4]}]", "train.lr=0.5"])
    assert "--config.train.lr=0.5" in cmd and not any("sweep" in a for a in cmd)
    assert parse_grid(["a=[[1, 2], [3]]"]) == [("a", [[1, 2], [3]])] and parse_seeds("3,7") == [3, 7]
    for bad, msg in ((lambda: parse_grid(["peft.prompt.length"]), "expected KEY=V1,V2"),
                     (lambda: parse_grid(["a=1,,2"]), "an empty value"),
                     (lambda: parse_seeds("0,x"), "'x' is not an integer"),
                     (lambda: expand(cfg_file, root, grid=[("peft.prompt.length", [1])]),
                      r"'peft.prompt.length'\] is both in config.sweep and a --grid axis"),
                     (lambda: expand(cfg_file, root, seeds=[1]), "'train.seed' is both a sweep axis"),
                     (lambda: expand(cfg_file + ":nosweep", root, ["peft.prompt.length=3"],
                                     grid=[("peft.prompt.length", [1])]), "is also a sweep axis"),
                     (lambda: expand(cfg_file + ":nosweep", root), "declares no sweep"),
                     (lambda: expand(cfg_file + ":nosweep", root, grid=[("peft.prompt.lenght", [1])]),
                      "unknown key 'lenght'"),
                     (lambda: expand(cfg_file, root, common=["sweep=[{"]), "not a Python literal")):
        with pytest.raises(SweepError, match=msg):
            bad()


def test_sweep_cli_grid_seeds_and_help(cfg_file, tmp_path, fake_train, capsys):
    root = str(tmp_path / "o")
    argv = ["--config", cfg_file + ":nosweep", "--workdir", root, "--grid", "peft.prompt.length=1,5",
            "--seeds", "0,1", "--train-cmd", shlex.join(fake_train)]
    assert sweep_main(argv) == 0
    assert "4 finished, 0 skipped (already finished), 0 failed, 0 invalid" in capsys.readouterr().out
    rows = [json.loads(open(os.path.join(root, d, "result.json")).read()) for d in sorted(os.listdir(root))
            if os.path.isdir(os.path.join(root, d))]
    assert sorted((r["config"]["peft.prompt.length"], r["config"]["train.seed"]) for r in rows) == \
        [(1, 0), (1, 1), (5, 0), (5, 1)]
    assert len(json.loads((tmp_path / "o" / "sweep.json").read_text())["runs"]) == 4
    assert sweep_main(["--help"]) == 0
    help_text = capsys.readouterr().out
    for flag in ("--config", "--workdir", "--grid", "--seeds", "--in-process", "--config.sweep"):
        assert flag in help_text
    from peft_jax import cli
    assert "sweep    --config ... --workdir DIR [--grid" in cli.__doc__ and "--root" not in cli.__doc__
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert "sweep --root" not in readme and "peft-jax sweep --config" in readme and "--workdir" in readme


def test_train_refuses_a_sweep_override(cfg_file, capsys):
    from peft_jax import cli
    assert cli.main(["train", "--config", cfg_file, "--config.sweep=[{'train.lr': [1]}]"]) == 2
    assert "a sweep is run by `peft-jax sweep`" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_path):
    from _train_fixtures import write_task, write_tiny_bert
    root = tmp_path_factory.mktemp("tiny_sweep")
    return write_tiny_bert(str(root / "model"), minilm_path), write_task(str(root / "data")), root


def test_every_cell_validated_before_the_first_run(tiny, tmp_path, fake_train, capsys):
    """Length 1 x class_labels (2 classes) is invalid: reported up front, recorded, never run;
    the report shows it (n=0, why), a failed cell and the cells never started."""
    from _train_fixtures import config_file
    from peft_jax.report import ablation_lines, aggregate, collect_all, report_main
    model, task, _ = tiny
    spec = config_file(str(tmp_path / "exp.py"), model, task, str(tmp_path / "unused"), "prompt",
                       **{"task.label_words": "bad,good"})
    cache = {}
    cfg = load_config_file(spec)
    runs = expand(spec, str(tmp_path / "r"), cfg=cfg, grid=[("peft.prompt.length", [1, 4, 5]),
                  ("peft.prompt.init", ["uniform", "class_labels"])], seeds=[0, 1],
                  check=experiment_checker(cfg, cache))
    assert len(cache) == 1 and not os.path.exists(tmp_path / "r")  # one model load, nothing run yet
    bad = {r.name: r.invalid for r in runs if r.invalid}
    assert len(bad) == 2 and all("length1_init-class_labels" in n for n in bad)
    assert all("config.peft.prompt.length=1" in why and "2 classes do not fit in 1 prompt vectors" in why
               for why in bad.values())
    root = str(tmp_path / "s")
    argv = ["--config", spec, "--workdir", root, "--grid", "peft.prompt.length=1,4,5", "--grid",
            "peft.prompt.init=uniform,class_labels", "--seeds", "0,1", "--train-cmd", shlex.join(fake_train),
            "--only", "*seed0*"]
    env_fail = os.environ.get("FAKE_FAIL_LEN5")
    os.environ["FAKE_FAIL_LEN5"] = "1"
    try:
        assert sweep_main(argv) == 1      # the length-5 cells fail
    finally:
        if env_fail is None:
            os.environ.pop("FAKE_FAIL_LEN5")
        else:
            os.environ["FAKE_FAIL_LEN5"] = env_fail
    out, err = capsys.readouterr()
    assert "1 of 6 cell(s) are invalid and will not run" in err and "2 classes do not fit" in err
    assert "3 finished, 0 skipped (already finished), 2 failed, 1 invalid" in out
    calls = open(os.path.join(root, "calls.log")).read().split()
    assert len(calls) == 5 and not any("length1_init-class_labels" in c for c in calls)
    inv = [json.load(open(os.path.join(root, n, "result.json"))) for n in bad if "seed0" in n][0]
    assert inv["status"] == "invalid" and "2 classes do not fit" in inv["error"]
    assert inv["config"]["peft.prompt.length"] == 1 and inv["config"]["peft.prompt.init"] == "class_labels"
    # the table: n per cell, the invalid / failed / never started (seed 1) cells and why
    rows = collect_all(root)
    assert sorted(r["status"] for r in rows).count("missing") == 5
    table = {(e["peft.prompt.length"], e["peft.prompt.init"]): e
             for e in aggregate(rows, ["peft.prompt.length", "peft.prompt.init"], ["accuracy"], seed_key="seed")}
    assert table[(1, "class_labels")]["n"] == 0 and table[(1, "class_labels")]["invalid"] == 2
    assert table[(1, "class_labels")]["missing"] == 0 and table[(4, "uniform")]["n"] == 1
    assert table[(5, "uniform")]["failed"] == 1 and table[(5, "uniform")]["n"] == 0
    assert report_main([root, "--metric", "accuracy", "--group-by", "peft.prompt.length,peft.prompt.init",
                        "--plot-ablation", str(tmp_path / "a.png")]) == 0
    text = capsys.readouterr().out
    line = [ln for ln in text.splitlines() if ln.startswith("1 ") and "class_labels" in ln][0]
    assert " 0 " in line and "2 invalid: config.peft.prompt.length=1" in line
    assert "not finished: 2 failed, 2 invalid, 5 missing" in text
    lines = {ln["hue"]: ln for ln in ablation_lines(list(table.values()), "peft.prompt.length",
                                                      "peft.prompt.init", "accuracy")}
    assert lines["class_labels"]["gaps"] == [1.0, 5.0] and lines["uniform"]["gaps"] == [5.0]
    assert lines["uniform"]["labels"] == ["n=1/2", "n=1/2", ""]
    # --list shows why a cell did not run
    assert sweep_main(argv[:-2] + ["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert sum(ln.startswith("invalid ") for ln in listed) == 2 and sum(ln.startswith("failed ") for ln in listed) == 2
    assert sum(ln.startswith("pending ") for ln in listed) == 5


@pytest.mark.slow
def test_in_process_cells_match_subprocess_runs(tiny, tmp_path):
    """--in-process trains the same deltas as one `peft-jax train` per cell, loading the model once."""
    from _train_fixtures import config_file
    from peft_jax.peft.delta_io import load_delta
    model, task, _ = tiny
    spec = config_file(str(tmp_path / "exp.py"), model, task, str(tmp_path / "unused"), "prompt",
                       **{"train.steps": 2})
    cfg = load_config_file(spec)
    grid = [("peft.prompt.length", [2, 3])]
    cache = {}
    a = expand(spec, str(tmp_path / "a"), cfg=cfg, grid=grid)
    s = run_sweep(a, spec, in_process=True, cache=cache, cfg=cfg)
    assert sorted(s["finished"]) == sorted(r.name for r in a) and len(cache) == 1
    b = expand(spec, str(tmp_path / "b"), cfg=cfg, grid=grid)
    assert run_sweep(b[:1], spec, cfg=cfg)["finished"] == [b[0].name]
    da, _ = load_delta(os.path.join(a[0].workdir, "delta"))
    db, _ = load_delta(os.path.join(b[0].workdir, "delta"))
    assert jax_equal(da, db)


def jax_equal(a, b) -> bool:
    import numpy as np
    from flax import traverse_util
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    return fa.keys() == fb.keys() and all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)
