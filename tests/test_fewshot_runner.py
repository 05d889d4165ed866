"""Few-shot features of the runner: soft-label distillation rows, extra/pseudo-labelled rows,
dev-selected test evaluation, predictions in row order, intermediate-task init, mixtures,
demonstrations through the runner's encoder, causal multi-token scoring in the forward, and
the ``peft-jax fewshot`` method configs. Tiny random BERT / Llama; real data where noted."""

from __future__ import annotations

import json
import os
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _train_fixtures import tiny_config, write_task, write_tiny_bert  # noqa: E402

from peft_jax.config import ConfigError  # noqa: E402
from peft_jax.data.readers import DataError  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("fs")
    model = write_tiny_bert(str(root / "model"), minilm_path, dropout=0.0)
    task = write_task(str(root / "data"))
    return model, task, root


def _texts(path):
    return [line.split("\t")[0] for line in open(path).read().splitlines() if line]


# ----------------------------------------------------------------------------- soft labels


def test_soft_label_rows_encode_and_train_on_the_soft_loss(tiny, tmp_path):
    from peft_jax.data.tokenize import encode_classification
    from peft_jax.experiment import setup
    from peft_jax.train.forward import make_loss_fn
    from peft_jax.train.losses import soft_label_loss

    model, task, _ = tiny
    extra = tmp_path / "soft.jsonl"
    rows = [{"text": t, "soft_label": [0.3, 0.7]} for t in _texts(task["dev"])[:8]]
    extra.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = tiny_config(model, task, str(tmp_path / "w"), methods="head,lora",
                      **{"task.extra_train": str(extra), "task.max_train_examples": 8})
    s = setup(cfg)
    enc = s.train_enc
    soft = enc.scalars["soft_label"]
    assert soft.shape == (16, 2)
    np.testing.assert_allclose(soft[8:], [[0.3, 0.7]] * 8)
    gold = enc.scalars["label"][:8]
    np.testing.assert_allclose(soft[:8], np.eye(2)[gold])       # gold rows: one-hot
    # the runner's loss on a batch with soft labels is the soft cross-entropy of its scores
    batch = {k: jnp.asarray(v) for k, v in next(iter(s.batches)).items() if k in
             ("input_ids", "attention_mask", "token_type_ids", "label", "example_mask", "soft_label")}
    v = s.ts.variables(s.frozen, s.state.trainable)
    loss, _ = make_loss_fn(s.exp.model, s.spec)(v, batch, None, True)
    from peft_jax.train.forward import scores
    y = scores(s.exp.model, s.spec, v, batch)
    want = soft_label_loss(y, batch["soft_label"], batch["example_mask"])
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    direct = -np.sum(np.asarray(batch["soft_label"]) * np.asarray(jax.nn.log_softmax(y)), -1)
    np.testing.assert_allclose(float(loss), direct.mean(), rtol=1e-5)


def test_bad_soft_labels_and_extra_rows_name_the_line(tiny, tmp_path):
    from peft_jax.data.tokenize import _soft_labels
    from peft_jax.experiment import read_extra_train
    from peft_jax.data import task_from_config

    with pytest.raises(DataError, match="example 1: soft_label"):
        _soft_labels([{"soft_label": [0.5, 0.5]}, {"soft_label": [0.9, 0.9]}], np.array([-1, -1]))
    task = task_from_config({"name": "file", "files": {"train": tiny[1]["train"]},
                             "columns": ["text", "label"], "text_fields": ["text"],
                             "label_names": ["negative", "positive"]})
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:3: .*'label' or 'soft_label'"):
        read_extra_train(str(bad), task)
    bad.write_text('{"text": "a", "soft_label": [1.0]}\n')
    with pytest.raises(DataError, match=r"x.jsonl:1: soft_label has 1 values"):
        read_extra_train(str(bad), task)
    bad.write_text('not json\n')
    with pytest.raises(DataError, match=r"x.jsonl:1: not JSON"):
        read_extra_train(str(bad), task)


# ----------------------------------------------------------------------------- runner pieces


def test_predict_scores_are_in_example_order_across_buckets(tiny, tmp_path):
    from peft_jax.experiment import setup

    model, task, _ = tiny
    cfg = tiny_config(model, task, str(tmp_path / "w"), methods="head,lora",
                      **{"train.buckets": (8, 16, 32)})
    s = setup(cfg)
    texts = _texts(task["dev"])
    # long and short examples interleaved: bucketed batches reorder them
    ex = [{"text": (t + " ") * (1 + 4 * (i % 2))} for i, t in enumerate(texts[:12])]
    got = s.predict_scores(s.state.trainable, ex)
    one_by_one = np.concatenate([s.predict_scores(s.state.trainable, [e]) for e in ex])
    np.testing.assert_allclose(got, one_by_one, rtol=1e-5, atol=1e-6)


