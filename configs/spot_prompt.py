"""SPoT (soft prompt transfer) with all-MiniLM-L6-v2 + linear head, prompt length 20.

One file, three phases, chosen by the config argument (``--config configs/spot_prompt.py:PHASE``):

- ``source``: train a prompt on each source task (sst2, mr, subj, trec; 512 training examples).
- ``probe:PROMPTS``: briefly train (5 steps) a prompt on each target task (lmbff/cr,
  lmbff/mpqa 16-shot split train-13) - the target embedding used to rank the sources.
- ``target:PROMPTS``: train each target (20 steps) from random init (uniform) and from each source's
  prompt ``PROMPTS/<source>.npy`` (peft.prompt.init=file), batch 8, max_length 32, evaluated on 100 test examples.

Run: launch/run_spot.sh
"""

import os

from peft_jax.defaults import base_config

LENGTH = 20
SOURCES = ("sst2", "mr", "subj", "trec")
TARGETS = ("lmbff/cr", "lmbff/mpqa")
SOURCE_SPLITS = {"sst2": ("train", "dev"), "mr": ("all", "all"), "subj": ("all", "all"),
                 "trec": ("train", "test")}


def _common():
    c = base_config()
    c.name = "spot"
    c.model.name = "minilm"
    c.model.pooling = "mean"
    c.task.format = "classification"
    c.task.max_length = 48
    c.task.max_eval_examples = 100
    c.peft.methods = "prompt"
    c.peft.prompt.length = LENGTH
    c.peft.prompt.init = "uniform"
    c.optim.optimizer = "adamw"
    c.optim.lr = 1e-2
    c.optim.head_lr = 1e-2
    c.optim.prompt_lr = 1e-2
    c.train.batch_size = 16
    c.train.eval_every = 0
    c.train.log_every = 10
    c.train.buckets = (48,)
    c.train.progress = False
    c.train.baseline = False
    return c


def get_config(arg=None):
    phase, _, prompts = (arg or "source").partition(":")
    c = _common()
    if phase == "source":
        c.task.name = "sst2"
        c.task.max_train_examples = 512
        c.train.steps = 40
        c.sweep = [{"task.name": s, "task.train_split": SOURCE_SPLITS[s][0],
                    "task.eval_split": SOURCE_SPLITS[s][1]} for s in SOURCES]
        return c
    if phase not in ("probe", "target"):
        raise ValueError(f"configs/spot_prompt.py: phase {phase!r} is not source|probe:DIR|target:DIR")
    c.task.name = TARGETS[0]
    c.task.train_split = "train-13"
    c.task.eval_split = "test"
    c.train.batch_size = 8
    c.task.max_length = 32
    c.train.buckets = (32,)
    if phase == "probe":
        c.train.steps = 5
        c.sweep = [{"task.name": list(TARGETS)}]
        return c
    if not prompts:
        raise ValueError("configs/spot_prompt.py: phase 'target' needs target:PROMPTS_DIR")
    c.train.steps = 20
    files = [os.path.join(os.path.abspath(prompts), s + ".npy") for s in SOURCES]
    c.sweep = [{"task.name": list(TARGETS), "peft.prompt.init": "uniform"},
               {"task.name": list(TARGETS), "peft.prompt.init": "file", "peft.prompt.file": files}]
    return c
