"""Few-shot methods under one protocol (LM-BFF): one seed -> one ``result.json`` row.

Every trained method is the config-driven runner (:func:`peft_jax.experiment.run_experiment`)
with the method's overrides: train on ``train-<seed>`` (K per class), evaluate on
``dev-<seed>`` (same size) every few steps and keep the best step, then test that step on a
fixed subset of the task's test file (the same subset for every seed and method). A row's
``metrics`` are the test metrics, ``dev`` the selected dev metrics.

Methods (``METHODS``):

====================  =======================================================================
``zeroshot``          template + verbalizer scores, no training
``incontext``         + one random demonstration per class in the context, no training
``prompt``            prompt-based fine-tuning (LM-BFF) with LoRA
``prompt_demo``       + demonstrations (``demos``: random or similarity)
``head``              standard fine-tuning: classification head + LoRA on pooled states
``protoverb``         ProtoVerb prototypes at the answer position of a frozen model
                      (+ the manual verbalizer when the model has an LM head)
``protoverb_mean``    the same on mean-pooled sentence states (for sentence encoders such
                      as all-MiniLM-L6-v2, whose [MASK] state was never trained)
``pet``               PET: one prompt model per PVP, ensemble soft labels on unlabelled data,
                      distilled into a classifier (head + LoRA on ``pet_student``)
``selftrain``         self-training (STraTA's loop): teacher -> confident pseudo-labels ->
                      student on labelled + pseudo-labelled, ``rounds`` times; teacher and
                      students start from the intermediate-task delta (``selftrain_init``)
``intermediate``      intermediate-task fine-tuning: a source task first, then the target
                      starts from its delta (the head is re-initialized when classes differ)
``multitask``         the target's K shots mixed with source tasks of the same label set
====================  =======================================================================
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional, Sequence

import numpy as np

from peft_jax.contrastive.embed import Embedder, make_tokenizer
from peft_jax.data import get_task
from peft_jax.data.fewshot import unlabelled
from peft_jax.defaults import base_config
from peft_jax.fewshot import pet, protoverb_frozen, self_training
from peft_jax.models.registry import load_pretrained, model_kind
from peft_jax.phases import PhaseClock
from peft_jax.programs import ProgramCache
from peft_jax.runner import RunResult, encode_split, load_examples, run_experiment, setup
from peft_jax.runner.results import flat_config, write_json
from peft_jax.runner.vectorized import run_vectorized

# methods whose seeds can train as one vectorized program (``--vectorize``): one runner
# training per seed, with the same shapes for every seed
VECTORIZABLE = ("prompt", "prompt_demo", "head")
METHODS = ("zeroshot", "incontext", "prompt", "prompt_demo", "head", "protoverb",
           "protoverb_mean", "pet", "selftrain", "intermediate", "multitask")
LM_METHODS = ("zeroshot", "incontext", "prompt", "prompt_demo", "pet")
TEMPLATE_METHODS = LM_METHODS + ("protoverb",)   # methods that prompt with a template
DEFAULT_MODEL = {m: ("smollm2" if m in LM_METHODS else "minilm") for m in METHODS}

# Where unlabelled in-domain text comes from (the full task, minus the test file and the shots).
UNLABELLED = {"lmbff/sst2": "sst2:train", "lmbff/cr": "cr:all", "lmbff/mr": "mr:all",
              "lmbff/mpqa": "mpqa:all", "lmbff/subj": "subj:all", "lmbff/trec": "trec:train",
              "lmbff/sst5": "sst5:train", "lmbff/cola": "cola:train"}
# Source tasks for intermediate / multi-task runs (same label set, no overlap with the target's
# test sentences: SST and MR share Rotten Tomatoes reviews, so neither is a source of the other).
SOURCES = {"lmbff/sst2": "cr:all,mpqa:all", "lmbff/cr": "sst2:train,mpqa:all",
           "lmbff/mr": "cr:all,mpqa:all", "lmbff/mpqa": "cr:all,sst2:train"}
# PET pattern-verbalizer pairs (causal-friendly: the answer ends the pattern). The first is
# also the prompt of the other LM methods (Budget.template="auto"): on SmolLM2-135M it scores
# 75.6% zero-shot on the 5 pooled SST-2 dev sets (160 sentences), against 50.0% for LM-BFF's
# "{sentence} It was {mask}" (great/terrible: 99% predicted positive), 50.6% for "All in all,
# it was" (good/bad) and 66.2% for "The movie was" (good/bad).
PVPS = {
    "sentiment": [("Review: {sentence} Sentiment: {mask}", "negative,positive"),
                  ("{sentence} All in all, it was {mask}", "bad,good"),
                  ("{sentence} It was {mask}", "terrible,great")],
}
PVP_SETS = {"lmbff/sst2": "sentiment", "lmbff/cr": "sentiment", "lmbff/mr": "sentiment",
            "lmbff/mpqa": "sentiment"}


@dataclasses.dataclass
class Budget:
    """Scale knobs of one method run (CPU-sized defaults; papers use 1000 steps)."""

    steps: int = 16
    lr: float = 1e-3
    batch_size: int = 8
    eval_every: int = 4
    test_examples: int = 200
    max_length: int = 64
    demo_max_length: int = 160
    demos: str = "random"              # prompt_demo / incontext: random | similarity
    template: str = "auto"             # LM methods: auto (PVPS[0] where known) | task (default)
                                       # | a template, e.g. "{sentence} It was {mask}."
    label_words: str = ""              # with a template: "terrible,great" ("" = task default)
    unlabelled: int = 256              # PET / self-training pool size
    pvps: int = 2                      # PET: number of PVPs
    pet_temperature: float = 2.0
    pet_student: str = "minilm"
    student_steps: int = 60
    threshold: float = 0.9             # self-training confidence threshold
    rounds: int = 2
    selftrain_init: str = "intermediate"   # self-training teacher/student start: intermediate | base
    source_steps: int = 200            # intermediate task
    mixture_cap: int = 256             # multitask: examples per source task


def method_config(method: str, task: str, seed: int, model: str, budget: Budget,
                  workdir: str):
    """The runner config of one (method, task, seed) run."""

    if method not in METHODS:
        raise ValueError(f"method {method!r}; choose from {list(METHODS)}")
    b = budget
    c = base_config()
    c.seed = seed
    c.model.name = model
    c.task.name = task
    c.task.train_split = f"train-{seed}"
    c.task.eval_split = f"dev-{seed}"
    c.task.test_split = "test"
    c.task.max_test_examples = b.test_examples
    lm = method in LM_METHODS
    # encoder-decoder models score label words as target sequences (text-to-text)
    c.task.format = ("text_to_text" if kind_of(model) == "encoder_decoder" else "verbalizer") \
        if lm else "classification"
    demos = method in ("incontext", "prompt_demo")
    c.task.demonstrations = b.demos if demos else ""
    c.task.max_length = b.demo_max_length if demos else b.max_length
    c.train.buckets = tuple(x for x in (32, 64, 128, 256) if x < c.task.max_length) + (c.task.max_length,)
    if lm and b.template == "auto" and task in PVP_SETS:
        c.task.template, c.task.label_words = PVPS[PVP_SETS[task]][0]
    elif lm and custom_template(b):
        c.task.template, c.task.label_words = b.template, b.label_words
    c.peft.methods = "lora" if lm else "head,lora"
    c.optim.lr = b.lr
    c.optim.warmup_steps = 0
    c.train.steps = b.steps
    c.train.batch_size = b.batch_size
    c.train.eval_every = b.eval_every
    c.train.best_metric = "accuracy"
    c.train.log_every = max(1, b.steps // 4)
    c.train.eval_batch_size = 32
    c.train.resume = False
    c.train.overwrite = True   # a seed is redone from scratch (--rerun, or after an interruption);
                               # its old files move to <workdir>/replaced-<time>/
    c.train.progress = False
    c.train.baseline = False
    c.train.keep = 1
    c.name = f"fewshot_{task.replace('/', '_')}_{method}_{model}"
    c.workdir = os.path.join(workdir, task.replace("/", "_"), f"{method}_{model}", f"seed{seed}")
    return c


def custom_template(budget: Budget) -> bool:
    """A template of the user's (not "auto" / "task"): every method that prompts uses it."""
    return budget.template not in ("auto", "task")


