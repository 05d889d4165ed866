"""LM-BFF prompt-based fine-tuning (LoRA, SmolLM2-135M) on SST-2 16-shot, one seed.

The config ``peft-jax fewshot --method prompt`` builds for each seed (dev-selected step,
fixed 200-example test subset); arg = seed:
``peft-jax train --config configs/fewshot_sst2_prompt.py:42``.
"""

from peft_jax.fewshot.methods import Budget, method_config


def get_config(arg=None):
    seed = int(arg) if arg else 42
    return method_config("prompt", "lmbff/sst2", seed, "smollm2", Budget(), workdir="runs/fewshot")
