"""Prompt-tuning ablation: prompt length x init x seed, all-MiniLM-L6-v2 + linear head, SST-2.

Run: launch/run_ablation.sh   (peft-jax sweep --config configs/ablation_prompt.py ...)
Grid: lengths {2, 5, 20} (class_labels needs length >= number of classes = 2) x inits {uniform, sampled_vocab, class_labels} x seeds {0, 1, 2}
= 27 runs; 512 SST-2 train examples (160 seen: 20 steps x batch 8), 100 dev examples, max_length 32, adamw (prompt lr 1e-2).
"""

from peft_jax.defaults import base_config


def get_config(arg=None):
    c = base_config()
    c.name = "ablation_prompt"
    c.workdir = "runs/ablation_prompt"
    c.model.name = "minilm"
    c.model.pooling = "mean"
    c.task.name = "sst2"
    c.task.format = "classification"
    c.task.max_length = 32
    c.task.max_train_examples = 512
    c.task.max_eval_examples = 100
    c.peft.methods = "prompt"
    c.peft.prompt.length = 5
    c.peft.prompt.init = "uniform"
    c.optim.optimizer = "adamw"
    c.optim.lr = 1e-2
    c.optim.head_lr = 1e-2
    c.optim.prompt_lr = 1e-2
    c.train.steps = 20
    c.train.batch_size = 8
    c.train.eval_every = 0
    c.train.log_every = 10
    c.train.buckets = (32,)
    c.train.progress = False
    # seed-major order (all 9 cells of seed 0 first), so a partial sweep still fills the table
    c.sweep = [{"seed": seed, "peft.prompt.length": [2, 5, 20],
                "peft.prompt.init": ["uniform", "sampled_vocab", "class_labels"]} for seed in (0, 1, 2)]
    return c