def check_template(methods: Sequence[str], budget: Budget) -> None:
    """``--template`` / ``--label-words`` are honoured by the prompting methods and refused
    for the others (which classify pooled states with a head), never silently ignored."""
    if not (custom_template(budget) or budget.label_words):
        return
    if budget.label_words and not custom_template(budget):
        raise ValueError("--label-words needs --template (the words fill its {mask} slot)")
    bad = [m for m in methods if m not in TEMPLATE_METHODS]
    if bad:
        raise ValueError(f"--template applies to {', '.join(TEMPLATE_METHODS)}; {', '.join(bad)} "
                         "classify pooled states with a head and use no template")


def kind_of(model: str) -> str:
    """'encoder' | 'decoder' | 'encoder_decoder' of a model name, read from its config only."""
    try:
        return model_kind(model)
    except FileNotFoundError:   # not installed: loading it later says how to get it
        return "decoder"


# ----------------------------------------------------------------------------- rows


def _row(cfg, method: str, res: dict, t0: float, **extra) -> dict:
    row = {"name": cfg.name, "status": "finished", "config": flat_config(cfg),
           "metrics": res.get("test", res.get("metrics", {})), "dev": res.get("metrics", {}),
           "selected_step": res.get("selected_step"), "steps": res.get("steps", 0),
           "trainable_params": res.get("trainable_params", 0),
           "base_params": res.get("base_params", 0), "wall_s": time.perf_counter() - t0}
    for key in ("reliability", "phases"):
        if res.get(key):
            row[key] = res[key]
    row["config"]["fewshot.method"] = method
    row.update(extra)
    return row


