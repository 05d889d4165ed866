"""PEFT methods as slot implementations (see ``peft_jax.models.slots``).

Methods: :class:`PromptTuning`, :class:`PrefixTuning`, :class:`LoRA`, :class:`Adapter`,
:class:`IA3`; :func:`init_delta` builds a delta for a model made with
``slots=Slots((method, ...))``; ``merge`` folds LoRA / IA3 into the base; ``mixed`` runs
mixed-task batches.
"""

from peft_jax.peft.adapters import Adapter
from peft_jax.peft.ia3 import IA3
from peft_jax.peft.init_delta import dense_paths, init_delta
from peft_jax.peft.lora import LoRA
from peft_jax.peft.merge import merge_ia3, merge_lora, strip_leaves, unmerge_lora
from peft_jax.peft.mixed import apply_mixed, stack_deltas
from peft_jax.peft.prefix import PrefixTuning, materialize
from peft_jax.peft.prompt import PromptTuning, set_prompt

__all__ = ["Adapter", "IA3", "LoRA", "PrefixTuning", "PromptTuning", "apply_mixed",
           "dense_paths", "init_delta", "materialize", "merge_ia3", "merge_lora", "set_prompt",
           "stack_deltas", "strip_leaves", "unmerge_lora"]
