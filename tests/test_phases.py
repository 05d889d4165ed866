"""Time to first step: the phase clock (consecutive phases, compile time inside each, cache
hits), the persistent compilation cache's location rules, and benchmarks/first_step.py's
two `peft-jax train` runs sharing a cache (the second loads compiled programs and trains
the same delta)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax import compile_cache
from peft_jax.phases import PhaseClock, merged_seconds, process_start_time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PHASES = ["imports", "config", "model_load", "data", "init", "prepare", "first_step"]


def test_merged_seconds_counts_overlapping_spans_once():
    spans = [(1.0, 3.0), (2.0, 4.0), (2.5, 2.6), (10.0, 12.0)]
    assert merged_seconds(spans, 0.0, 20.0) == pytest.approx(5.0)
    assert merged_seconds(spans, 3.5, 11.0) == pytest.approx(1.5)   # clipped to the window
    assert merged_seconds([], 0.0, 1.0) == 0.0


def test_phase_clock_puts_compilation_in_the_phase_that_compiled():
    clock = PhaseClock(from_process_start=False)
    with clock:
        x = jnp.arange(64.0)
        clock.mark("quiet")
        jax.jit(lambda v: jnp.sin(v) * 3.0 + v.sum())(x).block_until_ready()   # a new program
        clock.mark("compiles")
        with clock:                                                          # nested: no-op
            clock.mark("quiet")                                              # merged with the first
    s = clock.summary()
    assert s["order"] == list(s["seconds"]) == ["quiet", "compiles"]
    assert s["compile_s"]["compiles"] > 0.0
    assert s["compile_s"]["compiles"] <= s["seconds"]["compiles"] + 1e-3
    assert sum(s["seconds"].values()) == pytest.approx(s["total_s"], abs=5e-3)
    assert s["compile_parts_s"]["backend"] > 0 and s["compile_parts_s"]["trace"] > 0
    assert set(s["cpu_s"]) == {"quiet", "compiles"} and min(s["cpu_s"].values()) >= 0
    assert "time to first step" in clock.line() and "compiles" in clock.line()
    n = len(clock.spans)   # the listeners are gone after the outer block
    jax.jit(lambda v: jnp.cos(v) - 1.0)(x).block_until_ready()
    assert len(clock.spans) == n
    # a clock from the process start begins before this test ran
    start = process_start_time()
    assert start is not None and start < time.time() and PhaseClock().start == pytest.approx(start, abs=1.0)


def test_compile_cache_location_rules(tmp_path):
    tag = compile_cache.cpu_tag()
    assert tag == compile_cache.cpu_tag() and "-" in tag
    env = {"HOME": str(tmp_path / "home")}
    assert compile_cache.resolve(None, env) == os.path.join(
        str(tmp_path / "home"), ".cache", "peft_jax", "jax_cache", tag)
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    assert compile_cache.resolve(None, env) == os.path.join(str(tmp_path / "xdg"), "peft_jax",
                                                            "jax_cache", tag)
    env[compile_cache.ENV] = str(tmp_path / "mine")
    assert compile_cache.resolve(None, env) == os.path.join(str(tmp_path / "mine"), tag)
    for off in ("off", "0", "", "none"):
        assert compile_cache.resolve(off, env) is None
        assert compile_cache.resolve(None, {**env, compile_cache.ENV: off}) is None
    assert compile_cache.resolve(str(tmp_path / "flag"), env) == os.path.join(str(tmp_path / "flag"), tag)


def test_compile_cache_flag_is_global_before_a_double_dash():
    from peft_jax import cli
    argv, debug, cache = cli._split_debug(["train", "--compile-cache", "/x", "--config", "c.py"])
    assert argv == ["train", "--config", "c.py"] and cache == "/x"
    argv, _, cache = cli._split_debug(["fewshot", "--compile-cache=off", "--method", "head"])
    assert argv == ["fewshot", "--method", "head"] and cache == "off"
    argv, _, cache = cli._split_debug(["launch", "tpu", "--", "train", "--compile-cache", "/y"])
    assert argv == ["launch", "tpu", "--", "train", "--compile-cache", "/y"] and cache is None


@pytest.mark.slow
def test_first_step_benchmark_warm_run_loads_compiled_programs_and_trains_the_same_delta(
        tiny, tmp_path):
    """benchmarks/first_step.py (two `peft-jax train` processes sharing fresh caches) on the
    tiny model, whole runs: both record every phase from imports to the first step and
    print the table; the first fills the compilation cache, the second hits it and ends
    with the identical delta and metrics."""
    from _train_fixtures import config_file
    from peft_jax.peft.delta_io import flatten_delta, load_delta

    model, task, _ = tiny
    cfg = config_file(str(tmp_path / "cfg.py"), model, task, str(tmp_path / "unused"), "lora",
                      **{"train.baseline": True})
    root = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "first_step.py"),
                        "--config", cfg, "--steps", "3", "--until", "end", "--workdir", str(root)],
                       capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("phase "))
    assert [ln.split()[0] for ln in lines[head + 2:head + 2 + len(TRAIN_PHASES)]] == TRAIN_PHASES
    rows = [json.load(open(root / f"run_{m}" / "result.json")) for m in ("cold", "warm")]
    for row, m in zip(rows, ("cold", "warm")):
        ph = row["phases"]
        assert row["status"] == "finished" and f"{m}: exit 0" in p.stdout
        assert ph["order"] == TRAIN_PHASES and sorted(ph["seconds"]) == sorted(TRAIN_PHASES)
        assert ph["compile_cache"]["dir"] == os.path.join(str(root / "jax_cache"),
                                                          compile_cache.cpu_tag())
        assert ph["compile_s"]["first_step"] > 0      # the train step compiles (or loads) there
        assert row["baseline"] and row["metrics"]     # the baseline evaluated after training
        assert "[peft_jax] time to first step" in open(root / f"{m}.log").read()
    assert rows[0]["phases"]["compile_cache"]["misses"] > 0
    assert rows[1]["phases"]["compile_cache"]["hits"] > 0
    assert rows[0]["metrics"] == rows[1]["metrics"] and rows[0]["baseline"] == rows[1]["baseline"]
    deltas = [flatten_delta(load_delta(str(root / f"run_{m}" / "delta"))[0]) for m in ("cold", "warm")]
    assert sorted(deltas[0]) == sorted(deltas[1])
    for key in deltas[0]:
        np.testing.assert_array_equal(np.asarray(deltas[0][key]), np.asarray(deltas[1][key]))


def test_enable_changes_jax_config_only_and_children_get_the_setting(tmp_path):
    """The cache setting never leaks through os.environ (tests and other in-process callers
    keep theirs); processes we start get it from child_environ."""
    import jax

    before = dict(os.environ)
    try:
        assert compile_cache.enable("off") is None
        assert not jax.config.jax_enable_compilation_cache and dict(os.environ) == before
        assert compile_cache.child_environ({"A": "1"}) == {"A": "1", compile_cache.ENV: "off"}
        folder = compile_cache.enable(str(tmp_path / "c"))
        assert folder == os.path.join(str(tmp_path / "c"), compile_cache.cpu_tag())
        assert compile_cache.current_dir() == folder and dict(os.environ) == before
        env = compile_cache.child_environ()
        assert compile_cache.resolve(None, env) == folder      # the child resolves our folder
    finally:
        compile_cache.enable(before.get(compile_cache.ENV))