def write_row(cfg, row: dict) -> dict:
    os.makedirs(cfg.workdir, exist_ok=True)
    write_json(os.path.join(cfg.workdir, "result.json"), row)
    return row


def untrained(cfg, pre: Any, programs: Optional[ProgramCache] = None) -> dict:
    """Zero-shot / in-context: dev and test metrics of the base model (LoRA B = 0), with the
    test calibration (``ece``; content-free calibrated ``accuracy_cc`` / ``ece_cc``)."""
    s = setup(cfg, pre, programs=programs)
    test = load_examples(s.exp, cfg.task.test_split, cfg.task.max_test_examples, 0)
    metrics, scores = s.evaluate_scored(s.state.trainable, encode_split(s.exp, test))
    cal = test_calibration(s, s.state.trainable, test, scores)
    reliability = cal.pop("reliability", None)
    metrics.update(cal)
    return {"metrics": s.evaluate(s.state.trainable), "test": metrics, "trainable_params": 0,
            "reliability": reliability}


def content_free_examples(task: Any) -> list[dict]:
    """Zhao et al.'s content-free inputs (``"N/A"``, ``""``, ``"[MASK]"``) in every text field."""
    from peft_jax.fewshot.calibration import CONTENT_FREE
    return [{**{f: cf for f in task.text_fields}, "label": 0} for cf in CONTENT_FREE]


