"""SPoT transfer initialization: put a source task's prompt into a target delta.

One prompt path serves every way a prompt enters a delta: :func:`peft_jax.peft.prompt.place_prompt`
(bit-exact, sharding and boxes kept; lengths fitted by ``exact`` | ``truncate`` | ``tile``).
The runner reaches it through ``config.peft.prompt.init=file``; here it takes a source from a
``.npy`` file or a :class:`~peft_jax.transfer.library.PromptLibrary` entry.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import numpy as np

from peft_jax.peft import tree
from peft_jax.peft.prompt import fit_length, place_prompt
from peft_jax.transfer.library import LibraryError, PromptLibrary

__all__ = ["fit_length", "load_source", "prompt_paths", "transfer_prompt"]


def prompt_paths(delta: Mapping[str, Any]) -> list[str]:
    """'/'-joined paths of every ``prompt`` leaf of a delta."""
    return [p for p in tree.flatten(delta) if tree.leaf_name(p) == "prompt"]


def transfer_prompt(delta: Mapping[str, Any], source: Any, *, path: Optional[str] = None,
                    mode: str = "exact", cast: bool = False) -> dict:
    """``delta`` with its ``prompt`` leaf replaced by ``source`` ``[Ps, d]``
    (:func:`~peft_jax.peft.prompt.place_prompt`)."""
    return place_prompt(delta, source, path=path, mode=mode, cast=cast)


def load_source(spec: str, library: Optional[Union[str, PromptLibrary]] = None) -> np.ndarray:
    """A source prompt from a ``.npy`` file path or, with ``library``, an entry name."""
    if library is not None and not spec.endswith(".npy"):
        lib = library if isinstance(library, PromptLibrary) else PromptLibrary(library)
        return lib.load(spec)
    if not os.path.isfile(spec):
        raise LibraryError(f"source prompt file {spec!r} not found"
                           + ("" if library else " (to use a library entry, pass library=)"))
    return np.load(spec, allow_pickle=False)
