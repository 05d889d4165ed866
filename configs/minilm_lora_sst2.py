"""LoRA (r=8 on query/value) + classification head on all-MiniLM-L6-v2, SST-2.

Run:   peft-jax train --config configs/minilm_lora_sst2.py
Quick: peft-jax train --config configs/minilm_lora_sst2.py --config.train.steps=50
Expected (measured here, 2-core CPU): see README "Results".
"""

from peft_jax.defaults import base_config


def get_config(arg=None):
    c = base_config()
    c.name = "minilm_lora_sst2"
    c.workdir = "runs/minilm_lora_sst2"
    c.model.name = "minilm"
    c.model.pooling = "mean"
    c.task.name = "sst2"
    c.task.format = "classification"
    c.task.max_length = 64
    c.task.max_train_examples = 4000
    c.peft.methods = "lora"
    c.peft.lora.rank = 8
    c.peft.lora.alpha = 16.0
    c.optim.lr = 1e-3
    c.optim.head_lr = 1e-3
    c.train.steps = 250
    c.train.batch_size = 16
    c.train.eval_every = 0
    c.train.buckets = (32, 64)
    return c