def test_calibration(s: Any, trainable: Any, test: list, scores: Optional[np.ndarray] = None
                     ) -> dict:
    """``ece`` of the test predictions; for prompt (verbalizer) formats also the
    contextually calibrated ``accuracy_cc`` / ``ece_cc`` (same prompt, demonstrations
    included, with content-free inputs); ``reliability``: the diagram's bins (lists), before
    (and after) calibration. Empty for regression tasks. ``scores``: ``trainable``'s class
    scores ``[n, C]`` on ``test`` where the caller already has them (its test evaluation),
    else predicted here."""
    from peft_jax.fewshot.calibration import (calibration_metrics, content_free_prior,
                                              contextual_calibrate, label_probs, reliability)

    if s.exp.cfg.task.format == "regression":
        return {}
    if scores is None:
        scores = s.predict_scores(trainable, test)
    elif len(scores) != len(test):
        raise ValueError(f"test_calibration: {len(scores)} scores for {len(test)} test examples")
    cf = None
    if s.exp.cfg.task.format == "verbalizer":
        cf = s.predict_scores(trainable, content_free_examples(s.exp.task))
    y = np.asarray([ex["label"] for ex in test])
    out = calibration_metrics(scores, y, cf)
    out.pop("p_cf", None)
    bins = {"raw": reliability(label_probs(scores), y)}
    if cf is not None:
        bins["calibrated"] = reliability(contextual_calibrate(scores, content_free_prior(cf)), y)
    out["reliability"] = {k: {f: np.nan_to_num(v[f]).tolist() for f in ("count", "confidence", "accuracy")}
                          for k, v in bins.items()}
    return out


def with_test_calibration(cfg, res: RunResult) -> RunResult:
    """``res`` (a finished :func:`train`) with :func:`test_calibration` of its selected step
    merged into ``res.row["test"]`` (the test subset ``run_experiment`` used)."""
    s = res.session
    test = load_examples(s.exp, cfg.task.test_split, cfg.task.max_test_examples)
    cal = test_calibration(s, res.selected, test, res.test_scores)
    res.row["reliability"] = cal.pop("reliability", None)
    res.row["test"] = {**res.row.get("test", {}), **cal}
    return res


class Interrupted(RuntimeError):
    """A run stopped early (SIGTERM / preemption): no row is written for it."""


def train(cfg, pre: Any, clock: Optional[PhaseClock] = None,
          programs: Optional[ProgramCache] = None) -> RunResult:
    """One runner training with dev selection and a test evaluation of the selected step
    (``clock``: its phases, ``programs``: compiled programs shared with earlier runs, as for
    ``run_experiment``)."""
    res = run_experiment(cfg, pretrained=pre, clock=clock, programs=programs)
    if res.row["status"] != "finished":
        raise Interrupted(f"{cfg.workdir}: run {res.row['status']} at step {res.row['steps']}; "
                          "no result row written (rerun the command to redo this seed)")
    if cfg.task.test_split:
        with_test_calibration(cfg, res)
    return res


# ----------------------------------------------------------------------------- data


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def unlabelled_pool(task_name: str, seed: int, n: int) -> list[dict]:
    """``n`` in-domain examples without labels: the task's full data (``UNLABELLED``) minus
    every sentence of its test file and of this seed's train/dev shots; seeded sample."""

    if task_name not in UNLABELLED:
        raise ValueError(f"no unlabelled source for {task_name}; known: {sorted(UNLABELLED)}")
    task = get_task(task_name)
    src_name, _, split = UNLABELLED[task_name].partition(":")
    src_task = get_task(src_name)
    field, sf = task.text_fields[0], src_task.text_fields[0]
    banned = {_norm(ex[field]) for sp in ("test", f"train-{seed}", f"dev-{seed}") for ex in task.load(sp)}
    cand = [ex for ex in src_task.load(split) if _norm(ex[sf]) not in banned]
    rng = np.random.default_rng([seed, 7])
    take = rng.choice(len(cand), size=min(n, len(cand)), replace=False)
    return unlabelled([{field: cand[i][sf]} for i in sorted(take)])