def test_dev_selected_step_is_the_one_tested(tiny, tmp_path):
    from peft_jax.experiment import run_experiment

    model, task, _ = tiny
    cfg = tiny_config(model, task, str(tmp_path / "w"), methods="head,lora",
                      **{"train.steps": 6, "train.eval_every": 2, "train.best_metric": "accuracy",
                         "task.test_split": "dev", "optim.lr": 0.05})
    res = run_experiment(cfg)
    evals = {}
    for line in open(os.path.join(cfg.workdir, "metrics.jsonl")):
        row = json.loads(line)
        if "eval/accuracy" in row:
            evals[row["step"]] = row["eval/accuracy"]
    assert sorted(evals) == [2, 4, 6]
    best = max(evals.values())
    assert res.row["selected_step"] in [k for k, a in evals.items() if a == best]
    s = res.session
    assert s.evaluate(res.selected)["accuracy"] == best
    assert res.row["test"]["accuracy"] == best      # test split == dev here: the selected state's
    assert res.row["metrics"]["accuracy"] == evals[6]   # "metrics": the last evaluation
    from peft_jax.peft.delta_io import flatten_delta, load_delta
    saved, _ = load_delta(os.path.join(cfg.workdir, "delta"))
    want = flatten_delta(jax.device_get(res.selected))
    got = flatten_delta(saved)
    assert sorted(got) == sorted(want)
    for k in want:                                  # the saved delta is the selected one
        np.testing.assert_array_equal(got[k], want[k])


def test_init_from_delta_loads_matching_leaves_and_refreshes_the_rest(tiny, tmp_path):
    from peft_jax.experiment import run_experiment, setup
    from peft_jax.peft.delta_io import flatten_delta

    model, task, _ = tiny
    src = tiny_config(model, task, str(tmp_path / "src"), methods="head,lora",
                      **{"train.steps": 3})
    res = run_experiment(src)
    saved = flatten_delta(jax.device_get(res.state.trainable))
    # a 3-class target: LoRA leaves come from the source, the head is fresh
    tgt = tiny_config(model, task, str(tmp_path / "tgt"), methods="head,lora",
                      **{"train.init_from": os.path.join(src.workdir, "delta"),
                         "task.file.label_names": "negative,positive,neutral"})
    s = setup(tgt)
    now = flatten_delta(jax.device_get(s.state.trainable))
    lora = [k for k in now if "lora" in k]
    assert lora
    for k in lora:
        np.testing.assert_array_equal(now[k], saved[k])
    head = [k for k in now if "head" in k and now[k].ndim == 2]
    assert head and now[head[0]].shape[-1] == 3 and saved[head[0]].shape[-1] == 2
    with pytest.raises(ConfigError, match="no leaf of the saved delta"):
        other = tiny_config(model, task, str(tmp_path / "o"), methods="head,prompt",
                            **{"train.init_from": os.path.join(src.workdir, "delta"),
                               "task.file.label_names": "negative,positive,neutral"})
        setup(other)


def test_mixture_requires_the_same_label_set(tiny):
    from peft_jax.data import get_task
    from peft_jax.defaults import base_config
    from peft_jax.experiment import mixture_examples

    c = base_config()
    c.task.mixture = "trec:train"
    with pytest.raises(ConfigError, match="trec has 6 classes"):
        mixture_examples(c, get_task("lmbff/sst2"), [{"sentence": "a", "label": 0}])


def test_mixture_mixes_sources_at_their_rates(shared_data):
    from peft_jax.data import get_task
    from peft_jax.defaults import base_config
    from peft_jax.experiment import mixture_examples

    c = base_config()
    c.task.mixture = "cr:all,mpqa:all"
    c.task.mixture_mode = "equal"
    c.task.mixture_examples = 300
    target = get_task("lmbff/sst2").load("train-13")
    mixed = mixture_examples(c, get_task("lmbff/sst2"), target)
    assert len(mixed) == 300
    names = [m["task"] for m in mixed]
    for n in ("lmbff/sst2", "cr", "mpqa"):
        assert 60 < names.count(n) < 140, (n, names.count(n))
    assert all(set(m) >= {"sentence", "label"} for m in mixed)


