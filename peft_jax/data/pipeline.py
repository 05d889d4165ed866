"""From a config to batches: task -> (k-shot) examples -> encoding -> grain batch iterator.

    cfg = {"task": "lmbff/sst2", "split": "train-13", "format": "prompt", "family": "mlm",
           "max_len": 128, "batch_size": 8, "seed": 0}
    batches = batches_from_config(cfg, tokenizer, shard_index=jax.process_index(),
                                  shard_count=jax.process_count())

Keys: task (a registered name, or a dict for ``task_from_config``), split, data_dir,
format (classification | prompt | text2text), family, max_len, target_len, template,
verbalizer, truncate_side, kshot (``{"k": 16, "seed": 13}``: sample K per class from the
split), batch_size, buckets, seed, shuffle, drop_remainder, num_epochs.
"""

from __future__ import annotations

from typing import Any, Mapping

from peft_jax.data.batching import BatchIterator, make_batches
from peft_jax.data.fewshot import sample_kshot
from peft_jax.data.readers import DataError
from peft_jax.data.tasks import Task
from peft_jax.data.tokenize import Encoded, encode_classification, encode_prompt, encode_text_to_text
from peft_jax.data.userfile import task_from_config

KEYS = ("task", "split", "data_dir", "format", "family", "max_len", "target_len", "template", "verbalizer",
        "truncate_side", "kshot", "batch_size", "buckets", "seed", "shuffle", "drop_remainder", "num_epochs")


def _plain(cfg: Any) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def resolve_task(spec: Any) -> Task:
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, str):
        from peft_jax.data import get_task
        return get_task(spec)
    return task_from_config(_plain(spec))


def encode_from_config(cfg: Mapping, tokenizer) -> tuple[Task, Encoded]:
    """Load, optionally K-shot sample, and encode the examples a config names."""
    cfg = _plain(cfg)
    unknown = sorted(set(cfg) - set(KEYS))
    if unknown:
        raise DataError(f"data config: unknown keys {unknown} (allowed: {', '.join(KEYS)})")
    if "task" not in cfg or "split" not in cfg:
        raise DataError("data config needs 'task' and 'split'")
    task = resolve_task(cfg["task"])
    examples = task.load(cfg["split"], cfg.get("data_dir"))
    if cfg.get("kshot"):
        ks = dict(cfg["kshot"])
        examples = sample_kshot(examples, int(ks["k"]), int(ks.get("seed", 0)), task.num_labels)
    fmt = cfg.get("format", "classification")
    max_len = int(cfg.get("max_len", 128))
    if fmt == "classification":
        enc = encode_classification(examples, tokenizer, max_len, task=task,
                                    truncate_side=cfg.get("truncate_side", "right"))
    elif fmt == "prompt":
        enc = encode_prompt(examples, cfg.get("template"), cfg.get("verbalizer"), tokenizer,
                            cfg.get("family", "mlm"), max_len, task=task,
                            truncate_side=cfg.get("truncate_side", "right"))
    elif fmt == "text2text":
        enc = encode_text_to_text(examples, tokenizer, task, max_len, cfg.get("target_len"),
                                  template=cfg.get("template"), verbalizer=cfg.get("verbalizer"))
    else:
        raise DataError(f"data config: format must be classification, prompt or text2text, got {fmt!r}")
    return task, enc


def batches_from_config(cfg: Mapping, tokenizer, shard_index: int = 0, shard_count: int = 1) -> BatchIterator:
    """The batch iterator a config names (see the module docstring)."""
    c = _plain(cfg)
    _, enc = encode_from_config(c, tokenizer)
    buckets = c.get("buckets", (32, 64, 128, 256))
    if buckets is not None:
        max_len = int(c.get("max_len", 128))
        buckets = tuple(b for b in buckets if b < max_len) + (max_len,) if max(buckets) >= max_len \
            else tuple(buckets)
    return make_batches(enc, int(c.get("batch_size", 32)), buckets, int(c.get("seed", 0)), shard_index,
                        shard_count, bool(c.get("shuffle", True)), bool(c.get("drop_remainder", True)),
                        c.get("num_epochs"), c.get("target_len"))
