"""PEFT methods as slot implementations (see ``peft_jax.models.slots``), one class each.

Every method is a :class:`~peft_jax.peft.method.PeftMethod` registered under its name
(``config.peft.methods``); the import list below is the registration. :func:`init_delta`
builds a delta for a model made with ``slots=Slots((method, ...))``; ``merge`` folds
mergeable methods into the base; ``mixed`` runs mixed-task batches.
"""

# The registered methods (importing a module registers its class).
from peft_jax.peft.adapters import Adapter
from peft_jax.peft.base_rules import BitFit, FullFinetuning
from peft_jax.peft.dora import DoRA
from peft_jax.peft.heads import Head
from peft_jax.peft.ia3 import IA3
from peft_jax.peft.lora import LoRA
from peft_jax.peft.prefix import PrefixTuning, materialize
from peft_jax.peft.prompt import PromptTuning, set_prompt
from peft_jax.peft.vera import VeRA

from peft_jax.peft.init_delta import dense_paths, init_delta
from peft_jax.peft.merge import merge, strip_leaves, unmerge
from peft_jax.peft.method import REGISTRY, PeftMethod, method_class
from peft_jax.peft.mixed import apply_mixed, stack_deltas

__all__ = ["Adapter", "BitFit", "FullFinetuning", "Head", "IA3", "LoRA", "PeftMethod",
           "PrefixTuning", "PromptTuning", "REGISTRY", "apply_mixed", "dense_paths",
           "init_delta", "materialize", "merge", "method_class", "set_prompt", "stack_deltas",
           "strip_leaves", "unmerge"]