def test_demonstrations_through_the_runner_encoder(minilm_path):
    from transformers import AutoTokenizer
    from peft_jax.data import get_task
    from peft_jax.defaults import base_config
    from peft_jax.experiment import encode_split

    c = base_config()
    c.task.format, c.task.demonstrations, c.task.max_length, c.seed = "verbalizer", "random", 64, 3
    task = get_task("lmbff/sst2")
    tok = AutoTokenizer.from_pretrained(minilm_path)
    exp = types.SimpleNamespace(cfg=c, task=task, pre=types.SimpleNamespace(tokenizer=tok), kind="encoder",
                                embedder=None)
    pool = task.load("train-13")
    queries = task.load("dev-13")[:6]
    enc = encode_split(exp, queries, pool)
    again = encode_split(exp, queries, pool)
    for a, b in zip(enc.features["input_ids"], again.features["input_ids"]):
        np.testing.assert_array_equal(a, b)                      # fixed per seed
    great, terrible = tok.convert_tokens_to_ids("great"), tok.convert_tokens_to_ids("terrible")
    for ids, pos in zip(enc.features["input_ids"], enc.scalars["mask_pos"][:, 0]):
        assert len(ids) <= 64 and ids[pos] == tok.mask_token_id
        assert great in ids[pos + 1:] and terrible in ids[pos + 1:]   # one demo per class
    c.task.demonstrations = ""
    alone = encode_split(exp, queries, pool)
    assert all(len(a) < len(b) for a, b in zip(alone.features["input_ids"], enc.features["input_ids"]))


# ----------------------------------------------------------------------------- causal scoring


