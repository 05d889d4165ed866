"""Prompts as task embeddings (SPoT, Vu et al. 2022): similarity and ranking of sources.

A prompt is an array ``[P, d]`` (P soft tokens of width d). Two task similarities:

- ``mean_cosine``: cosine of the averaged prompt tokens,
  ``cos(mean_i a_i, mean_j b_j)``.
- ``token_cosine``: average over all token pairs of per-token cosines,
  ``1/(P_a P_b) sum_i sum_j cos(a_i, b_j)``.

Both accept prompts of different lengths (same width d). Pure numpy, float64 internally.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

import numpy as np

_EPS = 1e-12


def _as_prompt(x, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{what}: a prompt must be [length, d_model], got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{what}: prompt has length 0")
    return a


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm ([n, d] -> [n, d]); zero rows stay zero."""
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, _EPS)


def _check_width(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{what}: prompts have different widths d_model {a.shape[1]} vs "
                         f"{b.shape[1]} (prompts from different base models cannot be compared)")


def mean_cosine(a, b) -> float:
    """Cosine similarity of the averaged prompt tokens: [Pa, d], [Pb, d] -> scalar."""
    a, b = _as_prompt(a, "a"), _as_prompt(b, "b")
    _check_width(a, b, "mean_cosine")
    u, v = _unit(a.mean(0)[None])[0], _unit(b.mean(0)[None])[0]
    return float(u @ v)


def token_cosine(a, b) -> float:
    """Average over token pairs of per-token cosine similarity: [Pa, d], [Pb, d] -> scalar."""
    a, b = _as_prompt(a, "a"), _as_prompt(b, "b")
    _check_width(a, b, "token_cosine")
    return float((_unit(a) @ _unit(b).T).mean())


SIMILARITIES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "mean_cosine": mean_cosine,
    "token_cosine": token_cosine,
}


def get_similarity(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    if name not in SIMILARITIES:
        raise ValueError(f"unknown similarity {name!r}; choose one of {sorted(SIMILARITIES)}")
    return SIMILARITIES[name]


def rank(target_prompt, library: Union[Mapping[str, np.ndarray], "PromptLibrary"],  # noqa: F821
         method: str = "mean_cosine", exclude: tuple[str, ...] = (),
         base_hash: Optional[str] = None) -> list[tuple[str, float]]:
    """Rank library prompts by similarity to ``target_prompt`` [P, d], best first.

    ``library``: a mapping name -> prompt [P_s, d] or a :class:`PromptLibrary` (then
    ``base_hash``, if given, keeps only prompts trained on that base model). ``exclude``:
    names to leave out (e.g. the target task's own prompt). Ties are broken by name so the
    order is deterministic. Returns ``[(source_name, score), ...]`` sorted by score desc.
    """
    sim = get_similarity(method)
    target = _as_prompt(target_prompt, "target prompt")
    if hasattr(library, "load_all"):
        prompts = library.load_all(base_hash=base_hash)
    else:
        if base_hash is not None:
            raise ValueError("base_hash filtering needs a PromptLibrary (a plain mapping has no metadata)")
        prompts = dict(library)
    scored = []
    for name in sorted(prompts):
        if name in exclude:
            continue
        src = _as_prompt(prompts[name], f"library prompt {name!r}")
        if src.shape[1] != target.shape[1]:
            raise ValueError(f"library prompt {name!r} has width d_model={src.shape[1]} but the target "
                             f"has {target.shape[1]}; --base-hash (base_hash= in Python) keeps one base "
                             "model's prompts")
        scored.append((name, sim(target, src)))
    scored.sort(key=lambda t: (-t[1], t[0]))
    return scored


def similarity_matrix(prompts: Mapping[str, np.ndarray], method: str = "mean_cosine"
                      ) -> tuple[list[str], np.ndarray]:
    """All-pairs similarity: names (sorted) and a [n, n] matrix."""
    sim = get_similarity(method)
    names = sorted(prompts)
    arrs = [_as_prompt(prompts[n], n) for n in names]
    m = np.array([[sim(a, b) for b in arrs] for a in arrs], dtype=np.float64)
    return names, m
