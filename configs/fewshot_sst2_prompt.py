"""LM-BFF prompt-based fine-tuning (LoRA, SmolLM2-135M) on SST-2 16-shot, one seed.

The same config ``peft-jax fewshot --method prompt`` builds for each seed; arg = seed
(``peft-jax train --config configs/fewshot_sst2_prompt.py:42``).
"""

from peft_jax.fewshot.cli import method_config


def get_config(arg=None):
    seed = int(arg) if arg else 42
    return method_config("prompt", "lmbff/sst2", seed, "smollm2", steps=8, eval_examples=100,
                         workdir="runs/fewshot", lr=1e-3)
