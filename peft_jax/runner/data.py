"""Data assembly for a run: which examples, with which demonstrations, encoded how.

Training examples = the train split (optionally capped) + ``task.extra_train`` rows
(pseudo-labels, soft labels) + a ``task.mixture`` of other tasks; every split is encoded
for the run's format and model kind (``classification`` / ``regression``: plain
sequences; ``verbalizer``: template + label words, optionally with LM-BFF
demonstrations; ``text_to_text``: source and target text, T5 or decoder-only).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np

from peft_jax import data as D
from peft_jax.config import ConfigError
from peft_jax.data.fewshot import select_demonstrations
from peft_jax.data.readers import DataError
from peft_jax.data.tokenize import encode_classification, encode_prompt, encode_text_to_text
from peft_jax.runner.experiment import Experiment, label_words

# batch keys the model-side functions read (the rest stay on the host)
MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "label", "example_mask", "mask_pos",
              "soft_label", "targets", "target_mask", "loss_mask")


def model_batch(batch: dict) -> dict:
    """The arrays of a host batch that go to the devices."""
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


def encode_split(exp: Experiment, examples: list, demo_pool: Optional[list] = None) -> Any:
    """Examples -> ``data.Encoded`` for this experiment's format and model kind.

    With ``config.task.demonstrations`` every example gets one demonstration per class from
    ``demo_pool`` (default: the training split), fixed per example and seed."""
    cfg, tok = exp.cfg, exp.pre.tokenizer
    if cfg.task.format == "text_to_text":
        if exp.kind == "encoder":
            raise ConfigError(f"config.task.format='text_to_text' needs an encoder-decoder or "
                              f"decoder-only model; {exp.base_id} is an encoder (use "
                              "'verbalizer' or 'classification')")
        return encode_text_to_text(examples, tok, exp.task, cfg.task.max_length,
                                   template=cfg.task.template or None,
                                   verbalizer=label_words(cfg, exp.task), kind=exp.kind)
    if cfg.task.format == "verbalizer":
        demos = None
        if cfg.task.demonstrations:
            pool = demo_pool if demo_pool is not None else demonstration_pool(exp)
            demos = demonstrations_for(exp, examples, pool)
        return encode_prompt(examples, cfg.task.template or None, label_words(cfg, exp.task), tok,
                             kind=exp.kind, max_len=cfg.task.max_length,
                             task=exp.task, demonstrations=demos)
    return encode_classification(examples, tok, cfg.task.max_length, task=exp.task)


def demonstration_pool(exp: Experiment) -> list:
    """Labelled examples demonstrations are drawn from (``task.demo_pool`` or the train split)."""
    return exp.task.load(exp.cfg.task.demo_pool or exp.cfg.task.train_split)


def demonstrations_for(exp: Experiment, queries: list, pool: list) -> list:
    """``[query][class]`` demonstrations (LM-BFF): random within the class, or sampled from
    the half of the class most similar to the query under ``task.demo_embedder``."""
    cfg = exp.cfg
    embed_fn = None
    if cfg.task.demonstrations == "similarity":
        if exp.embedder is None:
            from peft_jax.contrastive.embed import load_embedder  # a second model, on demand
            exp.embedder = load_embedder(cfg.task.demo_embedder, pooling="mean", max_length=128,
                                         batch_size=64)
        embed_fn = exp.embedder
    return select_demonstrations(queries, pool, cfg.seed, cfg.task.demonstrations,
                                 num_classes=exp.task.num_labels, embed_fn=embed_fn,
                                 text_fields=exp.task.text_fields)


SUBSET_SEED = 0
"""Seed of the ``max_eval_examples`` / ``max_test_examples`` subsets: the same examples for
every run seed, so seeds differ in training only and their scores compare on one subset."""


def load_examples(exp: Experiment, split: str, limit: int = 0, seed: int = SUBSET_SEED) -> list:
    """The examples of ``split``; a seeded subset of ``limit`` (in order) when it has more."""
    examples = exp.task.load(split)
    if limit and len(examples) > limit:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(examples), limit, replace=False))
        examples = [examples[i] for i in keep]
    return examples


def read_extra_train(path: str, task: Any) -> list:
    """Rows of ``task.extra_train`` (JSONL): the task's text fields + ``label`` and/or
    ``soft_label`` (a list of C probabilities). Errors name the file and line."""
    rows = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{ln}: not JSON ({e.msg})") from None
            missing = [k for k in task.text_fields if not isinstance(ex.get(k), str)]
            if missing or ("label" not in ex and "soft_label" not in ex):
                raise DataError(f"{path}:{ln}: needs text fields {list(task.text_fields)} and "
                                f"'label' or 'soft_label'; missing {missing or ['label']}")
            if "soft_label" in ex and len(ex["soft_label"]) != task.num_labels:
                raise DataError(f"{path}:{ln}: soft_label has {len(ex['soft_label'])} values; "
                                f"task {task.name} has {task.num_labels} classes")
            rows.append(ex)
    return rows


def mixture_examples(cfg, task: Any, target: list) -> list:
    """Training examples of a multi-task run: the target's plus ``task.mixture`` tasks
    (``name:split``; same number of classes, shared head / verbalizer), mixed at the
    configured rates (``peft_jax.data.mixtures``)."""
    parts = [p.strip() for p in cfg.task.mixture.split(",") if p.strip()]
    examples = {task.name: list(target)}
    for p in parts:
        name, _, split = p.partition(":")
        t = D.get_task(name)
        if t.num_labels != task.num_labels:
            raise ConfigError(f"config.task.mixture: {name} has {t.num_labels} classes, "
                              f"{task.name} has {task.num_labels}; mixed tasks share one head "
                              "/ verbalizer, so their label sets must match")
        ex = t.load(split or "train")
        examples[name] = [{**{f: e[g] for f, g in zip(task.text_fields, t.text_fields)},
                           "label": e["label"]} for e in ex]
    sizes = {k: len(v) for k, v in examples.items()}
    rates = D.mixture_rates(sizes, cfg.task.mixture_mode, cfg.task.mixture_cap or None,
                            cfg.task.mixture_temperature)
    cap = cfg.task.mixture_cap
    n = cfg.task.mixture_examples or sum(min(v, cap) if cap else v for v in sizes.values())
    return D.mix(examples, rates, n, seed=cfg.seed)


def training_examples(exp: Experiment) -> list:
    """The train split (optionally capped), + extra rows, + multi-task mixture."""
    cfg = exp.cfg
    ex = load_examples(exp, cfg.task.train_split, cfg.task.max_train_examples, cfg.seed)
    if cfg.task.extra_train:
        ex = ex + read_extra_train(cfg.task.extra_train, exp.task)
    if cfg.task.mixture:
        ex = mixture_examples(cfg, exp.task, ex)
    return ex