def _write_jsonl(path: str, rows: Sequence[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


# ----------------------------------------------------------------------------- methods


def run_one(method: str, task: str, seed: int, model: str, budget: Budget, workdir: str,
            pre: Any = None, clock: Optional[PhaseClock] = None,
            programs: Optional[ProgramCache] = None) -> dict:
    """Run ``method`` for one seed and write its row; returns the row. ``clock``: the
    phases of its training run (methods trained by the runner); ``programs``: jitted
    programs shared with earlier runs of the process (the seeds of a method: compiled once;
    :mod:`peft_jax.programs`)."""

    cfg = method_config(method, task, seed, model, budget, workdir)
    t0 = time.perf_counter()
    if method in ("protoverb", "protoverb_mean"):
        return write_row(cfg, run_protoverb(cfg, task, seed, budget, pre, t0,
                                            "mean" if method == "protoverb_mean" else "mask"))
    pre = pre or load_pretrained(model)
    if method in ("zeroshot", "incontext"):
        return write_row(cfg, _row(cfg, method, untrained(cfg, pre, programs), t0))
    if method in ("prompt", "prompt_demo", "head"):
        return write_row(cfg, _row(cfg, method, train(cfg, pre, clock, programs).row, t0))
    if method == "pet":
        return write_row(cfg, run_pet(cfg, task, seed, budget, pre, t0, programs))
    if method == "selftrain":   # STraTA: teacher and students start from the intermediate task
        init = (source_delta(cfg, task, budget, pre, programs)
                if budget.selftrain_init == "intermediate" else "")
        return write_row(cfg, run_selftrain(cfg, task, seed, budget, pre, t0, init_from=init,
                                            programs=programs))
    if method == "intermediate":
        return write_row(cfg, run_intermediate(cfg, task, seed, budget, pre, t0, programs))
    if method == "multitask":
        cfg.task.mixture = SOURCES[task]
        cfg.task.mixture_cap = budget.mixture_cap
        cfg.train.steps = budget.source_steps
        cfg.train.eval_every = max(1, budget.source_steps // 5)
        return write_row(cfg, _row(cfg, method, train(cfg, pre, programs=programs).row, t0,
                                   mixture=cfg.task.mixture))
    raise ValueError(f"method {method!r}; choose from {list(METHODS)}")


def run_seeds_vectorized(method: str, task: str, seeds: Sequence[int], model: str,
                         budget: Budget, workdir: str, pre: Any = None,
                         clock: Optional[PhaseClock] = None) -> list[dict]:
    """The seeds of ``method`` (one of ``VECTORIZABLE``) trained as one vectorized program
    (:func:`peft_jax.runner.vectorized.run_vectorized`: one compilation, one pass of the
    base weights per step for all seeds); each seed's row and files as :func:`run_one`
    writes them, its ``wall_s`` the seeds' share of the total."""
    if method not in VECTORIZABLE:
        raise ValueError(f"--vectorize: {method} does not train one runner per seed; "
                         f"vectorizable methods: {', '.join(VECTORIZABLE)}")
    t0 = time.perf_counter()
    cfgs = [method_config(method, task, seed, model, budget, workdir) for seed in seeds]
    results = [with_test_calibration(cfg, res)
               for cfg, res in zip(cfgs, run_vectorized(cfgs, pre or load_pretrained(model), clock))]
    wall = (time.perf_counter() - t0) / len(cfgs)
    return [write_row(cfg, _row(cfg, method, res.row, t0, wall_s=wall,
                                vectorized=res.row["vectorized"]))
            for cfg, res in zip(cfgs, results)]


def run_protoverb(cfg, task: str, seed: int, budget: Budget, pre: Any, t0: float,
                  representation: str = "mask") -> dict:

    pre = pre or load_pretrained(cfg.model.name)
    embed = None
    if representation == "mean":
        embed = Embedder(pre.build(), {"params": pre.base},
                         make_tokenizer(pre.tokenizer, budget.max_length), pooling="mean",
                         batch_size=32)
    template = words = None
    if budget.template == "auto" and task in PVP_SETS:
        template, w = PVPS[PVP_SETS[task]][0]
        words = [[x] for x in w.split(",")]
    elif custom_template(budget):
        template = budget.template
        words = [x.split("|") for x in budget.label_words.split(",")] if budget.label_words else None
    res = protoverb_frozen.run(task, seed, budget.test_examples, pre=pre, embed_fn=embed,
                               representation=representation, max_len=budget.max_length,
                               template=template, label_words=words)
    method = "protoverb_mean" if representation == "mean" else "protoverb"
    return _row(cfg, method, {"test": res["metrics"], "metrics": res["dev"],
                              "trainable_params": res["trainable_params"]}, t0,
                protoverb={**res["protoverb"], "template": template}, steps=200)


def run_pet(cfg, task: str, seed: int, budget: Budget, pre: Any, t0: float,
            programs: Optional[ProgramCache] = None) -> dict:
    """PET: ``budget.pvps`` prompt models -> soft labels on unlabelled data -> distilled student."""
    pvps = PVPS[PVP_SETS.get(task, "")][:budget.pvps] if task in PVP_SETS else None
    if custom_template(budget):   # the user's PVP first
        pvps = [(budget.template, budget.label_words)] + list(pvps or [])[1:budget.pvps]
    if not pvps:
        raise ValueError(f"PET: no pattern-verbalizer pairs for {task}; known: {sorted(PVP_SETS)}")
    pool = unlabelled_pool(task, seed, budget.unlabelled)
    per_pvp, soft_scores, test_scores = [], [], []
    test_ex = None
    for k, (template, words) in enumerate(pvps):
        c = method_config("prompt", task, seed, cfg.model.name, budget,
                          os.path.join(cfg.workdir, f"pvp{k}"))
        c.workdir = os.path.join(cfg.workdir, f"pvp{k}")
        c.task.template, c.task.label_words = template, words
        done = _finished_prompt_run(cfg, task, seed, budget, template, words)
        if done is not None:   # the `prompt` method already trained this PVP for this seed
            c.train.init_from = os.path.join(os.path.dirname(done["path"]), "delta")
            s = setup(c, pre, programs=programs)
            selected, dev_acc = s.state.trainable, done["dev"].get("accuracy")
            test_acc = done["metrics"]["accuracy"]
        else:
            res = train(c, pre, programs=programs)
            s, selected = res.session, res.selected
            dev_acc, test_acc = res.row["metrics"].get("accuracy"), res.row["test"]["accuracy"]
        if test_ex is None:
            test_ex = load_examples(s.exp, c.task.test_split, c.task.max_test_examples, 0)
        soft_scores.append(s.predict_scores(selected, pool))
        test_scores.append(s.predict_scores(selected, test_ex))
        per_pvp.append({"template": template, "label_words": words, "test_accuracy": test_acc,
                        "dev_accuracy": dev_acc, "reused_prompt_run": done is not None})
    soft = pet.ensemble_soft_labels(soft_scores, temperature=budget.pet_temperature)
    y_test = np.asarray([ex["label"] for ex in test_ex])
    ens_acc = float(np.mean(pet.ensemble_soft_labels(test_scores).argmax(-1) == y_test))
    rows = [{**ex, "soft_label": [float(p) for p in soft[i]]} for i, ex in enumerate(pool)]
    extra = _write_jsonl(os.path.join(cfg.workdir, "soft_labels.jsonl"), rows)
    st = method_config("head", task, seed, budget.pet_student, budget,
                       os.path.join(cfg.workdir, "student"))
    st.workdir = os.path.join(cfg.workdir, "student")
    st.task.extra_train = extra
    st.train.steps = budget.student_steps
    st.train.batch_size = 16
    st.train.eval_every = max(1, budget.student_steps // 5)
    student_pre = pre if budget.pet_student == cfg.model.name else load_pretrained(budget.pet_student)
    res = train(st, student_pre, programs=programs).row
    return _row(cfg, "pet", res, t0, pvps=per_pvp, ensemble_test_accuracy=ens_acc,
                unlabelled=len(pool), student=budget.pet_student)


def _finished_prompt_run(cfg, task: str, seed: int, budget: Budget, template: str,
                         words: str) -> Optional[dict]:
    """The ``prompt`` method's row for this seed if it trained exactly this PVP (same
    template, words and budget), so PET can reuse its selected delta instead of retraining."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(cfg.workdir)))
    pc = method_config("prompt", task, seed, cfg.model.name, budget, root)
    path = os.path.join(pc.workdir, "result.json")
    if not (os.path.exists(path) and os.path.isdir(os.path.join(pc.workdir, "delta"))):
        return None
    row = json.load(open(path))
    want = {"task.template": template, "task.label_words": words, "train.steps": pc.train.steps,
            "optim.lr": pc.optim.lr, "train.batch_size": pc.train.batch_size,
            "task.max_test_examples": pc.task.max_test_examples}
    if any(row["config"].get(k) != v for k, v in want.items()) or row.get("status") != "finished":
        return None
    return {**row, "path": path}


def run_selftrain(cfg, task: str, seed: int, budget: Budget, pre: Any, t0: float,
                  init_from: str = "", programs: Optional[ProgramCache] = None) -> dict:
    """Teacher on the shots; each round pseudo-labels the pool above ``threshold`` (balanced
    per class) and trains a fresh student on shots + pseudo-labels; the student teaches next."""
    pool = unlabelled_pool(task, seed, budget.unlabelled)
    base = method_config("head", task, seed, cfg.model.name, budget, cfg.workdir)
    base.train.init_from = init_from
    rounds = []
    c = base.copy_and_resolve_references()
    c.workdir = os.path.join(cfg.workdir, "round0")
    res = train(c, pre, programs=programs)
    rounds.append({"round": 0, "pseudo": 0, "test_accuracy": res.row["test"]["accuracy"]})
    for r in range(1, budget.rounds + 1):
        probs = pet.softmax(res.session.predict_scores(res.selected, pool))
        kept = self_training.pseudo_labelled(pool, probs, budget.threshold,
                                             max_per_class=len(pool) // probs.shape[1])
        extra = _write_jsonl(os.path.join(cfg.workdir, f"pseudo{r}.jsonl"), kept)
        c = base.copy_and_resolve_references()
        c.workdir = os.path.join(cfg.workdir, f"round{r}")
        c.task.extra_train = extra
        c.train.steps = budget.student_steps
        c.train.batch_size = 16
        c.train.eval_every = max(1, budget.student_steps // 5)
        res = train(c, pre, programs=programs)
        rounds.append({"round": r, "pseudo": len(kept), "test_accuracy": res.row["test"]["accuracy"]})
    return _row(cfg, "selftrain", res.row, t0, rounds=rounds, threshold=budget.threshold,
                unlabelled=len(pool), init_from=init_from)


def source_delta(cfg, task: str, budget: Budget, pre: Any,
                 programs: Optional[ProgramCache] = None) -> str:
    """The intermediate-task delta (trained once, shared by the seeds: the source run does
    not see the target's shots): the ``SOURCES`` tasks as one mixture, head + LoRA."""
    src_dir = os.path.join(os.path.dirname(os.path.dirname(cfg.workdir)),
                           f"intermediate_source_{cfg.model.name}")
    delta = os.path.join(src_dir, "delta")
    if os.path.isdir(delta):
        return delta
    src = method_config("head", task, 0, cfg.model.name, budget, src_dir)
    src.workdir = src_dir
    first, _, split = SOURCES[task].split(",")[0].partition(":")
    src.task.name = first
    src.task.train_split = split or "train"
    src.task.mixture = ",".join(SOURCES[task].split(",")[1:])
    src.task.mixture_cap = budget.mixture_cap * 4
    src.task.max_train_examples = budget.mixture_cap * 4
    src.task.eval_split = split or "train"
    src.task.max_eval_examples = 64
    src.task.test_split = ""
    src.train.best_metric = ""
    src.train.steps = budget.source_steps
    src.train.batch_size = 16
    src.train.eval_every = 0
    train(src, pre, programs=programs)
    return delta


def run_intermediate(cfg, task: str, seed: int, budget: Budget, pre: Any, t0: float,
                     programs: Optional[ProgramCache] = None) -> dict:
    """Source tasks (``SOURCES``, as one mixture) first, then the target from that delta."""
    cfg.train.init_from = source_delta(cfg, task, budget, pre, programs)
    return _row(cfg, "intermediate", train(cfg, pre, programs=programs).row, t0,
                source=SOURCES[task])
