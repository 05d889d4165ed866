"""peft_jax.data: tasks, tokenization, few-shot sampling, mixtures and resumable batches.

A config names a task; ``get_task(name).load(split)`` gives examples (dicts of text fields +
``label``); an encoder turns them into token ids for a model family; ``make_batches`` yields
fixed-shape numpy batches (length buckets, per-host shards) from a grain iterator whose
``get_state()/set_state()`` continue exactly.

Registered tasks (files read from ``<repo>/../shared/data``, or $PEFT_JAX_DATA):

- SentEval layouts: ``sst2`` (train/dev/test), ``sst5`` (train/dev/test), ``mr``, ``cr``,
  ``subj``, ``mpqa`` (split ``all``), ``trec`` (train/test), ``mrpc`` (train/test), ``cola``
  (train/dev), ``stsb`` (train/dev/test), ``sts12``, ``sts13``, ``sts14``, ``sts15``,
  ``sts16`` (test only), ``sick-r``,
  ``sick-e`` (train/dev/test).
- SuperGLUE (FewGLUE): ``boolq``, ``cb``, ``copa``, ``rte``, ``wic``, ``wsc``, ``multirc``
  (splits ``train`` = 32 shots, ``dev32``, ``validation`` = official dev).
- LM-BFF 16-shot: ``lmbff/sst2``, ``lmbff/sst5``, ``lmbff/mr``, ``lmbff/cr``, ``lmbff/mpqa``,
  ``lmbff/subj``, ``lmbff/trec``, ``lmbff/cola``, ``lmbff/mrpc``, ``lmbff/qqp``,
  ``lmbff/stsb``, ``lmbff/qnli``, ``lmbff/rte``, ``lmbff/mnli``, ``lmbff/snli`` (splits
  ``train-<seed>``, ``dev-<seed>`` for seeds 13/21/42/87/100, and ``test`` where published).
- Any prepared TFDS dataset: ``tfds:<name>`` (e.g. ``tfds:glue/mnli``), read without TensorFlow.
- Your own file: ``task_from_config({...})`` (see peft_jax.data.userfile).

A run's data assembly (which examples, encoded how) is ``peft_jax.runner.data``.
"""

from __future__ import annotations

from typing import Optional

from peft_jax.data.batching import BatchIterator, make_batches
from peft_jax.data.builtin import LMBFF_SEEDS, default_registry, lmbff_splits
from peft_jax.data.fewshot import (lmbff_kshot, lmbff_protocol, sample_kshot, select_demonstrations,
                                   unlabelled)
from peft_jax.data.metrics import compute_metrics
from peft_jax.data.mixtures import mix, mixture_rates
from peft_jax.data.readers import DataError, data_root
from peft_jax.data.tasks import Example, Task, TaskRegistry
from peft_jax.data.templates import parse_template
from peft_jax.data.tfds_source import tfds_task
from peft_jax.data.tokenize import (Encoded, encode_classification, encode_prompt, encode_text_to_text,
                                    special_layout)
from peft_jax.data.userfile import task_from_config

REGISTRY = default_registry()


def get_task(name: str) -> Task:
    """The registered task ``name`` (or ``tfds:<dataset>``); DataError with close names otherwise."""
    return REGISTRY.get(name)


def list_tasks() -> list[str]:
    """Names of the registered tasks (sorted)."""
    return REGISTRY.names()


def register_task(task: Task, name: Optional[str] = None, overwrite: bool = False) -> None:
    """Add a task to the default registry (DataError if the name exists, unless overwrite)."""
    REGISTRY.register(task, name, overwrite)
