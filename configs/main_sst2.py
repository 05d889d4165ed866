"""The main job: LoRA on SmolLM2-135M-Instruct, prompt-based (LM-BFF style) on SST-2 16-shot.

Template "{sentence} It was {mask}." with label words great / terrible, scored as the next
token of the causal LM. Trains on the LM-BFF 16-shot split (seed 42: 32 examples) and
evaluates the untrained (zero-shot) and trained delta on the 872 SST-2 validation sentences
(LM-BFF's SST-2 test file).

Run:   bash launch/main.sh       (or: peft-jax train --config configs/main_sst2.py)
Other models/methods: --config.peft.methods=prompt --config.peft.prompt.length=20
Where ../shared/data is absent: PEFT_JAX_DATA=/path/to/data, or files of your own with
--config.task.name=file --config.task.file.train=train.tsv --config.task.file.test=dev.tsv
--config.task.file.label_names=negative,positive --config.task.template="{text} It was {mask}."
--config.task.label_words=terrible,great --config.task.train_split=train
"""

from peft_jax.defaults import base_config


def get_config(arg=None):
    c = base_config()
    c.name = "main_sst2_smollm2_lora"
    c.workdir = "runs/main_sst2"
    c.seed = 42
    c.model.name = "smollm2"
    # one layer traced and compiled, a loop over the 30 (same model, stacked weights): a
    # second launch ends its first step ~9 s after launch instead of ~18 s unrolled
    # (benchmarks/first_step.py); --config.model.scan_layers=False unrolls the layers
    c.model.scan_layers = True
    c.task.name = "lmbff/sst2"
    c.task.format = "verbalizer"
    c.task.train_split = "train-42"
    c.task.eval_split = "test"
    c.task.max_length = 64
    c.peft.methods = "lora"
    c.peft.lora.rank = 8
    c.peft.lora.alpha = 16.0
    c.peft.lora.targets = r".*/(query|value)$"
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 2
    c.train.steps = 24
    c.train.batch_size = 8
    c.train.log_every = 4
    c.train.eval_batch_size = 32
    c.train.buckets = (32, 64)
    c.train.resume = False     # the main job trains from scratch each time: a previous run in
    c.train.overwrite = True   # its workdir moves to <workdir>/replaced-<time>/ (never deleted)
    return c
