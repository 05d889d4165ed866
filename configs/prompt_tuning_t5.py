"""Prompt tuning as Lester et al. (2021) define it: T5 1.1 LM-adapted, only the prompt trains.

The recipe of "The Power of Scale for Parameter-Efficient Prompt Tuning" (Section 3) and its
reference code (google-research/prompt-tuning): a frozen T5 1.1 LM-adapted checkpoint; a
soft prompt of 100 tokens prepended to the encoder input, initialized from the class labels'
embeddings (row i = mean embedding of label i's sub-tokens, the rest sampled from the 5,000
most frequent ids); every task cast as text-to-text (T5's "sst2 sentence: ..." input, the
class name as the target) and trained with T5's token cross-entropy on the target; Adafactor,
learning rate 0.3 constant, weight decay 1e-5, second-moment decay rate 0.8, no parameter
scaling (peft_jax.peft.optim.GroupConfig.lester); batch size 32 for 30,000 steps, the
checkpoint selected by early stopping on the development set. No head: the frozen model's
decoder produces the label (evaluated here both by generation + exact match and by rank
classification of the class names).

Run (a local folder of a T5 checkpoint in safetensors, e.g. google/t5-base-lm-adapt; a
folder with only pytorch_model.bin is refused with the command that converts it, and a
SentencePiece-only tokenizer, spiece.model, loads without the sentencepiece package)::

    peft-jax train --config configs/prompt_tuning_t5.py --config.model.name=/path/to/t5-base-lm-adapt
    peft-jax train --config configs/prompt_tuning_t5.py:rte --config.model.name=/path/to/t5-base-lm-adapt
    peft-jax eval  --config configs/prompt_tuning_t5.py --config.model.name=/path/... --workdir runs/prompt_tuning_t5_sst2
    peft-jax export --config configs/prompt_tuning_t5.py --config.model.name=/path/... --format hf-peft --out prompt_hf

The config argument names the task (default sst2; any registered classification task).

What the paper reports (see /work/shared/REFERENCES.md): with T5 1.1 LM-adapted, prompt
tuning closes the gap to full model tuning as the model grows and matches it on SuperGLUE
at XXL (11B); prompts of >= 20 tokens give a large gain and little is gained past 100;
class-label initialization is the best initializer (the gap vanishing at the largest
sizes); LM adaptation of T5 1.1 matters. The released prompts (T5 1.1 LM-adapted Base,
P=100, class-label init) score on the validation sets: SST-2 95.07 accuracy, MRPC 89.7 F1 /
85.3 accuracy, RTE 68.6 accuracy. On this CPU-only machine no T5 weights are installed;
the tests run this recipe end to end on a tiny random T5 folder instead.
"""

from peft_jax.data import get_task
from peft_jax.defaults import base_config


def get_config(arg=None):
    task = arg or "sst2"
    splits = get_task(task).splits
    c = base_config()
    c.name = f"prompt_tuning_t5_{task}"
    c.workdir = f"runs/prompt_tuning_t5_{task}"
    c.model.name = "t5-base-lm-adapt"      # a local folder: --config.model.name=/path
    c.task.name = task
    c.task.format = "text_to_text"          # T5's task format -> the class name
    c.task.template = ""
    c.task.eval_mode = "both"               # generation + exact match, and rank classification
    c.task.train_split = "train"
    c.task.eval_split = next(s for s in ("dev", "validation", "test") if s in splits)
    c.task.max_length = 512
    c.train.buckets = (64, 128, 256, 512)
    c.peft.methods = "prompt"               # only the prompt trains: no head
    c.peft.prompt.length = 100
    c.peft.prompt.init = "class_labels"
    c.peft.prompt.placement = "prefix"      # on the encoder input
    c.peft.prompt.top_k = 5000
    c.peft.prompt.ranking = "auto"          # SentencePiece ids are frequency-ordered
    c.optim.optimizer = "adafactor"         # decay rate 0.8, no parameter scaling
    c.optim.lr = 0.3
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 1e-5
    c.optim.clip_norm = 0.0                 # Adafactor clips its own updates (threshold 1.0)
    c.train.steps = 30000
    c.train.batch_size = 32
    c.train.eval_every = 1000
    c.train.ckpt_every = 1000
    c.train.best_metric = "accuracy"        # early stopping on the dev set
    c.train.eval_batch_size = 64
    return c
