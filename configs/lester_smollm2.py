"""Lester et al.'s prompt-length x initialization ablation, on SmolLM2-135M and SST-2.

Pure prompt tuning: ``task.format=verbalizer`` scores the label words (terrible / great) of
the task's template ``"{sentence} It was {mask}."`` at the next-token position of the
frozen causal LM, so only the prompt trains (no head). Lester et al.'s optimizer: Adafactor,
constant lr 0.3, decay rate 0.8, weight decay 1e-5, no parameter scaling; uniform init in
[-0.5, 0.5]; sampled vocab from the 5,000 most frequent ids (ranked on the training texts:
SmolLM2's BPE ids are not frequency-ordered); class labels = the label words' embeddings.

Budget (2 CPU cores shared with other jobs): 2,000 SST-2 training sentences, batch 8,
250 steps (2,000 examples seen, one epoch), dev accuracy on a fixed 300-sentence subset of
the GLUE dev set before training and every 50 steps (so the last 20% of the steps is the last
eval interval: the convergence check compares the evals at steps 200 and 250).

The arg picks the method at the same budget:

- ``prompt`` (default): the grid lengths {1, 5, 20, 100} x inits {uniform, sampled_vocab,
  class_labels} (class_labels needs length >= 2 classes: length 1 x class_labels is reported
  as an invalid cell);
- ``lora``: LoRA r=8 on q/v (AdamW lr 2e-3);
- ``full``: every base weight (AdamW lr 2e-5).

Run (resumable; prints the tables): ``python benchmarks/lester_ablation.py``, or
``peft-jax sweep --config configs/lester_smollm2.py --seeds 0,1,2 --workdir runs/lester``.
"""

from peft_jax.defaults import base_config

LENGTHS = (1, 5, 20, 100)
INITS = ("uniform", "sampled_vocab", "class_labels")


def get_config(arg=None):
    method = arg or "prompt"
    c = base_config()
    c.name = f"lester_smollm2_{method}"
    c.workdir = f"runs/lester/{method}"
    c.model.name = "smollm2"
    c.task.name = "sst2"
    c.task.format = "verbalizer"
    c.task.train_split = "train"
    c.task.eval_split = "dev"
    c.task.max_length = 64
    c.task.max_train_examples = 2000
    c.task.max_eval_examples = 300
    c.train.steps = 250
    c.train.batch_size = 8
    c.train.eval_every = 50
    c.train.log_every = 10
    c.train.eval_batch_size = 50
    c.train.buckets = (32, 64)
    c.train.baseline = True
    c.train.progress = False
    c.peft.methods = method
    if method == "prompt":
        c.peft.prompt.length = 20
        c.peft.prompt.init = "class_labels"
        c.optim.optimizer = "adafactor"
        c.optim.lr = 0.3
        c.optim.prompt_lr = 0.3
        c.optim.weight_decay = 1e-5
        c.optim.clip_norm = 0.0
        c.sweep = {"peft": {"prompt": {"length": list(LENGTHS), "init": list(INITS)}}}
    elif method == "lora":
        c.peft.lora.rank = 8
        c.peft.lora.alpha = 16.0
        c.peft.lora.targets = r".*/(query|value)$"
        c.optim.lr = 2e-3
    elif method == "full":
        c.optim.lr = 2e-5
    else:
        raise ValueError(f"configs/lester_smollm2.py: method {method!r} is not prompt|lora|full")
    return c
