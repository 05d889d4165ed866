"""``peft-jax spot run`` on all-MiniLM-L6-v2 at a 2-core-CPU budget (prompt length 20 + a
linear head on mean-pooled states: the classification format, so the head trains with the
prompt; batch 16, max length 48, AdamW lr 1e-2, 100 evaluation examples).

    peft-jax spot run --config configs/spot_pipeline_minilm.py --workdir runs/spot_minilm \\
        --sources sst2,trec,cola --targets lmbff/cr,lmbff/mpqa \\
        --splits trec=train:test --splits lmbff/cr=train-13:test --splits lmbff/mpqa=train-13:test \\
        --source-steps 40 --embed-steps 5 --transfer-steps 20
"""

from peft_jax.defaults import base_config


def get_config(arg=None):
    c = base_config()
    c.name = "spot_minilm"
    c.workdir = "runs/spot_minilm"
    c.model.name = "minilm"
    c.model.pooling = "mean"
    c.task.name = "sst2"
    c.task.format = "classification"
    c.task.max_length = 48
    c.task.max_train_examples = 512
    c.task.max_eval_examples = 100
    c.peft.methods = "prompt"
    c.peft.prompt.length = 20
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