def test_causal_multi_token_scores_in_the_forward_match_teacher_forcing():
    """Multi-token label words of a causal LM (with and without a soft prompt in front) equal
    a direct computation: each unpadded prompt + word, log-probs of the word's tokens."""
    from peft_jax import peft as P
    from peft_jax.models.llama import LlamaConfig, LlamaModel
    from peft_jax.models.slots import Slots
    from peft_jax.train.forward import FormatSpec, scores

    cfg = LlamaConfig.tiny()
    lw = (((30, 31), (40, -1)), ((50, 51), (-1, -1)))
    words = [[[30, 31], [40]], [[50, 51]]]
    prompts = [[5, 9, 13, 2], [7, 3, 11, 17, 19, 23]]
    ids = jnp.asarray([[5, 9, 13, 2, 0, 0], [7, 3, 11, 17, 19, 23]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [1] * 6], jnp.int32)
    batch = {"input_ids": ids, "attention_mask": mask, "mask_pos": jnp.asarray([[3], [5]], jnp.int32)}
    for n_prompt in (0, 3):
        methods = (P.PromptTuning(length=n_prompt),) if n_prompt else ()
        model = LlamaModel(cfg, slots=Slots(methods))
        v = model.init(jax.random.PRNGKey(0), ids, mask)
        spec = FormatSpec(kind="decoder", format="verbalizer", label_word_ids=lw, methods=methods)
        got = np.asarray(scores(model, spec, v, batch))
        for b, p in enumerate(prompts):
            cls = []
            for ws in words:
                lps = []
                for w in ws:
                    seq = jnp.asarray([p + w[:-1]], jnp.int32)
                    lp = jax.nn.log_softmax(model.apply(v, seq, jnp.ones_like(seq))["logits"][0], -1)
                    lps.append(sum(float(lp[n_prompt + len(p) - 1 + k, t]) for k, t in enumerate(w)))
                cls.append(np.logaddexp.reduce(lps) - np.log(len(lps)))
            np.testing.assert_allclose(got[b], cls, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- fewshot CLI


def test_method_configs_validate_and_follow_the_protocol():
    from peft_jax import defaults
    from peft_jax.fewshot.methods import LM_METHODS, METHODS, Budget, method_config

    b = Budget()
    for m in METHODS:
        cfgs = [method_config(m, "lmbff/sst2", s, "smollm2", b, "/tmp/x") for s in (13, 42)]
        for c in cfgs:
            defaults.validate(c)
            assert c.task.eval_split == f"dev-{c.seed}" and c.task.test_split == "test"
            assert c.train.best_metric == "accuracy"
            assert c.task.format == ("verbalizer" if m in LM_METHODS else "classification")
            assert max(c.train.buckets) == c.task.max_length
        assert cfgs[0].task.train_split == "train-13" and cfgs[1].task.train_split == "train-42"
        assert cfgs[0].workdir != cfgs[1].workdir
    assert method_config("prompt_demo", "lmbff/cr", 13, "smollm2", b, "/x").task.demonstrations == "random"
    assert method_config("prompt", "lmbff/cr", 13, "smollm2", b, "/x").task.demonstrations == ""
    with pytest.raises(ValueError, match="method 'nope'"):
        method_config("nope", "lmbff/sst2", 13, "smollm2", b, "/tmp/x")


def test_unlabelled_pool_excludes_test_and_shots(shared_data):
    from peft_jax.data import get_task
    from peft_jax.fewshot.methods import _norm, unlabelled_pool

    pool = unlabelled_pool("lmbff/cr", 13, 300)
    assert len(pool) == 300 and all("label" not in ex for ex in pool)
    task = get_task("lmbff/cr")
    banned = {_norm(e["sentence"]) for sp in ("test", "train-13", "dev-13") for e in task.load(sp)}
    assert not banned & {_norm(e["sentence"]) for e in pool}
    assert pool == unlabelled_pool("lmbff/cr", 13, 300)        # deterministic
    assert pool != unlabelled_pool("lmbff/cr", 21, 300)


def test_fewshot_cli_rejects_unknown_methods(capsys):
    from peft_jax.fewshot.cli import fewshot_main
    with pytest.raises(SystemExit):
        fewshot_main(["--method", "prompt,bogus"])
    assert "bogus" in capsys.readouterr().err


@pytest.mark.slow
def test_fewshot_head_and_selftrain_end_to_end_on_real_data(shared_data, tmp_path):
    """MiniLM head fine-tuning and one self-training round on LM-BFF SST-2 seed 13 (tiny budget)."""
    from peft_jax.fewshot.cli import run_methods
    from peft_jax.fewshot.methods import Budget

    b = Budget(steps=4, eval_every=2, test_examples=40, unlabelled=64, student_steps=4, rounds=1,
               threshold=0.5, source_steps=4, mixture_cap=16)
    rows = run_methods(["head", "selftrain"], ["lmbff/sst2"], [13], "", b, str(tmp_path))
    # evaluated steps: head every 2 of 4; the self-training student every max(1, 4 // 5) = 1
    for r, evaluated in zip(rows, ((2, 4), (1, 2, 3, 4))):
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0 and r["dev"]["accuracy"] >= 0.0
        assert r["selected_step"] in evaluated
        assert os.path.exists(os.path.join(r["config"]["workdir"], "result.json"))
    st = rows[1]
    assert st["rounds"][1]["pseudo"] > 0 and st["unlabelled"] == 64
    # STraTA: teacher and student start from the intermediate-task delta (trained once)
    assert st["init_from"].endswith(os.path.join("intermediate_source_minilm", "delta"))
    assert os.path.isdir(st["init_from"])


def test_causal_verbalizer_scores_compute_the_lm_head_at_the_answer_only():
    """scores() asks the decoder for logits at the answer position; the result equals the
    full-sequence logits read at that position (with a soft prompt shifting positions)."""
    from peft_jax import peft as P
    from peft_jax.models.llama import LlamaConfig, LlamaModel
    from peft_jax.models.slots import Slots
    from peft_jax.train.forward import FormatSpec, label_word_scores, scores

    methods = (P.PromptTuning(length=2),)
    model = LlamaModel(LlamaConfig.tiny(), slots=Slots(methods))
    ids = jnp.asarray([[5, 9, 13, 2, 0], [7, 3, 11, 17, 19]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1, 0], [1] * 5], jnp.int32)
    pos = jnp.asarray([[3], [4]], jnp.int32)
    v = model.init(jax.random.PRNGKey(1), ids, mask)
    lw = (((30,), (40,)), ((50,), (-1,)))
    spec = FormatSpec(kind="decoder", format="verbalizer", label_word_ids=lw, methods=methods)
    got = scores(model, spec, v, {"input_ids": ids, "attention_mask": mask, "mask_pos": pos})
    full = model.apply(v, ids, mask)["logits"]
    assert full.shape[1] == 7
    want = label_word_scores(full, pos + 2, jnp.asarray(lw), causal=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_summary_counts_method_rows_only(tmp_path):
    """PET's per-PVP runs and self-training rounds write result.json rows of their own under
    the method's folder; the few-shot table aggregates the methods' rows only."""
    from peft_jax.fewshot.cli import method_rows, summary

    def write(path, method, acc):
        os.makedirs(path, exist_ok=True)
        cfg = {"task.name": "lmbff/sst2", "model.name": "smollm2", "seed": 13}
        if method:
            cfg["fewshot.method"] = method
        json.dump({"name": "x", "status": "finished", "config": cfg, "metrics": {"accuracy": acc},
                   "wall_s": 1.0}, open(os.path.join(path, "result.json"), "w"))

    write(tmp_path / "t" / "pet_smollm2" / "seed13", "pet", 0.8)
    write(tmp_path / "t" / "pet_smollm2" / "seed13" / "pvp0", None, 0.1)
    from peft_jax import report
    assert len(report.collect(str(tmp_path))) == 2
    assert [r["config"]["fewshot.method"] for r in method_rows(report.collect(str(tmp_path)))] == ["pet"]
    text = summary(str(tmp_path))
    assert "pet" in text and "0.8000" in text and "0.1000" not in text
