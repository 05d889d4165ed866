"""Runs in one process share compiled programs (``peft_jax.programs.ProgramCache``): a
second seed reuses the first seed's jitted train step, predict function and delta init
(no tracing, no compilation) and gives bit-identical deltas, metrics and selected step to
the same seed run without the cache; a run whose program differs (another LoRA rank) builds
its own. Tiny random BERT (conftest's ``tiny``) on a synthetic task."""

from __future__ import annotations

import collections
import contextlib
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _train_fixtures import tiny_config  # noqa: E402

from peft_jax.peft.delta_io import flatten_delta  # noqa: E402
from peft_jax.programs import ProgramCache  # noqa: E402

EVENTS = {"/jax/core/compile/backend_compile_duration": "compile",
          "/jax/core/compile/jaxpr_trace_duration": "trace"}


def _cfg(tiny, root, seed, **over):
    model, task, _ = tiny
    base = {"train.steps": 4, "train.eval_every": 2, "train.best_metric": "accuracy",
            "task.test_split": "dev", "train.buckets": (12, 32), "train.batch_size": 4,
            "task.max_train_examples": 24, "seed": seed}
    return tiny_config(model, task, os.path.join(root, f"seed{seed}"), methods="head,lora",
                       **{**base, **over})


@contextlib.contextmanager
def _compile_events():
    """Counts of JAX's ``("trace" | "compile", function name)`` events while inside."""
    seen: collections.Counter = collections.Counter()

    def span(event: str, start: float, end: float, **kw) -> None:
        if event in EVENTS:
            seen[(EVENTS[event], kw.get("fun_name"))] += 1

    jax.monitoring.register_event_time_span_listener(span)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_time_span_listener(span)


def _flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in flatten_delta(jax.device_get(tree)).items()}


def _assert_same_run(a, b) -> None:
    """Bit-identical trained and selected deltas, the same metrics and selected step."""
    for x, y in ((a.state.trainable, b.state.trainable), (a.selected, b.selected)):
        fx, fy = _flat(x), _flat(y)
        assert sorted(fx) == sorted(fy)
        for k in fx:
            np.testing.assert_array_equal(fx[k], fy[k], err_msg=k)
    for key in ("metrics", "test", "selected_step", "steps"):
        assert a.row[key] == b.row[key], key


def test_a_second_seed_reuses_every_program_and_equals_its_run_without(tiny, tmp_path):
    from peft_jax.runner.run import run_experiment

    programs = ProgramCache()
    first = run_experiment(_cfg(tiny, str(tmp_path / "shared"), 0), programs=programs)
    assert (programs.built, programs.reused) == (3, 0)   # delta init, predict, train step
    with _compile_events() as seen:
        second = run_experiment(_cfg(tiny, str(tmp_path / "shared"), 1), programs=programs)
    assert (programs.built, programs.reused) == (3, 3)
    assert second.row["compilations"] == 0 and first.row["compilations"] >= 1
    assert not [k for k in seen if k[0] == "compile"], seen     # nothing compiled at all
    assert not [k for k in seen if k[1] in ("train_step", "eval_step", "run")], seen
    # a fresh process's run of seed 1 (new jitted functions) gives the same bits
    _assert_same_run(second, run_experiment(_cfg(tiny, str(tmp_path / "fresh"), 1)))
    # the seeds really differ (init, data order, dropout): the equality is not vacuous
    f0, f1 = _flat(first.selected), _flat(second.selected)
    assert any(not np.array_equal(f0[k], f1[k]) for k in f0)


@pytest.mark.slow
def test_a_run_with_another_program_builds_its_own(tiny, tmp_path):
    from peft_jax.runner.run import run_experiment

    programs = ProgramCache()
    r4 = run_experiment(_cfg(tiny, str(tmp_path / "r4"), 0), programs=programs)
    with _compile_events() as seen:
        r8 = run_experiment(_cfg(tiny, str(tmp_path / "r8"), 0, **{"peft.lora.rank": 8}),
                            programs=programs)
    assert (programs.built, programs.reused) == (6, 0)
    assert r8.row["compilations"] >= 1
    assert {"train_step", "eval_step", "run"} <= {k[1] for k in seen if k[0] == "trace"}
    assert [k for k in seen if k[0] == "compile"]
    assert _flat(r8.selected)["peft/encoder/layer_0/attention/query/lora_a"].shape[-1] == 8
    for name, cached, over in (("r4", r4, {}), ("r8", r8, {"peft.lora.rank": 8})):
        _assert_same_run(cached, run_experiment(_cfg(tiny, str(tmp_path / f"fresh_{name}"), 0,
                                                     **over)))


def test_program_key_holds_what_changes_a_program(tiny, tmp_path):
    """Seeds, data splits and workdirs share a key; any program-changing key does not."""
    from peft_jax.runner.session import setup

    key = lambda seed, **over: setup(_cfg(tiny, str(tmp_path), seed, **over)).program_key()
    k0 = key(0)
    same = key(1, **{"task.eval_split": "train", "name": "other"})
    assert same == k0 and hash(same) == hash(k0)
    for override in ({"peft.lora.rank": 8}, {"peft.lora.alpha": 8.0}, {"optim.lr": 2e-2},
                     {"train.steps": 6}, {"optim.schedule": "linear"}, {"train.grad_accum": 2},
                     {"peft.lora.init_a": "gaussian"}):
        assert key(0, **override) != k0, override


@pytest.mark.slow
def test_fewshot_seeds_share_programs_and_give_their_own_rows(shared_data, tiny, tmp_path,
                                                              monkeypatch):
    """``peft-jax fewshot``'s seeds (one by one) compile once; a seed's row equals its row
    from a run of that seed alone."""
    from peft_jax.fewshot import cli
    from peft_jax.fewshot.methods import Budget, run_one

    caches = []

    class Recording(ProgramCache):
        def __init__(self):
            super().__init__()
            caches.append(self)

    monkeypatch.setattr(cli, "ProgramCache", Recording)
    model, b = tiny[0], Budget(steps=4, eval_every=2, test_examples=40)
    rows = cli.run_methods(["head"], ["lmbff/sst2"], [13, 21], model, b, str(tmp_path / "shared"))
    assert (caches[-1].built, caches[-1].reused) == (3, 3)
    alone = run_one("head", "lmbff/sst2", 21, model, b, str(tmp_path / "alone"))
    for key in ("dev", "metrics", "selected_step", "reliability"):
        assert rows[1][key] == alone[key], key
    assert rows[0]["dev"] != rows[1]["dev"] or rows[0]["metrics"] != rows[1]["metrics"]
