"""A tiny random BERT saved as a HF folder (with a real tokenizer) and a synthetic task,
shared by the training tests and their subprocess workers."""

from __future__ import annotations

import os
import random

POS = ["good", "great", "fine", "lovely", "superb", "nice"]
NEG = ["bad", "awful", "poor", "dull", "horrid", "weak"]
FILL = ["the", "film", "was", "really", "plot", "acting", "very", "quite", "a", "story"]


def write_task(folder: str, n_train: int = 64, n_dev: int = 32, seed: int = 0) -> dict:
    """Synthetic sentiment TSV files (``text<TAB>label``) -> {split: path}."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = []
        for i in range(n):
            y = i % 2
            words = rng.sample(FILL, rng.randint(2, 6)) + [rng.choice(POS if y else NEG)]
            rng.shuffle(words)
            rows.append(" ".join(words) + f"\t{'positive' if y else 'negative'}")
        path = os.path.join(folder, f"{split}.tsv")
        with open(path, "w") as f:
            f.write("\n".join(rows) + "\n")
        paths[split] = path
    return paths


def write_tiny_bert(folder: str, tokenizer_src: str, seed: int = 0, dropout: float = 0.1,
                    init_std: float = 0.02) -> str:
    """A random 2-layer BERT (d=32) with the all-MiniLM-L6-v2 tokenizer, as a HF folder
    (weights ~ N(0, init_std))."""
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    from transformers import AutoTokenizer

    from peft_jax.models import bert

    cfg = bert.BertConfig.tiny(vocab_size=30522, max_position_embeddings=128,
                               hidden_dropout=dropout, attention_dropout=dropout,
                               initializer_range=init_std)
    model = bert.BertModel(cfg)
    base = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), jnp.ones((1, 8), jnp.int32))["params"])
    bert.BERT.save(folder, cfg, jax.device_get(base))
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(folder)
    return folder


def tiny_config(model_dir: str, task_paths: dict, workdir: str, methods: str = "lora", **over):
    """A base_config for the tiny model on the synthetic task (overrides: dotted keys)."""
    from peft_jax.config import apply_overrides
    from peft_jax.defaults import base_config

    c = base_config()
    c.name = "tiny"
    c.workdir = workdir
    c.model.name = model_dir
    c.task.name = "file"
    c.task.file.train = task_paths["train"]
    c.task.file.dev = task_paths["dev"]
    c.task.file.label_names = "negative,positive"
    c.task.max_length = 32
    c.peft.methods = methods
    c.peft.prompt.length = 4
    c.peft.lora.rank = 4
    c.peft.head.dropout = 0.0
    c.optim.lr = 1e-2
    c.train.steps = 4
    c.train.batch_size = 8
    c.train.log_every = 1
    c.train.eval_batch_size = 16
    c.train.buckets = (32,)
    c.train.baseline = False
    c.train.progress = False
    c.mesh.data = 1
    c.lock()
    apply_overrides(c, [f"{k}={v}" for k, v in over.items()])
    return c


def config_file(path: str, model_dir: str, task_paths: dict, workdir: str, methods: str = "lora",
                **over) -> str:
    """Write a config .py file equivalent to :func:`tiny_config` (for CLI subprocesses)."""
    lines = [
        "import sys",
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})",
        "from _train_fixtures import tiny_config",
        "def get_config(arg=None):",
        f"    c = tiny_config({model_dir!r}, {task_paths!r}, {workdir!r}, {methods!r}, **{over!r})",
        "    c.unlock()",
        "    return c",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
