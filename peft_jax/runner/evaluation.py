"""Predictions and task metrics of a delta on an encoded split (every row, in order)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from peft_jax.data import make_batches
from peft_jax.data.metrics import compute_metrics, exact_match
from peft_jax.data.tokenize import decode_target
from peft_jax.runner.data import model_batch
from peft_jax.train.forward import generate


def predict_encoded(predict: Callable, trainable: Any, frozen: Any, encoded: Any,
                    shard: Callable, batch_size: int, buckets: tuple
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(scores ``[n, C]`` or ``[n]``, labels ``[n]``) of every encoded row, in row order.

    Multi-host: each host predicts its shard of the rows; every host gets all of them."""
    it = make_batches(encoded, batch_size, buckets=buckets, shuffle=False,
                      drop_remainder=False, num_epochs=1, shard_index=jax.process_index(),
                      shard_count=jax.process_count())
    preds, labels, keep, rows = [], [], [], []
    for batch in it:
        y = predict(trainable, frozen, shard(model_batch(batch)))
        if jax.process_count() > 1:
            y = np.asarray(multihost_utils.process_allgather(y, tiled=True))
            batch = {k: np.asarray(multihost_utils.process_allgather(batch[k], tiled=True))
                     for k in ("label", "example_mask", "row")}
        else:
            y = np.asarray(jax.device_get(y))
        preds.append(y)
        labels.append(batch["label"])
        keep.append(batch["example_mask"] > 0)
        rows.append(batch["row"])
    return in_row_order(preds, labels, keep, rows)


def in_row_order(preds: list, labels: list, keep: list, rows: list) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch predictions, labels, real-row flags and row numbers -> (predictions,
    labels) of the real rows in row order (batches come bucket by bucket)."""
    k = np.concatenate(keep)
    order = np.argsort(np.concatenate(rows)[k], kind="stable")
    return np.concatenate(preds)[k][order], np.concatenate(labels)[k][order]


def exact_match_encoded(model: Any, spec: Any, variables: Callable, tokenizer: Any, trainable: Any,
                        frozen: Any, encoded: Any, shard: Callable, batch_size: int,
                        buckets: tuple) -> float:
    """Greedy generation of every row's target (``variables(frozen, trainable)`` -> the
    model's variables); the fraction whose text, up to the end token, equals the gold
    target's."""
    n_new = int(encoded.target_lengths().max())
    gen = lambda tr, fr, batch: generate(model, spec, variables(fr, tr), batch, n_new)
    tokens, _ = predict_encoded(gen, trainable, frozen, encoded, shard, batch_size, buckets)
    eos = spec.eos_token_id
    return exact_match([decode_target(tokenizer, t, eos) for t in tokens],
                       [decode_target(tokenizer, t, eos) for t in encoded.targets["targets"]])


def task_metrics(task: Any, fmt: str, scores: np.ndarray, labels: np.ndarray) -> dict:
    """The task's metrics of scores (``[n, C]``, argmax) or regression values (``[n]``)."""
    if fmt == "regression":
        return compute_metrics(task.metrics, scores, labels)
    return compute_metrics(task.metrics, scores.argmax(-1), labels, num_classes=task.num_labels)
