"""SPoT: soft prompt transfer (Vu et al. 2022).

- :mod:`library`: a folder of exported prompts with metadata (add / list / inspect / load).
- :mod:`similarity`: prompts as task embeddings; ``rank(target, library)``.
- :mod:`init`: ``transfer_prompt(delta, source)`` puts a source prompt into a target delta.
- :mod:`retrieval`: how well ranked sources transfer (top-k vs random init, rank correlation).
- :mod:`cli`: ``spot_main(argv)`` for ``peft-jax spot ...``.

Importing this package does not import JAX.
"""

from peft_jax.transfer.init import fit_length, load_source, prompt_paths, transfer_prompt
from peft_jax.transfer.library import LibraryError, PromptLibrary, PromptMeta, add_from_run
from peft_jax.transfer.retrieval import evaluate_retrieval, gains_from_scores, read_gains_csv
from peft_jax.transfer.similarity import mean_cosine, rank, similarity_matrix, token_cosine

__all__ = [
    "LibraryError", "PromptLibrary", "PromptMeta", "add_from_run", "evaluate_retrieval",
    "fit_length", "gains_from_scores", "load_source", "mean_cosine", "prompt_paths", "rank",
    "read_gains_csv", "similarity_matrix", "token_cosine", "transfer_prompt",
]
